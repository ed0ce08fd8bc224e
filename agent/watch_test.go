package agent_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/warmpool/warmpool/agent"
	"github.com/warmpool/warmpool/agent/server"
	"github.com/warmpool/warmpool/internal/procfs/procfstest"
	"github.com/warmpool/warmpool/vm"
)

// watchEvents reads events into a channel until the watch ends.
func watchEvents(w *agent.Watch) (<-chan agent.WatchEvent, <-chan error) {
	evs := make(chan agent.WatchEvent, 1024)
	end := make(chan error, 1)
	go func() {
		defer close(evs)
		for {
			ev, err := w.Next()
			if err != nil {
				end <- err
				return
			}
			evs <- ev
		}
	}()
	return evs, end
}

// expectEvent waits for an event of type typ named name and returns the
// events before it.
func expectEvent(t *testing.T, evs <-chan agent.WatchEvent, typ, name string) []agent.WatchEvent {
	t.Helper()
	var seen []agent.WatchEvent
	timeout := time.After(10 * time.Second)
	for {
		select {
		case ev, ok := <-evs:
			if !ok {
				t.Fatalf("watch ended before %s %s; saw %+v", typ, name, seen)
			}
			if ev.Type == typ && ev.Name == name {
				return seen
			}
			seen = append(seen, ev)
		case <-timeout:
			t.Fatalf("no %s %s within 10s; saw %+v", typ, name, seen)
		}
	}
}

func TestSessionWatchEvents(t *testing.T) {
	s := pipeSession(t, server.Options{})
	ctx := context.Background()
	dir := t.TempDir()
	if err := os.Mkdir(dir+"/sub", 0o755); err != nil {
		t.Fatal(err)
	}
	w, err := s.Watch(ctx, dir+"/", false)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	if w.Dir.Path != dir || w.Dir.Type != "dir" {
		t.Errorf("watch answered %+v, want the directory %s", w.Dir, dir)
	}
	evs, _ := watchEvents(w)
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.WriteFile(dir+"/a", []byte("x"), 0o644))
	expectEvent(t, evs, "create", "a")
	expectEvent(t, evs, "write", "a")
	must(os.Rename(dir+"/a", dir+"/b"))
	expectEvent(t, evs, "rename", "a")
	expectEvent(t, evs, "create", "b")
	must(os.Chmod(dir+"/b", 0o600))
	expectEvent(t, evs, "chmod", "b")
	must(os.Remove(dir + "/b"))
	expectEvent(t, evs, "remove", "b")
	// Without recursive, a subdirectory's files are not reported: the
	// marker written after them comes with nothing from below.
	must(os.WriteFile(dir+"/sub/f", []byte("x"), 0o644))
	must(os.Mkdir(dir+"/new", 0o755))
	must(os.WriteFile(dir+"/new/f", []byte("x"), 0o644))
	must(os.WriteFile(dir+"/marker", nil, 0o644))
	before := expectEvent(t, evs, "create", "marker")
	for _, ev := range before {
		if strings.Contains(ev.Name, "/") {
			t.Errorf("a non-recursive watch reported %+v", ev)
		}
	}
	if len(before) != 1 || before[0] != (agent.WatchEvent{Type: "create", Name: "new", Dir: true}) {
		t.Errorf("events before the marker: %+v, want only the create of new", before)
	}
}

