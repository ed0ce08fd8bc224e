// Package bench measures the numbers users choose a warm pool on, side by
// side in one run on one machine: cold boot, restore, warm acquire, bursts,
// memory per warm VM, machine ensure and the pool's own overhead. Every
// ratio compares numbers from the same run.
package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/warmpool/warmpool/daemon"
	"github.com/warmpool/warmpool/vm"
)

// Options configure a run. Zero values take defaults that depend on Quick.
type Options struct {
	// Provider is "qemu" (default) or "fake".
	Provider string
	// Quick takes few samples so that a run with real VMs stays under two
	// minutes on a 2-core machine.
	Quick bool
	// StateDir is where the run keeps its daemon's state, VMs and template;
	// a fresh directory is created inside it and removed at the end. Empty
	// means the system's temporary directory, or with the fake provider
	// /dev/shm when there is one: the fake's VMs live in memory, so its
	// daemon's state does too, and its numbers are the code's, not the
	// disk's (the daemon commits its state at every acquire).
	StateDir string
	// CacheDir keeps the guest image between runs (it is slow to build the
	// first time). Empty means the user's cache directory.
	CacheDir string
	// ImageDir names a guest image built before (`warmpool image build
	// --out DIR`); empty builds or reuses the one in CacheDir.
	ImageDir string
	// Accel is passed to the QEMU provider: "auto", "kvm" or "tcg".
	Accel string
	// FakeLatency slows operations of the fake provider down, replacing
	// its own latencies (Provider "fake" only). A slow fake misses
	// targets, which is how a test proves that a miss is reported.
	// Names are the daemon's (create, restore, resume, ...).
	FakeLatency map[string]time.Duration
	// GuestAgent is a prebuilt static guest agent for the image build (the
	// one the warmpool binary embeds); nil compiles it from source.
	GuestAgent []byte
	// NetworkCIDR turns the network scenarios on: the run's daemon gets
	// network.cidr (a range free on this host; a /27 is enough) and its
	// network pool has policy isolated. Empty skips them.
	NetworkCIDR string

	// Samples is the number of measured runs of each latency scenario
	// (restore, warm acquire); ColdSamples of cold boots, which are slow.
	Samples     int
	ColdSamples int
	// WarmupRuns are run and thrown away before each latency scenario.
	WarmupRuns int
	// VCPUs and MemoryMiB shape every VM of the run.
	VCPUs     int
	MemoryMiB int
	// PoolDepth is the depth of the pool the warm acquire draws from.
	PoolDepth int
	// BurstConcurrency (K) acquirers hit a pool of BurstDepth (D) at once,
	// BurstRounds times.
	BurstConcurrency int
	BurstDepth       int
	BurstRounds      int
	// MemoryVMs is the number of warm VMs whose memory is measured.
	MemoryVMs int
	// OverheadConcurrency goroutines each acquire OverheadAcquires times from
	// a pre-filled in-process pool.
	OverheadConcurrency int
	OverheadAcquires    int
	// EnsureSamples measure ensure on a running machine; SuspendSamples
	// measure ensure from suspended.
	EnsureSamples  int
	SuspendSamples int

	// Trace, when set, is replayed against a pool of fixed depth TraceMax,
	// one of TraceMin and an adaptive one between them (scenario 8), at
	// TraceSpeed trace seconds per second. Zero means 2 with QEMU and, with
	// the fake provider, what makes the pool's restore time on the trace's
	// clock traceRefill (its restores run at the machine's speed, not
	// a VM's), within 20..100. The adaptive pool's tuning is divided by the
	// same speed.
	Trace              *Trace
	TraceSpeed         float64
	TraceMin, TraceMax int
	// Density, when above zero, keeps that many warm VMs of the template in
	// one pool and measures their memory and the warm acquire at that
	// depth against depth 2 (scenario 9).
	Density int
	// DensitySamples is the number of measured acquires at each depth.
	DensitySamples int
	// Parallelism is the daemon's limits.parallelism (0: its default).
	Parallelism int
	// TBSizeMiB bounds QEMU's TCG translation cache per VM (0: the
	// provider's default, negative: QEMU's own).
	TBSizeMiB int
	// Scenarios, when set, runs only these steps (StepNames); the
	// default runs every one but trace (only with Trace) and density (only
	// with Density).
	Scenarios []string

	// Progress receives one line per step; nil is silent.
	Progress io.Writer
	Logger   *slog.Logger
}

