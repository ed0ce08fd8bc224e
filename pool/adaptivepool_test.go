package pool

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/warmpool/warmpool/events"
	"github.com/warmpool/warmpool/provider/fake"
)

// fastAdaptive is the controller on a time scale a test can wait for.
var fastAdaptive = AdaptiveConfig{
	RateHalfLife:   500 * time.Millisecond,
	BurstWindow:    200 * time.Millisecond,
	ScaleDownAfter: 200 * time.Millisecond,
	ScaleDownEvery: 20 * time.Millisecond,
	MinIdle:        100 * time.Millisecond,
}

// drive acquires from name at about rate per second for d, destroying
// every VM it gets, and returns how many it got.
func drive(t *testing.T, p *Pool, name string, rate float64, d time.Duration) int {
	t.Helper()
	var wg sync.WaitGroup
	var mu sync.Mutex
	got := 0
	every := time.Duration(float64(time.Second) / rate)
	for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(every) {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			l, err := p.Acquire(ctx, name, testID())
			if err != nil {
				t.Errorf("Acquire: %v", err)
				return
			}
			_ = p.cfg.Provider.Destroy(ctx, l.VM.ID)
			mu.Lock()
			got++
			mu.Unlock()
		})
	}
	wg.Wait()
	return got
}

// An adaptive pool grows when acquires arrive, says why, and goes back to
// its min, destroying what it no longer needs, when they stop.
func TestAdaptivePoolFollowsDemand(t *testing.T) {
	bus := events.NewBus()
	sub := bus.Subscribe(1024, func(e events.Event) bool { return e.Kind == EventTarget })
	defer sub.Close()
	p, prov := newTestPool(t, fake.Options{RestoreLatency: 20 * time.Millisecond}, func(c *Config) {
		c.Adaptive = fastAdaptive
		c.Events = bus
	})
	snap := prov.AddSnapshot(testSpec)
	spec := stack("web", snap, 1, 16)
	spec.Adaptive = true
	if err := p.Register(spec); err != nil {
		t.Fatal(err)
	}
	waitReady(t, p, "web", 1)
	if s := status(t, p, "web"); !s.Adaptive || s.Target != 1 || s.TargetReason != TargetStart {
		t.Fatalf("idle adaptive pool: %+v", s)
	}
	drive(t, p, "web", 200, 400*time.Millisecond)
	s := status(t, p, "web")
	if s.Target <= 1 || s.Rate < 50 {
		t.Errorf("under 200 acquires/s: target %d, rate %.1f/s", s.Target, s.Rate)
	}
	if s.Refill <= 0 {
		t.Errorf("refill time %v, want the restores' (about 20ms)", s.Refill)
	}
	grew := false
	for len(sub.C) > 0 {
		e := <-sub.C
		if e.Subject == "web" && e.Detail["target"].(int) > e.Detail["previous"].(int) {
			grew = true
		}
	}
	if !grew {
		t.Error("no pool.target event for the growth")
	}
	waitFor(t, "the target back at min and the pool shrunk", func() bool {
		s := status(t, p, "web")
		return s.Target == 1 && s.TargetReason == TargetIdle && s.Ready == 1 && s.Restoring == 0
	})
	if s := status(t, p, "web"); s.Counters.Evicted == 0 || s.IdleVMSeconds <= 0 {
		t.Errorf("after shrinking: evicted %d, idle VM-seconds %.3f", s.Counters.Evicted, s.IdleVMSeconds)
	}
}

// Waiting acquirers get restores on top of the depth, beyond max, as fast
// as the slots allow: a burst of 12 against a fixed pool of depth 2 with 4
// slots runs 4 restores at a time.
func TestWaitersAreServedAtTheSlotsSpeed(t *testing.T) {
	var mu sync.Mutex
	inFlight, most := 0, 0
	p, prov := newTestPool(t, fake.Options{}, nil)
	prov.SetHook(func(ctx context.Context, op fake.Op, _ string) error {
		if op != fake.OpRestore {
			return nil
		}
		mu.Lock()
		inFlight++
		most = max(most, inFlight)
		mu.Unlock()
		time.Sleep(20 * time.Millisecond)
		mu.Lock()
		inFlight--
		mu.Unlock()
		return nil
	})
	snap := prov.AddSnapshot(testSpec)
	if err := p.Register(stack("web", snap, 2, 2)); err != nil {
		t.Fatal(err)
	}
	waitReady(t, p, "web", 2)
	mu.Lock()
	most = 0
	mu.Unlock()
	var wg sync.WaitGroup
	for range 12 {
		wg.Go(func() { acquire(t, p, "web") })
	}
	wg.Wait()
	mu.Lock()
	defer mu.Unlock()
	if most != 4 {
		t.Errorf("at most %d restores ran at once for 10 waiters, want the pool's 4 slots", most)
	}
}

// With a host budget of four VMs and a fixed pool holding two, a busy
// adaptive pool may grow to the other two and no further.
func TestAdaptivePoolStaysWithinBudget(t *testing.T) {
	p, prov := newTestPool(t, fake.Options{RestoreLatency: 20 * time.Millisecond}, func(c *Config) {
		c.Adaptive = fastAdaptive
		c.MemoryBudgetMiB = 4 * testSpec.MemoryMiB
	})
	snap := prov.AddSnapshot(testSpec)
	if err := p.Register(stack("fixed", snap, 2, 2)); err != nil {
		t.Fatal(err)
	}
	busy := stack("busy", snap, 0, 16)
	busy.Adaptive = true
	if err := p.Register(busy); err != nil {
		t.Fatal(err)
	}
	waitReady(t, p, "fixed", 2)
	most := 0
	done := make(chan struct{})
	go func() {
		defer close(done)
		for end := time.Now().Add(400 * time.Millisecond); time.Now().Before(end); time.Sleep(5 * time.Millisecond) {
			s := status(t, p, "busy")
			most = max(most, s.Target, s.Ready)
		}
	}()
	drive(t, p, "busy", 200, 400*time.Millisecond)
	<-done
	s := status(t, p, "busy")
	if most != 2 || s.Allowed != 2 {
		t.Errorf("busy pool: most %d target/ready, allowed %d; want 2 and 2 (budget 4, fixed pool 2)", most, s.Allowed)
	}
	if f := status(t, p, "fixed"); f.Target != 2 || f.Allowed != 2 {
		t.Errorf("fixed pool: target %d allowed %d, want its 2", f.Target, f.Allowed)
	}
}
