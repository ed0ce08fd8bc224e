package lifecycle

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/warmpool/warmpool/vm"
)

// The operations below run outside the machine goroutine. They touch the
// provider and the file system, never the machine's fields; what they learn
// goes back in an opResult.

// pollInterval paces waits for an agent to come up or a VM to power off.
const pollInterval = 50 * time.Millisecond

func (m *Manager) createVM(ctx context.Context, spec MachineSpec, old *vm.VM) opResult {
	var r opResult
	if old != nil {
		if err := m.destroy(ctx, old.ID); err != nil {
			r.err = fmt.Errorf("destroy previous vm %s: %w", old.ID, err)
			return r
		}
		r.destroyedOld = true
	}
	disk, err := ensureDataDisk(m.cfg.StateDir, spec)
	if err != nil {
		r.err = err
		return r
	}
	ctx, cancel := context.WithTimeout(ctx, m.cfg.StartTimeout)
	defer cancel()
	fp := spec.Fingerprint()
	v, err := m.cfg.Provider.Create(ctx, vmSpec(spec, disk, fp))
	if err != nil {
		r.err = fmt.Errorf("create vm: %w", err)
		return r
	}
	r.vm, r.fp = &v, fp
	return r
}

func vmSpec(spec MachineSpec, disk string, fp Fingerprint) vm.Spec {
	return vm.Spec{
		Name:      spec.Name,
		VCPUs:     spec.VCPUs,
		MemoryMiB: spec.MemoryMiB,
		Kernel:    spec.Kernel,
		Initrd:    spec.Initrd,
		Cmdline:   spec.Cmdline,
		DataDisk:  disk,
		RootDisk:  spec.RootDisk,
		Labels:    map[string]string{LabelMachine: spec.Name, LabelFingerprint: encodeFingerprint(fp)},
	}
}

// ensureDataDisk creates the machine's sparse data disk if it is missing and
// grows it when the spec asks for more. It never shrinks or deletes it.
func ensureDataDisk(stateDir string, spec MachineSpec) (string, error) {
	if spec.DataDiskMiB == 0 {
		return "", nil
	}
	path := dataDiskPath(stateDir, spec.Name)
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return "", fmt.Errorf("data disk directory for %s: %w", spec.Name, err)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return "", fmt.Errorf("open data disk %s: %w", path, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return "", fmt.Errorf("stat data disk %s: %w", path, err)
	}
	want := int64(spec.DataDiskMiB) << 20
	switch {
	case fi.Size() < want:
		if err := f.Truncate(want); err != nil {
			return "", fmt.Errorf("size data disk %s to %d MiB: %w", path, spec.DataDiskMiB, err)
		}
	case fi.Size() > want:
		return "", fmt.Errorf("data disk %s is %d MiB, spec asks for %d: refusing to shrink it", path, fi.Size()>>20, spec.DataDiskMiB)
	}
	return path, nil
}

func (m *Manager) bootVM(ctx context.Context, v vm.VM) opResult {
	ctx, cancel := context.WithTimeout(ctx, m.cfg.StartTimeout)
	defer cancel()
	err := m.waitReady(ctx, v)
	return opResult{err: err, vanished: errors.Is(err, errVanished)}
}

// waitReady pings the agent until it answers or ctx ends, and gives up early
// when the VM is gone.
func (m *Manager) waitReady(ctx context.Context, v vm.VM) error {
	for {
		err := m.pingOnce(ctx, v)
		if err == nil {
			return nil
		}
		info, ierr := m.cfg.Provider.Inspect(ctx, v.ID)
		if errors.Is(ierr, vm.ErrNotFound) {
			return fmt.Errorf("wait for agent of vm %s: %w", v.ID, errVanished)
		}
		if ierr == nil && info.Status == vm.StatusStopped {
			return fmt.Errorf("vm %s exited before its agent answered (last ping: %v)", v.ID, err)
		}
		t := time.NewTimer(pollInterval)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("agent of vm %s did not answer within %s: %w", v.ID, m.cfg.StartTimeout, err)
		case <-t.C:
		}
	}
}

func (m *Manager) pingOnce(ctx context.Context, v vm.VM) error {
	ctx, cancel := context.WithTimeout(ctx, m.cfg.PingTimeout)
	defer cancel()
	if m.cfg.Ping == nil {
		info, err := m.cfg.Provider.Inspect(ctx, v.ID)
		if err != nil {
			return fmt.Errorf("inspect vm %s: %w", v.ID, err)
		}
		if info.Status != vm.StatusRunning {
			return fmt.Errorf("vm %s is %s", v.ID, info.Status)
		}
		return nil
	}
	if err := callCtx(ctx, func(ctx context.Context) error { return m.cfg.Ping(ctx, v) }); err != nil {
		return fmt.Errorf("ping agent of vm %s: %w", v.ID, err)
	}
	return nil
}

