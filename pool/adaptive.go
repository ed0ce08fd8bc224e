package pool

import (
	"fmt"
	"math"
	"slices"
	"time"

	"github.com/warmpool/warmpool/vm"
)

// AdaptiveConfig tunes the pools whose spec asks for an adaptive depth. Every
// duration is on the clock the controller is given (wall time in the
// daemon); zero fields take the defaults below.
type AdaptiveConfig struct {
	// RateHalfLife is the half-life of the arrival-rate estimate: an
	// arrival counts half as much this long after it. Default 30s.
	RateHalfLife time.Duration
	// BurstWindow is the short window of the burst detector: the arrivals
	// within it, divided by it, are a second rate estimate that reacts at
	// once to a burst. Default 3s.
	BurstWindow time.Duration
	// Quantile is the share of refills whose arrivals the target covers:
	// the target is the smallest depth that this share of the time is not
	// emptied by the acquires arriving while one restore runs (the refill
	// time: the median of recent restores). Default 0.99.
	Quantile float64
	// Headroom is added to the computed target (before max). Default 0.
	Headroom int
	// ScaleDownAfter is how long the computed target must stay below the
	// current one before the pool shrinks; ScaleDownEvery is the time
	// between two steps down of one VM each. Defaults 15s and 5s.
	ScaleDownAfter time.Duration
	ScaleDownEvery time.Duration
	// MinIdle is the least time a ready VM has waited before it is
	// destroyed because the target went down. Default 15s.
	MinIdle time.Duration
}

// DefaultAdaptive is the tuning that zero fields of AdaptiveConfig take.
func DefaultAdaptive() AdaptiveConfig {
	var c AdaptiveConfig
	_ = c.setDefaults() // the zero value is valid
	return c
}

// Validate names the first field of c that is out of range (zero fields
// take their defaults).
func (c AdaptiveConfig) Validate() error { return c.setDefaults() }

func (c *AdaptiveConfig) setDefaults() error {
	durations := []struct {
		field string
		v     *time.Duration
		def   time.Duration
	}{
		{"adaptive.rate_half_life", &c.RateHalfLife, 30 * time.Second},
		{"adaptive.burst_window", &c.BurstWindow, 3 * time.Second},
		{"adaptive.scale_down_after", &c.ScaleDownAfter, 15 * time.Second},
		{"adaptive.scale_down_every", &c.ScaleDownEvery, 5 * time.Second},
		{"adaptive.min_idle", &c.MinIdle, 15 * time.Second},
	}
	for _, d := range durations {
		if *d.v < 0 {
			return &vm.FieldError{Field: d.field, Value: *d.v, Reason: "must not be negative"}
		}
		if *d.v == 0 {
			*d.v = d.def
		}
	}
	if c.Quantile == 0 {
		c.Quantile = 0.99
	}
	if c.Quantile < 0.5 || c.Quantile >= 1 {
		return &vm.FieldError{Field: "adaptive.quantile", Value: c.Quantile, Reason: "must be at least 0.5 and below 1"}
	}
	if c.Headroom < 0 || c.Headroom > MaxSize {
		return &vm.FieldError{Field: "adaptive.headroom", Value: c.Headroom, Reason: fmt.Sprintf("must be between 0 and %d", MaxSize)}
	}
	return nil
}

// Reasons for a change of an adaptive pool's target, in Status, events and
// the target-changes metric.
const (
	TargetStart  = "start"  // the pool became adaptive
	TargetRate   = "rate"   // the estimated arrival rate went up
	TargetBurst  = "burst"  // the burst detector saw more arrivals than the rate explains
	TargetMiss   = "miss"   // an acquirer found nothing ready
	TargetIdle   = "idle"   // demand went down and stayed down (one step)
	TargetBounds = "bounds" // min or max changed
	TargetBudget = "budget" // the host's memory budget gives the pool less
)

// EventTarget is published when an adaptive pool's target changes.
const EventTarget = "pool.target"

// burstSlots divides the burst window so that it slides in steps of a
// tenth of itself.
const burstSlots = 10

// restoreSamples is how many recent restore times the refill time is
// taken from, and refillQuantile which of them (the median): the tail of
// restores on a busy host is long, and a target sized for it would idle
// most of the time; a miss in that tail raises the target by one anyway.
const (
	restoreSamples = 64
	refillQuantile = 0.5
)

