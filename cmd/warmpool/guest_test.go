package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/warmpool/warmpool/api/apitest"
)

// The fake backend serves a real guest agent in this process, so these
// commands run on this host and its paths are this host's.
func TestGuestExecStdinDetachLogsKill(t *testing.T) {
	state := startDaemon(t, apitest.New())
	s := "--state=" + state
	id := strings.TrimSpace(cli(t, "", s, "acquire", "web", "-q").stdout)

	in := strings.Repeat("a line of stdin\n", 200_000) // 3.2 MB: beyond the old 512 KiB
	sum := sha256.Sum256([]byte(in))
	r := cli(t, in, s, "exec", "-i", id, "--", "sha256sum")
	if r.code != 0 || !strings.HasPrefix(r.stdout, hex.EncodeToString(sum[:])) {
		t.Fatalf("exec -i sha256sum: %+v", r)
	}
	r = cli(t, "", s, "exec", id, "--", "sh", "-c", "kill -INT $$")
	if r.code != 130 {
		t.Errorf("a command killed by SIGINT exits %d, want 130 (%+v)", r.code, r)
	}
	r = cli(t, "", s, "exec", id, "--", "no-such-command-here")
	if r.code != 127 || !strings.Contains(r.stderr, "no-such-command-here") {
		t.Errorf("exec of a missing command: %+v, want 127 and the reason", r)
	}

	r = cli(t, "", s, "exec", "--detach", id, "--", "sh", "-c", "echo started; while :; do sleep 0.05; done")
	if r.code != 0 || !regexp.MustCompile(`^\d+\n$`).MatchString(r.stdout) {
		t.Fatalf("exec --detach: %+v", r)
	}
	pid := strings.TrimSpace(r.stdout)
	r = cli(t, "", s, "ps", id)
	if r.code != 0 || !strings.Contains(r.stdout, pid) || !strings.Contains(r.stdout, "running (detached)") {
		t.Errorf("ps: %+v", r)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		r = cli(t, "", s, "logs", id, pid)
		if r.stdout == "started\n" || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if r.code != 0 || r.stdout != "started\n" {
		t.Errorf("logs: %+v", r)
	}
	follow := make(chan result, 1)
	go func() { follow <- cli(t, "", s, "logs", "-f", id, pid) }()
	time.Sleep(200 * time.Millisecond)
	if r := cli(t, "", s, "kill", id, pid, "--signal", "KILL"); r.code != 0 {
		t.Fatalf("kill: %+v", r)
	}
	select {
	case r := <-follow:
		if r.code != 137 || r.stdout != "started\n" {
			t.Errorf("logs -f of a killed process: %+v, want its output and 137", r)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("logs -f did not end when the process was killed")
	}
	if r := cli(t, "", s, "wait", id, pid); r.code != 137 {
		t.Errorf("wait: %+v", r)
	}
	assertFailure(t, cli(t, "", s, "kill", id, "1"), exitFailure, "no process 1")
	assertFailure(t, cli(t, "", s, "logs", "lease-999", "5"), exitFailure, "lease-999")
	assertFailure(t, cli(t, "", s, "kill", id, "x"), exitUsage, "PID")
}

func TestGuestCp(t *testing.T) {
	state := startDaemon(t, apitest.New())
	s := "--state=" + state
	id := strings.TrimSpace(cli(t, "", s, "acquire", "web", "-q").stdout)
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	must(t, os.MkdirAll(filepath.Join(src, "sub"), 0o750))
	must(t, os.WriteFile(filepath.Join(src, "sub", "run.sh"), []byte("#!/bin/sh\necho hi\n"), 0o755))
	must(t, os.WriteFile(filepath.Join(src, "data"), bytes.Repeat([]byte("x"), 1<<20), 0o600))
	must(t, os.Symlink("sub/run.sh", filepath.Join(src, "link")))
	old := time.Date(2021, 5, 6, 7, 8, 9, 0, time.UTC)
	must(t, os.Chtimes(filepath.Join(src, "data"), old, old))
	guest := filepath.Join(dir, "guest") // the "guest" path, on this host

	if r := cli(t, "", s, "cp", src, id+":"+guest); r.code != 0 {
		t.Fatalf("cp dir in: %+v", r)
	}
	back := filepath.Join(dir, "back")
	if r := cli(t, "", s, "cp", id+":"+guest, back); r.code != 0 {
		t.Fatalf("cp dir out: %+v", r)
	}
	for _, tree := range []string{guest, back} {
		if fi, err := os.Stat(filepath.Join(tree, "sub", "run.sh")); err != nil || fi.Mode().Perm() != 0o755 {
			t.Errorf("%s/sub/run.sh: %v %v", tree, fi, err)
		}
		if fi, err := os.Stat(filepath.Join(tree, "data")); err != nil || fi.Mode().Perm() != 0o600 || !fi.ModTime().Equal(old) || fi.Size() != 1<<20 {
			t.Errorf("%s/data: %v %v", tree, fi, err)
		}
		if l, err := os.Readlink(filepath.Join(tree, "link")); err != nil || l != "sub/run.sh" {
			t.Errorf("%s/link: %q %v", tree, l, err)
		}
		if fi, err := os.Stat(filepath.Join(tree, "sub")); err != nil || fi.Mode().Perm() != 0o750 {
			t.Errorf("%s/sub: %v %v", tree, fi, err)
		}
	}
	// Onto an existing directory the tree lands inside it.
	if r := cli(t, "", s, "cp", src, id+":"+guest); r.code != 0 {
		t.Fatalf("cp dir into a dir: %+v", r)
	}
	if _, err := os.Stat(filepath.Join(guest, "src", "data")); err != nil {
		t.Errorf("second copy did not land inside: %v", err)
	}
	// Files, and - for stdin and stdout.
	if r := cli(t, "piped bytes", s, "cp", "-", id+":"+guest+"/piped"); r.code != 0 {
		t.Fatalf("cp - in: %+v", r)
	}
	if r := cli(t, "", s, "cp", id+":"+guest+"/piped", "-"); r.code != 0 || r.stdout != "piped bytes" {
		t.Errorf("cp out -: %+v", r)
	}
	if r := cli(t, "", s, "cp", filepath.Join(src, "data"), id+":"+guest+"/sub"); r.code != 0 {
		t.Fatalf("cp file into a dir: %+v", r)
	}
	if fi, err := os.Stat(filepath.Join(guest, "sub", "data")); err != nil || fi.Size() != 1<<20 {
		t.Errorf("file copied into a dir: %v %v", fi, err)
	}
	assertFailure(t, cli(t, "", s, "cp", id+":"+dir+"/nope", filepath.Join(dir, "x")), exitFailure, "no such file")
	assertFailure(t, cli(t, "", s, "cp", filepath.Join(src, "data"), id+":"+dir+"/missing/dir/f"), exitFailure, "does not exist")
	assertFailure(t, cli(t, "", s, "cp", "lease-999:/x", "-"), exitFailure, "lease-999")
	assertFailure(t, cli(t, "", s, "cp", "a", "b"), exitUsage, "one side in a VM")
	assertFailure(t, cli(t, "", s, "cp", id+":relative", "b"), exitUsage, "absolute")
	if ents, _ := os.ReadDir(filepath.Join(dir)); len(ents) != 3 {
		t.Errorf("a failed copy left something behind: %v", ents)
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// watch prints a change as it happens and ends cleanly when its context
// does (what Ctrl-C does to run's).
func TestGuestWatch(t *testing.T) {
	state := startDaemon(t, apitest.New())
	s := "--state=" + state
	id := strings.TrimSpace(cli(t, "", s, "acquire", "web", "-q").stdout)
	dir := t.TempDir()
	assertFailure(t, cli(t, "", s, "watch", id, dir+"/missing"), exitFailure, dir+"/missing")

	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	var out, errb syncWriter
	done := make(chan int, 1)
	go func() {
		done <- run(ctx, []string{s, "watch", "-r", "-o", "json", id, dir}, strings.NewReader(""), &out, &errb)
	}()
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(errb.String(), "watching "+dir) {
		if time.Now().After(deadline) {
			t.Fatalf("watch did not start: %q", errb.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := os.MkdirAll(dir+"/sub", 0o755); err != nil {
		t.Fatal(err)
	}
	// Once its create is printed, the new directory is watched too.
	for !strings.Contains(out.String(), `{"type":"create","name":"sub","dir":true}`) {
		if time.Now().After(deadline) {
			t.Fatalf("watch printed %q, no create of sub", out.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := os.WriteFile(dir+"/sub/f", []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	for !strings.Contains(out.String(), `{"type":"write","name":"sub/f"}`) {
		if time.Now().After(deadline) {
			t.Fatalf("watch printed %q, no write of sub/f", out.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
	if !strings.HasPrefix(out.String(), `{"type":"create","name":"sub","dir":true}`+"\n") {
		t.Errorf("watch printed %q, want the create of sub first", out.String())
	}
	cancel()
	select {
	case code := <-done:
		if code != 0 {
			t.Errorf("watch ended by its context exits %d (stderr %q), want 0", code, errb.String())
		}
	case <-time.After(10 * time.Second):
		t.Fatal("watch did not end with its context")
	}
}

type syncWriter struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (w *syncWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}

func (w *syncWriter) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.String()
}
