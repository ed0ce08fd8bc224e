package firecracker

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/warmpool/warmpool/internal/sparse"
	"github.com/warmpool/warmpool/vm"
)

// An image's disks: Spec.RootDisk read-only, Spec.WritableDisk under it.
//
// Firecracker records each drive's path_on_host in a snapshot and reopens
// that path when a clone loads it, with no override. So every VM names its
// writable disk by the same path relative to its own root: "rw.img" in
// its working directory (the VM directory, outside a jail) or "/rw.img"
// inside its jail. A clone puts its private copy of the snapshot's frozen
// disk there before the load, and the load opens the clone's file, never
// the template's. The root disk is shared and never written: outside a
// jail its absolute path is the same for every VM, inside one it is linked
// into each jail under the same name.
const (
	rootDriveID     = "root"
	writableDriveID = "rw"

	rootDiskName     = "root.ext4"
	writableDiskName = "rw.img"
	// snapWritableName is the frozen copy of the snapshotted VM's writable
	// disk in the snapshot directory; clones start from copies of it.
	snapWritableName = "writable.img"
	metaWritable     = "writable_disk"
)

// guestDrive is a drive as Firecracker is told about it.
type guestDrive struct {
	id, path string
	readOnly bool
}

// imageDrives links the root and writable disks of a VM about to boot
// where its process finds them, and returns their drives in the order the
// guest names them (vda, vdb). The writable disk stays the caller's file:
// the VM writes to it through a link.
func (p *Provider) imageDrives(in *instance) ([]guestDrive, error) {
	spec := in.Spec
	if spec.RootDisk == "" {
		if spec.WritableDisk != "" {
			return nil, &vm.FieldError{Field: "writable_disk", Value: spec.WritableDisk, Reason: "needs a root_disk it is the writable layer of"}
		}
		return nil, nil
	}
	root, err := p.rootDrivePath(in)
	if err != nil {
		return nil, err
	}
	drives := []guestDrive{{id: rootDriveID, path: root, readOnly: true}}
	if spec.WritableDisk == "" {
		return drives, nil
	}
	if in.Jailed {
		// The guest's writes must reach the caller's disk: link only.
		if _, err := p.linkIntoJail(in, spec.WritableDisk, writableDiskName, true); err != nil {
			return nil, err
		}
		// Firecracker, no longer root, opens the disk read-write.
		if err := os.Chown(spec.WritableDisk, p.opts.Jailer.UID, p.opts.Jailer.GID); err != nil {
			return nil, fmt.Errorf("hand writable disk %s to the jail's user: %w", spec.WritableDisk, err)
		}
	} else {
		target, err := filepath.Abs(spec.WritableDisk)
		if err != nil {
			return nil, fmt.Errorf("writable disk %s: %w", spec.WritableDisk, err)
		}
		// A symbolic link works across file systems, and the process
		// resolves it only outside a jail.
		if err := os.Symlink(target, in.hostPath(writableDiskName)); err != nil {
			return nil, fmt.Errorf("link writable disk %s into vm %s: %w", target, in.ID, err)
		}
	}
	in.WritableDiskPath = spec.WritableDisk
	return append(drives, guestDrive{id: writableDriveID, path: writablePath(in)}), nil
}

// rootDrivePath makes the image's root disk visible to in's process.
func (p *Provider) rootDrivePath(in *instance) (string, error) {
	if !in.Jailed {
		return filepath.Abs(in.Spec.RootDisk)
	}
	// A copy would cost the image's size per VM; the jail must share it.
	return p.linkIntoJail(in, in.Spec.RootDisk, rootDiskName, true)
}

// writablePath is how in's process names its writable disk: the same for
// every VM, see above.
func writablePath(in *instance) string {
	if in.Jailed {
		return in.fcPath(writableDiskName)
	}
	return writableDiskName
}

// freezeWritableDisk keeps the paused VM's writable disk in the snapshot
// directory as the snapshot's memory last saw it. Firecracker's block
// device writes the guest's requests to the file as they come (there is no
// cache of its own to flush), so the file is complete once the VM is
// paused. It returns the snapshot's meta entries.
func freezeWritableDisk(in *instance, dir string) (map[string]string, error) {
	if in.WritableDiskPath == "" {
		return nil, nil
	}
	if err := sparse.Clone(in.WritableDiskPath, filepath.Join(dir, snapWritableName)); err != nil {
		return nil, fmt.Errorf("freeze writable disk: %w", err)
	}
	return map[string]string{metaWritable: snapWritableName}, nil
}

// cloneImageDisks gives in, about to load snap, its own copy of the
// snapshot's frozen writable disk at the path the snapshot names, and the
// root disk where the snapshot expects it. The copy is a reflink where the
// file system has them (nothing is copied until the clone writes) and a
// sparse copy elsewhere (what the template wrote, never the image).
func (p *Provider) cloneImageDisks(in *instance, snap vm.Snapshot) error {
	spec := snap.Spec
	if spec.RootDisk == "" {
		return nil
	}
	if _, err := os.Stat(spec.RootDisk); err != nil {
		return fmt.Errorf("the snapshot's root disk: %w (%w)", err, vm.ErrIncompatible)
	}
	if in.Jailed {
		if _, err := p.rootDrivePath(in); err != nil {
			return err
		}
	}
	name := snap.Meta[metaWritable]
	if name == "" {
		if spec.WritableDisk != "" {
			return fmt.Errorf("snapshot names a writable disk but keeps no copy of it: %w", vm.ErrIncompatible)
		}
		return nil
	}
	if filepath.Base(name) != name || strings.HasPrefix(name, ".") {
		return &vm.FieldError{Field: "snapshot.meta." + metaWritable, Value: name, Reason: "must be a file name"}
	}
	frozen := filepath.Join(snap.Dir, name)
	if _, err := os.Stat(frozen); err != nil {
		return fmt.Errorf("the snapshot's writable disk: %w (%w)", err, vm.ErrIncompatible)
	}
	dst := in.hostPath(writableDiskName)
	if err := sparse.Clone(frozen, dst); err != nil {
		return fmt.Errorf("clone's writable disk: %w", err)
	}
	if in.Jailed {
		if err := os.Chown(dst, p.opts.Jailer.UID, p.opts.Jailer.GID); err != nil {
			return fmt.Errorf("hand the clone's writable disk to the jail's user: %w", err)
		}
	}
	in.WritableDiskPath = dst
	in.Spec.WritableDisk = dst
	return nil
}

// guestDiskCmdline names the disks on the kernel command line the way this
// guest can find them. The command line refers to them by the serials
// vm.RootDiskSerial and vm.WritableDiskSerial, which Firecracker cannot set
// (its virtio-blk serial is made from the file's inode), so each word whose
// value is one of those serials gets the device the guest kernel names the
// drive instead. Firecracker adds the drives to the guest in the order they
// were configured, and the kernel names them in that order: vda, vdb.
func guestDiskCmdline(cmdline string, drives []guestDrive) string {
	dev := map[string]string{}
	for i, d := range drives {
		name := "/dev/vd" + string(rune('a'+i))
		switch d.id {
		case rootDriveID:
			dev[vm.RootDiskSerial] = name
		case writableDriveID:
			dev[vm.WritableDiskSerial] = name
		}
	}
	words := strings.Fields(cmdline)
	for i, w := range words {
		k, v, ok := strings.Cut(w, "=")
		if d, found := dev[v]; ok && found {
			words[i] = k + "=" + d
		}
	}
	return strings.Join(words, " ")
}
