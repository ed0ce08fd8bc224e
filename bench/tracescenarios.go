package bench

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/warmpool/warmpool/api"
	"github.com/warmpool/warmpool/pool"
)

// traceAdaptive is the daemon's default adaptive tuning on the trace's
// clock: every duration divided by the replay speed, so that the
// controller sees the trace as it would at speed 1.
func traceAdaptive(speed float64) pool.AdaptiveConfig {
	def := pool.DefaultAdaptive()
	scale := func(d time.Duration) time.Duration { return time.Duration(float64(d) / speed) }
	c := def
	c.RateHalfLife = scale(def.RateHalfLife)
	c.BurstWindow = scale(def.BurstWindow)
	c.ScaleDownAfter = scale(def.ScaleDownAfter)
	c.ScaleDownEvery = scale(def.ScaleDownEvery)
	c.MinIdle = scale(def.MinIdle)
	return c
}

// traceRefill is the restore-to-ready time, on the trace's clock, that an
// automatic speed aims at: what a QEMU/TCG restore takes on a small host.
const traceRefill = 0.25

// calibrateTraceSpeed fills a pool of the trace's max depth and returns
// the speed at which its restore time is traceRefill on the trace's clock.
func calibrateTraceSpeed(ctx context.Context, e *env) (float64, error) {
	bp, err := e.newPool(ctx, "trace-calibrate", e.opts.TraceMax)
	if err != nil {
		return 0, err
	}
	defer bp.shutdown(ctx) //nolint:errcheck // the run's cleanup reports it
	if err := bp.waitFull(ctx); err != nil {
		return 0, err
	}
	st, err := bp.status(ctx)
	if err != nil {
		return 0, err
	}
	speed := 100.0
	if st.RestoreMS > 0 {
		speed = max(20, min(100, traceRefill*1000/st.RestoreMS))
	}
	e.progress("  restores take %s: trace speed %.0f", formatMillis(st.RestoreMS), speed)
	return speed, bp.shutdown(ctx)
}

// traceRun is what one replay of the trace against one pool measured.
type traceRun struct {
	acquires []time.Duration
	hits     uint64
	acquired uint64
	// idle is VM-seconds on the trace's clock (real ones times the speed).
	idle float64
	// restore is the pool's restore-to-ready time at the end, on the
	// trace's clock (seconds).
	restore float64
}

// replay runs the trace against pool name (set with req) at e's speed:
// each arrival acquires at its instant divided by the speed and releases
// at once. The pool starts full and is deleted at the end.
func replay(ctx context.Context, e *env, name string, req api.PoolRequest, fill int) (traceRun, error) {
	tr, speed := *e.opts.Trace, e.opts.TraceSpeed
	if _, err := e.d.SetPool(ctx, name, req); err != nil {
		return traceRun{}, fmt.Errorf("set pool %s: %w", name, err)
	}
	bp := &benchPool{name: name, depth: fill, e: e}
	e.onCleanup("pool "+name, bp.shutdown)
	defer bp.shutdown(ctx) //nolint:errcheck // the run's cleanup reports it
	if err := bp.waitFull(ctx); err != nil {
		return traceRun{}, err
	}
	before, err := bp.status(ctx)
	if err != nil {
		return traceRun{}, err
	}
	var (
		mu   sync.Mutex
		run  traceRun
		errs []error
		wg   sync.WaitGroup
	)
	start := time.Now()
	at := func(traceSeconds float64) time.Time {
		return start.Add(time.Duration(traceSeconds / speed * float64(time.Second)))
	}
	for _, a := range tr.Arrivals {
		if err := sleep(ctx, time.Until(at(a))); err != nil {
			return traceRun{}, err
		}
		wg.Go(func() {
			t0 := time.Now()
			l, err := bp.acquire(ctx)
			d := time.Since(t0)
			if err == nil {
				err = bp.release(ctx, l)
			}
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				errs = append(errs, err)
				return
			}
			run.acquires = append(run.acquires, d)
		})
	}
	// Idle time counts over the trace's whole duration, for every pool alike.
	if err := sleep(ctx, time.Until(at(tr.DurationSeconds))); err != nil {
		return traceRun{}, err
	}
	after, err := bp.status(ctx)
	wg.Wait()
	if err != nil {
		return traceRun{}, err
	}
	if err := errors.Join(errs...); err != nil {
		return traceRun{}, fmt.Errorf("replay trace on pool %s: %w", name, err)
	}
	// Counters include acquires still finishing at the end: read them again.
	final, err := bp.status(ctx)
	if err != nil {
		return traceRun{}, err
	}
	run.hits = final.Counters.Hits - before.Counters.Hits
	run.acquired = final.Counters.Acquired - before.Counters.Acquired
	run.idle = (after.IdleVMSeconds - before.IdleVMSeconds) * speed
	run.restore = final.RestoreMS / 1000 * speed
	return run, nil
}

