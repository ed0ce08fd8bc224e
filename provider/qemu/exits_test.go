package qemu_test

import (
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/warmpool/warmpool/agent"
	"github.com/warmpool/warmpool/internal/realvm"
	"github.com/warmpool/warmpool/vm"
)

// exitTimeout is generous: a killed QEMU is torn down slowly on a loaded
// machine. The latency itself is logged, not asserted.
const exitTimeout = 30 * time.Second

func waitExit(t *testing.T, exits <-chan vm.Exit, id string, since time.Time) vm.Exit {
	t.Helper()
	deadline := time.After(exitTimeout)
	for {
		select {
		case e := <-exits:
			if e.ID != id {
				t.Errorf("exit reported for %s (%s), want one for %s only", e.ID, e.Reason, id)
				continue
			}
			t.Logf("exit of %s reported %v after the cause: %s", id, time.Since(since), e.Reason)
			return e
		case <-deadline:
			t.Fatalf("no exit of %s reported within %v", id, exitTimeout)
		}
	}
}

// TestExitsOfGuestPoweroffAndAdoptedVMs covers the two exits the
// conformance suite's SIGKILL of a child does not: a guest that powers
// itself off, and a VM this provider adopted from an earlier process,
// which is no child of ours.
func TestExitsOfGuestPoweroffAndAdoptedVMs(t *testing.T) {
	spec := testSpec(t)
	dir := realvm.StateDir(t)
	first := newProvider(t, dir)
	destroyAll(t, first)
	ctx := ctxT(t)
	poweroff, err := first.Create(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	adopted, err := first.Create(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{poweroff.ID, adopted.ID} {
		if err := agent.WaitReady(ctx, first, id); err != nil {
			t.Fatal(err)
		}
	}
	exits := make(chan vm.Exit, 8)
	defer first.OnExit(func(e vm.Exit) { exits <- e })()
	c, err := agent.Dial(ctx, first, poweroff.ID)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := c.Shutdown(ctx); err != nil {
		t.Fatalf("ask the guest of %s to power off: %v", poweroff.ID, err)
	}
	c.Close()
	if e := waitExit(t, exits, poweroff.ID, start); !strings.Contains(e.Reason, "guest powered off") {
		t.Errorf("exit reason %q, want it to say the guest powered off", e.Reason)
	}

	first.Close()
	second := newProvider(t, dir)
	destroyAll(t, second)
	if _, err := second.List(ctx); err != nil {
		t.Fatal(err)
	}
	adoptedExits := make(chan vm.Exit, 8)
	defer second.OnExit(func(e vm.Exit) { adoptedExits <- e })()
	if !second.Alive(adopted.ID) {
		t.Fatalf("adopted %s not alive", adopted.ID)
	}
	start = time.Now()
	if err := syscall.Kill(adopted.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitExit(t, adoptedExits, adopted.ID, start)
	if second.Alive(adopted.ID) {
		t.Errorf("Alive(%s) after its exit was reported", adopted.ID)
	}
	select {
	case e := <-exits:
		t.Errorf("closed provider reported the exit of %s", e.ID)
	default:
	}
}
