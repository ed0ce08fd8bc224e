package bench

import (
	"context"
	"errors"
	"fmt"
	"golang.org/x/sys/unix"
	"io"
	"sync"
	"time"

	"github.com/warmpool/warmpool/api"
	"github.com/warmpool/warmpool/vm"
)

// poolWaitTimeout bounds waiting for a pool to reach its depth.
const poolWaitTimeout = 5 * time.Minute

// benchPool is one pool of the run's daemon, restored from the run's
// template and deleted (its warm VMs destroyed) at the end of its scenario,
// or by the run's cleanup if not before. Its VMs are prepared, validated and
// handed off by the daemon, exactly as for a client of `warmpool serve`.
type benchPool struct {
	name  string
	depth int
	e     *env
	once  sync.Once
	err   error
}

func (e *env) newPool(ctx context.Context, name string, depth int) (*benchPool, error) {
	req := api.PoolRequest{Template: e.templateName, Min: depth, Max: depth}
	if _, err := e.d.SetPool(ctx, name, req); err != nil {
		return nil, fmt.Errorf("set pool %s: %w", name, err)
	}
	bp := &benchPool{name: name, depth: depth, e: e}
	e.onCleanup("pool "+name, bp.shutdown)
	return bp, nil
}

// shutdown deletes the pool once and waits until its VMs are gone, so the
// next scenario does not measure their destruction; later calls return the
// first result.
func (bp *benchPool) shutdown(ctx context.Context) error {
	bp.once.Do(func() {
		ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Minute)
		defer cancel()
		if err := bp.e.d.DeletePool(ctx, bp.name); err != nil {
			bp.err = err
			return
		}
		bp.err = bp.e.waitNoVMs(ctx)
	})
	return bp.err
}

// waitNoVMs polls until the daemon's provider runs no VM. Between
// scenarios nothing else should run: baselines destroy their VMs
// themselves, and the pool of the last scenario was just deleted.
func (e *env) waitNoVMs(ctx context.Context) error {
	t := time.NewTicker(5 * time.Millisecond)
	defer t.Stop()
	for {
		vms, err := e.provider.List(ctx)
		if err != nil {
			return fmt.Errorf("list VMs: %w", err)
		}
		if len(vms) == 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%d VMs still run after their pool was deleted: %w", len(vms), ctx.Err())
		case <-t.C:
		}
	}
}

func (bp *benchPool) status(ctx context.Context) (api.Pool, error) {
	ps, err := bp.e.d.Pools(ctx)
	if err != nil {
		return api.Pool{}, err
	}
	for _, p := range ps {
		if p.Name == bp.name {
			return p, nil
		}
	}
	return api.Pool{}, fmt.Errorf("pool %s: %w", bp.name, vm.ErrNotFound)
}

// waitFull polls until the pool holds its full depth of ready VMs.
func (bp *benchPool) waitFull(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, poolWaitTimeout)
	defer cancel()
	t := time.NewTicker(time.Millisecond)
	defer t.Stop()
	for {
		st, err := bp.status(ctx)
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

// acquire takes a lease the way `warmpool acquire` does.
func (bp *benchPool) acquire(ctx context.Context) (api.Lease, error) {
	return bp.e.d.Acquire(ctx, bp.name, api.AcquireRequest{Wait: poolWaitTimeout})
}

func (bp *benchPool) release(ctx context.Context, l api.Lease) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
	defer cancel()
	return bp.e.d.Release(ctx, l.ID)
}

// hit says whether an acquire found a ready VM without waiting.
func hit(l api.Lease) bool { return l.Timings.WaitMS == 0 }

// warmAcquire is scenario 3: acquire from a full pool (every sample is a
// hit) until a handed-off lease is returned.
func warmAcquire(ctx context.Context, e *env) ([]Scenario, error) {
	bp, err := e.newPool(ctx, "warm", e.opts.PoolDepth)
	if err != nil {
		return nil, err
	}
	defer bp.shutdown(ctx) //nolint:errcheck // the run's cleanup reports it
	var handoffs, firstExecs []time.Duration
	var diskKiB []float64
	diskSkipped := ""
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
		handoffs = append(handoffs, time.Duration(l.Timings.HandoffMS)*time.Millisecond)
		fe, err := e.firstExec(actx, l.ID)
		if err != nil {
			return 0, err
		}
		firstExecs = append(firstExecs, fe)
		if kib, why, err := e.writableDiskKiB(ctx, l.VMID); err != nil {
			return 0, err
		} else if why != "" {
			diskSkipped = why
		} else {
			diskKiB = append(diskKiB, kib)
		}
		if err := bp.release(ctx, l); err != nil {
			return 0, err
		}
		return d, nil
	})
	if err != nil {
		return nil, err
	}
	row := latencyRow("warm-acquire", 3, "acquire from warm pool to handed-off lease", ds, e.opts.WarmupRuns, "cold-boot")
	if st, err := bp.status(ctx); err == nil {
		row.Metrics = map[string]float64{"pool_depth": float64(bp.depth), "hits": float64(st.Counters.Hits), "waits": float64(st.Counters.Waits)}
	}
	// Warm-up runs are the first ones; the handoff part of the measured ones.
	if w := e.opts.WarmupRuns; len(handoffs) > w {
		if row.Metrics == nil {
			row.Metrics = map[string]float64{}
		}
		// The lease reports its hand-off in whole milliseconds.
		row.Metrics["handoff_p50_ms"] = Summarize(millis(handoffs[w:])).P50
		row.Metrics["first_exec_p50_ms"] = Summarize(millis(firstExecs[w:])).P50
	}
	const diskTitle = "host disk per clone after hand-off and a first exec"
	disk := skippedRow("disk-per-clone", 3, diskTitle, "KiB", diskSkipped)
	if w := e.opts.WarmupRuns; len(diskKiB) > w {
		disk = Scenario{ID: "disk-per-clone", Number: 3, Title: diskTitle, Unit: "KiB", Summary: Summarize(diskKiB[w:]), WarmupRuns: w}
	}
	return []Scenario{row, disk}, nil
}