// demand estimates, from acquire arrivals and restore times fed to it with
// their instants, how many acquires arrive during one refill. It holds no
// clock: every method is given the time.
type demand struct {
	halfLife, window time.Duration
	// rate is the exponentially weighted arrival rate (per second) at
	// rateAt: each arrival adds 1/tau and the sum decays as e^(-dt/tau),
	// which for a steady Poisson stream averages to its rate.
	rate   float64
	rateAt time.Time
	// slots count arrivals per tenth of the burst window; slotAt says which
	// tenth (counted from the zero time) each one holds. One more than the
	// window's tenths lets the window slide smoothly within a tenth.
	slots  [burstSlots + 1]int
	slotAt [burstSlots + 1]int64

	restores  [restoreSamples]time.Duration
	nRestores int
	next      int
	// refill caches refillTime's answer for refillQ until a sample comes.
	refill  time.Duration
	refillQ float64
}

func (d *demand) tau() float64 { return d.halfLife.Seconds() / math.Ln2 }

func (d *demand) slotWidth() int64 { return max(1, int64(d.window/burstSlots)) }

func (d *demand) slotIndex(now time.Time) int64 { return now.UnixNano() / d.slotWidth() }

// arrive records n acquires at now.
func (d *demand) arrive(now time.Time, n int) {
	if n <= 0 {
		return
	}
	d.rate = d.rateAtTime(now) + float64(n)/d.tau()
	d.rateAt = now
	i := d.slotIndex(now)
	s := int(i % (burstSlots + 1))
	if d.slotAt[s] != i {
		d.slotAt[s], d.slots[s] = i, 0
	}
	d.slots[s] += n
}

// rateAtTime is the exponentially weighted rate decayed to now.
func (d *demand) rateAtTime(now time.Time) float64 {
	if d.rateAt.IsZero() {
		return 0
	}
	dt := now.Sub(d.rateAt).Seconds()
	if dt <= 0 {
		return d.rate
	}
	return d.rate * math.Exp(-dt/d.tau())
}

// burstRate is the arrivals within the last burst window, per second: the
// tenths within it, and the share of the oldest tenth still inside.
func (d *demand) burstRate(now time.Time) float64 {
	cur := d.slotIndex(now)
	elapsed := float64(now.UnixNano()-cur*d.slotWidth()) / float64(d.slotWidth())
	n := 0.0
	for s := range burstSlots + 1 {
		switch age := cur - d.slotAt[s]; {
		case age < 0 || age > burstSlots:
		case age == burstSlots:
			n += float64(d.slots[s]) * (1 - elapsed)
		default:
			n += float64(d.slots[s])
		}
	}
	return n / d.window.Seconds()
}

// restored records how long one restore took to a ready VM.
func (d *demand) restored(took time.Duration) {
	d.restores[d.next] = took
	d.next = (d.next + 1) % restoreSamples
	d.nRestores = min(d.nRestores+1, restoreSamples)
	d.refillQ = 0
}

// refillTime is the q-quantile of the recent restore times; zero before
// the first one.
func (d *demand) refillTime(q float64) time.Duration {
	if d.nRestores == 0 {
		return 0
	}
	if d.refillQ == q {
		return d.refill
	}
	s := slices.Clone(d.restores[:d.nRestores])
	slices.Sort(s)
	i := int(math.Ceil(q*float64(len(s)))) - 1
	d.refill, d.refillQ = s[max(0, min(i, len(s)-1))], q
	return d.refill
}

// poissonQuantile is the smallest k with P(N <= k) >= q for N Poisson with
// the given mean, at most limit.
func poissonQuantile(mean, q float64, limit int) int {
	if mean <= 0 {
		return 0
	}
	cdf := 0.0
	for k := 0; k < limit; k++ {
		lg, _ := math.Lgamma(float64(k + 1))
		cdf += math.Exp(float64(k)*math.Log(mean) - mean - lg)
		if cdf >= q {
			return k
		}
	}
	return limit
}

