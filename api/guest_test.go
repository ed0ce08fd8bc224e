package api_test

import (
	"context"
	"errors"
	"net"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/warmpool/warmpool/api"
	"github.com/warmpool/warmpool/api/apitest"
	"github.com/warmpool/warmpool/vm"
)

// leasedClient is a client of an API server on a fake backend and the
// target of a lease it acquired there.
func leasedClient(t *testing.T) (*api.Client, api.Target) {
	t.Helper()
	srv := httptest.NewServer(api.NewServer(api.ServerOptions{Backend: apitest.New()}))
	t.Cleanup(srv.Close)
	c := api.NewClient(srv.URL, "")
	l, err := c.Acquire(t.Context(), "web", 0, api.AcquireRequest{})
	if err != nil {
		t.Fatal(err)
	}
	return c, api.Target{Lease: l.ID}
}

// A process cut short because the daemon shuts down tells the client why,
// over the exec WebSocket as over the legacy exec.
func TestExecStreamSaysShuttingDown(t *testing.T) {
	b := apitest.New()
	srv := httptest.NewUnstartedServer(api.NewServer(api.ServerOptions{Backend: b}))
	reqCtx, cancel := context.WithCancelCause(context.Background())
	srv.Config.BaseContext = func(net.Listener) context.Context { return reqCtx }
	srv.Start()
	defer srv.Close()
	c := api.NewClient(srv.URL, "")
	ctx := t.Context()
	l, err := c.Acquire(ctx, "web", 0, api.AcquireRequest{})
	if err != nil {
		t.Fatal(err)
	}
	started := make(chan int, 1)
	done := make(chan error, 1)
	go func() {
		_, err := c.ExecStream(ctx, api.Target{Lease: l.ID}, api.ProcessRequest{Argv: []string{"sleep", "100"}},
			api.ExecIO{Started: func(pid int) { started <- pid }})
		done <- err
	}()
	<-started
	cancel(api.ErrShuttingDown)
	select {
	case err := <-done:
		var e *api.Error
		if !errors.As(err, &e) || !strings.Contains(err.Error(), "shutting down") {
			t.Errorf("exec cut short by the shutdown: %v, want an error saying so", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("exec did not end when the daemon's requests were cancelled")
	}
}

// Stdin streams, a terminal is resized, a signal reaches the process, and
// the exit code comes back, over the WebSocket.
func TestExecStreamTerminalResizeSignal(t *testing.T) {
	c, tg := leasedClient(t)
	ctx := t.Context()
	resize := make(chan [2]int, 1)
	sigs := make(chan string, 1)
	out := &syncBuf{}
	pr, pw := net.Pipe()
	defer pw.Close()
	done := make(chan api.ExitStatus, 1)
	go func() {
		e, err := c.ExecStream(ctx, tg, api.ProcessRequest{Argv: []string{"sh", "-c", "stty size; read x; stty size; sleep 100"}, TTY: true, Rows: 20, Cols: 70, Stdin: true},
			api.ExecIO{Stdin: pr, Stdout: out, Resize: resize, Signal: sigs})
		if err != nil {
			t.Error(err)
		}
		done <- e
	}()
	waitOut(t, out, "20 70")
	resize <- [2]int{50, 150}
	time.Sleep(200 * time.Millisecond)
	pw.Write([]byte("\n"))
	waitOut(t, out, "50 150")
	sigs <- "TERM"
	select {
	case e := <-done:
		if e.Code != 143 {
			t.Errorf("exit after TERM: %+v, want 143", e)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the signal did not end the process")
	}
}

type syncBuf struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuf) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func waitOut(t *testing.T, s *syncBuf, want string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(s.String(), want) {
		if time.Now().After(deadline) {
			t.Fatalf("output %q never showed %q", s.String(), want)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Attach sees what a detached process writes after it attached, and its exit.
func TestAttachFromNow(t *testing.T) {
	c, tg := leasedClient(t)
	ctx := t.Context()
	pid, err := c.StartProcess(ctx, tg, api.ProcessRequest{Argv: []string{"sh", "-c", "echo before; read x; echo after; exit 4"}, Stdin: true})
	if err != nil {
		t.Fatal(err)
	}
	waitLogs := func(want string) {
		deadline := time.Now().Add(10 * time.Second)
		for {
			var out strings.Builder
			c.Logs(ctx, tg, pid, false, &out, nil)
			if out.String() == want || time.Now().After(deadline) {
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	waitLogs("before\n")
	out := &syncBuf{}
	done := make(chan *int, 1)
	go func() {
		code, err := c.Attach(ctx, tg, pid, out, nil)
		if err != nil {
			t.Error(err)
		}
		done <- code
	}()
	// Nothing tells the client that the attach is in place; it takes
	// milliseconds.
	time.Sleep(500 * time.Millisecond)
	if err := c.WriteStdin(ctx, tg, pid, strings.NewReader("go\n"), true); err != nil {
		t.Fatal(err)
	}
	code := <-done
	if code == nil || *code != 4 || out.String() != "after\n" {
		t.Errorf("attach: %q, exit %v; want only what came after and 4", out.String(), code)
	}
	if _, err := c.Attach(ctx, tg, 999999, nil, nil); status(err) != 404 {
		t.Errorf("attach to an unknown PID: %v", err)
	}
}

func status(err error) int {
	var e *api.Error
	if errors.As(err, &e) {
		return e.Status
	}
	return 0
}

// A watch answers once the directory is watched, reports a file written
// through the API by its name, reports the directory's removal last, and
// refuses a missing directory with a 404.
func TestWatchFiles(t *testing.T) {
	c, target := leasedClient(t)
	ctx := t.Context()
	// The test's guest agent runs in this process: its paths are ours.
	dir := t.TempDir() + "/w"
	if _, err := c.Watch(ctx, target, dir, false); !errors.Is(err, vm.ErrNotFound) {
		t.Fatalf("watch of a missing directory = %v, want not found", err)
	}
	if _, err := c.Mkdir(ctx, target, api.MkdirRequest{Path: dir}); err != nil {
		t.Fatal(err)
	}
	w, err := c.Watch(ctx, target, dir, true)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	if w.Dir.Path != dir || w.Dir.Type != "dir" {
		t.Errorf("watched %+v, want the directory %s", w.Dir, dir)
	}
	if _, err := c.WriteFile(ctx, target, api.WriteFileOptions{Path: dir + "/sub/f.txt", Parents: true}, strings.NewReader("hi")); err != nil {
		t.Fatal(err)
	}
	next := func() api.WatchEvent {
		t.Helper()
		ev, err := w.Next()
		if err != nil {
			t.Fatal(err)
		}
		return ev
	}
	var seen []api.WatchEvent
	for ev := next(); ev != (api.WatchEvent{Type: "create", Name: "sub/f.txt"}); ev = next() {
		seen = append(seen, ev)
	}
	if len(seen) == 0 || seen[0] != (api.WatchEvent{Type: "create", Name: "sub", Dir: true}) {
		t.Errorf("events before the file's create: %+v, want the create of sub first", seen)
	}
	if err := c.Remove(ctx, target, dir, true); err != nil {
		t.Fatal(err)
	}
	for {
		ev, err := w.Next()
		if errors.Is(err, api.ErrWatchEnded) {
			break
		}
		if err != nil {
			t.Fatalf("watch of a removed directory ended with %v, want ErrWatchEnded", err)
		}
		seen = append(seen, ev)
	}
	if last := seen[len(seen)-1]; last != (api.WatchEvent{Type: "remove", Name: ".", Dir: true}) {
		t.Errorf("last event %+v, want the removal of the directory itself", last)
	}
	// A watch the client ends is ended in the guest too.
	if _, err := c.Mkdir(ctx, target, api.MkdirRequest{Path: dir}); err != nil {
		t.Fatal(err)
	}
	cctx, cancel := context.WithCancel(ctx)
	w2, err := c.Watch(cctx, target, dir, false)
	if err != nil {
		t.Fatal(err)
	}
	cancel()
	if _, err := w2.Next(); !errors.Is(err, context.Canceled) {
		t.Errorf("Next after cancel = %v, want canceled", err)
	}
	w2.Close()
}
