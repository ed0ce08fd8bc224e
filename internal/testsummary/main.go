// Command testsummary runs `go test -json` (or reads its output on stdin)
// and prints what a person reading a CI log needs: one line per package with
// its counts, the full output of every failed test as it fails, every
// skipped test with its reason, and a last line
//
//	N passed, N failed, N skipped
//
// so that a machine without QEMU, whose real-VM tests skip, cannot pass
// without saying so. Its exit code is non-zero when a test or a package
// failed or the command itself did.
//
// Usage:
//
//	go run ./internal/testsummary go test -json -race ./...
//	go test -json ./... | go run ./internal/testsummary
package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"os/exec"
	"slices"
	"strings"
	"time"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdin, os.Stdout, os.Stderr))
}

func run(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		if summarize(stdin, stdout).failed() {
			return 1
		}
		return 0
	}
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Stdin, cmd.Stderr = stdin, stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		fmt.Fprintf(stderr, "testsummary: %v\n", err)
		return 1
	}
	if err := cmd.Start(); err != nil {
		fmt.Fprintf(stderr, "testsummary: start %s: %v\n", strings.Join(args, " "), err)
		return 1
	}
	s := summarize(out, stdout)
	err = cmd.Wait()
	if err != nil {
		var exit *exec.ExitError
		if !errors.As(err, &exit) || !s.failed() {
			// A failure no test event explains (the command could not run,
			// was killed, or go test failed before testing).
			fmt.Fprintf(stderr, "testsummary: %s: %v\n", strings.Join(args, " "), err)
		}
		return 1
	}
	if s.failed() {
		return 1
	}
	return 0
}

// event is one line of `go test -json` (cmd/test2json).
type event struct {
	Action      string
	Package     string
	Test        string
	Output      string
	Elapsed     float64
	ImportPath  string // build-output and build-fail
	FailedBuild string
}

// counts are one package's or the run's test results.
type counts struct{ passed, failed, skipped int }

func (c counts) String() string {
	return fmt.Sprintf("%d passed, %d failed, %d skipped", c.passed, c.failed, c.skipped)
}

type test struct {
	pkg, name string
	output    []string
}

type skip struct {
	pkg, name, reason string
}

// summary accumulates a run while printing as it goes.
type summary struct {
	w       io.Writer
	total   counts
	pkgs    map[string]*counts
	running map[string]*test    // package + "\x00" + test name
	pkgOut  map[string][]string // output outside any test, by package
	build   map[string][]string // build output by import path
	skips   []skip
	fails   []string // "pkg Test"
}

func summarize(r io.Reader, w io.Writer) *summary {
	s := &summary{w: w, pkgs: map[string]*counts{}, running: map[string]*test{},
		pkgOut: map[string][]string{}, build: map[string][]string{}}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 16<<20)
	for sc.Scan() {
		var e event
		line := sc.Bytes()
		if len(line) == 0 || line[0] != '{' || json.Unmarshal(line, &e) != nil {
			// Not an event (go test printed it itself): pass it through.
			fmt.Fprintf(w, "%s\n", line)
			continue
		}
		s.handle(e)
	}
	if err := sc.Err(); err != nil {
		fmt.Fprintf(w, "testsummary: reading test events: %v\n", err)
		s.total.failed++
	}
	s.finish()
	return s
}

func (s *summary) failed() bool { return s.total.failed > 0 }

func (s *summary) pkg(name string) *counts {
	c := s.pkgs[name]
	if c == nil {
		c = &counts{}
		s.pkgs[name] = c
	}
	return c
}

func key(pkg, name string) string { return pkg + "\x00" + name }