// controller decides an adaptive pool's target depth from its demand: up
// at once, down one VM at a time after demand stayed low. It is pure
// state: the bucket's owner gives it every observation with its time.
type controller struct {
	cfg    AdaptiveConfig
	demand demand

	// target is the current target depth (within the bounds and the
	// budget); reason why it last changed, at changed.
	target  int
	reason  string
	changed time.Time
	// below is since when the computed target has been below target; zero
	// while it is not.
	below time.Time
	// lastDown is when the target last went down a step.
	lastDown time.Time
	started  bool
}

func newController(cfg AdaptiveConfig) *controller {
	return &controller{cfg: cfg, demand: demand{halfLife: cfg.RateHalfLife, window: cfg.BurstWindow}}
}

// observation is what a bucket tells its controller at a step.
type observation struct {
	// Arrivals counts acquires since the previous step; Missed those of
	// them that found nothing ready.
	Arrivals, Missed int
	// Min and Max bound the target.
	Min, Max int
	// Allowed is the most VMs the host's memory budget leaves the pool,
	// at least Min; negative means no budget applies.
	Allowed int
}

// estimate is the controller's view of demand at a step.
type estimate struct {
	// Rate is the arrival rate the target is computed from (per second):
	// the larger of the weighted and the burst-window rate.
	Rate float64
	// Burst says the burst window's rate was the larger.
	Burst bool
	// Refill is the refill time used.
	Refill time.Duration
	// Want is the depth that demand asks for, before bounds and budget.
	Want int
}

func (c *controller) estimate(now time.Time, limit int) estimate {
	weighted, burst := c.demand.rateAtTime(now), c.demand.burstRate(now)
	e := estimate{Rate: max(weighted, burst), Burst: burst > weighted, Refill: c.demand.refillTime(refillQuantile)}
	// A pool whose demand is this low expects less than one acquire
	// before it would shrink anyway: it keeps none beyond its min.
	if e.Rate*c.cfg.ScaleDownAfter.Seconds() < 1 {
		return e
	}
	// An acquire hits when fewer than the depth arrived during the refill
	// before it; with Poisson arrivals that count is Poisson(rate·refill).
	e.Want = poissonQuantile(e.Rate*e.Refill.Seconds(), c.cfg.Quantile, limit) + 1 + c.cfg.Headroom
	return e
}

// step takes in an observation at now and moves the target. It reports
// whether the target changed.
func (c *controller) step(now time.Time, o observation) (estimate, bool) {
	c.demand.arrive(now, o.Arrivals)
	est := c.estimate(now, max(o.Max, 1))
	ceiling := o.Max
	if o.Allowed >= 0 {
		ceiling = min(ceiling, max(o.Allowed, o.Min))
	}
	clamp := func(n int) int { return max(o.Min, min(n, ceiling)) }
	old := c.target
	set := func(n int, reason string) bool {
		if n == c.target {
			return false
		}
		c.target, c.reason, c.changed = n, reason, now
		return true
	}
	if !c.started {
		c.started = true
		c.target, c.reason, c.changed = clamp(est.Want), TargetStart, now
		return est, true
	}
	// Bounds and budget apply at once, whichever way.
	if clamped := clamp(c.target); clamped != c.target {
		reason := TargetBounds
		if clamped < c.target && o.Allowed >= 0 && o.Allowed < o.Max && clamped == max(o.Allowed, o.Min) {
			reason = TargetBudget
		}
		set(clamped, reason)
		c.below = time.Time{}
	}
	want, why := est.Want, TargetRate
	if est.Burst {
		why = TargetBurst
	}
	if o.Missed > 0 && want <= c.target {
		want, why = c.target+1, TargetMiss
	}
	switch {
	case clamp(want) > c.target:
		set(clamp(want), why)
		c.below = time.Time{}
	case clamp(want) < c.target:
		if c.below.IsZero() {
			c.below = now
		}
		if now.Sub(c.below) >= c.cfg.ScaleDownAfter && now.Sub(c.lastDown) >= c.cfg.ScaleDownEvery {
			set(c.target-1, TargetIdle)
			c.lastDown = now
		}
	default:
		c.below = time.Time{}
	}
	return est, c.target != old
}

// tick is how often an adaptive bucket's owner steps its controller when
// nothing else wakes it, so that demand decays on time.
func (c *controller) tick() time.Duration {
	return min(c.cfg.BurstWindow/burstSlots*2, c.cfg.ScaleDownEvery)
}
