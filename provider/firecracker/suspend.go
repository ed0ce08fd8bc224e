package firecracker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/warmpool/warmpool/internal/singleuse"
	"github.com/warmpool/warmpool/vm"
)

var _ vm.Suspender = (*Provider)(nil)

// Meta keys of a single-use snapshot.
const (
	metaSingleUse = "single_use" // "true"
	metaDataDisk  = "data_disk_path"
)

// Suspend implements vm.Suspender: a Full snapshot of the paused VM into dir
// that keeps its data disk where it is. Firecracker flushes the drive's
// pending writes when it pauses the VM and the snapshot records the drive by
// path; the one restore reopens the same file. From here on the VM can only
// be stopped or destroyed.
func (p *Provider) Suspend(ctx context.Context, id, dir string) (vm.Snapshot, error) {
	fail := func(err error) (vm.Snapshot, error) {
		return vm.Snapshot{}, fmt.Errorf("suspend firecracker vm %s to %s: %w", id, dir, err)
	}
	in, err := p.running(id)
	if err != nil {
		return fail(err)
	}
	if in.SuspendedTo != "" {
		return fail(fmt.Errorf("already suspended to snapshot %s: %w", in.SuspendedTo, vm.ErrInvalidState))
	}
	if in.WritableDiskPath != "" {
		return fail(fmt.Errorf("vm has a writable root disk, which goes with it: %w", vm.ErrUnsupported))
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return fail(err)
	}
	api := in.client()
	defer api.close()
	var info instanceInfo
	if err := api.do(ctx, "GET", "/", nil, &info); err != nil {
		return fail(err)
	}
	if info.State != "Paused" {
		return fail(fmt.Errorf("the vm is %s, pause it first: %w", info.State, vm.ErrInvalidState))
	}
	raw, _, err := runningVersion(ctx, api)
	if err != nil {
		return fail(err)
	}
	if err := os.MkdirAll(abs, 0o700); err != nil {
		return fail(err)
	}
	statePath, memPath := filepath.Join(abs, snapStateName), filepath.Join(abs, snapMemName)
	if in.Jailed {
		statePath, memPath = in.fcPath("snapshot."+snapStateName), in.fcPath("snapshot."+snapMemName)
	}
	start := time.Now()
	if err := api.do(ctx, "PUT", "/snapshot/create", snapshotCreate{SnapshotType: "Full", SnapshotPath: statePath, MemFilePath: memPath}, nil); err != nil {
		return fail(err)
	}
	if in.Jailed {
		for _, name := range []string{snapStateName, snapMemName} {
			if err := moveFile(in.hostPath("snapshot."+name), filepath.Join(abs, name)); err != nil {
				return fail(err)
			}
		}
	}
	snap := vm.Snapshot{
		ID: newID("fcsusp-"), Provider: p.Name(), Dir: abs, Spec: in.Spec,
		CreatedAt: time.Now().UTC(), ProviderVersion: raw, SingleUse: true,
		Meta: map[string]string{"vmstate": snapStateName, "memory": snapMemName, "source_vm": id, metaSingleUse: "true"},
	}
	if in.DataDiskPath != "" {
		snap.Meta[metaDataDisk] = in.DataDiskPath
	}
	// From here on the VM must never run again, or its disk would move on
	// without the snapshot's memory.
	in.SuspendedTo = snap.ID
	if err := p.saveRecord(in); err != nil {
		return fail(err)
	}
	undo := func(err error) (vm.Snapshot, error) {
		for _, name := range []string{snapStateName, snapMemName, snapMetaName, singleuse.SuspendedFile} {
			os.Remove(filepath.Join(abs, name))
		}
		in.SuspendedTo = ""
		if uerr := p.saveRecord(in); uerr != nil {
			p.log.Warn("vm stays marked suspended after a failed suspend", "vm", id, "err", uerr)
		}
		return fail(err)
	}
	b, _ := json.MarshalIndent(snap, "", "  ")
	if err := os.WriteFile(filepath.Join(abs, snapMetaName), b, 0o600); err != nil {
		return undo(err)
	}
	// The marker goes last: without it the directory is no snapshot.
	mark := singleuse.Marker{Snapshot: snap.ID, SourceVM: id, DataDisk: in.DataDiskPath}
	if err := singleuse.Write(abs, mark); err != nil {
		return undo(err)
	}
	p.log.Info("vm suspended", "vm", id, "dir", abs, "data_disk", in.DataDiskPath, "ms", time.Since(start).Milliseconds())
	return snap, nil
}

