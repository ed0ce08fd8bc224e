package lifecycle

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/warmpool/warmpool/vm"
)

// A machine's own idle policy replaces the manager's default, and changing
// it (through Ensure or SetIdle) reschedules the idle steps without
// recreating the VM.
func TestPerMachineIdlePolicy(t *testing.T) {
	h := newHarness(t, func(c *Config) {
		c.Idle = IdlePolicy{ShrinkAfter: time.Hour, ReserveMiB: 64}
		c.GuestMemUsed = func(context.Context, vm.VM) (int, error) { return 100, nil }
	})
	quick := baseSpec("quick")
	quick.Idle = &IdlePolicy{ShrinkAfter: time.Minute, ReserveMiB: 16}
	q := h.ensure(quick)
	h.ensure(baseSpec("default"))

	h.clock.Advance(time.Minute)
	if idle := h.waitState("quick", Idle); idle.BalloonMiB == nil || *idle.BalloonMiB != 116 {
		t.Errorf("quick machine's idle balloon %v, want used 100 + its own reserve 16", idle.BalloonMiB)
	}
	time.Sleep(10 * time.Millisecond)
	if m, _ := h.mgr.Get("default"); m.State != Running {
		t.Errorf("machine on the default policy is %s after a minute, want running (default shrinks after an hour)", m.State)
	}
	h.clock.Advance(time.Hour)
	if idle := h.waitState("default", Idle); *idle.BalloonMiB != 164 {
		t.Errorf("default machine's idle balloon %d, want used 100 + default reserve 64", *idle.BalloonMiB)
	}

	// Turning idling off for one machine through Ensure: no drift, same VM.
	quick.Idle = &IdlePolicy{}
	again := h.ensure(quick)
	if again.VMID != q.VMID {
		t.Fatalf("changing the idle policy recreated the machine: vm %s -> %s", q.VMID, again.VMID)
	}
	if again.Spec.Idle == nil || again.Spec.Idle.ShrinkAfter != 0 {
		t.Errorf("machine's spec after ensure: idle %+v, want shrink off", again.Spec.Idle)
	}
	h.clock.Advance(100 * time.Hour)
	time.Sleep(10 * time.Millisecond)
	if m, _ := h.mgr.Get("quick"); m.State != Running {
		t.Errorf("machine with idling off is %s, want running", m.State)
	}
	sawPolicy := false
	for _, e := range h.drain() {
		if e.Kind == "machine.drift" {
			t.Errorf("an idle policy change counted as drift: %v", e.Detail)
		}
		if e.Kind == "machine.idle_policy" && e.Subject == "quick" && e.Detail["shrink_after"] == "0s" {
			sawPolicy = true
		}
	}
	if !sawPolicy {
		t.Error("no machine.idle_policy event for the policy the ensure changed")
	}

	// SetIdle changes the policy without an Ensure, and nil goes back to
	// the manager's default.
	m, err := h.mgr.SetIdle(context.Background(), "quick", &IdlePolicy{ShrinkAfter: 2 * time.Minute, ReserveMiB: 8})
	if err != nil || m.VMID != q.VMID || m.State != Running {
		t.Fatalf("SetIdle = %+v, %v", m, err)
	}
	e := h.waitEvent("quick", "machine.idle_policy", nil)
	if e.Detail["shrink_after"] != "2m0s" || e.Detail["default"] != false {
		t.Errorf("idle_policy event %v", e.Detail)
	}
	h.clock.Advance(2 * time.Minute)
	if idle := h.waitState("quick", Idle); *idle.BalloonMiB != 108 {
		t.Errorf("balloon %d after SetIdle, want 108", *idle.BalloonMiB)
	}
	if _, err := h.mgr.SetIdle(context.Background(), "quick", nil); err != nil {
		t.Fatal(err)
	}
	h.waitState("quick", Running) // setting a policy is activity: it wakes the machine
	h.clock.Advance(59 * time.Minute)
	time.Sleep(10 * time.Millisecond)
	if m, _ := h.mgr.Get("quick"); m.State != Running || m.Spec.Idle != nil {
		t.Errorf("after SetIdle(nil) and 59 minutes: %s, idle %+v; want running on the default", m.State, m.Spec.Idle)
	}
	h.clock.Advance(time.Minute)
	h.waitState("quick", Idle)
	if creates, _, _ := h.p.counts(); creates != 2 {
		t.Errorf("%d creates for two machines, want 2", creates)
	}

	if _, err := h.mgr.SetIdle(context.Background(), "quick", &IdlePolicy{ShrinkAfter: -time.Second}); !errors.Is(err, vm.ErrInvalid) {
		t.Errorf("negative idle policy: %v, want ErrInvalid", err)
	}
	if _, err := h.mgr.SetIdle(context.Background(), "nope", nil); !errors.Is(err, vm.ErrNotFound) {
		t.Errorf("SetIdle of an unknown machine: %v, want ErrNotFound", err)
	}
	bad := baseSpec("bad")
	bad.Idle = &IdlePolicy{ReserveMiB: -1}
	if _, err := h.mgr.Ensure(context.Background(), bad); !errors.Is(err, vm.ErrInvalid) {
		t.Errorf("ensure with a negative reserve: %v, want ErrInvalid", err)
	}
}

// A per-machine policy is part of the record, so a restarted manager keeps
// idling the machine on its own schedule.
func TestIdlePolicySurvivesRestore(t *testing.T) {
	h := newHarness(t, func(c *Config) {
		c.GuestMemUsed = func(context.Context, vm.VM) (int, error) { return 100, nil }
	})
	spec := baseSpec("dev")
	spec.Idle = &IdlePolicy{ShrinkAfter: time.Minute, ReserveMiB: 10}
	h.ensure(spec)
	h.mu.Lock()
	rec := h.changes[len(h.changes)-1]
	h.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := h.mgr.Close(ctx); err != nil {
		t.Fatal(err)
	}
	h.newManager()
	if err := h.mgr.Restore(ctx, []Record{rec}); err != nil {
		t.Fatal(err)
	}
	h.waitState("dev", Running)
	h.clock.Advance(time.Minute)
	if idle := h.waitState("dev", Idle); *idle.BalloonMiB != 110 {
		t.Errorf("restored machine's idle balloon %d, want 110", *idle.BalloonMiB)
	}
}
