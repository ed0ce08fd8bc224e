package bench

import (
	"encoding/json"
	"fmt"
	"io"
	"time"
)

// Report is everything one run measured, in a shape that is stable for
// scripts: fields may be added, none renamed.
type Report struct {
	Provider string    `json:"provider"`
	Quick    bool      `json:"quick"`
	Started  time.Time `json:"started"`
	// DurationSeconds is the wall time of the whole run, setup included.
	DurationSeconds float64    `json:"duration_seconds"`
	Host            Host       `json:"host"`
	Config          Config     `json:"config"`
	Scenarios       []Scenario `json:"scenarios"`
}

// Config records the knobs the run used so two reports can be compared.
type Config struct {
	Samples             int `json:"samples"`
	ColdSamples         int `json:"cold_samples"`
	WarmupRuns          int `json:"warmup_runs"`
	VCPUs               int `json:"vcpus"`
	MemoryMiB           int `json:"memory_mib"`
	PoolDepth           int `json:"pool_depth"`
	BurstConcurrency    int `json:"burst_concurrency"`
	BurstDepth          int `json:"burst_depth"`
	BurstRounds         int `json:"burst_rounds"`
	MemoryVMs           int `json:"memory_vms"`
	OverheadConcurrency int `json:"overhead_concurrency"`
	OverheadAcquires    int `json:"overhead_acquires"`
	SuspendSamples      int `json:"suspend_samples"`
	// TraceSpeed is trace seconds per second of the trace replay.
	TraceSpeed     float64 `json:"trace_speed,omitempty"`
	TraceMin       int     `json:"trace_min,omitempty"`
	TraceMax       int     `json:"trace_max,omitempty"`
	Density        int     `json:"density,omitempty"`
	DensitySamples int     `json:"density_samples,omitempty"`
	TBSizeMiB      int     `json:"tb_size_mib,omitempty"`
}

// Scenario is one measured row. Latencies are in milliseconds, memory in
// MiB; Unit says which.
type Scenario struct {
	ID     string `json:"id"`
	Number int    `json:"number"`
	Title  string `json:"title"`
	Unit   string `json:"unit"`
	Summary
	WarmupRuns int `json:"warmup_runs"`
	// Baseline names what Ratio compares against: another scenario's ID or a
	// fixed quantity such as "configured-memory".
	Baseline string `json:"baseline,omitempty"`
	// BaselineValue is the baseline's p50 (or the fixed quantity), in Unit.
	BaselineValue float64 `json:"baseline_value,omitempty"`
	// Ratio is P50 / BaselineValue; 0 when there is no baseline or no data.
	Ratio   float64            `json:"ratio"`
	Metrics map[string]float64 `json:"metrics,omitempty"`
	Targets []Target           `json:"targets,omitempty"`
	// Skipped says why the scenario could not run; its numbers are zero.
	Skipped string `json:"skipped,omitempty"`
}

// Target is one goal checked against the run's own numbers.
type Target struct {
	Description string  `json:"description"`
	Value       float64 `json:"value"`
	Limit       float64 `json:"limit"`
	Unit        string  `json:"unit"`
	Pass        bool    `json:"pass"`
}

// Scenario returns the row with the given ID.
func (r Report) Scenario(id string) (Scenario, bool) {
	for _, s := range r.Scenarios {
		if s.ID == id {
			return s, true
		}
	}
	return Scenario{}, false
}

// Passed reports whether every target of every scenario that ran was met.
func (r Report) Passed() bool { return len(r.Missed()) == 0 }

// Missed returns the targets that were not met, in report order.
func (r Report) Missed() []Target {
	var out []Target
	for _, s := range r.Scenarios {
		for _, t := range s.Targets {
			if !t.Pass {
				out = append(out, t)
			}
		}
	}
	return out
}

// WriteJSON writes the report as indented JSON.
func (r Report) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	if err := enc.Encode(r); err != nil {
		return fmt.Errorf("encode bench report: %w", err)
	}
	return nil
}

// computeRatios fills Ratio for every scenario whose baseline is another
// scenario of the same run, so ratios never mix numbers from two runs.
func computeRatios(scenarios []Scenario) {
	byID := make(map[string]Scenario, len(scenarios))
	for _, s := range scenarios {
		byID[s.ID] = s
	}
	for i := range scenarios {
		s := &scenarios[i]
		if base, ok := byID[s.Baseline]; ok && s.Baseline != "" {
			if base.Count == 0 || base.Unit != s.Unit {
				continue
			}
			s.BaselineValue = base.P50
		}
		if s.BaselineValue > 0 && s.Count > 0 {
			s.Ratio = s.P50 / s.BaselineValue
		}
	}
}

// targetSpec is a goal evaluated after all ratios are known.
type targetSpec struct {
	scenario    string
	description string
	unit        string
	// strict goals need value < limit; the others allow equality.
	strict bool
	// atLeast goals need value >= limit instead.
	atLeast bool
	// value extracts the measured quantity; ok is false when the inputs are
	// missing (scenario skipped), in which case no target is reported.
	value func(byID map[string]Scenario) (v float64, ok bool)
	limit func(byID map[string]Scenario) (l float64, ok bool)
}

func fixed(v float64) func(map[string]Scenario) (float64, bool) {
	return func(map[string]Scenario) (float64, bool) { return v, true }
}

func field(id string, get func(Scenario) float64) func(map[string]Scenario) (float64, bool) {
	return func(byID map[string]Scenario) (float64, bool) {
		s, ok := byID[id]
		if !ok || s.Count == 0 {
			return 0, false
		}
		return get(s), true
	}
}

