package bench

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"strings"

	"github.com/warmpool/warmpool/guest"
	"github.com/warmpool/warmpool/provider/qemu"
	"github.com/warmpool/warmpool/vm"
)

// setupQEMU builds (or finds in the cache) the guest image, starts a QEMU
// provider in the run's own state directory and makes the template.
func setupQEMU(ctx context.Context, e *env, host *Host) error {
	img, err := guestImage(ctx, e)
	if err != nil {
		return err
	}
	p, err := qemu.New(qemu.Options{StateDir: e.subdir("qemu"), Accel: e.opts.Accel, Logger: e.opts.Logger})
	if err != nil {
		return err
	}
	// Closed after the final sweep has destroyed every VM.
	e.closeProvider = p.Close
	e.provider, e.snaps, e.dialer = p, p, p
	host.QEMUVersion = p.Version()
	e.bootSpec = vm.Spec{
		Name: "bench", VCPUs: e.opts.VCPUs, MemoryMiB: e.opts.MemoryMiB,
		Kernel: img.Kernel, Initrd: img.Initrd, Cmdline: img.Cmdline,
	}
	e.progress("template (%d vCPU, %d MiB)", e.opts.VCPUs, e.opts.MemoryMiB)
	snap, err := snapshotTemplate(ctx, e, e.subdir("template"))
	if err != nil {
		return err
	}
	e.template = snap
	host.Accel = e.accel
	return nil
}

func guestImage(ctx context.Context, e *env) (guest.Image, error) {
	if e.opts.ImageDir != "" {
		e.progress("guest image %s", e.opts.ImageDir)
		return guest.Load(e.opts.ImageDir)
	}
	cache := e.opts.CacheDir
	if cache == "" {
		cache = guest.DefaultCacheDir()
	}
	e.progress("guest image (cache %s)", cache)
	lastStep := ""
	img, err := guest.Build(ctx, guest.BuildOptions{
		CacheDir: cache,
		Agent:    e.opts.GuestAgent,
		Progress: func(step string, _, _ int64) {
			if step != lastStep {
				lastStep = step
				e.progress("  %s", step)
			}
		},
	})
	if err != nil {
		return guest.Image{}, fmt.Errorf("guest image: %w", err)
	}
	return img, nil
}

// accelOf reads the accelerator a hypervisor process really runs with from
// its command line ("-accel tcg,tb-size=32" gives "tcg"), so the report
// does not repeat a setting that "auto" may have resolved either way.
func accelOf(pid int) string {
	if pid <= 0 {
		return ""
	}
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return ""
	}
	args := bytes.Split(bytes.TrimRight(raw, "\x00"), []byte{0})
	for i := 0; i+1 < len(args); i++ {
		if string(args[i]) == "-accel" || string(args[i]) == "--accel" {
			name, _, _ := strings.Cut(string(args[i+1]), ",")
			return strings.TrimPrefix(name, "accel=")
		}
		if string(args[i]) == "-machine" || string(args[i]) == "-M" {
			for _, opt := range strings.Split(string(args[i+1]), ",") {
				if v, ok := strings.CutPrefix(opt, "accel="); ok {
					return v
				}
			}
		}
	}
	return ""
}