func (m *Manager) resumeVM(ctx context.Context, snap vm.Snapshot, memoryMiB int, restoreBalloon bool) opResult {
	var r opResult
	sn, ok := vm.As[vm.Snapshotter](m.cfg.Provider, vm.CapSnapshot)
	if !ok {
		r.err = fmt.Errorf("restore from snapshot %s: %w", snap.Dir, vm.ErrUnsupported)
		return r
	}
	parent := ctx
	ctx, cancel := context.WithTimeout(ctx, m.cfg.StartTimeout)
	defer cancel()
	fail := func(v *vm.VM, err error) opResult {
		if v != nil && snap.SingleUse && parent.Err() != nil {
			// The single-use snapshot went into v: destroying v would lose
			// the memory for good. Keep it; a stop powers it off, a new
			// daemon finds it by its labels.
			_ = os.RemoveAll(snap.Dir)
			r.vm, r.err = v, err
			return r
		}
		if v != nil {
			_ = m.destroy(context.WithoutCancel(ctx), v.ID)
		}
		if parent.Err() != nil {
			// Cancelled by a stop or by Close: the memory is still wanted.
			r.snap = &snap
		} else {
			_ = os.RemoveAll(snap.Dir)
		}
		r.err = err
		return r
	}
	v, err := sn.Restore(ctx, snap)
	if err != nil {
		return fail(nil, fmt.Errorf("restore from snapshot %s: %w", snap.Dir, err))
	}
	if err := m.cfg.Provider.Resume(ctx, v.ID); err != nil {
		return fail(&v, fmt.Errorf("resume restored vm %s: %w", v.ID, err))
	}
	v.Status = vm.StatusRunning
	if b, ok := m.ballooner(); ok && restoreBalloon {
		if err := b.SetBalloon(ctx, v.ID, memoryMiB); err != nil {
			m.cfg.Logger.Warn("balloon back up after restore failed", "vm", v.ID, "err", err)
		}
	}
	if err := m.waitReady(ctx, v); err != nil {
		return fail(&v, err)
	}
	if err := os.RemoveAll(snap.Dir); err != nil {
		m.cfg.Logger.Warn("remove used snapshot", "dir", snap.Dir, "err", err)
	}
	r.vm = &v
	return r
}

// stopVM powers cur off and destroys it, and discards a suspend snapshot.
// A powered-off VM is of no use: the next start boots a new one (the data
// disk is a file of the machine, not of the VM), while the dead VM would
// keep its directory and, under QEMU, its memory file.
func (m *Manager) stopVM(ctx context.Context, cur *vm.VM, snap *vm.Snapshot, force bool) opResult {
	var r opResult
	if cur != nil {
		forced, err := m.powerOff(ctx, *cur, force)
		r.forced = forced
		if err != nil {
			r.err = fmt.Errorf("stop vm %s: %w", cur.ID, err)
			return r
		}
		dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), m.cfg.StopTimeout)
		err = m.destroy(dctx, cur.ID)
		cancel()
		if err != nil {
			// The machine is stopped all the same; the next create
			// destroys the VM before it makes a new one.
			m.cfg.Logger.Warn("destroy stopped vm", "vm", cur.ID, "err", err)
			r.keptVM = true
		}
	}
	if snap != nil {
		if err := os.RemoveAll(snap.Dir); err != nil {
			r.err = fmt.Errorf("discard snapshot %s: %w", snap.Dir, err)
		}
	}
	return r
}

// powerOff stops v gracefully within StopTimeout unless force, then by force.
// forced reports that the graceful attempt ran out.
func (m *Manager) powerOff(ctx context.Context, v vm.VM, force bool) (forced bool, err error) {
	if info, err := m.cfg.Provider.Inspect(ctx, v.ID); errors.Is(err, vm.ErrNotFound) || (err == nil && info.Status == vm.StatusStopped) {
		return false, nil
	}
	if !force {
		gctx, cancel := context.WithTimeout(ctx, m.cfg.StopTimeout)
		err := m.gracefulStop(gctx, v)
		cancel()
		if err == nil {
			return false, nil
		}
		if ctx.Err() != nil {
			return false, ctx.Err()
		}
		m.cfg.Logger.Warn("graceful stop failed, forcing", "vm", v.ID, "err", err)
		forced = true
	}
	fctx, cancel := context.WithTimeout(ctx, m.cfg.StopTimeout)
	defer cancel()
	if err := m.cfg.Provider.Stop(fctx, v.ID, 0); err != nil && !errors.Is(err, vm.ErrNotFound) {
		return forced, fmt.Errorf("force stop: %w", err)
	}
	return forced, nil
}