func (s *summary) handle(e event) {
	switch e.Action {
	case "build-output":
		s.build[e.ImportPath] = append(s.build[e.ImportPath], e.Output)
		return
	case "build-fail":
		return // reported with the package's fail event
	}
	if e.Test == "" {
		s.handlePackage(e)
		return
	}
	k := key(e.Package, e.Test)
	t := s.running[k]
	if t == nil {
		t = &test{pkg: e.Package, name: e.Test}
		s.running[k] = t
	}
	switch e.Action {
	case "output":
		t.output = append(t.output, e.Output)
	case "pass":
		delete(s.running, k)
		s.pkg(e.Package).passed++
		s.total.passed++
	case "skip":
		delete(s.running, k)
		s.pkg(e.Package).skipped++
		s.total.skipped++
		s.skips = append(s.skips, skip{pkg: e.Package, name: e.Test, reason: skipReason(t.output)})
	case "fail":
		delete(s.running, k)
		s.failTest(t)
	}
}

func (s *summary) failTest(t *test) {
	s.pkg(t.pkg).failed++
	s.total.failed++
	s.fails = append(s.fails, t.pkg+" "+t.name)
	fmt.Fprintf(s.w, "=== FAIL %s %s\n%s", t.pkg, t.name, strings.Join(t.output, ""))
}

func (s *summary) handlePackage(e event) {
	switch e.Action {
	case "output":
		s.pkgOut[e.Package] = append(s.pkgOut[e.Package], e.Output)
	case "pass":
		c := s.pkg(e.Package)
		fmt.Fprintf(s.w, "ok    %-50s %s  %s\n", e.Package, c, elapsed(e.Elapsed))
	case "skip":
		// A package without test files.
		fmt.Fprintf(s.w, "?     %-50s no test files\n", e.Package)
	case "fail":
		c := s.pkg(e.Package)
		// Tests still running when the package failed (a timeout, a crash
		// in another goroutine, os.Exit) failed with it.
		unfinished := false
		for _, k := range slices.Sorted(maps.Keys(s.running)) {
			if t := s.running[k]; t.pkg == e.Package {
				delete(s.running, k)
				s.failTest(t)
				unfinished = true
			}
		}
		if e.FailedBuild != "" {
			fmt.Fprintf(s.w, "=== BUILD FAILED %s\n%s", e.FailedBuild, strings.Join(s.build[e.FailedBuild], ""))
		}
		if c.failed == 0 && !unfinished {
			// Failed outside any test (build, TestMain, init): that counts
			// as a failure too, with the package's own output as the reason.
			c.failed++
			s.total.failed++
			s.fails = append(s.fails, e.Package+" (package)")
			fmt.Fprintf(s.w, "=== FAIL %s\n%s", e.Package, strings.Join(s.pkgOut[e.Package], ""))
		}
		fmt.Fprintf(s.w, "FAIL  %-50s %s  %s\n", e.Package, c, elapsed(e.Elapsed))
	}
}

// finish reports tests whose package never ended (the stream was cut) as
// failed, then every skip with its reason, then the totals.
func (s *summary) finish() {
	for _, k := range slices.Sorted(maps.Keys(s.running)) {
		s.failTest(s.running[k])
		delete(s.running, k)
	}
	if len(s.skips) > 0 {
		fmt.Fprintf(s.w, "\nskipped tests (%d):\n", len(s.skips))
		for _, sk := range s.skips {
			fmt.Fprintf(s.w, "  SKIP %s %s: %s\n", sk.pkg, sk.name, sk.reason)
		}
	}
	if len(s.fails) > 0 {
		fmt.Fprintf(s.w, "\nfailed tests (%d):\n", len(s.fails))
		for _, f := range s.fails {
			fmt.Fprintf(s.w, "  FAIL %s\n", f)
		}
	}
	fmt.Fprintf(s.w, "\n%s\n", s.total)
}

// skipReason is what a skipped test logged, without the framing lines go
// test adds around it.
func skipReason(output []string) string {
	var parts []string
	for _, line := range output {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "=== ") || strings.HasPrefix(line, "--- SKIP") {
			continue
		}
		parts = append(parts, line)
	}
	if len(parts) == 0 {
		return "(no reason given)"
	}
	return strings.Join(parts, " ")
}

func elapsed(secs float64) string {
	return (time.Duration(secs * float64(time.Second))).Round(10 * time.Millisecond).String()
}