// writableDiskKiB is what VM id's private writable disk takes on the host
// (allocated blocks, not its size), or why there is none to measure.
func (e *env) writableDiskKiB(ctx context.Context, id string) (float64, string, error) {
	v, err := e.provider.Inspect(ctx, id)
	if err != nil {
		return 0, "", fmt.Errorf("inspect leased VM %s: %w", id, err)
	}
	if v.Spec.WritableDisk == "" {
		return 0, "the image has no root filesystem disk (busybox: the root is the initramfs)", nil
	}
	var st unix.Stat_t
	if err := unix.Stat(v.Spec.WritableDisk, &st); err != nil {
		return 0, "", fmt.Errorf("writable disk of VM %s: %w", id, err)
	}
	return float64(st.Blocks) * 512 / 1024, "", nil
}

// firstExec is what a tenant's first command costs right after acquire
// (`warmpool exec LEASE -- true`), not counted in the acquire itself.
func (e *env) firstExec(ctx context.Context, leaseID string) (time.Duration, error) {
	start := time.Now()
	code, err := e.d.Exec(ctx, leaseID, api.ExecRequest{Argv: []string{"true"}}, io.Discard, io.Discard)
	if err != nil {
		return 0, fmt.Errorf("first exec in lease %s: %w", leaseID, err)
	}
	if code != 0 {
		return 0, fmt.Errorf("first exec in lease %s: true exited %d", leaseID, code)
	}
	return time.Since(start), nil
}

// burst is scenario 4: K acquirers arrive at once at a pool of depth D. The
// first D are hits; the rest wait for restores. Tenants keep their VMs until
// the pool is back to depth, as a burst of real tenants would.
func burst(ctx context.Context, e *env) ([]Scenario, error) {
	k, depth := e.opts.BurstConcurrency, e.opts.BurstDepth
	bp, err := e.newPool(ctx, "burst", depth)
	if err != nil {
		return nil, err
	}
	defer bp.shutdown(ctx) //nolint:errcheck // the run's cleanup reports it

	var all, hits, waits, refill, refillAfterLast []time.Duration
	var rates []float64
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
		// The waiters' VMs were all restored between the start and the
		// last lease.
		if w := k - countHits(res.acquires); w > 0 && res.lastAcquired > 0 {
			rates = append(rates, float64(w)/res.lastAcquired.Seconds())
		}
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
		"parallelism":                 float64(e.d.Parallelism()),
	}
	if len(rates) > 0 {
		rowAll.Metrics["restores_per_s"] = Summarize(rates).P50
	}
	if st, err := bp.status(ctx); err == nil && st.RestoreMS > 0 {
		// What the slots could do if restores took as long as they do
		// one at a time: parallelism restores per restore time.
		rowAll.Metrics["restore_ms"] = st.RestoreMS
		rowAll.Metrics["restores_per_s_at_parallelism"] = float64(e.d.Parallelism()) * 1000 / st.RestoreMS
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
		leases []api.Lease
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
			start := time.Now()
			l, err := bp.acquire(ctx)
			d := time.Since(start)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				errs = append(errs, err)
				return
			}
			leases = append(leases, l)
			res.acquires = append(res.acquires, acquireResult{total: d, hit: hit(l)})
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
	bp, err := e.newPool(ctx, "memory", n)
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
	private, pss, rss, err := e.warmMemory(ctx)
	if err != nil {
		return nil, err
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

// warmMemory reads, in MiB, the private, PSS and RSS memory of every
// paused VM of the run's template that has a hypervisor process.
func (e *env) warmMemory(ctx context.Context) (private, pss, rss []float64, err error) {
	vms, err := e.provider.List(ctx)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("list warm VMs: %w", err)
	}
	for _, v := range vms {
		if v.Snapshot != e.template.ID || v.Status != vm.StatusPaused || v.PID == 0 {
			continue
		}
		m, err := readProcMemory(v.PID)
		if err != nil {
			return nil, nil, nil, fmt.Errorf("memory of warm VM %s: %w", v.ID, err)
		}
		private = append(private, float64(m.PrivateKiB)/1024)
		pss = append(pss, float64(m.PssKiB)/1024)
		rss = append(rss, float64(m.RssKiB)/1024)
	}
	return private, pss, rss, nil
}

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
