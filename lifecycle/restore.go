package lifecycle

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"

	"github.com/warmpool/warmpool/vm"
)

// Restore takes over the machines of an earlier run from their records. A
// record says what callers wanted and which VM and snapshot belonged to the
// machine; its State is only a hint, never trusted: the state is derived
// from what exists now (is the VM there, is its process alive, does its
// agent answer). Machines that should run and do not are then brought back
// by their goroutines without anyone calling Ensure.
func (m *Manager) Restore(ctx context.Context, recs []Record) error {
	var listed []vm.VM
	var listErr error
	listOnce := sync.OnceFunc(func() { listed, listErr = m.cfg.Provider.List(ctx) })

	type derived struct {
		rec Record
		in  initial
		why string
		err error
	}
	out := make([]derived, len(recs))
	var wg sync.WaitGroup
	for i, rec := range recs {
		out[i].rec = rec
		if err := rec.Spec.Validate(); err != nil {
			out[i].err = fmt.Errorf("restore machine %s: %w", rec.Name, err)
			continue
		}
		if rec.Spec.Name != rec.Name {
			out[i].err = fmt.Errorf("restore machine %s: record holds the spec of %q: %w", rec.Name, rec.Spec.Name, vm.ErrInvalid)
			continue
		}
		wg.Go(func() {
			out[i].in, out[i].why = m.derive(ctx, rec, func() ([]vm.VM, error) { listOnce(); return listed, listErr })
		})
	}
	wg.Wait()

	var errs []error
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return ErrClosed
	}
	for _, d := range out {
		if d.err != nil {
			errs = append(errs, d.err)
			continue
		}
		if _, ok := m.machines[d.rec.Name]; ok {
			errs = append(errs, fmt.Errorf("restore machine %s: already managed", d.rec.Name))
			continue
		}
		mc := newMachine(m, d.rec.Name, d.in)
		mc.emit("machine.restored", map[string]any{
			"state": string(d.in.state), "recorded_state": string(d.rec.State), "vm_id": mc.vmID(), "reason": d.why,
		})
		m.cfg.Logger.Info("machine restored", "machine", d.rec.Name, "state", d.in.state, "recorded", d.rec.State, "reason", d.why)
		m.machines[d.rec.Name] = mc
		m.start(mc)
	}
	return errors.Join(errs...)
}

// derive works out a machine's state from reality. The machine goroutine
// then does the rest: a Created machine is pinged until it answers, a
// NotExist one that should run is created (not counted as a failed attempt),
// a Failed one is recovered.
func (m *Manager) derive(ctx context.Context, rec Record, list func() ([]vm.VM, error)) (initial, string) {
	in := initial{spec: rec.Spec, want: rec.Desired, holds: rec.Holds, curFP: rec.Spec.Fingerprint()}
	if in.want == "" {
		in.want = DesiredRunning
		if rec.State == Stopped || rec.State == Stopping {
			in.want = DesiredStopped
		}
	}
	if in.holds == nil {
		in.holds = []Hold{}
	}
	cur := m.findVM(ctx, rec, list)
	if cur != nil {
		in.cur = cur
		if fp, ok := decodeFingerprint(cur.Spec.Labels[LabelFingerprint]); ok {
			in.curFP = fp
		}
	}
	switch {
	case cur == nil:
		if rec.Snapshot != nil && dirExists(rec.Snapshot.Dir) {
			in.state, in.snap, in.balloon = Suspended, rec.Snapshot, rec.BalloonMiB
			if rec.Snapshot.Spec.Labels != nil {
				if fp, ok := decodeFingerprint(rec.Snapshot.Spec.Labels[LabelFingerprint]); ok {
					in.curFP = fp
				}
			}
			return in, "no vm; snapshot present"
		}
		if in.want == DesiredStopped {
			in.state = Stopped
			return in, "no vm; stopped on request"
		}
		in.state = NotExist
		return in, "vm missing; will be recreated"
	case cur.Status == vm.StatusStopped:
		if in.want == DesiredStopped {
			// Left by a run that kept powered-off VMs: a stopped machine
			// holds none.
			in.state = Stopped
			if err := m.destroy(ctx, cur.ID); err != nil {
				m.cfg.Logger.Warn("destroy stopped vm", "machine", rec.Name, "vm", cur.ID, "err", err)
				return in, "vm powered off"
			}
			in.cur = nil
			return in, "vm powered off; destroyed"
		}
		in.state = Failed
		return in, "vm process exited while the daemon was away; recovering"
	case cur.Status == vm.StatusPaused:
		// Perhaps caught in the middle of a suspend: let it run again.
		if err := m.cfg.Provider.Resume(ctx, cur.ID); err != nil {
			in.state = Failed
			return in, "paused vm would not resume: " + err.Error()
		}
		cur.Status = vm.StatusRunning
	}
	if err := m.pingOnce(ctx, *cur); err != nil {
		// Alive but not answering (yet): the goroutine waits for it up to
		// StartTimeout, then recovers it.
		in.state = Created
		return in, "vm alive, agent not answering yet: " + err.Error()
	}
	in.state = Running
	if b, ok := m.ballooner(); ok {
		if st, err := b.BalloonStats(ctx, cur.ID); err == nil && st.TargetMiB > 0 && st.TargetMiB < in.curFP.MemoryMiB {
			t := st.TargetMiB
			in.state, in.balloon = Idle, &t
			return in, "vm alive, agent answers, balloon shrunk"
		}
	}
	return in, "vm alive, agent answers"
}

// findVM returns the machine's VM: the recorded one if the provider still
// knows it, else one labelled with the machine's name (created just before
// a crash, before its record was written).
func (m *Manager) findVM(ctx context.Context, rec Record, list func() ([]vm.VM, error)) *vm.VM {
	if rec.VMID != "" {
		v, err := m.cfg.Provider.Inspect(ctx, rec.VMID)
		if err == nil {
			return &v
		}
		if !errors.Is(err, vm.ErrNotFound) {
			m.cfg.Logger.Warn("inspect recorded vm", "machine", rec.Name, "vm", rec.VMID, "err", err)
		}
	}
	vms, err := list()
	if err != nil {
		m.cfg.Logger.Warn("list vms", "err", err)
		return nil
	}
	var found *vm.VM
	for i := range vms {
		v := vms[i]
		if v.Spec.Labels[LabelMachine] != rec.Name || v.Status == vm.StatusStopped {
			continue
		}
		if found == nil || v.CreatedAt.After(found.CreatedAt) {
			found = &v
		}
	}
	return found
}

func dirExists(dir string) bool {
	if dir == "" {
		return false
	}
	fi, err := os.Stat(dir)
	return err == nil && fi.IsDir()
}
