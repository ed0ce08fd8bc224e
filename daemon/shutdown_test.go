package daemon

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/warmpool/warmpool/api"
)

// An exec that never ends must not keep the daemon from destroying its warm
// VMs: once limits.shutdown_wait is over, the exec is cancelled (its process
// killed) and the pools' shutdown still has time of its own.
func TestShutdownCancelsEndlessExecAndDestroysWarmVMs(t *testing.T) {
	dir := t.TempDir()
	prov := newFakeProvider()
	r := startFake(t, dir, prov, "limits: {shutdown_wait: 200ms}\n")
	setupPool(t, r.client, 2, 2)
	lease, err := r.client.Acquire(ctxT(t), "py", 5*time.Second, api.AcquireRequest{})
	if err != nil {
		t.Fatal(err)
	}
	waitReady(t, r.client, "py", 2)

	// The fake provider's agent runs commands on the host, so the command's
	// PID tells whether it was killed.
	pidFile := filepath.Join(dir, "exec.pid")
	execDone := make(chan error, 1)
	go func() {
		_, err := r.client.Exec(context.Background(), lease.ID, api.ExecRequest{
			Argv: []string{"sh", "-c", "echo $$ > " + pidFile + "; exec sleep 3600"},
		}, nil, nil)
		execDone <- err
	}()
	pid := waitPIDFile(t, pidFile)

	r.stop(t)
	select {
	case err := <-execDone:
		// The daemon answers the cancelled exec (rather than dropping its
		// connection) and says why.
		var apiErr *api.Error
		if !errors.As(err, &apiErr) || apiErr.Code != api.CodeUnavailable || !strings.Contains(apiErr.Message, api.ErrShuttingDown.Error()) {
			t.Errorf("the endless exec at shutdown returned %v, want the daemon's %q answer saying it is shutting down", err, api.CodeUnavailable)
		}
	case <-time.After(time.Minute):
		t.Fatal("the endless exec was still running a minute after the daemon stopped")
	}
	waitGone(t, pid)
	live, err := prov.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(live) != 1 || live[0].ID != lease.VMID {
		var ids []string
		for _, v := range live {
			ids = append(ids, v.ID)
		}
		t.Errorf("VMs after shutdown: %v, want only the leased VM %s (warm VMs destroyed)", ids, lease.VMID)
	}
	assertAccounted(t, dir, prov)
}

func waitPIDFile(t *testing.T, path string) int {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for time.Now().Before(deadline) {
		if b, err := os.ReadFile(path); err == nil && strings.HasSuffix(string(b), "\n") {
			pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
			if err != nil {
				t.Fatalf("pid file %s: %v", path, err)
			}
			return pid
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("the exec never wrote %s", path)
	return 0
}

// waitGone waits until pid no longer runs (a zombie counts as gone: it was
// killed and only waits for its parent).
func waitGone(t *testing.T, pid int) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for time.Now().Before(deadline) {
		if err := syscall.Kill(pid, 0); errors.Is(err, syscall.ESRCH) {
			return
		}
		if b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat"); err == nil {
			if f := strings.Fields(string(b)); len(f) > 2 && f[2] == "Z" {
				return
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	_ = syscall.Kill(pid, syscall.SIGKILL)
	t.Errorf("the exec's process %d still ran a minute after shutdown", pid)
}

// A failed API server stops the daemon as SIGTERM would: the background work
// ends and Run returns the server's error instead of waiting for a context
// nobody cancels.
func TestAPIServerFailureStopsTheDaemon(t *testing.T) {
	dir := t.TempDir()
	prov := newFakeProvider()
	r := startFake(t, dir, prov, "")
	setupPool(t, r.client, 1, 1)
	if err := r.d.srv.ln.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-r.done:
		r.cancel() // it stopped already
		r.cancel = nil
		if err == nil {
			t.Error("Run returned no error after its API server failed")
		}
	case <-time.After(time.Minute):
		t.Fatal("the daemon still ran a minute after its API server failed")
	}
	if live, _ := prov.List(context.Background()); len(live) != 0 {
		t.Errorf("warm VMs left after the daemon stopped: %+v", live)
	}
	assertAccounted(t, dir, prov)
}
