package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/warmpool/warmpool/internal/atomicfile"
	"github.com/warmpool/warmpool/internal/singleuse"
	"github.com/warmpool/warmpool/internal/sparse"
	"github.com/warmpool/warmpool/vm"
	"golang.org/x/sys/unix"
)

// Meta keys of a single-use snapshot.
const (
	metaSingleUse = "single_use" // "true"
	metaSourceVM  = "source_vm"  // ID of the suspended VM
)

// Suspend writes a single-use snapshot of the paused VM into dir, keeping
// its data disk. QEMU's stop and the end of the migration flush every write
// the guest had issued to the disk image (cache=writeback flushes with
// fdatasync); what the guest still holds in its page cache is in its
// memory, which comes back with the restore.
//
// With a shared RAM file the stream holds only device state, and the RAM
// file moves into dir: a hard link when dir is on the RAM file's file
// system (no copy at all), else a sparse copy (to a disk-backed dir, which
// is what frees the memory). The VM is marked suspended and can only be
// stopped or destroyed from now on: it still maps that same file.
func (p *Provider) Suspend(ctx context.Context, id, dir string) (vm.Snapshot, error) {
	m, err := p.lookup(ctx, id)
	if err != nil {
		return vm.Snapshot{}, err
	}
	m.op.Lock()
	defer m.op.Unlock()
	fail := func(err error) (vm.Snapshot, error) {
		return vm.Snapshot{}, fmt.Errorf("suspend qemu vm %s to %s: %w", id, dir, err)
	}
	rec, err := p.pausedRecord(ctx, m)
	if err != nil {
		return fail(err)
	}
	if rec.Config.WritableDisk != "" {
		return fail(fmt.Errorf("vm has a writable root disk layer, which goes with it: %w", vm.ErrUnsupported))
	}
	ramInFile := rec.Config.MemPath != "" && rec.Config.MemShared
	abs, err := filepath.Abs(dir)
	if err != nil {
		return fail(err)
	}
	if err := os.MkdirAll(abs, 0o755); err != nil {
		return fail(err)
	}
	c, err := p.conn(ctx, m)
	if err != nil {
		return fail(err)
	}
	start := time.Now()
	if err := p.migrateOut(ctx, c, ramInFile, filepath.Join(abs, snapStateFile)); err != nil {
		return fail(err)
	}
	stateDone := time.Now()
	snap := vm.Snapshot{
		ID:              "snap-" + newID(),
		Provider:        p.Name(),
		Dir:             abs,
		Spec:            snapshotSpec(rec.Spec),
		CreatedAt:       time.Now().UTC(),
		ProviderVersion: p.version,
		SingleUse:       true,
		Meta:            map[string]string{metaState: snapStateFile, metaSingleUse: "true", metaSourceVM: id},
	}
	// From here on the VM must never run again, or its disk and memory
	// would move on without the snapshot.
	if err := p.setSuspendedTo(m, snap.ID); err != nil {
		return fail(err)
	}
	undo := func(err error) (vm.Snapshot, error) {
		os.Remove(filepath.Join(abs, singleuse.SuspendedFile))
		os.Remove(filepath.Join(abs, snapMemoryFile))
		if uerr := p.setSuspendedTo(m, ""); uerr != nil {
			p.log.Warn("vm stays marked suspended after a failed suspend", "id", id, "err", uerr)
		}
		return fail(err)
	}
	cfg := rec.Config
	cfg.Incoming, cfg.OwnsMem, cfg.MemShared, cfg.MemPath = true, false, false, ""
	moved := "none"
	if ramInFile {
		how, err := linkOrCopy(rec.Config.MemPath, filepath.Join(abs, snapMemoryFile))
		if err != nil {
			return undo(err)
		}
		moved = how
		snap.Meta[metaMemory] = snapMemoryFile
	}
	cfgJSON, err := json.Marshal(cfg)
	if err != nil {
		return undo(err)
	}
	snap.Meta[metaConfig] = string(cfgJSON)
	if err := atomicfile.WriteJSON(filepath.Join(abs, snapMetaFile), 0o600, snapshotMeta{Snapshot: snap, Config: cfg}); err != nil {
		return undo(err)
	}
	// The marker goes last: without it the directory is no snapshot.
	if err := singleuse.Write(abs, singleuse.Marker{Snapshot: snap.ID, SourceVM: id}); err != nil {
		return undo(err)
	}
	p.log.Info("vm suspended", "id", id, "dir", abs, "ram", moved, "data_disk", rec.Config.DataDisk,
		"state_ms", stateDone.Sub(start).Milliseconds(), "total_ms", time.Since(start).Milliseconds())
	return snap, nil
}

func (p *Provider) setSuspendedTo(m *machine, snapID string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	rec := m.rec
	rec.SuspendedTo = snapID
	if err := atomicfile.WriteJSON(filepath.Join(m.dir, recordFile), 0o600, rec); err != nil {
		return err
	}
	m.rec = rec
	return nil
}

