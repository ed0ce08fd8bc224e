package main

import (
	"bytes"
	"os"
	"strings"
	"testing"
)

// testdata/run.jsonl is `go test -json` of a module with a passing, a
// skipped and a failing test with a failing subtest (tj/a), a build failure
// (tj/b), a package without tests (tj/d), a skipped subtest (tj/e) and a
// test that hit -timeout (tj/c).
func TestSummaryCountsSkipsAndFailures(t *testing.T) {
	in, err := os.Open("testdata/run.jsonl")
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	var out, errb bytes.Buffer
	code := run(nil, in, &out, &errb)
	got := out.String()
	if code != 1 {
		t.Errorf("exit code %d for a run with failures, want 1", code)
	}
	lines := strings.Split(strings.TrimRight(got, "\n"), "\n")
	if last := lines[len(lines)-1]; last != "4 passed, 4 failed, 2 skipped" {
		t.Errorf("last line %q, want %q", last, "4 passed, 4 failed, 2 skipped")
	}
	for _, want := range []string{
		// every skip with its reason
		"SKIP tj/a TestSkip: a_test.go:4: SKIPPING: no qemu here",
		"SKIP tj/e TestOK/two: e_test.go:3: needs /dev/kvm",
		// the output of every failure: a failed assertion, a build error,
		// a timeout's panic, with what it is about
		"=== FAIL tj/a TestFail/sub\n=== RUN   TestFail/sub\n    a_test.go:5: boom\n",
		`b/b.go:2:23: cannot use "x" (untyped string constant) as int value`,
		"=== FAIL tj/c TestSlow\n=== RUN   TestSlow\npanic: test timed out after 2s\n",
		// per-package counts
		"FAIL  tj/a ", "1 passed, 2 failed, 1 skipped",
		"FAIL  tj/b ", "FAIL  tj/c ",
		"ok    tj/e ", "2 passed, 0 failed, 1 skipped",
		"?     tj/d ",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("summary lacks %q:\n%s", want, got)
		}
	}
}

func TestSummaryOfAPassingRunExitsZero(t *testing.T) {
	in, err := os.Open("testdata/pass.jsonl")
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	var out bytes.Buffer
	if code := run(nil, in, &out, &out); code != 0 {
		t.Errorf("exit code %d for a passing run, want 0:\n%s", code, out.String())
	}
	if !strings.HasSuffix(out.String(), "\n2 passed, 0 failed, 1 skipped\n") {
		t.Errorf("summary does not end with the totals:\n%s", out.String())
	}
}

// A command that fails without reporting any test (go test could not
// build its list of packages, say) fails the summary too.
func TestCommandFailureWithoutEventsFails(t *testing.T) {
	var out, errb bytes.Buffer
	code := run([]string{"sh", "-c", "echo 'no Go files in /nowhere'; exit 3"}, strings.NewReader(""), &out, &errb)
	if code != 1 {
		t.Errorf("exit code %d, want 1", code)
	}
	if !strings.Contains(out.String(), "no Go files in /nowhere") || !strings.Contains(errb.String(), "exit status 3") {
		t.Errorf("stdout %q, stderr %q: want the command's output and its exit status", out.String(), errb.String())
	}
	if code := run([]string{"sh", "-c", "cat testdata/pass.jsonl"}, strings.NewReader(""), &out, &errb); code != 0 {
		t.Errorf("a passing command's summary exited %d", code)
	}
}
