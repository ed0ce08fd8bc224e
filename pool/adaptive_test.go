package pool

import (
	"testing"
	"time"
)

// The controller's tests run it on a virtual clock: every observation is
// given its instant, so minutes of demand take microseconds.

var t0 = time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)

func testAdaptiveConfig(t *testing.T) AdaptiveConfig {
	t.Helper()
	var c AdaptiveConfig // the defaults: what a daemon without adaptive settings runs
	if err := c.setDefaults(); err != nil {
		t.Fatal(err)
	}
	return c
}

// sim drives one controller: arrivals evenly spaced at a rate that may
// change with time, a step at every arrival (an acquire wakes the owner)
// and at every tick in between, restores that always take refill.
type sim struct {
	t     *testing.T
	c     *controller
	now   time.Time
	min   int
	max   int
	allow int
	// history of (time, target) after every step
	times   []time.Time
	targets []int
}

func newSim(t *testing.T, cfg AdaptiveConfig, min, max int, refill time.Duration) *sim {
	c := newController(cfg)
	for range restoreSamples {
		c.demand.restored(refill)
	}
	s := &sim{t: t, c: c, now: t0, min: min, max: max, allow: -1}
	s.step(0, 0)
	return s
}

func (s *sim) step(arrivals, missed int) {
	s.c.step(s.now, observation{Arrivals: arrivals, Missed: missed, Min: s.min, Max: s.max, Allowed: s.allow})
	s.times = append(s.times, s.now)
	s.targets = append(s.targets, s.c.target)
}

// run advances the clock by d with arrivals at rate(t) per second (t since
// the start of this run); rate 0 means none.
func (s *sim) run(d time.Duration, rate func(t time.Duration) float64) {
	start, end := s.now, s.now.Add(d)
	tick := s.c.tick()
	next := start
	if r := rate(0); r > 0 {
		next = start.Add(time.Duration(float64(time.Second) / r))
	} else {
		next = time.Time{}
	}
	for s.now.Before(end) {
		at := s.now.Add(tick)
		if !next.IsZero() && next.Before(at) {
			at = next
		}
		if at.After(end) {
			s.now = end
			s.step(0, 0)
			break
		}
		s.now = at
		if !next.IsZero() && !next.After(s.now) {
			s.step(1, 0)
			if r := rate(s.now.Sub(start)); r > 0 {
				next = s.now.Add(time.Duration(float64(time.Second) / r))
			} else {
				next = time.Time{}
			}
			continue
		}
		s.step(0, 0)
		if next.IsZero() {
			if r := rate(s.now.Sub(start)); r > 0 {
				next = s.now.Add(time.Duration(float64(time.Second) / r))
			}
		}
	}
}

func constant(r float64) func(time.Duration) float64 { return func(time.Duration) float64 { return r } }

// wantFor is the target for a steady rate: the smallest depth that
// 99.9% of refills do not empty, plus the one the acquire takes.
func wantFor(cfg AdaptiveConfig, rate float64, refill time.Duration) int {
	return poissonQuantile(rate*refill.Seconds(), cfg.Quantile, MaxSize) + 1
}

// wantAbove is wantFor with one arrival more per burst window, which the
// window holds at the instant of an arrival of an evenly spaced stream.
func wantAbove(cfg AdaptiveConfig, rate float64, refill time.Duration) int {
	return wantFor(cfg, rate+1/cfg.BurstWindow.Seconds(), refill)
}

func TestPoissonQuantile(t *testing.T) {
	// P(N <= 10) = 0.9972 and P(N <= 11) = 0.9991 for a mean of 4.
	if got := poissonQuantile(4, 0.999, 100); got != 11 {
		t.Errorf("poissonQuantile(4, 0.999) = %d, want 11", got)
	}
	if got := poissonQuantile(0.4, 0.999, 100); got != 3 {
		t.Errorf("poissonQuantile(0.4, 0.999) = %d, want 3", got)
	}
	if got := poissonQuantile(1e6, 0.999, 50); got != 50 {
		t.Errorf("poissonQuantile bounded by its limit: %d, want 50", got)
	}
}

