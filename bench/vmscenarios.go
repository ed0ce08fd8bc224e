package bench

import (
	"context"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/warmpool/warmpool/agent"
	"github.com/warmpool/warmpool/internal/procfs"
)

// readyTimeout bounds one boot or restore: generous, because under TCG on a
// busy 2-core host a boot can take many times its usual 2 s.
const readyTimeout = 2 * time.Minute

// coldBoot is scenario 1: boot the guest image and wait until its agent
// answers. It is the baseline every other latency is compared with.
func coldBoot(ctx context.Context, e *env) ([]Scenario, error) {
	ds, err := measure(ctx, e.opts.WarmupRuns, e.opts.ColdSamples, func(ctx context.Context) (time.Duration, error) {
		ctx, cancel := context.WithTimeout(ctx, readyTimeout)
		defer cancel()
		start := time.Now()
		v, err := e.provider.Create(ctx, e.bootSpec)
		if err != nil {
			return 0, fmt.Errorf("cold boot %s: %w", e.bootSpec.Kernel, err)
		}
		defer e.destroy(ctx, v.ID) //nolint:errcheck // the final sweep retries
		if err := agent.WaitReady(ctx, e.dialer, v.ID); err != nil {
			return 0, fmt.Errorf("cold boot %s: %w", v.ID, err)
		}
		d := time.Since(start)
		e.progress("  cold boot %s: %s", v.ID, formatMillis(millis1(d)))
		return d, nil
	})
	if err != nil {
		return nil, err
	}
	return []Scenario{latencyRow("cold-boot", 1, "cold boot to agent-ready", ds, e.opts.WarmupRuns, "cold-boot")}, nil
}

// restoreToReady is scenario 2: restore a VM from the template on demand,
// resume it and wait until its agent answers, as a platform without a pool
// pays on every request.
func restoreToReady(ctx context.Context, e *env) ([]Scenario, error) {
	ds, err := measure(ctx, e.opts.WarmupRuns, e.opts.Samples, func(ctx context.Context) (time.Duration, error) {
		ctx, cancel := context.WithTimeout(ctx, readyTimeout)
		defer cancel()
		start := time.Now()
		v, err := e.snaps.Restore(ctx, e.template)
		if err != nil {
			return 0, fmt.Errorf("restore from %s: %w", e.template.ID, err)
		}
		defer e.destroy(ctx, v.ID) //nolint:errcheck // the final sweep retries
		if err := e.provider.Resume(ctx, v.ID); err != nil {
			return 0, fmt.Errorf("resume restored %s: %w", v.ID, err)
		}
		if err := agent.WaitReady(ctx, e.dialer, v.ID); err != nil {
			return 0, fmt.Errorf("restored %s: %w", v.ID, err)
		}
		return time.Since(start), nil
	})
	if err != nil {
		return nil, err
	}
	return []Scenario{latencyRow("restore", 2, "restore from template to agent-ready", ds, e.opts.WarmupRuns, "cold-boot")}, nil
}

func millis1(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// procMemory is what the kernel charges a process for: Private counts pages
// only it maps, Pss splits shared pages among their mappers.
type procMemory struct {
	PrivateKiB int64
	PssKiB     int64
	RssKiB     int64
}

// readProcMemory reads /proc/PID/smaps_rollup.
func readProcMemory(pid int) (procMemory, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		return procMemory{}, fmt.Errorf("read memory of pid %d: %w", pid, err)
	}
	defer f.Close()
	m, err := parseSmapsRollup(f)
	if err != nil {
		return procMemory{}, fmt.Errorf("parse smaps_rollup of pid %d: %w", pid, err)
	}
	return m, nil
}

func parseSmapsRollup(r io.Reader) (procMemory, error) {
	vals, err := procfs.ParseKiB(r)
	if err != nil {
		return procMemory{}, err
	}
	for _, key := range []string{"Rss", "Pss", "Private_Clean", "Private_Dirty"} {
		if _, ok := vals[key]; !ok {
			return procMemory{}, fmt.Errorf("no %s line", key)
		}
	}
	return procMemory{
		RssKiB:     int64(vals["Rss"]),
		PssKiB:     int64(vals["Pss"]),
		PrivateKiB: int64(vals["Private_Clean"] + vals["Private_Dirty"]),
	}, nil
}
