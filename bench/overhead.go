package bench

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/warmpool/warmpool/daemon"
	"github.com/warmpool/warmpool/pool"
	"github.com/warmpool/warmpool/vm"
)

// poolOverhead is scenario 7: the pool's own acquire path, on its own. It
// is the one scenario that does not go through the daemon: its pool has no
// validation or hand-off (those are the daemon's and are measured in
// scenarios 3 and 4) and a provider that costs nothing (the daemon's fake
// without latencies, its own instance), and its bucket is filled
// beforehand, so that what is measured is the pool's locking, bookkeeping
// and scheduling under OverheadConcurrency concurrent acquirers.
func poolOverhead(ctx context.Context, e *env) ([]Scenario, error) {
	conc, per := e.opts.OverheadConcurrency, e.opts.OverheadAcquires
	total := conc * per
	if total > pool.MaxSize {
		per = pool.MaxSize / conc
		total = conc * per
	}
	p := daemon.NewFakeProvider()
	snap, err := overheadSnapshot(ctx, p, e.subdir("overhead"))
	if err != nil {
		return nil, err
	}
	op, err := newOverheadPool(p, snap, total)
	if err != nil {
		return nil, err
	}
	// The provider is private to this scenario: nothing else destroys its
	// VMs, so the pool's shutdown must leave it empty.
	e.onCleanup("overhead pool", op.shutdown)
	defer op.shutdown(ctx) //nolint:errcheck // the run's cleanup reports it
	if err := op.waitFull(ctx, total); err != nil {
		return nil, err
	}
	// With the floor at zero the refiller stays idle while the bucket
	// drains: restores are the provider's cost, measured in scenarios 2-4,
	// and here they would only contend for the two CPUs.
	op.spec.Min = 0
	if err := op.Register(op.spec); err != nil {
		return nil, fmt.Errorf("lower the floor of pool %s: %w", op.spec.Name, err)
	}
	// Collect the garbage of filling 1000s of entries now, not during the
	// measurement.
	runtime.GC()
	ds, wall, hits, err := acquireConcurrently(ctx, op, conc, per)
	if err != nil {
		return nil, err
	}
	row := latencyRow("pool-overhead", 7, fmt.Sprintf("in-process acquire, fake provider, %d acquirers", conc), ds, 0, "warm-acquire")
	row.Metrics = map[string]float64{
		"concurrency":    float64(conc),
		"per_acquire_ns": float64(wall.Nanoseconds()) / float64(len(ds)),
		"hit_rate":       float64(hits) / float64(len(ds)),
	}
	if err := op.shutdown(ctx); err != nil {
		return nil, fmt.Errorf("shut down overhead pool: %w", err)
	}
	if left, err := p.List(ctx); err == nil && len(left) > 0 {
		return nil, fmt.Errorf("overhead pool left %d VMs in its provider", len(left))
	}
	return []Scenario{row}, nil
}

// overheadSnapshot makes the snapshot the overhead pool restores from.
func overheadSnapshot(ctx context.Context, p vm.Provider, dir string) (vm.Snapshot, error) {
	snaps, ok := vm.As[vm.Snapshotter](p, vm.CapSnapshot)
	if !ok {
		return vm.Snapshot{}, fmt.Errorf("provider %s cannot snapshot: %w", p.Name(), vm.ErrUnsupported)
	}
	v, err := p.Create(ctx, vm.Spec{Name: "overhead", VCPUs: 1, MemoryMiB: vm.MinMemoryMiB})
	if err != nil {
		return vm.Snapshot{}, err
	}
	defer p.Destroy(context.WithoutCancel(ctx), v.ID) //nolint:errcheck // an in-memory VM
	if err := p.Pause(ctx, v.ID); err != nil {
		return vm.Snapshot{}, err
	}
	return snaps.Snapshot(ctx, v.ID, dir)
}

// overheadPool is a pool on its own, with pool.Config's defaults.
type overheadPool struct {
	*pool.Pool
	prov vm.Provider
	spec pool.StackSpec
	once sync.Once
	err  error
}

func newOverheadPool(p vm.Provider, snap vm.Snapshot, size int) (*overheadPool, error) {
	pl, err := pool.New(pool.Config{Provider: p})
	if err != nil {
		return nil, err
	}
	spec := pool.StackSpec{
		Name:     "overhead",
		Key:      vm.StackKey{Template: "overhead", VCPUs: snap.Spec.VCPUs, MemoryMiB: snap.Spec.MemoryMiB},
		Snapshot: snap,
		Min:      size,
		Max:      size,
	}
	op := &overheadPool{Pool: pl, prov: p, spec: spec}
	if err := pl.Register(spec); err != nil {
		return nil, fmt.Errorf("register stack %s: %w", spec.Name, err)
	}
	return op, nil
}

func (op *overheadPool) shutdown(ctx context.Context) error {
	op.once.Do(func() {
		ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Minute)
		defer cancel()
		op.err = op.Shutdown(ctx)
	})
	return op.err
}

func (op *overheadPool) waitFull(ctx context.Context, n int) error {
	ctx, cancel := context.WithTimeout(ctx, poolWaitTimeout)
	defer cancel()
	t := time.NewTicker(time.Millisecond)
	defer t.Stop()
	for {
		st, err := op.Status(op.spec.Name)
		if err != nil {
			return err
		}
		if st.Ready >= n {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("pool %s reached %d of %d ready VMs: %w", op.spec.Name, st.Ready, n, ctx.Err())
		case <-t.C:
		}
	}
}

// leaseSeq numbers the overhead pool's leases.
var leaseSeq atomic.Uint64

func (op *overheadPool) acquire(ctx context.Context) (*pool.Lease, error) {
	return op.Acquire(ctx, op.spec.Name, pool.Identity{LeaseID: fmt.Sprintf("bench-%d", leaseSeq.Add(1))})
}

// acquireConcurrently has conc goroutines acquire per leases each and
// returns every acquire's latency, the wall time of the whole, and how many
// were hits. Leased VMs are destroyed after the clock stops: that is the
// provider's cost, not the pool's overhead.
func acquireConcurrently(ctx context.Context, op *overheadPool, conc, per int) ([]time.Duration, time.Duration, int, error) {
	var (
		wg     sync.WaitGroup
		mu     sync.Mutex
		errs   []error
		ds     = make([]time.Duration, 0, conc*per)
		leases = make([]*pool.Lease, 0, conc*per)
		hits   int
	)
	gate := make(chan struct{})
	for i := 0; i < conc; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			local := make([]time.Duration, 0, per)
			mine := make([]*pool.Lease, 0, per)
			localHits := 0
			<-gate
			for j := 0; j < per; j++ {
				start := time.Now()
				l, err := op.acquire(ctx)
				d := time.Since(start)
				if err != nil {
					mu.Lock()
					errs = append(errs, err)
					mu.Unlock()
					break
				}
				local = append(local, d)
				mine = append(mine, l)
				if l.Timings.Wait == 0 {
					localHits++
				}
			}
			mu.Lock()
			ds = append(ds, local...)
			leases = append(leases, mine...)
			hits += localHits
			mu.Unlock()
		}()
	}
	start := time.Now()
	close(gate)
	wg.Wait()
	wall := time.Since(start)
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
	defer cancel()
	for _, l := range leases {
		if err := op.prov.Destroy(dctx, l.VM.ID); err != nil && !errors.Is(err, vm.ErrNotFound) {
			errs = append(errs, fmt.Errorf("destroy leased %s: %w", l.VM.ID, err))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, 0, 0, fmt.Errorf("%d concurrent acquirers: %w", conc, err)
	}
	return ds, wall, hits, nil
}