func (o Options) withDefaults() Options {
	def := func(v *int, full, quick int) {
		if *v <= 0 {
			*v = full
			if o.Quick {
				*v = quick
			}
		}
	}
	if o.Provider == "" {
		o.Provider = "qemu"
	}
	if o.Accel == "" {
		o.Accel = "auto"
	}
	def(&o.Samples, 20, 6)
	def(&o.ColdSamples, 5, 2)
	def(&o.WarmupRuns, 1, 1)
	def(&o.VCPUs, 1, 1)
	def(&o.MemoryMiB, 256, 256)
	def(&o.PoolDepth, 2, 2)
	def(&o.BurstConcurrency, 16, 16)
	def(&o.BurstDepth, 4, 4)
	def(&o.BurstRounds, 3, 1)
	def(&o.MemoryVMs, 8, 3)
	def(&o.OverheadConcurrency, 64, 64)
	def(&o.OverheadAcquires, 200, 20)
	def(&o.EnsureSamples, 2000, 500)
	def(&o.SuspendSamples, 5, 2)
	def(&o.TraceMin, 1, 1)
	def(&o.TraceMax, 8, 8)
	def(&o.DensitySamples, 20, 10)
	if o.TraceSpeed <= 0 && o.Provider != "fake" {
		o.TraceSpeed = 2
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	return o
}

func (o Options) config() Config {
	return Config{
		Samples: o.Samples, ColdSamples: o.ColdSamples, WarmupRuns: o.WarmupRuns,
		VCPUs: o.VCPUs, MemoryMiB: o.MemoryMiB, PoolDepth: o.PoolDepth,
		BurstConcurrency: o.BurstConcurrency, BurstDepth: o.BurstDepth, BurstRounds: o.BurstRounds,
		MemoryVMs: o.MemoryVMs, OverheadConcurrency: o.OverheadConcurrency, OverheadAcquires: o.OverheadAcquires,
		SuspendSamples: o.SuspendSamples, TraceSpeed: o.TraceSpeed, TraceMin: o.TraceMin, TraceMax: o.TraceMax,
		Density: o.Density, DensitySamples: o.DensitySamples, TBSizeMiB: o.TBSizeMiB,
	}
}

// StepNames are the steps of a run, in order; Options.Scenarios picks
// among them.
var StepNames = []string{"cold-boot", "restore", "warm-acquire", "burst", "memory", "ensure", "overhead", "trace", "density", "network", "guest-io"}

// selected says whether step runs.
func (o Options) selected(step string) bool {
	if len(o.Scenarios) > 0 {
		return slices.Contains(o.Scenarios, step)
	}
	switch step {
	case "trace":
		return o.Trace != nil
	case "density":
		return o.Density > 0
	case "network":
		return o.NetworkCIDR != ""
	}
	return true
}

func (o Options) validate() error {
	switch o.Provider {
	case "qemu", "fake":
	default:
		return &vm.FieldError{Field: "provider", Value: o.Provider, Reason: `must be "qemu" or "fake"`}
	}
	if err := vm.ValidateRange("vcpus", o.VCPUs, 1, vm.MaxVCPUs); err != nil {
		return err
	}
	if err := vm.ValidateRange("memory_mib", o.MemoryMiB, vm.MinMemoryMiB, vm.MaxMemoryMiB); err != nil {
		return err
	}
	if err := vm.ValidateRange("burst_depth", o.BurstDepth, 1, o.BurstConcurrency); err != nil {
		return err
	}
	if len(o.FakeLatency) > 0 && o.Provider != "fake" {
		return &vm.FieldError{Field: "fake_latency", Value: o.FakeLatency, Reason: "only applies to the fake provider"}
	}
	for _, s := range o.Scenarios {
		if !slices.Contains(StepNames, s) {
			return &vm.FieldError{Field: "scenarios", Value: s, Reason: "must be one of " + strings.Join(StepNames, ", ")}
		}
	}
	if o.selected("trace") && o.Trace == nil {
		return &vm.FieldError{Field: "trace", Value: nil, Reason: "the trace scenario needs a trace (builtin or a file)"}
	}
	if o.Trace != nil {
		if err := o.Trace.Validate(); err != nil {
			return &vm.FieldError{Field: "trace", Value: o.Trace.Name, Reason: err.Error()}
		}
	}
	if err := vm.ValidateRange("trace_min", o.TraceMin, 0, o.TraceMax); err != nil {
		return err
	}
	if err := vm.ValidateRange("trace_max", o.TraceMax, 1, 1024); err != nil {
		return err
	}
	if o.selected("density") {
		if err := vm.ValidateRange("density", o.Density, 2, 1024); err != nil {
			return err
		}
	}
	for op, d := range o.FakeLatency {
		if d < 0 {
			return &vm.FieldError{Field: "fake_latency", Value: string(op) + "=" + d.String(), Reason: "must not be negative"}
		}
	}
	return nil
}

// env is what every scenario shares: one daemon in-process (the wiring of
// `warmpool serve`), its provider, one template, one state directory, and
// the cleanups that must run however the run ends.
type env struct {
	opts Options
	// d is the daemon every pool, template and machine of the run belongs
	// to; scenarios drive it through its api.Backend methods.
	d *daemon.Local
	// provider is the daemon's, for what a platform without warmpool does
	// by hand (the cold boot and restore baselines) and for reading VMs.
	provider vm.Provider
	snaps    vm.Snapshotter
	dialer   vm.AgentDialer
	// bootSpec cold-boots the daemon's guest image in the template's shape.
	bootSpec vm.Spec
	// templateName names the template every pool is restored from; template
	// is its snapshot.
	templateName string
	template     vm.Snapshot
	stateDir     string

	mu       sync.Mutex
	cleanups []cleanup
}

type cleanup struct {
	what string
	fn   func(context.Context) error
}

// onCleanup registers fn to run at the end of the run, last registered first.
func (e *env) onCleanup(what string, fn func(context.Context) error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.cleanups = append(e.cleanups, cleanup{what, fn})
}

// cleanupAll runs every registered cleanup, the daemon's shutdown among
// them: it was opened with StopAll, so it destroys its warm and leased VMs,
// stops its machines and destroys whatever VM its provider still lists
// (the provider's state lives in this run's own directory, so everything
// it lists was started by this run).
func (e *env) cleanupAll(ctx context.Context) error {
	e.mu.Lock()
	cs := e.cleanups
	e.cleanups = nil
	e.mu.Unlock()
	var errs []error
	for i := len(cs) - 1; i >= 0; i-- {
		start := time.Now()
		err := cs[i].fn(ctx)
		e.opts.Logger.Debug("bench cleanup", "what", cs[i].what, "took", time.Since(start), "err", err)
		if err != nil {
			errs = append(errs, fmt.Errorf("clean up %s: %w", cs[i].what, err))
		}
	}
	return errors.Join(errs...)
}

func (e *env) progress(format string, args ...any) {
	if e.opts.Progress == nil {
		return
	}
	fmt.Fprintf(e.opts.Progress, format+"\n", args...)
}

// memoryDir is where the fake provider's runs keep their state by default.
const memoryDir = "/dev/shm"

// testHookEnv, when set by a test, sees every run's environment.
var testHookEnv func(*env)

// scenarioFunc measures one scenario and returns its rows.
type scenarioFunc func(ctx context.Context, e *env) ([]Scenario, error)

// Run measures every scenario and returns the report. VMs, pools, machines
// and the run's state directory are removed before it returns, also when it
// fails or ctx is cancelled. A scenario the provider cannot run (memory
// without a hypervisor process, say) is reported as skipped with a reason;
// a scenario that fails ends the run with its error.
func Run(ctx context.Context, opts Options) (rep Report, err error) {
	opts = opts.withDefaults()
	if err := opts.validate(); err != nil {
		return Report{}, fmt.Errorf("bench options: %w", err)
	}
	started := time.Now()
	rep = Report{Provider: opts.Provider, Quick: opts.Quick, Started: started.UTC(), Host: hostInfo(), Config: opts.config()}

	parent := opts.StateDir
	if parent == "" {
		parent = os.TempDir()
		if fi, err := os.Stat(memoryDir); opts.Provider == "fake" && err == nil && fi.IsDir() {
			parent = memoryDir
		}
	}
	if err := os.MkdirAll(parent, 0o755); err != nil {
		return Report{}, fmt.Errorf("bench state directory %s: %w", parent, err)
	}
	stateDir, err := os.MkdirTemp(parent, "warmpool-bench-")
	if err != nil {
		return Report{}, fmt.Errorf("bench state directory in %s: %w", parent, err)
	}
	e := &env{opts: opts, stateDir: stateDir}
	if testHookEnv != nil {
		testHookEnv(e)
	}
	defer func() {
		// Cleanup must run even when ctx is already cancelled (Ctrl-C), but
		// must not hang forever on a wedged hypervisor.
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Minute)
		defer cancel()
		cerr := e.cleanupAll(cctx)
		if rerr := os.RemoveAll(stateDir); rerr != nil {
			cerr = errors.Join(cerr, fmt.Errorf("remove bench state %s: %w", stateDir, rerr))
		}
		if cerr != nil {
			err = errors.Join(err, cerr)
		}
	}()

	if err := setup(ctx, e, &rep.Host); err != nil {
		return Report{}, err
	}

	steps := []struct {
		name string
		fn   scenarioFunc
	}{
		{"cold-boot", coldBoot},
		{"restore", restoreToReady},
		{"warm-acquire", warmAcquire},
		{"burst", burst},
		{"memory", memory},
		{"ensure", machineEnsure},
		{"overhead", poolOverhead},
		{"trace", traceScenarios},
		{"density", density},
		{"network", networkScenarios},
		{"guest-io", guestIO},
	}
	steps = slices.DeleteFunc(steps, func(s struct {
		name string
		fn   scenarioFunc
	}) bool {
		return !opts.selected(s.name)
	})
	for i, step := range steps {
		e.progress("[%d/%d] %s", i+1, len(steps), step.name)
		rows, err := step.fn(ctx, e)
		if err != nil {
			return Report{}, fmt.Errorf("bench %s: %w", step.name, err)
		}
		rep.Scenarios = append(rep.Scenarios, rows...)
		// Let the host settle between scenarios so that one scenario's
		// teardown does not land in the next one's samples.
		runtime.GC()
	}
	computeRatios(rep.Scenarios)
	evaluateTargets(rep.Scenarios)
	rep.Host.LoadAvgAfter = readLoadAvg()
	rep.DurationSeconds = time.Since(started).Seconds()
	return rep, nil
}

