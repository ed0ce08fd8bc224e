package lifecycle

import (
	"context"
	"testing"
	"time"

	"github.com/warmpool/warmpool/events"
	"github.com/warmpool/warmpool/provider/fake"
	"github.com/warmpool/warmpool/vm"
)

// fakeManager is a manager on the shared fake provider (provider/fake), with
// no agent: a running VM counts as answering.
func fakeManager(tb testing.TB, p vm.Provider, clock Clock, bus *events.Bus) *Manager {
	tb.Helper()
	cfg := Config{
		Provider:       p,
		StateDir:       tb.TempDir(),
		Clock:          clock,
		Events:         bus,
		HealthInterval: time.Minute,
		Backoff:        Backoff{Initial: time.Second, Max: time.Minute, MaxAttempts: 3},
		Idle:           IdlePolicy{SuspendAfter: time.Hour},
	}
	if bus == nil {
		cfg.Events = nil
	}
	m, err := NewManager(cfg)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = m.Close(ctx)
	})
	return m
}

// TestWithFakeProvider runs the main paths on the shared fake provider, so
// the manager is known to work with a provider it did not write itself. The
// provider reports no exits here, so the health loop must notice the kill.
func TestWithFakeProvider(t *testing.T) {
	p := fake.New(fake.Options{CreateLatency: 5 * time.Millisecond, NoExitEvents: true})
	clock := newFakeClock()
	bus := events.NewBus()
	defer bus.Close()
	sub := bus.Subscribe(1024, nil)
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
	clock.Advance(time.Minute)
	h.waitEvent("dev", "machine.health_failed", nil)
	h.waitEvent("dev", "machine.recovering", nil)
	clock.Advance(time.Second)
	h.waitEvent("dev", "machine.recovered", nil)
	second := h.waitState("dev", Running)
	if second.VMID == first.VMID {
		t.Fatalf("still on killed vm %s", first.VMID)
	}

	clock.Advance(time.Hour)
	h.waitState("dev", Suspended)
	third, err := m.Ensure(ctx, baseSpec("dev"))
	if err != nil {
		t.Fatal(err)
	}
	if third.VMID == second.VMID || p.Calls(fake.OpRestore) != 1 {
		t.Errorf("ensure after suspend: vm %s, %d restores", third.VMID, p.Calls(fake.OpRestore))
	}
	if err := m.Stop(ctx, "dev", false); err != nil {
		t.Fatal(err)
	}
}

// The Ensure benchmarks run on the fake provider: they measure the manager's
// own overhead, not a hypervisor's. Target for a running machine: under 1 ms.
func BenchmarkEnsureRunning(b *testing.B) {
	ctx := context.Background()
	m := fakeManager(b, fake.New(fake.Options{}), RealClock(), nil)
	if _, err := m.Ensure(ctx, baseSpec("dev")); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := m.Ensure(ctx, baseSpec("dev")); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkEnsureSuspended(b *testing.B) {
	ctx := context.Background()
	clock := newFakeClock()
	m := fakeManager(b, fake.New(fake.Options{}), clock, nil)
	for b.Loop() {
		b.StopTimer()
		if _, err := m.Ensure(ctx, baseSpec("dev")); err != nil {
			b.Fatal(err)
		}
		clock.Advance(time.Hour)
		waitFor(b, func() bool { mc, _ := m.Get("dev"); return mc.State == Suspended })
		b.StartTimer()
		if _, err := m.Ensure(ctx, baseSpec("dev")); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkEnsureCold(b *testing.B) {
	ctx := context.Background()
	m := fakeManager(b, fake.New(fake.Options{}), RealClock(), nil)
	for b.Loop() {
		if _, err := m.Ensure(ctx, baseSpec("dev")); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		if err := m.Stop(ctx, "dev", true); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
}

func waitFor(tb testing.TB, cond func() bool) {
	tb.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			tb.Fatal("condition not reached in 20s")
		}
		time.Sleep(100 * time.Microsecond)
	}
}
