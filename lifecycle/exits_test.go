package lifecycle

import (
	"context"
	"testing"
	"time"

	"github.com/warmpool/warmpool/events"
	"github.com/warmpool/warmpool/provider/fake"
	"github.com/warmpool/warmpool/vm"
)

// TestCrashRecoversAtOnce: when the provider reports that a running
// machine's VM exited, the machine fails with machine.crashed and comes
// back on a new VM without waiting for a health ping or a backoff: the
// clock never moves in this test.
func TestCrashRecoversAtOnce(t *testing.T) {
	p := fake.New(fake.Options{})
	bus := events.NewBus()
	defer bus.Close()
	sub := bus.Subscribe(1024, nil)
	clock := newFakeClock()
	m := fakeManager(t, p, clock, bus)
	h := &harness{t: t, clock: clock, mgr: m, sub: sub}
	ctx := context.Background()

	first, err := m.Ensure(ctx, baseSpec("dev"))
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Kill(first.VMID); err != nil {
		t.Fatal(err)
	}
	var seen []events.Event
	for timeout := time.After(20 * time.Second); len(seen) == 0 || seen[len(seen)-1].Kind != "machine.recovered"; {
		select {
		case e := <-sub.C:
			seen = append(seen, e)
		case <-timeout:
			t.Fatalf("no machine.recovered within 20s; events: %v", seen)
		}
	}
	second := h.waitState("dev", Running)
	if second.VMID == first.VMID {
		t.Fatalf("still on killed vm %s", first.VMID)
	}
	if _, err := p.Inspect(ctx, first.VMID); err == nil {
		t.Errorf("dead vm %s was not destroyed by the recovery", first.VMID)
	}
	var sawCrash, sawCrashed bool
	for _, e := range seen {
		if e.Kind == "machine.crashed" {
			sawCrashed = true
			if e.Detail["vm_id"] != first.VMID || e.Detail["reason"] != "killed" {
				t.Errorf("machine.crashed detail %v, want vm_id %s and the provider's reason", e.Detail, first.VMID)
			}
		}
		if e.Kind == "machine.health_failed" {
			t.Errorf("the health loop took part: %v", e.Detail)
		}
		if e.Kind == "machine.state" && e.Detail["event"] == string(EvCrash) {
			sawCrash = true
			if e.Detail["from"] != string(Running) || e.Detail["to"] != string(Failed) {
				t.Errorf("crash transition %v, want running -> failed", e.Detail)
			}
		}
	}
	if !sawCrash || !sawCrashed {
		t.Errorf("machine.state for the crash seen: %v, machine.crashed seen: %v; want both", sawCrash, sawCrashed)
	}
}

// lateExits is the fake provider with its exit notifications held back, as
// when an exit is still on its way to the manager: Alive already knows.
type lateExits struct{ *fake.Provider }

func (lateExits) OnExit(func(vm.Exit)) func() { return func() {} }

// TestEnsureNeverAnswersRunningForADeadVM: an Ensure in the moment between
// a VM's death and its exit event must not answer from the stale view; it
// returns once the machine runs again, on a new VM.
func TestEnsureNeverAnswersRunningForADeadVM(t *testing.T) {
	p := fake.New(fake.Options{})
	m := fakeManager(t, lateExits{p}, newFakeClock(), nil)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	first, err := m.Ensure(ctx, baseSpec("dev"))
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Kill(first.VMID); err != nil {
		t.Fatal(err)
	}
	again, err := m.Ensure(ctx, baseSpec("dev"))
	if err != nil {
		t.Fatalf("Ensure after the kill: %v", err)
	}
	if again.State != Running || again.VMID == first.VMID {
		t.Fatalf("Ensure after the kill answered %s on vm %s; want running on a new vm (killed %s)", again.State, again.VMID, first.VMID)
	}
}

// TestEnsureConfirmsStaleLiveness: once the agent's last answer is older
// than the liveness window, Ensure pings before it answers, and a guest
// whose agent no longer answers is not reported running.
func TestEnsureConfirmsStaleLiveness(t *testing.T) {
	h := newHarness(t, func(c *Config) { c.LivenessWindow = 10 * time.Second })
	first := h.ensure(baseSpec("dev"))
	h.clock.Advance(20 * time.Second) // stale, but before the next health ping
	h.p.setAgentDead(first.VMID, true)
	type result struct {
		m   Machine
		err error
	}
	done := make(chan result, 1)
	go func() {
		m, err := h.mgr.Ensure(context.Background(), baseSpec("dev"))
		done <- result{m, err}
	}()
	h.waitEvent("dev", "machine.ping_failed", nil)
	select {
	case r := <-done:
		t.Fatalf("Ensure answered %s (%v) while the agent did not answer", r.m.State, r.err)
	default:
	}
	// The agent recovers; the health loop's next ping answers the Ensure.
	h.p.setAgentDead(first.VMID, false)
	h.clock.Advance(time.Minute)
	select {
	case r := <-done:
		if r.err != nil || r.m.State != Running || r.m.VMID != first.VMID {
			t.Errorf("Ensure answered %s on vm %s (%v), want running on %s", r.m.State, r.m.VMID, r.err, first.VMID)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("Ensure never answered after the agent recovered")
	}
}