// restoreSuspended starts the one VM a single-use snapshot may have. It
// claims the snapshot first (so a concurrent or later restore fails), and
// gives the claim back if the restore fails, so that it can be retried.
func (p *Provider) restoreSuspended(ctx context.Context, snap vm.Snapshot) (_ vm.VM, err error) {
	fail := func(err error) (vm.VM, error) {
		return vm.VM{}, fmt.Errorf("restore qemu vm from suspended snapshot %s in %s: %w", snap.ID, snap.Dir, err)
	}
	mark, err := singleuse.Read(snap.Dir, snap.ID)
	if err != nil {
		return fail(err)
	}
	if src, err := p.lookup(ctx, mark.SourceVM); err == nil {
		src.mu.Lock()
		alive, gone := src.proc.alive(), src.gone
		src.mu.Unlock()
		if alive && !gone {
			return fail(fmt.Errorf("suspended vm %s still runs and holds the disk; destroy it first: %w", mark.SourceVM, vm.ErrInvalidState))
		}
	}
	cfg, err := p.checkSnapshot(snap)
	if err != nil {
		return fail(err)
	}
	if err := ctx.Err(); err != nil {
		return fail(err)
	}
	claim, err := singleuse.Take(snap.Dir, mark)
	if err != nil {
		return fail(err)
	}
	defer func() {
		if err != nil {
			if uerr := claim.Release(); uerr != nil {
				p.log.Error("suspended snapshot stays claimed after a failed restore", "dir", snap.Dir, "err", uerr)
			}
		}
	}()

	id := newID()
	dir := filepath.Join(p.vmsDir, id)
	if cfg.Accel == AccelTCG && p.opts.TBSizeMiB > 0 {
		cfg.TBSizeMiB = p.opts.TBSizeMiB
	}
	snapMem := ""
	if name := snap.Meta[metaMemory]; name != "" {
		if filepath.Base(name) != name {
			return fail(&vm.FieldError{Field: "snapshot.meta.memory", Value: name, Reason: "must be a file name"})
		}
		snapMem = filepath.Join(snap.Dir, name)
	}
	// The restored VM is an ordinary VM again: in shared mode its RAM is a
	// shared file of its own, so it can be snapshotted or suspended later.
	if snapMem != "" || p.opts.SnapshotMode == SnapshotShared {
		cfg.MemPath, cfg.MemShared, cfg.OwnsMem = p.ramPath(dir, id), true, true
	}
	// The snapshot's RAM file is linked (or copied) in, not moved: a failed
	// restore never ran the guest, so the file is unchanged and the claim
	// can be given back.
	prepare := func(string) error {
		if snapMem == "" {
			return nil
		}
		_, err := linkOrCopy(snapMem, cfg.MemPath)
		return err
	}
	spec := restoredSpec(cfg, snap.Spec)
	spec.NoBalloon = cfg.NoBalloon
	rec := record{ID: id, Spec: spec, CreatedAt: time.Now().UTC(), Snapshot: snap.ID, Config: cfg}
	start := time.Now()
	m, err := p.startPrepared(ctx, rec, prepare)
	if err != nil {
		return fail(err)
	}
	started := time.Now()
	if err := p.migrateIn(ctx, m, snapMem != "", filepath.Join(snap.Dir, snap.Meta[metaState])); err != nil {
		p.remove(m)
		return fail(fmt.Errorf("load state into vm %s: %w (qemu log: %s)", id, err, p.logTail(m.dir)))
	}
	if err := claim.Complete(id); err != nil {
		p.remove(m)
		return fail(err)
	}
	// The memory now belongs to the restored VM alone.
	if snapMem != "" {
		if err := os.Remove(snapMem); err != nil && !errors.Is(err, os.ErrNotExist) {
			p.log.Warn("remove restored snapshot's memory", "path", snapMem, "err", err)
		}
	}
	p.log.Info("vm restored from suspend", "id", id, "snapshot", snap.ID, "from_vm", mark.SourceVM,
		"start_ms", started.Sub(start).Milliseconds(), "total_ms", time.Since(start).Milliseconds())
	return p.handOver(ctx, m)
}

// linkOrCopy makes dst hold src's content: a hard link on one file system,
// a sparse copy across two. It says which it did.
func linkOrCopy(src, dst string) (string, error) {
	err := os.Link(src, dst)
	if err == nil {
		return "linked", nil
	}
	if !errors.Is(err, unix.EXDEV) && !errors.Is(err, unix.EPERM) && !errors.Is(err, unix.EMLINK) {
		return "", fmt.Errorf("link ram file: %w", err)
	}
	if err := sparse.Copy(src, dst); err != nil {
		return "", err
	}
	return "copied", nil
}
