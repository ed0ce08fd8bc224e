package bench

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"os"
	"slices"
)

// Trace is a replayable sequence of acquire arrivals, in trace seconds
// from its start. `warmpool bench --trace-out FILE` writes one and
// `--trace FILE` replays it.
type Trace struct {
	// Name says where the trace came from ("builtin" or a file's own).
	Name string `json:"name"`
	// Seed generated a builtin trace; 0 for one from elsewhere.
	Seed uint64 `json:"seed,omitempty"`
	// DurationSeconds is how long the trace lasts; the last arrival is
	// before it.
	DurationSeconds float64 `json:"duration_seconds"`
	// Arrivals are the acquires' instants, ascending.
	Arrivals []float64 `json:"arrivals"`
}

// The builtin trace: one compressed "day" of BuiltinTraceSeconds in which
// the base rate follows a sine from BuiltinBaseLow to BuiltinBaseHigh
// acquires per second (night at the start and end, noon in the middle),
// plus bursts whose starts are a Poisson process of BuiltinBurstsPerMinute;
// each burst adds BuiltinBurstRate acquires per second for
// BuiltinBurstSeconds. Arrivals are Poisson (thinning of the summed rate)
// from a PCG seeded with BuiltinTraceSeed, so the same build always
// generates the same trace.
const (
	BuiltinTraceSeed       = 17
	BuiltinTraceSeconds    = 600
	BuiltinBaseLow         = 0.1
	BuiltinBaseHigh        = 0.9
	BuiltinBurstsPerMinute = 1
	BuiltinBurstRate       = 2.0
	BuiltinBurstSeconds    = 8
)

// BuiltinTrace generates the builtin trace.
func BuiltinTrace() Trace {
	rng := rand.New(rand.NewPCG(BuiltinTraceSeed, BuiltinTraceSeed))
	const d = float64(BuiltinTraceSeconds)
	var bursts []float64
	for t := rng.ExpFloat64() * 60 / BuiltinBurstsPerMinute; t < d; t += rng.ExpFloat64() * 60 / BuiltinBurstsPerMinute {
		bursts = append(bursts, t)
	}
	rate := func(t float64) float64 {
		mid, amp := (BuiltinBaseHigh+BuiltinBaseLow)/2, (BuiltinBaseHigh-BuiltinBaseLow)/2
		r := mid - amp*math.Cos(2*math.Pi*t/d)
		for _, b := range bursts {
			if t >= b && t < b+BuiltinBurstSeconds {
				r += BuiltinBurstRate
			}
		}
		return r
	}
	peak := BuiltinBaseHigh + BuiltinBurstRate*float64(len(bursts)) // bound for thinning
	tr := Trace{Name: "builtin", Seed: BuiltinTraceSeed, DurationSeconds: d}
	for t := rng.ExpFloat64() / peak; t < d; t += rng.ExpFloat64() / peak {
		if rng.Float64()*peak < rate(t) {
			tr.Arrivals = append(tr.Arrivals, math.Round(t*1e6)/1e6)
		}
	}
	return tr
}

// ReadTrace reads a trace as WriteJSON writes it, or "builtin".
func ReadTrace(path string) (Trace, error) {
	if path == "builtin" {
		return BuiltinTrace(), nil
	}
	f, err := os.Open(path)
	if err != nil {
		return Trace{}, fmt.Errorf("read trace: %w", err)
	}
	defer f.Close()
	var tr Trace
	if err := json.NewDecoder(f).Decode(&tr); err != nil {
		return Trace{}, fmt.Errorf("read trace %s: %w", path, err)
	}
	if err := tr.Validate(); err != nil {
		return Trace{}, fmt.Errorf("trace %s: %w", path, err)
	}
	if tr.Name == "" {
		tr.Name = path
	}
	return tr, nil
}

// Validate says what is wrong with a trace read from elsewhere.
func (tr Trace) Validate() error {
	if tr.DurationSeconds <= 0 || math.IsInf(tr.DurationSeconds, 0) || math.IsNaN(tr.DurationSeconds) {
		return fmt.Errorf("duration_seconds %v must be positive", tr.DurationSeconds)
	}
	if len(tr.Arrivals) == 0 {
		return fmt.Errorf("no arrivals")
	}
	if !slices.IsSorted(tr.Arrivals) {
		return fmt.Errorf("arrivals are not in ascending order")
	}
	if first, last := tr.Arrivals[0], tr.Arrivals[len(tr.Arrivals)-1]; first < 0 || last >= tr.DurationSeconds {
		return fmt.Errorf("arrivals from %v to %v are not within [0, %v)", first, last, tr.DurationSeconds)
	}
	return nil
}

// WriteJSON writes the trace so that ReadTrace gives it back.
func (tr Trace) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	if err := enc.Encode(tr); err != nil {
		return fmt.Errorf("write trace: %w", err)
	}
	return nil
}

// optimumQuantile is the share of arrivals the offline optimum serves from
// the pool: the hit-rate target.
const optimumQuantile = 0.99

// optimumWindow is the hindsight window (trace seconds) over which the
// offline optimum knows the trace's rate: the arrivals within half of it
// before and after an instant.
const optimumWindow = 10.0

// OptimumIdleVMSeconds is the idle VM-seconds of the offline optimum for
// tr with restores of refill seconds: a pool that knows, at every instant
// t, the trace's rate around it (the arrivals within optimumWindow/2
// before and after t, per second) and holds the smallest depth that one
// refill's Poisson arrivals at that rate empty only 1% of the time, plus
// the one the acquire takes; its VMs are replaced the moment they are
// taken, so at t it has that depth less the arrivals of the last refill
// ready. It has no estimation lag and no hysteresis, which is what an
// online controller pays for; its idle time is the integral of its ready
// VMs, in steps of a hundredth of the refill.
func OptimumIdleVMSeconds(tr Trace, refill float64) float64 {
	if refill <= 0 || len(tr.Arrivals) == 0 {
		return 0
	}
	a := tr.Arrivals
	count := func(from, to float64) int { // arrivals in [from, to)
		return before(a, to) - before(a, from)
	}
	dt := refill / 100
	idle := 0.0
	for t := 0.0; t < tr.DurationSeconds; t += dt {
		from, to := max(0, t-optimumWindow/2), min(tr.DurationSeconds, t+optimumWindow/2)
		rate := float64(count(from, to)) / (to - from)
		depth := poissonQuantile(rate*refill, optimumQuantile) + 1
		if rate == 0 {
			depth = 0
		}
		ready := depth - count(t-refill, t)
		idle += float64(max(0, ready)) * dt
	}
	return idle
}

// before is the number of arrivals before t.
func before(a []float64, t float64) int {
	i, _ := slices.BinarySearch(a, t)
	return i
}

// poissonQuantile is the smallest k with P(N <= k) >= q, N Poisson(mean).
func poissonQuantile(mean, q float64) int {
	if mean <= 0 {
		return 0
	}
	cdf := 0.0
	for k := 0; k < 10000; k++ {
		lg, _ := math.Lgamma(float64(k + 1))
		cdf += math.Exp(float64(k)*math.Log(mean) - mean - lg)
		if cdf >= q {
			return k
		}
	}
	return 10000
}