// measure runs fn warmup times without recording, then n times recording
// how long each took.
func measure(ctx context.Context, warmup, n int, fn func(ctx context.Context) (time.Duration, error)) ([]time.Duration, error) {
	out := make([]time.Duration, 0, n)
	for i := 0; i < warmup+n; i++ {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		d, err := fn(ctx)
		if err != nil {
			return nil, err
		}
		if i >= warmup {
			out = append(out, d)
		}
	}
	return out, nil
}

func latencyRow(id string, number int, title string, ds []time.Duration, warmup int, baseline string) Scenario {
	return Scenario{ID: id, Number: number, Title: title, Unit: "ms", Summary: Summarize(millis(ds)), WarmupRuns: warmup, Baseline: baseline}
}

func skippedRow(id string, number int, title, unit, why string) Scenario {
	return Scenario{ID: id, Number: number, Title: title, Unit: unit, Skipped: why}
}

// destroyQuietly destroys a VM on a context that outlives cancellation.
func (e *env) destroy(ctx context.Context, id string) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
	defer cancel()
	if err := e.provider.Destroy(ctx, id); err != nil && !errors.Is(err, vm.ErrNotFound) {
		return fmt.Errorf("destroy %s: %w", id, err)
	}
	return nil
}

func (e *env) subdir(name string) string { return filepath.Join(e.stateDir, name) }