// A step from no demand to 20 acquires a second is met within one burst
// window, long before the weighted rate (half-life 30s) would get there.
func TestAdaptiveStepUpWithinBurstWindow(t *testing.T) {
	cfg := testAdaptiveConfig(t)
	refill := 200 * time.Millisecond
	s := newSim(t, cfg, 1, 64, refill)
	s.run(time.Minute, constant(0))
	if s.c.target != 1 {
		t.Fatalf("idle pool's target = %d, want its min 1", s.c.target)
	}
	want := wantFor(cfg, 20, refill)
	s.run(cfg.BurstWindow+s.c.tick(), constant(20))
	if s.c.target < want {
		t.Errorf("target %d one burst window after a step to 20/s, want %d", s.c.target, want)
	}
	if s.c.reason != TargetBurst {
		t.Errorf("reason %q, want %q", s.c.reason, TargetBurst)
	}
	// It stays there while the rate does, and does not overshoot.
	s.run(2*time.Minute, constant(20))
	if high := wantAbove(cfg, 20, refill); s.c.target < want || s.c.target > high {
		t.Errorf("target %d after two minutes at 20/s, want %d..%d", s.c.target, want, high)
	}
}

// On a ramp the target follows the rate up, one burst window behind at
// most, and never goes down.
func TestAdaptiveRampFollowsRate(t *testing.T) {
	cfg := testAdaptiveConfig(t)
	refill := 200 * time.Millisecond
	s := newSim(t, cfg, 0, 64, refill)
	ramp := func(at time.Duration) float64 { return 1 + 19*min(at.Seconds(), 60)/60 }
	s.run(60*time.Second, ramp)
	for i := 1; i < len(s.targets); i++ {
		if s.targets[i] < s.targets[i-1] {
			t.Fatalf("target went down from %d to %d at %v during a ramp up", s.targets[i-1], s.targets[i], s.times[i].Sub(t0))
		}
	}
	lag := cfg.BurstWindow + s.c.tick()
	for i, at := range s.times {
		rampAt := at.Sub(s.times[0])
		if rampAt < lag {
			continue
		}
		if low := wantFor(cfg, ramp(rampAt-lag), refill); s.targets[i] < low {
			t.Fatalf("at %v of the ramp the target is %d, below %d (the rate %v earlier)", rampAt, s.targets[i], low, lag)
		}
		if high := wantAbove(cfg, ramp(rampAt), refill); s.targets[i] > high {
			t.Fatalf("at %v of the ramp the target is %d, above %d (the rate now)", rampAt, s.targets[i], high)
		}
	}
}

// A short burst raises the target at once; afterwards the target holds for
// ScaleDownAfter, then goes down one VM per ScaleDownEvery back to what
// the base rate needs.
func TestAdaptiveBurstUpAtOnceDownSlowly(t *testing.T) {
	cfg := testAdaptiveConfig(t)
	refill := 200 * time.Millisecond
	s := newSim(t, cfg, 1, 64, refill)
	s.run(3*time.Minute, constant(2))
	base := s.c.target
	if want, high := wantFor(cfg, 2, refill), wantAbove(cfg, 2, refill); base < want || base > high {
		t.Fatalf("target at 2/s = %d, want %d..%d", base, want, high)
	}
	s.run(cfg.BurstWindow, constant(30))
	peak := s.c.target
	if want := wantFor(cfg, 30, refill); peak < want-1 || s.c.reason != TargetBurst {
		t.Fatalf("after a %v burst at 30/s the target is %d (%s), want about %d for burst", cfg.BurstWindow, peak, s.c.reason, want)
	}
	burstEnd := s.now
	s.run(10*time.Minute, constant(2))
	var firstDown time.Time
	last, lastAt := peak, burstEnd
	for i, at := range s.times {
		if !at.After(burstEnd) {
			continue
		}
		n := s.targets[i]
		switch {
		case n > last:
			t.Fatalf("target rose from %d to %d at %v after the burst at a steady rate", last, n, at.Sub(burstEnd))
		case n < last:
			if last-n != 1 {
				t.Fatalf("target dropped %d at once (from %d to %d), want one VM per step", last-n, last, n)
			}
			if firstDown.IsZero() {
				firstDown = at
			} else if gap := at.Sub(lastAt); gap < cfg.ScaleDownEvery {
				t.Fatalf("two steps down %v apart, want at least %v", gap, cfg.ScaleDownEvery)
			}
			last, lastAt = n, at
		}
	}
	if firstDown.IsZero() || firstDown.Sub(burstEnd) < cfg.ScaleDownAfter {
		t.Errorf("first step down %v after the burst, want at least %v", firstDown.Sub(burstEnd), cfg.ScaleDownAfter)
	}
	if s.c.target > base {
		t.Errorf("ten minutes after the burst the target is %d, want back at %d", s.c.target, base)
	}
}