// traceScenarios replays the trace against a pool of fixed depth max, one
// of fixed depth min and an adaptive one between them, and reports them
// side by side with the offline optimum's idle VM-seconds.
func traceScenarios(ctx context.Context, e *env) ([]Scenario, error) {
	tr, lo, hi := *e.opts.Trace, e.opts.TraceMin, e.opts.TraceMax
	if e.opts.TraceSpeed <= 0 {
		speed, err := calibrateTraceSpeed(ctx, e)
		if err != nil {
			return nil, err
		}
		e.opts.TraceSpeed = speed
	}
	if err := e.d.SetAdaptive(traceAdaptive(e.opts.TraceSpeed)); err != nil {
		return nil, err
	}
	// Later scenarios' adaptive pools (none today) get the daemon's own.
	defer e.d.SetAdaptive(pool.AdaptiveConfig{}) //nolint:errcheck // the zero value is valid
	configs := []struct {
		id, title string
		req       api.PoolRequest
		fill      int
	}{
		{"trace-fixed-max", fmt.Sprintf("trace: fixed depth %d (max)", hi), api.PoolRequest{Template: e.templateName, Min: hi, Max: hi}, hi},
		{"trace-fixed-min", fmt.Sprintf("trace: fixed depth %d (min)", lo), api.PoolRequest{Template: e.templateName, Min: lo, Max: lo}, lo},
		{"trace-adaptive", fmt.Sprintf("trace: adaptive depth %d..%d", lo, hi), api.PoolRequest{Template: e.templateName, Min: lo, Max: hi, Adaptive: true}, lo},
	}
	var rows []Scenario
	var refill float64
	for _, c := range configs {
		e.progress("  %s: %d arrivals over %.0fs of trace at speed %g", c.id, len(tr.Arrivals), tr.DurationSeconds, e.opts.TraceSpeed)
		run, err := replay(ctx, e, c.id, c.req, c.fill)
		if err != nil {
			return nil, err
		}
		row := latencyRow(c.id, 8, c.title, run.acquires, 0, "trace-fixed-max")
		row.Metrics = map[string]float64{
			"hit_rate":        float64(run.hits) / float64(max(run.acquired, 1)),
			"idle_vm_seconds": run.idle,
			"arrivals":        float64(len(tr.Arrivals)),
			"speed":           e.opts.TraceSpeed,
		}
		if c.req.Adaptive {
			refill = run.restore
			opt := OptimumIdleVMSeconds(tr, refill)
			row.Metrics["optimum_idle_vm_seconds"] = opt
			row.Metrics["restore_trace_ms"] = refill * 1000
			if opt > 0 {
				row.Metrics["idle_vs_optimum"] = run.idle / opt
			}
		}
		e.progress("  %s: hit rate %.1f%%, idle %.0f VM-s", c.id, 100*row.Metrics["hit_rate"], run.idle)
		rows = append(rows, row)
	}
	return rows, nil
}
