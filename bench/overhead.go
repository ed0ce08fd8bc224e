package bench

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"sync"
	"time"

	"github.com/warmpool/warmpool/pool"
	"github.com/warmpool/warmpool/provider/fake"
	"github.com/warmpool/warmpool/vm"
)

// poolOverhead is scenario 7: the pool's own acquire path, with a provider
// that costs nothing (the fake with zero latency and no agent) and a bucket
// filled beforehand, so that what is measured is locking, bookkeeping and
// scheduling under OverheadConcurrency concurrent acquirers.
func poolOverhead(ctx context.Context, e *env) ([]Scenario, error) {
	conc, per := e.opts.OverheadConcurrency, e.opts.OverheadAcquires
	total := conc * per
	if total > pool.MaxSize {
		per = pool.MaxSize / conc
		total = conc * per
	}
	p := fake.New(fake.Options{})
	snap := p.AddSnapshot(vm.Spec{Name: "overhead", VCPUs: 1, MemoryMiB: vm.MinMemoryMiB})
	bp, err := e.newPool(ctx, "overhead", total, p, snap, pool.Config{})
	if err != nil {
		return nil, err
	}
	// The fake provider is private to this scenario: the run's final sweep
	// does not see it, so the pool's shutdown must leave it empty.
	defer bp.shutdown(ctx) //nolint:errcheck // the run's cleanup reports it
	if err := bp.waitFull(ctx); err != nil {
		return nil, err
	}
	// With the floor at zero the refiller stays idle while the bucket
	// drains: restores are the provider's cost, measured in scenarios 2-4,
	// and here they would only contend for the two CPUs.
	if err := bp.Register(pool.StackSpec{Name: bp.name, Key: bp.key, Snapshot: snap, Min: 0, Max: total}); err != nil {
		return nil, fmt.Errorf("lower the floor of pool %s: %w", bp.name, err)
	}
	// Collect the garbage of filling 1000s of entries now, not during the
	// measurement.
	runtime.GC()
	ds, wall, hits, err := acquireConcurrently(ctx, bp, conc, per)
	if err != nil {
		return nil, err
	}
	row := latencyRow("pool-overhead", 7, fmt.Sprintf("in-process acquire, fake provider, %d acquirers", conc), ds, 0, "warm-acquire")
	row.Metrics = map[string]float64{
		"concurrency":    float64(conc),
		"per_acquire_ns": float64(wall.Nanoseconds()) / float64(len(ds)),
		"hit_rate":       float64(hits) / float64(len(ds)),
	}
	if err := bp.shutdown(ctx); err != nil {
		return nil, fmt.Errorf("shut down overhead pool: %w", err)
	}
	if left, err := p.List(ctx); err == nil && len(left) > 0 {
		return nil, fmt.Errorf("overhead pool left %d VMs in its provider", len(left))
	}
	return []Scenario{row}, nil
}

// acquireConcurrently has conc goroutines acquire per leases each and
// returns every acquire's latency, the wall time of the whole, and how many
// were hits. Leases are released after the clock stops: release is the
// provider's destroy, which is not the pool's overhead.
func acquireConcurrently(ctx context.Context, bp *benchPool, conc, per int) ([]time.Duration, time.Duration, int, error) {
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
				l, err := bp.acquire(ctx)
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
	for _, l := range leases {
		_ = bp.release(ctx, l)
	}
	if err := errors.Join(errs...); err != nil {
		return nil, 0, 0, fmt.Errorf("%d concurrent acquirers: %w", conc, err)
	}
	return ds, wall, hits, nil
}