// When acquires stop, the target decays to min, not before ScaleDownAfter
// and a step at a time; with min 0 the pool ends empty.
func TestAdaptiveIdleDecayToMin(t *testing.T) {
	cfg := testAdaptiveConfig(t)
	for _, min := range []int{0, 2} {
		s := newSim(t, cfg, min, 64, 200*time.Millisecond)
		s.run(2*time.Minute, constant(10))
		busy := s.c.target
		stop := s.now
		s.run(cfg.ScaleDownAfter, constant(0))
		if s.c.target != busy {
			t.Errorf("min %d: target %d within %v of the last acquire, want still %d", min, s.c.target, cfg.ScaleDownAfter, busy)
		}
		s.run(30*time.Minute, constant(0))
		if s.c.target != min || s.c.reason != TargetIdle {
			t.Errorf("min %d: target %d (%s) half an hour after the last acquire, want %d (%s)", min, s.c.target, s.c.reason, min, TargetIdle)
		}
		for i := 1; i < len(s.targets); i++ {
			if s.times[i].After(stop) && s.targets[i-1]-s.targets[i] > 1 {
				t.Fatalf("min %d: target dropped from %d to %d in one step", min, s.targets[i-1], s.targets[i])
			}
		}
	}
}

// A miss raises the target by one even when the rate estimate does not.
func TestAdaptiveMissRaisesTarget(t *testing.T) {
	cfg := testAdaptiveConfig(t)
	s := newSim(t, cfg, 1, 8, 200*time.Millisecond)
	s.run(time.Minute, constant(1))
	before := s.c.target
	s.now = s.now.Add(time.Millisecond)
	s.step(1, 1)
	if s.c.target != before+1 || s.c.reason != TargetMiss {
		t.Errorf("after a miss the target is %d (%s), want %d (%s)", s.c.target, s.c.reason, before+1, TargetMiss)
	}
}

// Bounds apply at once; a budget below the target cuts it at once too.
func TestAdaptiveBoundsAndBudgetApplyAtOnce(t *testing.T) {
	cfg := testAdaptiveConfig(t)
	s := newSim(t, cfg, 1, 64, 200*time.Millisecond)
	s.run(time.Minute, constant(30))
	if s.c.target < 10 {
		t.Fatalf("target %d at 30/s", s.c.target)
	}
	s.max = 5
	s.now = s.now.Add(time.Millisecond)
	s.step(0, 0)
	if s.c.target != 5 || s.c.reason != TargetBounds {
		t.Errorf("max lowered to 5: target %d (%s)", s.c.target, s.c.reason)
	}
	s.allow = 3
	s.now = s.now.Add(time.Millisecond)
	s.step(0, 0)
	if s.c.target != 3 || s.c.reason != TargetBudget {
		t.Errorf("budget allows 3: target %d (%s)", s.c.target, s.c.reason)
	}
	s.allow = 0 // the budget never takes a pool below its min
	s.now = s.now.Add(time.Millisecond)
	s.step(0, 0)
	if s.c.target != 1 {
		t.Errorf("budget allows 0, min 1: target %d", s.c.target)
	}
	s.allow = -1
	s.now = s.now.Add(time.Millisecond)
	s.step(1, 0)
	if s.c.target != 5 {
		t.Errorf("budget lifted: target %d, want back to max 5 at once", s.c.target)
	}
}

// A VM is never destroyed to shrink while an acquirer waits, and only
// once it has waited MinIdle unless the budget cut the pool.
func TestShrinkPlan(t *testing.T) {
	minIdle := 30 * time.Second
	now := t0.Add(time.Hour)
	born := []time.Time{now.Add(-time.Minute), now.Add(-40 * time.Second), now.Add(-10 * time.Second), now.Add(-time.Second)}
	count := func(evict []bool) int {
		n := 0
		for _, e := range evict {
			if e {
				n++
			}
		}
		return n
	}
	evict, next := shrinkPlan(now, born, 3, 0, minIdle, false)
	if !evict[0] || !evict[1] || count(evict) != 2 {
		t.Errorf("excess 3: evicts %v, want the two that waited %v", evict, minIdle)
	}
	if want := born[2].Add(minIdle); !next.Equal(want) {
		t.Errorf("next shrink at %v, want %v (when the third has waited %v)", next, want, minIdle)
	}
	if evict, _ := shrinkPlan(now, born, 3, 1, minIdle, false); count(evict) != 0 {
		t.Errorf("with an acquirer waiting: evicts %v, want none", evict)
	}
	if evict, _ := shrinkPlan(now, born, 3, 1, minIdle, true); count(evict) != 0 {
		t.Errorf("budget cut with an acquirer waiting: evicts %v, want none", evict)
	}
	if evict, _ := shrinkPlan(now, born, 3, 0, minIdle, true); count(evict) != 3 || evict[3] {
		t.Errorf("budget cut: evicts %v, want the three oldest", evict)
	}
}

