package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Kernel command line words that give the guest an image's root
// filesystem: warmpool.root=SERIAL names the read-only image disk and
// warmpool.rw=SERIAL|tmpfs where its writes go (the overlay's upper layer).
// Disks are found by their virtio serial, which the provider sets, so the
// order the kernel names them in does not matter. A provider that cannot
// set serials (Firecracker) names the device instead: a value starting
// with /dev/ is taken as the disk's path.
const (
	rootParam     = "warmpool.root="
	writableParam = "warmpool.rw="
	// writableTmpfs keeps the writes in memory (a machine, whose lasting
	// data lives on its data disk).
	writableTmpfs = "tmpfs"
)

// Where the pieces are mounted in the initramfs before the switch; they
// stay mounted (hidden under the new root) for the VM's life.
const (
	lowerDir    = "/run/warmpool/lower"
	writableDir = "/run/warmpool/rw"
	newRootDir  = "/run/warmpool/root"
)

// rootDiskTimeout bounds the wait for the disks to appear after virtio_blk
// loads (the kernel probes them asynchronously).
const rootDiskTimeout = 10 * time.Second

// switchRoot mounts the image's root filesystem disk read-only, the
// writable layer over it with overlayfs, and makes that the root, as
// switch_root does: /proc, /sys and /dev move along, the initramfs stays
// underneath. It reports false when the command line asks for no root disk
// (the busybox image, whose root is the initramfs). PID 1 and the agent it
// starts keep running from the initramfs's agent binary.
func switchRoot(cmdline string) (bool, error) {
	rootSerial, rwSpec := "", ""
	for _, w := range strings.Fields(cmdline) {
		if v, ok := strings.CutPrefix(w, rootParam); ok {
			rootSerial = v
		}
		if v, ok := strings.CutPrefix(w, writableParam); ok {
			rwSpec = v
		}
	}
	if rootSerial == "" {
		return false, nil
	}
	if rwSpec == "" {
		return false, fmt.Errorf("%s%s without %sSERIAL|tmpfs", rootParam, rootSerial, writableParam)
	}
	for _, d := range []string{lowerDir, writableDir, newRootDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return false, err
		}
	}
	rootDev, err := diskBySerial(rootSerial, rootDiskTimeout)
	if err != nil {
		return false, err
	}
	// noload: the image is read-only and clean, its journal has nothing to
	// replay and must not be touched.
	if err := unix.Mount(rootDev, lowerDir, "ext4", unix.MS_RDONLY, "noload"); err != nil {
		return false, fmt.Errorf("mount image disk %s (serial %s) read-only: %w", rootDev, rootSerial, err)
	}
	if rwSpec == writableTmpfs {
		if err := unix.Mount("tmpfs", writableDir, "tmpfs", 0, "mode=0755"); err != nil {
			return false, fmt.Errorf("mount tmpfs writable layer: %w", err)
		}
	} else {
		rwDev, err := diskBySerial(rwSpec, rootDiskTimeout)
		if err != nil {
			return false, err
		}
		// noinit_itable: no background zeroing of the inode tables mkfs
		// left uninitialised. It would run on in every clone of a
		// template snapshotted soon after boot, writing its disk and
		// taking its CPU.
		if err := unix.Mount(rwDev, writableDir, "ext4", 0, "noinit_itable"); err != nil {
			return false, fmt.Errorf("mount writable disk %s (serial %s): %w", rwDev, rwSpec, err)
		}
	}
	upper, work := filepath.Join(writableDir, "upper"), filepath.Join(writableDir, "work")
	for _, d := range []string{upper, work} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return false, err
		}
	}
	// volatile: no sync of the upper layer ever reaches the disk. The layer
	// is thrown away with its VM, and otherwise every copy-up (the
	// hand-off's first write to /etc, say) is a flush the host pays for.
	opts := "lowerdir=" + lowerDir + ",upperdir=" + upper + ",workdir=" + work + ",volatile"
	if err := unix.Mount("overlay", newRootDir, "overlay", 0, opts); err != nil {
		return false, fmt.Errorf("mount overlay root (%s): %w", opts, err)
	}
	for _, m := range []string{"/proc", "/sys", "/dev"} {
		target := filepath.Join(newRootDir, m)
		if err := os.MkdirAll(target, 0o755); err != nil {
			return false, err
		}
		if err := unix.Mount(m, target, "", unix.MS_MOVE, ""); err != nil {
			return false, fmt.Errorf("move %s into the new root: %w", m, err)
		}
	}
	if err := os.Chdir(newRootDir); err != nil {
		return false, err
	}
	if err := unix.Mount(".", "/", "", unix.MS_MOVE, ""); err != nil {
		return false, fmt.Errorf("move the new root onto /: %w", err)
	}
	if err := unix.Chroot("."); err != nil {
		return false, fmt.Errorf("chroot into the new root: %w", err)
	}
	if err := os.Chdir("/"); err != nil {
		return false, err
	}
	// /run is scratch space by convention: a tmpfs, as an init system would
	// mount it.
	_ = os.MkdirAll("/run", 0o755)
	if err := unix.Mount("tmpfs", "/run", "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "mode=0755"); err != nil {
		return true, fmt.Errorf("mount /run: %w", err)
	}
	return true, nil
}

// diskBySerial waits for the block device whose virtio serial is serial,
// or for the device serial names when it is a /dev/ path.
func diskBySerial(serial string, timeout time.Duration) (string, error) {
	deadline := time.Now().Add(timeout)
	if strings.HasPrefix(serial, "/dev/") {
		return waitDevice(serial, deadline)
	}
	for {
		entries, _ := os.ReadDir("/sys/block")
		var seen []string
		for _, e := range entries {
			b, err := os.ReadFile(filepath.Join("/sys/block", e.Name(), "serial"))
			if err != nil {
				continue
			}
			got := strings.TrimSpace(string(b))
			seen = append(seen, e.Name()+"="+got)
			if got == serial {
				dev := "/dev/" + e.Name()
				if _, err := os.Stat(dev); err == nil {
					return dev, nil
				} else if !errors.Is(err, os.ErrNotExist) {
					return "", err
				}
			}
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("no disk with serial %q after %s (disks: %s)", serial, timeout, strings.Join(seen, " "))
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// waitDevice waits until dev exists and is a block device.
func waitDevice(dev string, deadline time.Time) (string, error) {
	for {
		fi, err := os.Stat(dev)
		if err == nil {
			if fi.Mode()&os.ModeDevice == 0 {
				return "", fmt.Errorf("%s is no block device", dev)
			}
			return dev, nil
		}
		if !errors.Is(err, os.ErrNotExist) {
			return "", err
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("no disk %s after waiting", dev)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
