package e2etest

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// SIGTERM while an exec runs a command that never ends: once
// limits.shutdown_wait is over the exec is cancelled and its guest process
// killed, the warm VMs are destroyed, and only the leased VM and the
// machine keep running.
func TestQEMUSIGTERMWithEndlessExec(t *testing.T) {
	state := qemuState(t, "real-VM shutdown test", "wp-term-")
	config := filepath.Join(state, "config.yaml")
	if err := os.WriteFile(config, []byte("limits: {shutdown_wait: 2s}\n"), 0o600); err != nil {
		t.Fatal(err)
	}

	useTemplate(t, state, "base", busybox256)
	d := startDaemon(t, state, "--config", config)
	mustCLI(t, state, time.Minute, "pool", "set", "py", "--template", "base", "--min", "2", "--max", "2")
	waitPool(t, state, "py", 2)
	l := acquire(t, state, "py")
	var m machineJSON
	if err := json.Unmarshal([]byte(mustCLI(t, state, 5*time.Minute, "machine", "ensure", "dev", "--vcpus", "1", "--mem", "256", "-o", "json")), &m); err != nil || m.State != "running" {
		t.Fatalf("machine ensure: %+v, %v", m, err)
	}
	waitPool(t, state, "py", 2)
	if warm := len(processVMs(t, state)) - 2; warm != 2 {
		t.Fatalf("%d warm VMs before SIGTERM, want 2", warm)
	}

	// The endless command records its PID in the guest, then says it runs.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	endless := exec.CommandContext(ctx, warmpoolBin, "--state", state, "exec", l.ID, "--",
		"sh", "-c", "echo $$ > /tmp/endless.pid; echo started; exec sleep 100000")
	endless.Env = append(os.Environ(), "WARMPOOL_SOCKET=")
	stdout, err := endless.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	endless.Stderr = &stderr
	if err := endless.Start(); err != nil {
		t.Fatal(err)
	}
	lines := bufio.NewScanner(stdout)
	if !lines.Scan() || lines.Text() != "started" {
		t.Fatalf("the endless exec did not start: %q, %v; stderr %s", lines.Text(), lines.Err(), stderr.String())
	}
	endlessDone := make(chan error, 1)
	go func() {
		for lines.Scan() {
		}
		endlessDone <- endless.Wait()
	}()

	d.term(t)
	select {
	case err := <-endlessDone:
		if err == nil || !strings.Contains(stderr.String(), "shutting down") {
			t.Errorf("the endless exec ended with %v, stderr %q; want a failure saying the daemon is shutting down", err, stderr.String())
		}
	case <-time.After(time.Minute):
		t.Errorf("the endless exec still ran a minute after the daemon stopped")
	}
	waitProcesses(t, state, l.VMID, m.VMID)

	// The next daemon adopts the lease; the endless command is gone from
	// its guest. --stop-all then leaves nothing.
	d = startDaemon(t, state, "--stop-all")
	if out := mustCLI(t, state, time.Minute, "exec", l.ID, "--", "sh", "-c", "kill -0 $(cat /tmp/endless.pid) 2>/dev/null && echo running || echo gone"); out != "gone\n" {
		t.Errorf("the endless command in the leased VM after shutdown: %q, want gone (killed when its exec was cancelled)", out)
	}
	d.term(t)
	waitProcesses(t, state)
}