func TestSessionWatchRecursive(t *testing.T) {
	s := pipeSession(t, server.Options{})
	ctx := context.Background()
	dir := t.TempDir()
	if err := os.MkdirAll(dir+"/pre/deep", 0o755); err != nil {
		t.Fatal(err)
	}
	w, err := s.Watch(ctx, dir, true)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	evs, _ := watchEvents(w)
	if err := os.WriteFile(dir+"/pre/deep/g", nil, 0o644); err != nil {
		t.Fatal(err)
	}
	expectEvent(t, evs, "create", "pre/deep/g")
	// Made after the watch began, and filled at once: its file is
	// reported whether its own watch was in place in time or not.
	if err := os.MkdirAll(dir+"/later/x", 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dir+"/later/x/f", []byte("hi"), 0o644); err != nil {
		t.Fatal(err)
	}
	expectEvent(t, evs, "create", "later/x/f")
	// And once watched, its files' writes are too.
	time.Sleep(100 * time.Millisecond)
	if err := os.WriteFile(dir+"/later/x/f2", []byte("hi"), 0o644); err != nil {
		t.Fatal(err)
	}
	expectEvent(t, evs, "write", "later/x/f2")
	// A directory moved within the tree is watched under its new name.
	if err := os.Rename(dir+"/later", dir+"/moved"); err != nil {
		t.Fatal(err)
	}
	expectEvent(t, evs, "create", "moved")
	if err := os.WriteFile(dir+"/moved/x/f3", nil, 0o644); err != nil {
		t.Fatal(err)
	}
	expectEvent(t, evs, "create", "moved/x/f3")
}

func TestSessionWatchErrors(t *testing.T) {
	s := pipeSession(t, server.Options{})
	ctx := context.Background()
	dir := t.TempDir()
	if _, err := s.Watch(ctx, dir+"/missing", false); !errors.Is(err, vm.ErrNotFound) {
		t.Errorf("watch of a missing path = %v, want not found", err)
	}
	if err := os.WriteFile(dir+"/file", nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Watch(ctx, dir+"/file", false); !errors.Is(err, vm.ErrInvalid) || !strings.Contains(err.Error(), "not a directory") {
		t.Errorf("watch of a file = %v, want invalid: not a directory", err)
	}
	if _, err := s.Watch(ctx, "relative", false); !errors.Is(err, vm.ErrInvalid) {
		t.Errorf("watch of a relative path = %v, want invalid", err)
	}
}

// Every way a watch ends closes its inotify descriptor and ends its
// goroutines: Close, a cancelled ctx, the directory's removal.
func TestSessionWatchEndsFreeTheDescriptor(t *testing.T) {
	s := pipeSession(t, server.Options{})
	dir := t.TempDir()
	base := procfstest.InotifyFDs(t)
	// The count starts once the agent's side of the session serves
	// streams: its goroutines start after DialSession has returned.
	if err := s.Ping(context.Background()); err != nil {
		t.Fatal(err)
	}
	goroutines := runtime.NumGoroutine()
	for i := range 50 {
		ctx, cancel := context.WithCancel(context.Background())
		w, err := s.Watch(ctx, dir, true)
		if err != nil {
			t.Fatal(err)
		}
		if i%2 == 0 {
			w.Close()
		} else {
			cancel()
			if _, err := w.Next(); !errors.Is(err, context.Canceled) {
				t.Errorf("Next after cancel = %v, want canceled", err)
			}
		}
		cancel()
	}
	procfstest.WaitInotifyFDs(t, base, "after 50 watches ended by the host")
	gone := filepath.Join(dir, "gone")
	if err := os.Mkdir(gone, 0o755); err != nil {
		t.Fatal(err)
	}
	w, err := s.Watch(context.Background(), gone, false)
	if err != nil {
		t.Fatal(err)
	}
	if procfstest.InotifyFDs(t) != base+1 {
		t.Errorf("a running watch holds %d inotify descriptors, want %d", procfstest.InotifyFDs(t), base+1)
	}
	evs, end := watchEvents(w)
	if err := os.Remove(gone); err != nil {
		t.Fatal(err)
	}
	expectEvent(t, evs, "remove", ".")
	select {
	case err := <-end:
		if !errors.Is(err, agent.ErrWatchEnded) {
			t.Errorf("watch of a removed directory ended with %v, want ErrWatchEnded", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the watch did not end with its directory")
	}
	w.Close()
	procfstest.WaitInotifyFDs(t, base, "after the watched directory was removed")
	deadline := time.Now().Add(10 * time.Second)
	for runtime.NumGoroutine() > goroutines+2 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := runtime.NumGoroutine(); n > goroutines+2 {
		t.Errorf("%d goroutines after the watches ended, %d before", n, goroutines)
	}
}
