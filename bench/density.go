package bench

import (
	"context"
	"fmt"
	"time"
)

// density is scenario 9: a pool of e.opts.Density warm (paused) VMs of the
// template. It reports the host memory each costs (private and PSS) and
// the warm acquire at that depth, side by side with a pool of depth 2
// measured the same way in the same run: many warm VMs must not slow the
// hot path.
func density(ctx context.Context, e *env) ([]Scenario, error) {
	n := e.opts.Density
	acquireAt := func(name string, depth int) ([]time.Duration, *benchPool, error) {
		bp, err := e.newPool(ctx, name, depth)
		if err != nil {
			return nil, nil, err
		}
		started := time.Now()
		if err := bp.waitFull(ctx); err != nil {
			return nil, bp, err
		}
		e.progress("  %d warm VMs ready after %s", depth, formatMillis(millis1(time.Since(started))))
		ds, err := measure(ctx, e.opts.WarmupRuns, e.opts.DensitySamples, func(ctx context.Context) (time.Duration, error) {
			// Every sample draws from the full depth.
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
			if !hit(l) {
				return 0, fmt.Errorf("acquire from the full pool %s of depth %d waited %d ms", name, depth, l.Timings.WaitMS)
			}
			return d, bp.release(ctx, l)
		})
		return ds, bp, err
	}

	small, bp2, err := acquireAt("density-2", 2)
	if bp2 != nil {
		_ = bp2.shutdown(ctx)
	}
	if err != nil {
		return nil, err
	}
	large, bp, err := acquireAt("density", n)
	if bp != nil {
		defer bp.shutdown(ctx) //nolint:errcheck // the run's cleanup reports it
	}
	if err != nil {
		return nil, err
	}
	if err := bp.waitFull(ctx); err != nil {
		return nil, err
	}
	if err := sleep(ctx, memorySettle); err != nil {
		return nil, err
	}
	private, pss, rss, err := e.warmMemory(ctx)
	if err != nil {
		return nil, err
	}

	rowSmall := latencyRow("density-acquire-2", 9, "warm acquire, pool depth 2", small, e.opts.WarmupRuns, "")
	rowLarge := latencyRow("density-acquire", 9, fmt.Sprintf("warm acquire, pool depth %d", n), large, e.opts.WarmupRuns, "density-acquire-2")
	rowLarge.Metrics = map[string]float64{"depth": float64(n)}
	if p99 := Summarize(millis(small)).P99; p99 > 0 {
		rowLarge.Metrics["p99_vs_depth_2"] = Summarize(millis(large)).P99 / p99
	}
	rows := []Scenario{rowSmall, rowLarge}
	titleP, titleS := fmt.Sprintf("memory per warm VM at depth %d: private", n), fmt.Sprintf("memory per warm VM at depth %d: PSS", n)
	if len(private) == 0 {
		why := fmt.Sprintf("provider %s runs no hypervisor process to measure", e.provider.Name())
		return append(rows, skippedRow("density-private", 9, titleP, "MiB", why), skippedRow("density-pss", 9, titleS, "MiB", why)), nil
	}
	configured := float64(e.template.Spec.MemoryMiB)
	metrics := map[string]float64{
		"warm_vms":       float64(len(private)),
		"configured_mib": configured,
		"rss_p50_mib":    Summarize(rss).P50,
		"private_share":  Summarize(private).P50 / configured,
		"pss_total_mib":  sum(pss),
	}
	return append(rows,
		Scenario{ID: "density-private", Number: 9, Title: titleP, Unit: "MiB", Summary: Summarize(private),
			Baseline: "configured-memory", BaselineValue: configured, Metrics: metrics},
		Scenario{ID: "density-pss", Number: 9, Title: titleS, Unit: "MiB", Summary: Summarize(pss),
			Baseline: "configured-memory", BaselineValue: configured},
	), nil
}

func sum(xs []float64) float64 {
	t := 0.0
	for _, x := range xs {
		t += x
	}
	return t
}
