package daemon

import (
	"fmt"

	"github.com/warmpool/warmpool/internal/procfs"
	"github.com/warmpool/warmpool/store"
	"github.com/warmpool/warmpool/vm"
)

// checkPoolMemory refuses a pool whose VMs, at the pool's max and with every
// other pool at its max too, could need more guest memory than
// limits.memory_mib. Warm clones share their template's pages, but a leased
// VM may touch all of its memory, so the configured size is what counts.
// An adaptive pool counts at its min: beyond it, the pools share the same
// limit at run time (pool.Config.MemoryBudgetMiB), so its max is a bound,
// not a claim.
func (d *Daemon) checkPoolMemory(p store.Pool, t store.Template) error {
	others, err := store.List(d.st, store.Pools)
	if err != nil {
		return err
	}
	committed := 0
	for _, o := range others {
		if o.Name == p.Name {
			continue
		}
		if ot, ok := d.template(o.Template); ok {
			committed += committedVMs(o) * ot.MemoryMiB
		}
	}
	want := committedVMs(p) * t.MemoryMiB
	limit := d.cfg.Limits.MemoryMiB
	if committed+want > limit {
		bound := "max"
		if p.Adaptive {
			bound = "min"
		}
		return fmt.Errorf("%d VMs of %d MiB need %d MiB, other pools may hold %d MiB, and this host offers %d MiB (limits.memory_mib): lower %s or free other pools: %w",
			committedVMs(p), t.MemoryMiB, want, committed, limit, bound, vm.ErrExhausted)
	}
	return nil
}

// committedVMs is what a pool may hold whatever the budget: a fixed pool's
// max, an adaptive pool's min.
func committedVMs(p store.Pool) int {
	if p.Adaptive {
		return p.Min
	}
	return p.Max
}

// hostMemoryMiB is MemTotal from /proc/meminfo; if it cannot be read, the
// largest memory a VM may have, so the check never refuses a sane pool
// because of a missing /proc.
func hostMemoryMiB() int {
	mem, err := procfs.ReadKiB("/proc/meminfo")
	if err != nil || mem["MemTotal"] == 0 {
		return vm.MaxMemoryMiB
	}
	return int(mem["MemTotal"] / 1024)
}