func (m *Manager) gracefulStop(ctx context.Context, v vm.VM) error {
	if m.cfg.Shutdown != nil {
		err := callCtx(ctx, func(ctx context.Context) error { return m.cfg.Shutdown(ctx, v) })
		if err == nil {
			return m.waitStopped(ctx, v.ID)
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		m.cfg.Logger.Info("agent shutdown failed, asking the provider", "vm", v.ID, "err", err)
	}
	grace := m.cfg.StopTimeout
	if dl, ok := ctx.Deadline(); ok {
		grace = time.Until(dl)
	}
	if err := m.cfg.Provider.Stop(ctx, v.ID, grace); err != nil && !errors.Is(err, vm.ErrNotFound) {
		return err
	}
	return nil
}

func (m *Manager) waitStopped(ctx context.Context, id string) error {
	for {
		info, err := m.cfg.Provider.Inspect(ctx, id)
		if errors.Is(err, vm.ErrNotFound) || (err == nil && info.Status == vm.StatusStopped) {
			return nil
		}
		t := time.NewTimer(pollInterval)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("vm %s still running after agent shutdown: %w", id, ctx.Err())
		case <-t.C:
		}
	}
}

func (m *Manager) ballooner() (vm.Ballooner, bool) {
	return vm.As[vm.Ballooner](m.cfg.Provider, vm.CapBalloon)
}

func (m *Manager) shrinkVM(ctx context.Context, v vm.VM, memoryMiB, reserveMiB int) opResult {
	r := opResult{reserveMiB: reserveMiB}
	b, ok := m.ballooner()
	if !ok {
		return r
	}
	ctx, cancel := context.WithTimeout(ctx, m.cfg.StartTimeout)
	defer cancel()
	used, err := m.guestUsed(ctx, v, b)
	if err != nil {
		r.err = err
		return r
	}
	target := min(used+reserveMiB, memoryMiB)
	if err := b.SetBalloon(ctx, v.ID, target); err != nil {
		r.err = fmt.Errorf("shrink balloon of vm %s to %d MiB: %w", v.ID, target, err)
		return r
	}
	r.balloon, r.usedMiB = &target, used
	return r
}

// guestUsed asks the agent what the guest uses, else the balloon's guest
// statistics. There is deliberately no fixed fallback: a guess could
// squeeze a busy guest.
func (m *Manager) guestUsed(ctx context.Context, v vm.VM, b vm.Ballooner) (int, error) {
	if m.cfg.GuestMemUsed != nil {
		var used int
		err := callCtx(ctx, func(ctx context.Context) error {
			var err error
			used, err = m.cfg.GuestMemUsed(ctx, v)
			return err
		})
		if err != nil {
			return 0, fmt.Errorf("guest memory use of vm %s: %w", v.ID, err)
		}
		return used, nil
	}
	st, err := b.BalloonStats(ctx, v.ID)
	if err != nil {
		return 0, fmt.Errorf("balloon stats of vm %s: %w", v.ID, err)
	}
	avail := st.AvailableMiB
	if avail == 0 {
		avail = st.FreeMiB
	}
	if st.TotalMiB == 0 || avail == 0 {
		return 0, fmt.Errorf("guest memory use of vm %s unknown: the guest reported no statistics", v.ID)
	}
	return st.TotalMiB - avail, nil
}

func (m *Manager) wakeVM(ctx context.Context, v vm.VM, memoryMiB int, shrunk bool) opResult {
	var r opResult
	b, ok := m.ballooner()
	if !ok || !shrunk {
		return r
	}
	ctx, cancel := context.WithTimeout(ctx, m.cfg.StartTimeout)
	defer cancel()
	if err := b.SetBalloon(ctx, v.ID, memoryMiB); err != nil {
		r.err = fmt.Errorf("balloon of vm %s back to %d MiB: %w", v.ID, memoryMiB, err)
	}
	return r
}

// suspender is the provider's single-use snapshot, which keeps data disks.
func (m *Manager) suspender() (vm.Suspender, bool) {
	return vm.As[vm.Suspender](m.cfg.Provider, vm.CapSuspend)
}