func scaled(f func(map[string]Scenario) (float64, bool), by float64) func(map[string]Scenario) (float64, bool) {
	return func(byID map[string]Scenario) (float64, bool) {
		v, ok := f(byID)
		return v * by, ok
	}
}

// metric extracts a row's named metric times by; missing when the row or
// the metric is.
func metric(id, name string, by float64) func(map[string]Scenario) (float64, bool) {
	return func(byID map[string]Scenario) (float64, bool) {
		s, ok := byID[id]
		if !ok {
			return 0, false
		}
		v, ok := s.Metrics[name]
		return v * by, ok
	}
}

func p50(s Scenario) float64   { return s.P50 }
func p99(s Scenario) float64   { return s.P99 }
func maxOf(s Scenario) float64 { return s.Max }
func ratio(s Scenario) float64 { return s.Ratio }

// targets are the goals from issue 6 (and issues 2, 3 and 5) for this
// machine. Ratio goals compare like with like (p50 against p50) except the
// warm acquire, whose tail must beat the typical cold boot a hundredfold.
var targets = []targetSpec{
	{
		scenario:    "restore",
		description: "restore-to-ready p50 <= 1/10 of cold boot p50",
		unit:        "ratio",
		value:       field("restore", ratio),
		limit:       fixed(0.1),
	},
	{
		scenario:    "warm-acquire",
		description: "warm acquire p99 < 20 ms",
		strict:      true,
		unit:        "ms",
		value:       field("warm-acquire", p99),
		limit:       fixed(20),
	},
	{
		scenario:    "warm-acquire",
		description: "warm acquire p99 <= 1/100 of cold boot p50",
		unit:        "ms",
		value:       field("warm-acquire", p99),
		limit:       scaled(field("cold-boot", p50), 0.01),
	},
	{
		scenario:    "burst-wait",
		description: "burst: every waiter served within 1 s",
		unit:        "ms",
		value:       field("burst-wait", maxOf),
		limit:       fixed(1000),
	},
	{
		scenario:    "trace-adaptive",
		description: "trace: adaptive hit rate >= 99%",
		unit:        "%",
		value:       metric("trace-adaptive", "hit_rate", 100),
		limit:       fixed(99),
		atLeast:     true,
	},
	{
		scenario:    "trace-adaptive",
		description: "trace: adaptive hit rate within 1 point of fixed depth = max",
		unit:        "points",
		value: func(byID map[string]Scenario) (float64, bool) {
			a, okA := metric("trace-adaptive", "hit_rate", 100)(byID)
			m, okM := metric("trace-fixed-max", "hit_rate", 100)(byID)
			return m - a, okA && okM
		},
		limit: fixed(1),
	},
	{
		scenario:    "trace-adaptive",
		description: "trace: adaptive idle VM-seconds <= 1.5x the offline optimum",
		unit:        "VM-s",
		value:       metric("trace-adaptive", "idle_vm_seconds", 1),
		limit:       scaled(metric("trace-adaptive", "optimum_idle_vm_seconds", 1), 1.5),
	},
	{
		scenario:    "net-acquire",
		description: "warm acquire with networking p99 < 20 ms",
		strict:      true,
		unit:        "ms",
		value:       field("net-acquire", p99),
		limit:       fixed(20),
	},
	{
		scenario:    "memory-private",
		description: "private memory of every warm VM <= 25% of configured memory",
		unit:        "MiB",
		value:       field("memory-private", maxOf),
		limit:       scaled(field("memory-private", func(s Scenario) float64 { return s.BaselineValue }), 0.25),
	},
	{
		scenario:    "disk-per-clone",
		description: "host disk per clone after hand-off < 1 MiB",
		strict:      true,
		unit:        "KiB",
		value:       field("disk-per-clone", maxOf),
		limit:       fixed(1024),
	},
	{
		scenario:    "pool-overhead",
		description: "in-process acquire p99 < 50 µs",
		strict:      true,
		unit:        "ms",
		value:       field("pool-overhead", p99),
		limit:       fixed(0.05),
	},
	{
		scenario:    "ensure-running",
		description: "ensure on a running machine p99 < 1 ms",
		strict:      true,
		unit:        "ms",
		value:       field("ensure-running", p99),
		limit:       fixed(1),
	},
	{
		scenario:    "ensure-suspended",
		description: "ensure from suspended p50 < 1/5 of cold start p50",
		strict:      true,
		unit:        "ratio",
		value:       field("ensure-suspended", ratio),
		limit:       fixed(0.2),
	},
}

// evaluateTargets attaches every target whose inputs were measured.
func evaluateTargets(scenarios []Scenario) {
	byID := make(map[string]Scenario, len(scenarios))
	for _, s := range scenarios {
		byID[s.ID] = s
	}
	for _, spec := range targets {
		v, okV := spec.value(byID)
		l, okL := spec.limit(byID)
		if !okV || !okL {
			continue
		}
		for i := range scenarios {
			if scenarios[i].ID != spec.scenario {
				continue
			}
			pass := v <= l
			switch {
			case spec.atLeast:
				pass = v >= l
			case spec.strict:
				pass = v < l
			}
			scenarios[i].Targets = append(scenarios[i].Targets, Target{
				Description: spec.description, Value: v, Limit: l, Unit: spec.unit, Pass: pass,
			})
		}
	}
}
