package lifecycle

import (
	"context"
	"errors"
	"syscall"
	"testing"
	"time"

	"github.com/warmpool/warmpool/events"
)

// crashedWithin is the margin the test allows between a SIGKILL and the
// machine.crashed event. The target is well under a second; a loaded
// two-core machine under TCG can be far slower, so the test logs the
// latency and fails only past a generous bound.
const crashedWithin = 5 * time.Second

// TestQEMUKillThenEnsureAtOnce: with no health tick (the clock stands
// still), SIGKILL a machine's QEMU: machine.crashed is published right
// after the kill, from the provider's exit report, and the machine comes
// back by itself. SIGKILL it again and call Ensure at once: Ensure answers
// only once the machine runs again on a new VM with a new process whose
// agent answers, never "running" for the dead one.
func TestQEMUKillThenEnsureAtOnce(t *testing.T) {
	h, p := qemuHarness(t)
	spec := qemuSpec(t, "crashy")
	ctx, cancel := context.WithTimeout(context.Background(), qemuTimeout)
	defer cancel()
	crashed := make(chan events.Event, 4)
	sub := h.bus.Subscribe(256, func(e events.Event) bool {
		return e.Subject == "crashy" && (e.Kind == "machine.crashed" || e.Kind == "machine.recovered")
	})
	defer sub.Close()
	go func() {
		for e := range sub.C {
			e.Time = time.Now() // when the test heard of it; the manager's clock is fake
			crashed <- e
		}
	}()
	next := func(kind string, within time.Duration) events.Event {
		t.Helper()
		timeout := time.After(within)
		for {
			select {
			case e := <-crashed:
				if e.Kind == kind {
					return e
				}
			case <-timeout:
				t.Fatalf("no %s event within %v", kind, within)
			}
		}
	}

	first, err := h.mgr.Ensure(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	dead, err := p.Inspect(ctx, first.VMID)
	if err != nil || dead.PID <= 0 {
		t.Fatalf("inspect %s: %+v, %v", first.VMID, dead, err)
	}
	killed := time.Now()
	if err := syscall.Kill(dead.PID, syscall.SIGKILL); err != nil {
		t.Fatalf("kill qemu %d: %v", dead.PID, err)
	}
	e := next("machine.crashed", crashedWithin)
	latency := e.Time.Sub(killed)
	t.Logf("machine.crashed %v after SIGKILL, nobody calling Ensure: %v", latency, e.Detail)
	if latency > crashedWithin {
		t.Errorf("machine.crashed came %v after SIGKILL; want well under 1s (allowing %v under load)", latency, crashedWithin)
	}
	if reason, _ := e.Detail["reason"].(string); reason != "qemu killed by signal 9 (SIGKILL)" {
		t.Errorf("machine.crashed reason %q, want the provider's exit report", reason)
	}
	rec := next("machine.recovered", qemuTimeout)
	t.Logf("recovered by itself %v after SIGKILL", rec.Time.Sub(killed))
	first = h.waitState("crashy", Running)
	if dead, err = p.Inspect(ctx, first.VMID); err != nil || dead.PID <= 0 {
		t.Fatalf("inspect %s: %+v, %v", first.VMID, dead, err)
	}

	killed = time.Now()
	if err := syscall.Kill(dead.PID, syscall.SIGKILL); err != nil {
		t.Fatalf("kill qemu %d: %v", dead.PID, err)
	}
	again, err := h.mgr.Ensure(ctx, spec)
	took := time.Since(killed)
	if err != nil {
		t.Fatalf("Ensure right after the kill: %v", err)
	}
	if again.State != Running || again.VMID == first.VMID {
		t.Fatalf("Ensure right after killing %s answered %s on vm %s: want running on a new vm", first.VMID, again.State, again.VMID)
	}
	now, err := p.Inspect(ctx, again.VMID)
	if err != nil || now.PID <= 0 || now.PID == dead.PID {
		t.Fatalf("the machine's new vm %s: %+v, %v; want a new process (old pid %d)", again.VMID, now, err, dead.PID)
	}
	if err := syscall.Kill(dead.PID, 0); !errors.Is(err, syscall.ESRCH) {
		t.Errorf("killed qemu %d still exists (%v)", dead.PID, err)
	}
	if out := guestSh(t, p, again.VMID, "echo up"); out != "up" {
		t.Errorf("agent of the new vm: %q", out)
	}
	t.Logf("ensure right after SIGKILL returned in %v, on vm %s (pid %d; killed pid %d)", took, again.VMID, now.PID, dead.PID)
	e = next("machine.crashed", crashedWithin)
	t.Logf("machine.crashed %v after the second SIGKILL: %v", e.Time.Sub(killed), e.Detail)
}
