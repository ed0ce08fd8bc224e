package bench

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/warmpool/warmpool/agent"
	"github.com/warmpool/warmpool/pool"
	"github.com/warmpool/warmpool/vm"
)

// poolWaitTimeout bounds waiting for a pool to reach its depth.
const poolWaitTimeout = 5 * time.Minute

// handoffTimes records how long each step of the hand-off took, so the
// report can say where a slow acquire spends its time.
type handoffTimes struct {
	mu            sync.Mutex
	dial, handoff []time.Duration
	prepared      int
}

// warmExec is the command a warm VM runs once while it is prepared, as the
// daemon's pools do, so that a tenant's first exec is not the first one.
var warmExec = []string{"true"}

// warmPoolConfig is how the daemon runs a pool of real warm VMs: each VM
// is prepared for a fast hand-off before it enters the pool (see
// agent.Handoffer), and acquire hands it fresh entropy, the wall clock and a
// hostname through the agent, then pings it, so that the measured acquire
// pays for the real hand-off. times, when not nil, records each step.
func (e *env) warmPoolConfig(times *handoffTimes) pool.Config {
	h := agent.NewHandoffer(e.provider, e.dialer)
	h.WarmExec = warmExec
	e.onCleanup("handoffer", func(context.Context) error { h.Close(); return nil })
	return pool.Config{
		Validate: h.Validate(validateWarm(e.provider)),
		Handoff: func(ctx context.Context, v vm.VM, id pool.Identity) error {
			entropy := make([]byte, 32)
			if _, err := rand.Read(entropy); err != nil {
				return fmt.Errorf("entropy for %s: %w", v.ID, err)
			}
			t, err := h.Handoff(ctx, v, agent.HandoffRequest{Entropy: entropy, Time: time.Now(), Hostname: id.LeaseID})
			if err != nil {
				return err
			}
			if times != nil {
				times.mu.Lock()
				times.dial = append(times.dial, t.Dial)
				times.handoff = append(times.handoff, t.Handoff)
				if t.Prepared {
					times.prepared++
				}
				times.mu.Unlock()
			}
			return nil
		},
	}
}

// validateWarm is the daemon's check of a paused warm VM: still there, not
// stopped. A paused guest cannot answer its agent.
func validateWarm(p vm.Provider) func(ctx context.Context, v vm.VM) error {
	return func(ctx context.Context, v vm.VM) error {
		got, err := p.Inspect(ctx, v.ID)
		if err != nil {
			return err
		}
		if got.Status == vm.StatusStopped || got.Status == vm.StatusUnknown {
			return fmt.Errorf("VM %s is %s: %w", v.ID, got.Status, vm.ErrInvalidState)
		}
		return nil
	}
}

// benchPool is one pool with one stack of the run's template, shut down
// (every warm VM destroyed) by the run's cleanup if not before.
type benchPool struct {
	*pool.Pool
	prov  vm.Provider // destroys what the pool hands out
	name  string
	key   vm.StackKey
	depth int
	e     *env
	once  sync.Once
	err   error
}

func (e *env) newPool(ctx context.Context, name string, depth int, p vm.Provider, snap vm.Snapshot, cfg pool.Config) (*benchPool, error) {
	cfg.Provider = p
	if cfg.Validate == nil {
		cfg.Validate = validateWarm(p)
	}
	pl, err := pool.New(cfg)
	if err != nil {
		return nil, err
	}
	key := vm.StackKey{Template: "bench", VCPUs: snap.Spec.VCPUs, MemoryMiB: snap.Spec.MemoryMiB}
	bp := &benchPool{Pool: pl, prov: p, name: name, key: key, depth: depth, e: e}
	e.onCleanup("pool "+name, bp.shutdown)
	spec := pool.StackSpec{
		Name:     name,
		Key:      key,
		Snapshot: snap,
		Min:      depth,
		Max:      depth,
	}
	if err := pl.Register(spec); err != nil {
		return nil, fmt.Errorf("register stack %s: %w", name, err)
	}
	return bp, nil
}

