package qemu

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/warmpool/warmpool/internal/sparse"
	"github.com/warmpool/warmpool/vm"
)

// Files of the writable disk.
const (
	// snapDiskFile is the frozen copy of the template's writable disk in a
	// snapshot's directory: raw, never written again.
	snapDiskFile = "disk.raw"
	// snapCloneDiskFile is an empty qcow2 layer over snapDiskFile, made
	// once per snapshot; each clone starts from a copy of it.
	snapCloneDiskFile = "clone-disk.qcow2"
	// cloneDiskExt ends a clone's private copy-on-write layer,
	// StateDir/disks/<id>.qcow2, removed with the clone.
	cloneDiskExt = ".qcow2"
)

// Meta keys of a snapshot with a writable disk.
const (
	metaDisk      = "disk"
	metaCloneDisk = "clone_disk"
)

// diskArgs attaches the image's root filesystem read-only and the writable
// disk, each with the serial the guest looks for.
func (c machineConfig) diskArgs() []string {
	var a []string
	if c.RootDisk != "" {
		a = append(a,
			"-drive", "id=root,if=none,format=raw,readonly=on,file="+c.RootDisk,
			"-device", "virtio-blk-device,drive=root,serial="+vm.RootDiskSerial,
		)
	}
	if c.WritableDisk != "" {
		format := c.WritableFormat
		if format == "" {
			format = "raw"
		}
		// cache=unsafe: the guest's flushes are not passed on. The layer
		// never outlives this QEMU process (a clone's goes with its VM, a
		// template's is copied once QEMU has written everything out for
		// the snapshot), so a host crash loses nothing anyone keeps.
		a = append(a,
			"-drive", "id=rw,if=none,format="+format+",cache=unsafe,file="+c.WritableDisk,
			"-device", "virtio-blk-device,drive=rw,serial="+vm.WritableDiskSerial,
		)
	}
	return a
}

// freezeWritableDisk keeps the paused VM's writable disk in the snapshot
// directory, as the snapshot's guest memory last saw it: a sparse copy
// (QEMU has flushed the guest's writes by the end of the migration), and
// an empty qcow2 layer over it that clones copy. It returns the snapshot
// meta entries.
func (p *Provider) freezeWritableDisk(ctx context.Context, cfg machineConfig, dir string) (map[string]string, error) {
	if cfg.WritableFormat != "" && cfg.WritableFormat != "raw" {
		return nil, fmt.Errorf("vm's writable disk is a %s layer (a clone's): snapshot the template instead: %w", cfg.WritableFormat, vm.ErrUnsupported)
	}
	base := filepath.Join(dir, snapDiskFile)
	if err := sparse.Copy(cfg.WritableDisk, base); err != nil {
		return nil, fmt.Errorf("freeze writable disk: %w", err)
	}
	layer := filepath.Join(dir, snapCloneDiskFile)
	if err := p.qemuImg(ctx, "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", layer); err != nil {
		return nil, fmt.Errorf("clone layer over the writable disk: %w", err)
	}
	return map[string]string{metaDisk: snapDiskFile, metaCloneDisk: snapCloneDiskFile}, nil
}

// checkWritableDisk resolves a snapshot's writable disk files, if it has
// them.
func checkWritableDisk(snap vm.Snapshot) (layer string, err error) {
	name := snap.Meta[metaCloneDisk]
	if name == "" {
		return "", nil
	}
	if filepath.Base(name) != name {
		return "", &vm.FieldError{Field: "snapshot.meta.clone_disk", Value: name, Reason: "must be a file name"}
	}
	for _, f := range []string{snap.Meta[metaDisk], name} {
		if _, err := os.Stat(filepath.Join(snap.Dir, f)); err != nil {
			return "", fmt.Errorf("snapshot's writable disk: %w (%w)", err, vm.ErrIncompatible)
		}
	}
	return filepath.Join(snap.Dir, name), nil
}

// cloneDiskPath is where the clone id keeps its writable layer: on the
// state disk, since what a tenant writes may be large, while the VM's
// directory may be on tmpfs.
func (p *Provider) cloneDiskPath(id string) string {
	return filepath.Join(p.disksDir, id+cloneDiskExt)
}

// copyCloneLayer makes a clone's own copy of the snapshot's empty qcow2
// layer: its writes land there, the frozen base under it is shared.
func copyCloneLayer(layer, path string) error {
	if err := sparse.Copy(layer, path); err != nil {
		return fmt.Errorf("clone's writable disk: %w", err)
	}
	return nil
}

// sweepOrphanDisks removes clone disks whose VM directory is gone: the run
// directory was on tmpfs and the host rebooted, or a process died between
// the two removals. A disk is made after its VM's directory, so a VM being
// started by a process on the same directories keeps its disk.
func (p *Provider) sweepOrphanDisks() error {
	entries, err := os.ReadDir(p.disksDir)
	if err != nil {
		return fmt.Errorf("list clone disks in %s: %w", p.disksDir, err)
	}
	for _, e := range entries {
		id, ok := strings.CutSuffix(e.Name(), cloneDiskExt)
		if !ok || vm.ValidateName("id", id) != nil {
			continue
		}
		if _, err := os.Stat(filepath.Join(p.vmsDir, id)); !errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err := os.Remove(filepath.Join(p.disksDir, e.Name())); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("remove orphan clone disk: %w", err)
		}
		p.log.Info("orphan clone disk removed", "id", id)
	}
	return nil
}

// qemuImg runs the qemu-img next to the QEMU binary (else on PATH).
func (p *Provider) qemuImg(ctx context.Context, args ...string) error {
	bin := filepath.Join(filepath.Dir(p.opts.Binary), "qemu-img")
	if _, err := os.Stat(bin); err != nil {
		if bin, err = exec.LookPath("qemu-img"); err != nil {
			return fmt.Errorf("qemu-img: %w (install qemu-utils)", err)
		}
	}
	out, err := exec.CommandContext(ctx, bin, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("qemu-img %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}