// canSuspend reports whether a machine's VM can be saved to a snapshot.
// A template snapshot refuses data disks, so a machine with one needs a
// provider that suspends.
func (m *Manager) canSuspend(hasDataDisk bool) bool {
	if _, ok := m.suspender(); ok {
		return true
	}
	_, ok := vm.As[vm.Snapshotter](m.cfg.Provider, vm.CapSnapshot)
	return ok && !hasDataDisk
}

// suspendVM saves the paused VM to the machine's snapshot directory and
// destroys it. The single-use suspend snapshot is preferred: it is restored
// exactly once, in place of this VM, so it keeps the data disk and may
// move the memory instead of copying it. A template snapshot is the
// fallback for providers without it.
func (m *Manager) suspendVM(ctx context.Context, name string, v vm.VM) opResult {
	var r opResult
	var save func(ctx context.Context, id, dir string) (vm.Snapshot, error)
	if s, ok := m.suspender(); ok {
		save = s.Suspend
	} else if sn, ok := vm.As[vm.Snapshotter](m.cfg.Provider, vm.CapSnapshot); ok {
		save = sn.Snapshot
	} else {
		r.err = fmt.Errorf("suspend vm %s: %w", v.ID, vm.ErrUnsupported)
		return r
	}
	ctx, cancel := context.WithTimeout(ctx, m.cfg.StartTimeout)
	defer cancel()
	undo := func(dir string, err error) opResult {
		// Leave the machine running as it was.
		uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), m.cfg.StopTimeout)
		defer cancel()
		if rerr := m.cfg.Provider.Resume(uctx, v.ID); rerr != nil {
			m.cfg.Logger.Warn("resume after failed suspend", "vm", v.ID, "err", rerr)
		}
		if dir != "" {
			_ = os.RemoveAll(dir)
		}
		r.err = err
		return r
	}
	if err := m.cfg.Provider.Pause(ctx, v.ID); err != nil {
		return undo("", fmt.Errorf("pause vm %s: %w", v.ID, err))
	}
	if err := os.MkdirAll(m.cfg.SnapshotDir, 0o700); err != nil {
		return undo("", fmt.Errorf("snapshot directory: %w", err))
	}
	dir := filepath.Join(m.cfg.SnapshotDir, name)
	if err := os.RemoveAll(dir); err != nil {
		return undo("", fmt.Errorf("clear old snapshot %s: %w", dir, err))
	}
	snap, err := save(ctx, v.ID, dir)
	if err != nil {
		return undo(dir, fmt.Errorf("snapshot vm %s to %s: %w", v.ID, dir, err))
	}
	if err := m.destroy(ctx, v.ID); err != nil {
		return undo(dir, fmt.Errorf("destroy suspended vm %s: %w", v.ID, err))
	}
	r.snap = &snap
	return r
}

func (m *Manager) probeVM(v vm.VM) healthResult {
	ctx, cancel := context.WithTimeout(m.ctx, m.cfg.PingTimeout)
	defer cancel()
	r := healthResult{vmID: v.ID}
	info, err := m.cfg.Provider.Inspect(ctx, v.ID)
	switch {
	case errors.Is(err, vm.ErrNotFound):
		r.gone, r.vanished = true, true
		r.err = fmt.Errorf("vm %s: %w", v.ID, errVanished)
		return r
	case err != nil:
		r.err = fmt.Errorf("inspect vm %s: %w", v.ID, err)
		return r
	case info.Status == vm.StatusStopped:
		r.gone = true
		r.err = fmt.Errorf("vm %s process exited", v.ID)
		return r
	}
	if m.cfg.Ping == nil {
		return r
	}
	if err := callCtx(ctx, func(ctx context.Context) error { return m.cfg.Ping(ctx, v) }); err != nil {
		r.err = fmt.Errorf("ping agent of vm %s: %w", v.ID, err)
		// A crash makes the ping fail first; look again so that it counts
		// as the process gone, not as one of several slow pings.
		info, ierr := m.cfg.Provider.Inspect(ctx, v.ID)
		r.vanished = errors.Is(ierr, vm.ErrNotFound)
		r.gone = r.vanished || (ierr == nil && info.Status == vm.StatusStopped)
	}
	return r
}

func (m *Manager) destroy(ctx context.Context, id string) error {
	if err := m.cfg.Provider.Destroy(ctx, id); err != nil && !errors.Is(err, vm.ErrNotFound) {
		return err
	}
	return nil
}

// callCtx runs fn but returns when ctx ends even if fn ignores ctx, so an
// injected agent call that hangs cannot hang the operation that made it.
func callCtx(ctx context.Context, fn func(context.Context) error) error {
	done := make(chan error, 1)
	go func() { done <- fn(ctx) }()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}