// shutdown destroys the pool's warm VMs once; later calls return the first
// result.
func (bp *benchPool) shutdown(ctx context.Context) error {
	bp.once.Do(func() {
		ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Minute)
		defer cancel()
		bp.err = bp.Shutdown(ctx)
	})
	return bp.err
}

// waitFull polls until the pool holds its full depth of ready VMs.
func (bp *benchPool) waitFull(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, poolWaitTimeout)
	defer cancel()
	t := time.NewTicker(time.Millisecond)
	defer t.Stop()
	for {
		st, err := bp.Status(bp.name)
		if err != nil {
			return err
		}
		if st.Ready >= bp.depth {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("pool %s reached %d of %d ready VMs: %w", bp.name, st.Ready, bp.depth, ctx.Err())
		case <-t.C:
		}
	}
}

func (bp *benchPool) release(ctx context.Context, l *pool.Lease) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
	defer cancel()
	if err := bp.prov.Destroy(ctx, l.VM.ID); err != nil && !errors.Is(err, vm.ErrNotFound) {
		return fmt.Errorf("release lease %s: destroy %s: %w", l.ID, l.VM.ID, err)
	}
	return nil
}

// leaseSeq numbers the bench's leases: the ID is the guest's hostname.
var leaseSeq atomic.Uint64

// acquire leases a VM under a fresh lease ID, as the daemon does.
func (bp *benchPool) acquire(ctx context.Context) (*pool.Lease, error) {
	return bp.Acquire(ctx, bp.name, pool.Identity{LeaseID: fmt.Sprintf("bench-%d", leaseSeq.Add(1))})
}

// warmAcquire is scenario 3: acquire from a full pool (every sample is a
// hit) until a handed-off, pinged lease is returned.
func warmAcquire(ctx context.Context, e *env) ([]Scenario, error) {
	var steps handoffTimes
	bp, err := e.newPool(ctx, "warm", e.opts.PoolDepth, e.provider, e.template, e.warmPoolConfig(&steps))
	if err != nil {
		return nil, err
	}
	defer bp.shutdown(ctx) //nolint:errcheck // the run's cleanup reports it
	var handoffs, firstExecs []time.Duration
	ds, err := measure(ctx, e.opts.WarmupRuns, e.opts.Samples, func(ctx context.Context) (time.Duration, error) {
		if err := bp.waitFull(ctx); err != nil {
			return 0, err
		}
		actx, cancel := context.WithTimeout(ctx, readyTimeout)
		defer cancel()
		start := time.Now()
		l, err := bp.acquire(actx)
		d := time.Since(start)
		if err != nil {
			return 0, err
		}
		handoffs = append(handoffs, l.Timings.Handoff)
		fe, err := firstExec(actx, e.dialer, l.VM.ID)
		if err != nil {
			return 0, err
		}
		firstExecs = append(firstExecs, fe)
		if err := bp.release(ctx, l); err != nil {
			return 0, err
		}
		return d, nil
	})
	if err != nil {
		return nil, err
	}
	row := latencyRow("warm-acquire", 3, "acquire from warm pool to handed-off lease", ds, e.opts.WarmupRuns, "cold-boot")
	st, err := bp.Status(bp.name)
	if err == nil {
		row.Metrics = map[string]float64{"pool_depth": float64(bp.depth), "hits": float64(st.Counters.Hits), "waits": float64(st.Counters.Waits)}
	}
	// Warm-up runs are the first ones; the handoff part of the measured ones.
	if len(handoffs) > e.opts.WarmupRuns {
		hs := Summarize(millis(handoffs[e.opts.WarmupRuns:]))
		if row.Metrics == nil {
			row.Metrics = map[string]float64{}
		}
		row.Metrics["handoff_p50_ms"] = hs.P50
		row.Metrics["first_exec_p50_ms"] = Summarize(millis(firstExecs[e.opts.WarmupRuns:])).P50
		w := e.opts.WarmupRuns
		steps.mu.Lock()
		if len(steps.dial) > w {
			row.Metrics["handoff_dial_p50_ms"] = Summarize(millis(steps.dial[w:])).P50
			row.Metrics["handoff_call_p50_ms"] = Summarize(millis(steps.handoff[w:])).P50
			row.Metrics["handoff_call_p99_ms"] = Summarize(millis(steps.handoff[w:])).P99
			row.Metrics["handoffs_prepared"] = float64(steps.prepared)
		}
		steps.mu.Unlock()
	}
	return []Scenario{row}, nil
}