// Two adaptive pools over one budget: the one whose VMs earn fewer hits
// gives way, and gets its VMs back when the other's demand goes.
func TestBudgetArbitrationBetweenTwoPools(t *testing.T) {
	cfg := testAdaptiveConfig(t)
	refill := 200 * time.Millisecond
	busy := newSim(t, cfg, 1, 64, refill)
	quiet := newSim(t, cfg, 1, 64, refill)
	const memMiB, budgetVMs = 256, 14
	const budgetMiB = budgetVMs * memMiB
	hits := func(s *sim) float64 { return s.c.demand.rateAtTime(s.now) }
	share := func() {
		claims := []budgetClaim{
			{name: "busy", memMiB: memMiB, floor: busy.min, want: max(busy.c.estimate(busy.now, 64).Want, busy.c.target), value: hits(busy)},
			{name: "quiet", memMiB: memMiB, floor: quiet.min, want: max(quiet.c.estimate(quiet.now, 64).Want, quiet.c.target), value: hits(quiet)},
		}
		got := arbitrate(budgetMiB, claims)
		busy.allow, quiet.allow = got[0], got[1]
	}
	// Both pools step a second at a time, the budget shared between steps.
	for range 180 {
		busy.run(time.Second, constant(20))
		quiet.run(time.Second, constant(8))
		share()
	}
	wantBusy, wantQuiet := wantFor(cfg, 20, refill), wantFor(cfg, 8, refill)
	if wantBusy+wantQuiet <= budgetVMs {
		t.Fatalf("test needs demand beyond the budget: %d + %d", wantBusy, wantQuiet)
	}
	if high := wantAbove(cfg, 20, refill); busy.c.target < wantBusy || busy.c.target > high {
		t.Errorf("busy pool's target %d, want all it asks for (%d..%d)", busy.c.target, wantBusy, high)
	}
	if quiet.c.target != budgetVMs-busy.c.target || quiet.c.reason != TargetBudget {
		t.Errorf("quiet pool's target %d (%s), want the rest of the budget %d (%s)", quiet.c.target, quiet.c.reason, budgetVMs-busy.c.target, TargetBudget)
	}
	if sum := busy.c.target + quiet.c.target; sum > budgetVMs {
		t.Errorf("targets sum to %d VMs, over the budget of %d", sum, budgetVMs)
	}
	// The busy pool's demand goes; the quiet one gets what it needs.
	for range 20 * 60 {
		busy.run(time.Second, constant(0))
		quiet.run(time.Second, constant(8))
		share()
	}
	if high := wantAbove(cfg, 8, refill); quiet.c.target < wantQuiet || quiet.c.target > high {
		t.Errorf("after the busy pool went idle the quiet pool's target is %d, want %d..%d", quiet.c.target, wantQuiet, high)
	}
}

func TestArbitrateFloorsFirstThenValuePerMiB(t *testing.T) {
	claims := []budgetClaim{
		{name: "a", memMiB: 512, floor: 2, want: 6, value: 4},  // 4 hits/s for 512 MiB VMs
		{name: "b", memMiB: 256, floor: 1, want: 6, value: 3},  // more per MiB than a
		{name: "c", memMiB: 256, floor: 3, want: 3, value: 0},  // a fixed pool
		{name: "d", memMiB: 256, floor: 0, want: 2, value: 10}, // most per MiB
	}
	// Floors: 2*512 + 1*256 + 3*256 = 2048 of 4096. Then d (+2: 512), b
	// (+5: 1280), a (+0: 256 left is half a VM of 512).
	got := arbitrate(4096, claims)
	want := []int{2, 6, 3, 2}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("arbitrate = %v, want %v", got, want)
		}
	}
}