// restoreSuspended starts the one VM a single-use snapshot may have, on the
// suspended VM's own data disk. It claims the snapshot first (so a
// concurrent or later restore fails) and gives the claim back if the
// restore fails, so that it can be retried.
func (p *Provider) restoreSuspended(ctx context.Context, snap vm.Snapshot) (_ vm.VM, err error) {
	fail := func(err error) (vm.VM, error) {
		return vm.VM{}, fmt.Errorf("restore firecracker vm from suspended snapshot %s in %s: %w", snap.ID, snap.Dir, err)
	}
	mark, err := singleuse.Read(snap.Dir, snap.ID)
	if err != nil {
		return fail(err)
	}
	if src, err := p.load(mark.SourceVM); err == nil && p.alivePID(src) != 0 {
		return fail(fmt.Errorf("suspended vm %s still runs and holds the disk; destroy it first: %w", mark.SourceVM, vm.ErrInvalidState))
	}
	if mark.DataDisk != "" {
		if _, err := os.Stat(mark.DataDisk); err != nil {
			return fail(fmt.Errorf("data disk of the suspended vm: %w", err))
		}
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

	spec := snap.Spec
	spec.DataDisk = mark.DataDisk
	in, err := p.newInstance(spec)
	if err != nil {
		return fail(err)
	}
	in.Snapshot = snap.ID
	in.DataDiskPath = mark.DataDisk
	if err := p.loadSuspended(ctx, in, snap); err != nil {
		p.discard(in)
		return fail(err)
	}
	if err := claim.Complete(in.ID); err != nil {
		p.discard(in)
		return fail(err)
	}
	// The memory now belongs to the restored VM alone: Firecracker maps it
	// privately, so the file can go (its pages stay while the VM runs).
	if err := os.Remove(filepath.Join(snap.Dir, snap.Meta["memory"])); err != nil && !errors.Is(err, os.ErrNotExist) {
		p.log.Warn("remove restored snapshot's memory", "dir", snap.Dir, "err", err)
	}
	p.log.Info("vm restored from suspend", "vm", in.ID, "snapshot", snap.ID, "from_vm", mark.SourceVM)
	// The restore has happened and cannot be given back: a late
	// cancellation must not lose the VM that now holds the memory.
	p.handOver(in.ID)
	return p.Inspect(context.WithoutCancel(ctx), in.ID)
}

// loadSuspended starts a fresh process for in, loads the snapshot paused and
// points its data drive at the suspended VM's disk.
func (p *Provider) loadSuspended(ctx context.Context, in *instance, snap vm.Snapshot) error {
	statePath, memPath, err := p.snapshotFiles(in, snap)
	if err != nil {
		return err
	}
	if in.Jailed && in.Spec.RootDisk != "" {
		if _, err := p.rootDrivePath(in); err != nil {
			return err
		}
	}
	disk := in.DataDiskPath
	if in.Jailed && disk != "" {
		// The guest's writes must reach the machine's disk: link only.
		if disk, err = p.linkIntoJail(in, in.DataDiskPath, cloneDiskName, true); err != nil {
			return err
		}
	}
	api, raw, ver, err := p.startForLoad(ctx, in)
	if err != nil {
		return err
	}
	defer api.close()
	if snap.ProviderVersion != "" && snap.ProviderVersion != raw {
		return fmt.Errorf("snapshot %s was taken with Firecracker %s but %s is running: %w (%w)", snap.ID, snap.ProviderVersion, raw, vm.ErrIncompatible, vm.ErrInvalidState)
	}
	load := snapshotLoad{
		SnapshotPath:  statePath,
		MemBackend:    memoryBackend{BackendType: "File", BackendPath: memPath},
		VsockOverride: vsockOverrideFor(in, ver),
	}
	if ver.atLeast(1, 12) {
		load.NetworkOverrides = p.overrides(in)
	}
	if err := api.do(ctx, "PUT", "/snapshot/load", load, nil); err != nil {
		return err
	}
	if disk != "" {
		// Firecracker reopened the drive at its snapshotted path, which is
		// this disk outside a jail; say so explicitly, since a jailed VM
		// sees it under its own root.
		if err := api.do(ctx, "PATCH", "/drives/"+dataDriveID, partialDrive{DriveID: dataDriveID, PathOnHost: disk}, nil); err != nil {
			return err
		}
	}
	return nil
}