// firstExec is what a tenant's first command costs right after acquire
// (connect to the agent, run true), not counted in the acquire itself.
func firstExec(ctx context.Context, d vm.AgentDialer, id string) (time.Duration, error) {
	start := time.Now()
	c, err := agent.Dial(ctx, d, id)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	code, err := c.Exec(ctx, agent.ExecRequest{Argv: []string{"true"}}, nil, nil)
	if err != nil {
		return 0, fmt.Errorf("first exec in %s: %w", id, err)
	}
	if code != 0 {
		return 0, fmt.Errorf("first exec in %s: true exited %d", id, code)
	}
	return time.Since(start), nil
}

// burst is scenario 4: K acquirers arrive at once at a pool of depth D. The
// first D are hits; the rest wait for restores. Tenants keep their VMs until
// the pool is back to depth, as a burst of real tenants would.
func burst(ctx context.Context, e *env) ([]Scenario, error) {
	k, depth := e.opts.BurstConcurrency, e.opts.BurstDepth
	bp, err := e.newPool(ctx, "burst", depth, e.provider, e.template, e.warmPoolConfig(nil))
	if err != nil {
		return nil, err
	}
	defer bp.shutdown(ctx) //nolint:errcheck // the run's cleanup reports it

	var all, hits, waits, refill, refillAfterLast []time.Duration
	for round := 0; round < e.opts.BurstRounds; round++ {
		if err := bp.waitFull(ctx); err != nil {
			return nil, err
		}
		res, err := burstOnce(ctx, bp, k)
		if err != nil {
			return nil, err
		}
		for _, r := range res.acquires {
			all = append(all, r.total)
			if r.hit {
				hits = append(hits, r.total)
			} else {
				waits = append(waits, r.total)
			}
		}
		refill = append(refill, res.backToDepth)
		refillAfterLast = append(refillAfterLast, res.backToDepth-res.lastAcquired)
		e.progress("  burst round %d: %d acquirers, %d hits, back to depth %d after %s", round+1, k, countHits(res.acquires), depth, formatMillis(millis1(res.backToDepth)))
	}
	title := fmt.Sprintf("burst: %d acquirers, pool depth %d", k, depth)
	rowAll := latencyRow("burst", 4, title, all, 0, "cold-boot")
	rowAll.Metrics = map[string]float64{
		"concurrency":                 float64(k),
		"depth":                       float64(depth),
		"rounds":                      float64(e.opts.BurstRounds),
		"hit_rate":                    float64(len(hits)) / float64(max(len(all), 1)),
		"back_to_depth_p50_ms":        Summarize(millis(refill)).P50,
		"back_to_depth_max_ms":        Summarize(millis(refill)).Max,
		"back_to_depth_after_last_ms": Summarize(millis(refillAfterLast)).P50,
	}
	return []Scenario{
		rowAll,
		latencyRow("burst-hit", 4, "burst: acquires that hit", hits, 0, "cold-boot"),
		latencyRow("burst-wait", 4, "burst: acquires that waited", waits, 0, "cold-boot"),
	}, nil
}

type acquireResult struct {
	total time.Duration
	hit   bool
}

type burstResult struct {
	acquires     []acquireResult
	lastAcquired time.Duration // from the start until the last lease
	backToDepth  time.Duration // from the start until the pool is full again
}

func countHits(rs []acquireResult) int {
	n := 0
	for _, r := range rs {
		if r.hit {
			n++
		}
	}
	return n
}

