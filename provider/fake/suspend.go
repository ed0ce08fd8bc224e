package fake

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/warmpool/warmpool/vm"
)

var _ vm.Suspender = (*Provider)(nil)

// suspendState is what the fake knows about a single-use snapshot.
type suspendState struct {
	source     string // the suspended VM
	restoredAs string // the one VM restored from it, or "" while none is
	claimed    bool   // a restore is in progress or done
}

// Suspend implements vm.Suspender like a real provider: the snapshot
// restores once, only after its VM stopped or is gone, and the suspended VM
// cannot be resumed.
func (p *Provider) Suspend(ctx context.Context, id string, dir string) (vm.Snapshot, error) {
	if dir == "" {
		return vm.Snapshot{}, fmt.Errorf("fake suspend %s: %w", id, &vm.FieldError{Field: "dir", Value: dir, Reason: "must not be empty"})
	}
	snapID := "fake-snap-" + strconv.FormatUint(p.seq.Add(1), 10)
	var spec vm.Spec
	err := p.transition(ctx, OpSuspend, id, func(m *machine) error {
		if m.vm.Status != vm.StatusPaused {
			return invalidState(m.vm.Status)
		}
		if m.suspendedTo != "" {
			return fmt.Errorf("already suspended to %s: %w", m.suspendedTo, vm.ErrInvalidState)
		}
		m.suspendedTo = snapID
		spec = m.vm.Spec
		return nil
	})
	if err != nil {
		return vm.Snapshot{}, err
	}
	snap := vm.Snapshot{ID: snapID, Provider: Name, Dir: dir, Spec: spec, CreatedAt: time.Now(), SingleUse: true}
	if err := writeSnapshotFile(snap); err != nil {
		if m := p.machine(id); m != nil {
			m.mu.Lock()
			m.suspendedTo = ""
			m.mu.Unlock()
		}
		return vm.Snapshot{}, fmt.Errorf("fake suspend %s: %w", id, err)
	}
	p.snapMu.Lock()
	p.snapshots[snap.ID] = snap
	if p.suspends == nil {
		p.suspends = make(map[string]*suspendState)
	}
	p.suspends[snap.ID] = &suspendState{source: id}
	p.snapMu.Unlock()
	return snap, nil
}

func writeSnapshotFile(snap vm.Snapshot) error {
	data, err := json.MarshalIndent(snap, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(snap.Dir, 0o755); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(snap.Dir, "snapshot.json"), data, 0o644)
}

// claimSuspended reserves a single-use snapshot for one restore. release
// records the outcome: a failed restore gives the snapshot back. Template
// snapshots need no claim.
func (p *Provider) claimSuspended(snapID string) (release func(ok bool, vmID string), err error) {
	p.snapMu.Lock()
	defer p.snapMu.Unlock()
	st := p.suspends[snapID]
	if st == nil {
		return func(bool, string) {}, nil
	}
	if st.claimed {
		if st.restoredAs != "" {
			return nil, fmt.Errorf("single-use snapshot already restored as %s: %w", st.restoredAs, vm.ErrInvalidState)
		}
		return nil, fmt.Errorf("single-use snapshot being restored: %w", vm.ErrInvalidState)
	}
	if m := p.machine(st.source); m != nil {
		m.mu.Lock()
		running := !m.gone && m.vm.Status != vm.StatusStopped
		m.mu.Unlock()
		if running {
			return nil, fmt.Errorf("suspended vm %s still runs: %w", st.source, vm.ErrInvalidState)
		}
	}
	st.claimed = true
	return func(ok bool, vmID string) {
		p.snapMu.Lock()
		defer p.snapMu.Unlock()
		if ok {
			st.restoredAs = vmID
		} else {
			st.claimed = false
		}
	}, nil
}
