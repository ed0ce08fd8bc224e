package qemu

import (
	"context"
	"fmt"
	"math"
	"path/filepath"

	"github.com/warmpool/warmpool/internal/atomicfile"
	"github.com/warmpool/warmpool/vm"
)

const mib = 1 << 20

// errNoBalloon is the answer for VMs created with Spec.NoBalloon and their
// clones.
var errNoBalloon = fmt.Errorf("created without a balloon device (Spec.NoBalloon, as templates and their clones are): %w", vm.ErrUnsupported)

// SetBalloon sets how much memory the guest may use: the balloon takes the
// rest. Targets above the VM's memory are capped at it.
func (p *Provider) SetBalloon(ctx context.Context, id string, targetMiB int) error {
	m, err := p.lookup(ctx, id)
	if err != nil {
		return err
	}
	m.mu.Lock()
	memMiB, noBalloon := m.rec.Config.MemoryMiB, m.rec.Config.NoBalloon
	m.mu.Unlock()
	if noBalloon {
		return fmt.Errorf("set balloon of qemu vm %s: %w", id, errNoBalloon)
	}
	if targetMiB < 1 || targetMiB > memMiB {
		return fmt.Errorf("set balloon of qemu vm %s: %w", id, &vm.FieldError{Field: "target_mib", Value: targetMiB,
			Reason: fmt.Sprintf("must be between 1 and the VM's %d MiB", memMiB)})
	}
	c, err := p.conn(ctx, m)
	if err != nil {
		return fmt.Errorf("set balloon of qemu vm %s: %w", id, err)
	}
	if err := c.Execute(ctx, "balloon", map[string]any{"value": int64(targetMiB) * mib}, nil); err != nil {
		return fmt.Errorf("set balloon of qemu vm %s to %d MiB: %w", id, targetMiB, err)
	}
	m.mu.Lock()
	m.rec.TargetMiB = targetMiB
	rec := m.rec
	m.mu.Unlock()
	return atomicfile.WriteJSON(filepath.Join(m.dir, recordFile), 0o600, rec)
}

// BalloonStats reports the balloon's target and actual size and the guest's
// own memory figures (zero until the guest has reported).
func (p *Provider) BalloonStats(ctx context.Context, id string) (vm.BalloonStats, error) {
	m, err := p.lookup(ctx, id)
	if err != nil {
		return vm.BalloonStats{}, err
	}
	m.mu.Lock()
	noBalloon := m.rec.Config.NoBalloon
	m.mu.Unlock()
	if noBalloon {
		return vm.BalloonStats{}, fmt.Errorf("balloon stats of qemu vm %s: %w", id, errNoBalloon)
	}
	c, err := p.conn(ctx, m)
	if err != nil {
		return vm.BalloonStats{}, fmt.Errorf("balloon stats of qemu vm %s: %w", id, err)
	}
	var bal struct {
		Actual int64 `json:"actual"`
	}
	if err := c.Execute(ctx, "query-balloon", nil, &bal); err != nil {
		return vm.BalloonStats{}, fmt.Errorf("balloon stats of qemu vm %s: %w", id, err)
	}
	// Stats the guest has not reported yet are (uint64)-1.
	var gs struct {
		Stats map[string]uint64 `json:"stats"`
	}
	if err := c.Execute(ctx, "qom-get", map[string]any{"path": "/machine/peripheral/" + balloonID, "property": "guest-stats"}, &gs); err != nil {
		return vm.BalloonStats{}, fmt.Errorf("guest memory stats of qemu vm %s: %w", id, err)
	}
	m.mu.Lock()
	target := m.rec.TargetMiB
	if target == 0 {
		target = m.rec.Config.MemoryMiB
	}
	m.mu.Unlock()
	toMiB := func(k string) int {
		if v := gs.Stats[k]; v > 0 && v != math.MaxUint64 {
			return int(v / mib)
		}
		return 0
	}
	return vm.BalloonStats{
		TargetMiB:    target,
		ActualMiB:    int(bal.Actual / mib),
		TotalMiB:     toMiB("stat-total-memory"),
		FreeMiB:      toMiB("stat-free-memory"),
		AvailableMiB: toMiB("stat-available-memory"),
	}, nil
}