func burstOnce(ctx context.Context, bp *benchPool, k int) (burstResult, error) {
	ctx, cancel := context.WithTimeout(ctx, poolWaitTimeout)
	defer cancel()
	var (
		mu     sync.Mutex
		leases []*pool.Lease
		res    burstResult
		errs   []error
		wg     sync.WaitGroup
	)
	// Leases are released whatever happens, after the measurement.
	defer func() {
		for _, l := range leases {
			_ = bp.release(ctx, l)
		}
	}()
	startGate := make(chan struct{})
	for i := 0; i < k; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-startGate
			l, err := bp.acquire(ctx)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				errs = append(errs, err)
				return
			}
			leases = append(leases, l)
			res.acquires = append(res.acquires, acquireResult{total: l.Timings.Total, hit: l.Timings.Wait == 0})
		}()
	}
	start := time.Now()
	close(startGate)
	wg.Wait()
	res.lastAcquired = time.Since(start)
	if err := errors.Join(errs...); err != nil {
		return res, fmt.Errorf("burst of %d acquirers: %w", k, err)
	}
	if err := bp.waitFull(ctx); err != nil {
		return res, err
	}
	res.backToDepth = time.Since(start)
	return res, nil
}

// memory is scenario 5: N warm VMs of one template sit in a pool; how much
// host memory does each cost on its own (Private) and as its fair share of
// what clones share (PSS), against the guest memory it was given.
func memory(ctx context.Context, e *env) ([]Scenario, error) {
	const titleP, titleS = "memory per warm VM: private", "memory per warm VM: PSS"
	n := e.opts.MemoryVMs
	bp, err := e.newPool(ctx, "memory", n, e.provider, e.template, e.warmPoolConfig(nil))
	if err != nil {
		return nil, err
	}
	defer bp.shutdown(ctx) //nolint:errcheck // the run's cleanup reports it
	if err := bp.waitFull(ctx); err != nil {
		return nil, err
	}
	// Restores finish their lazy work (page faults of the first run) a
	// moment after they report ready; measure the steady state.
	if err := sleep(ctx, memorySettle); err != nil {
		return nil, err
	}
	vms, err := e.provider.List(ctx)
	if err != nil {
		return nil, fmt.Errorf("list warm VMs: %w", err)
	}
	var private, pss, rss []float64
	for _, v := range vms {
		if v.Snapshot != e.template.ID || v.Status != vm.StatusPaused {
			continue
		}
		if v.PID == 0 {
			continue
		}
		m, err := readProcMemory(v.PID)
		if err != nil {
			return nil, fmt.Errorf("memory of warm VM %s: %w", v.ID, err)
		}
		private = append(private, float64(m.PrivateKiB)/1024)
		pss = append(pss, float64(m.PssKiB)/1024)
		rss = append(rss, float64(m.RssKiB)/1024)
	}
	if len(private) == 0 {
		why := fmt.Sprintf("provider %s runs no hypervisor process to measure", e.provider.Name())
		return []Scenario{
			skippedRow("memory-private", 5, titleP, "MiB", why),
			skippedRow("memory-pss", 5, titleS, "MiB", why),
		}, nil
	}
	configured := float64(e.template.Spec.MemoryMiB)
	metrics := map[string]float64{
		"warm_vms":       float64(len(private)),
		"configured_mib": configured,
		"rss_p50_mib":    Summarize(rss).P50,
	}
	if e.template.SharedMemory {
		metrics["shared_memory"] = 1
	} else {
		metrics["shared_memory"] = 0
	}
	return []Scenario{
		{ID: "memory-private", Number: 5, Title: titleP, Unit: "MiB", Summary: Summarize(private),
			Baseline: "configured-memory", BaselineValue: configured, Metrics: metrics},
		{ID: "memory-pss", Number: 5, Title: titleS, Unit: "MiB", Summary: Summarize(pss),
			Baseline: "configured-memory", BaselineValue: configured},
	}, nil
}

const memorySettle = time.Second

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
