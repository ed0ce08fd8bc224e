package template

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/warmpool/warmpool/vm"
)

// DefaultDiskMiB is a template's writable disk when BuildOptions.DiskMiB is
// zero. The file is sparse: it costs what is written to it.
const DefaultDiskMiB = 1024

// MaxDiskMiB bounds a template's writable disk (1 TiB).
const MaxDiskMiB = 1 << 20

// RootCmdline is what the kernel command line of a VM booting an image's
// root filesystem disk gains: writable names the layer its writes go to, a
// disk serial or "tmpfs".
func RootCmdline(writable string) string {
	return "warmpool.root=" + vm.RootDiskSerial + " warmpool.rw=" + writable
}

// buildDiskFile is the build VM's writable disk in the template directory
// while the build runs.
const buildDiskFile = "build-disk.raw"

// attachRootDisk gives the build VM the image's root filesystem disk and a
// fresh writable disk of opts.DiskMiB, when the image has one, and returns
// the writable disk's size.
func attachRootDisk(ctx context.Context, spec *vm.Spec, opts BuildOptions) (int, error) {
	if opts.Image.Rootfs == nil {
		if opts.DiskMiB != 0 {
			return 0, &vm.FieldError{Field: "disk_mib", Value: opts.DiskMiB, Reason: "needs an image with a root filesystem (image build --from ...), the busybox image has none"}
		}
		return 0, nil
	}
	if !opts.Provider.Capabilities().Has(vm.CapRootDisk) {
		return 0, fmt.Errorf("image %s has a root filesystem disk, which provider %s cannot attach: %w", opts.Image.Dir, opts.Provider.Name(), vm.ErrUnsupported)
	}
	size := opts.DiskMiB
	if size == 0 {
		size = DefaultDiskMiB
	}
	if err := vm.ValidateRange("disk_mib", size, 16, MaxDiskMiB); err != nil {
		return 0, err
	}
	path := filepath.Join(opts.Dir, buildDiskFile)
	if err := MakeWritableDisk(ctx, path, size); err != nil {
		return 0, err
	}
	spec.RootDisk = opts.Image.Rootfs.Path
	spec.WritableDisk = path
	spec.Cmdline = strings.TrimSpace(spec.Cmdline + " " + RootCmdline(vm.WritableDiskSerial))
	return size, nil
}

// MakeWritableDisk makes a sparse raw disk of sizeMiB with an empty ext4 on
// it, with mkfs.ext4 on the host. It has no journal: a writable layer
// never outlives its VM's run (a clone is destroyed, not rebooted), and
// without one a clone's first writes touch fewer blocks of its
// copy-on-write layer.
func MakeWritableDisk(ctx context.Context, path string, sizeMiB int) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
	if err != nil {
		return fmt.Errorf("writable disk: %w", err)
	}
	err = f.Truncate(int64(sizeMiB) << 20)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(path)
		return fmt.Errorf("writable disk %s: %w", path, err)
	}
	mkfs, err := exec.LookPath("mkfs.ext4")
	if err != nil {
		os.Remove(path)
		return fmt.Errorf("writable disk: %w (install e2fsprogs)", err)
	}
	cmd := exec.CommandContext(ctx, mkfs, "-q", "-F", "-O", "^has_journal", "-m", "0",
		"-E", "lazy_itable_init=1,root_owner=0:0", "-L", "warmpool-rw", path, strconv.Itoa(sizeMiB)+"M")
	if out, err := cmd.CombinedOutput(); err != nil {
		os.Remove(path)
		return fmt.Errorf("mkfs.ext4 %s: %w: %s", path, err, strings.TrimSpace(string(out)))
	}
	return nil
}
