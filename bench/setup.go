package bench

import (
	"context"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/warmpool/warmpool/api"
	"github.com/warmpool/warmpool/daemon"
	"github.com/warmpool/warmpool/template"
	"github.com/warmpool/warmpool/vm"
)

// Latencies of the fake provider. They only need to keep the run's shape
// so that the smoke run exercises every code path quickly and its targets
// mean what they mean with real VMs: restore far cheaper than boot, and a
// cold boot slow enough that a warm acquire (which commits the daemon's
// state twice) is a hundredth of it, as under TCG. Its numbers say nothing
// about real VMs.
var fakeLatency = map[string]time.Duration{
	"create":  400 * time.Millisecond,
	"restore": 2 * time.Millisecond,
}

// benchTemplate is the one template every pool of the run is restored from.
const benchTemplate = "bench"

// setup starts the run's daemon in-process, the way `warmpool serve` wires
// it, on the run's own state directory, and builds the template every
// scenario shares through it.
func setup(ctx context.Context, e *env, host *Host) error {
	opts := daemon.Options{
		StateDir:      e.subdir("daemon"),
		Provider:      e.opts.Provider,
		Accel:         e.opts.Accel,
		Image:         e.opts.ImageDir,
		ImageCacheDir: e.opts.CacheDir,
		GuestAgent:    e.opts.GuestAgent,
		Logger:        e.opts.Logger,
		// The run leaves nothing behind: no lease, machine or VM.
		StopAll:     true,
		TBSizeMiB:   e.opts.TBSizeMiB,
		Parallelism: e.opts.Parallelism,
		NetworkCIDR: e.opts.NetworkCIDR,
	}
	if e.opts.NetworkCIDR != "" {
		lower, _, err := halves(e.opts.NetworkCIDR)
		if err != nil {
			return err
		}
		opts.NetworkCIDR = lower
		// Not with the fake provider, whose agent runs commands on this
		// host.
		if e.opts.selected("network") && e.opts.Provider != "fake" {
			opts.WarmExec = listenerWarmExec
		}
	}
	if e.opts.selected("density") {
		// The density pool holds more guest memory than the host could
		// lease at once; its VMs share the template's pages.
		opts.MemoryMiB = (e.opts.Density + 64) * e.opts.MemoryMiB
	}
	if e.opts.Provider == "fake" {
		opts.FakeLatency = maps.Clone(fakeLatency)
		maps.Copy(opts.FakeLatency, e.opts.FakeLatency)
	}
	d, err := daemon.Open(ctx, opts)
	if err != nil {
		return fmt.Errorf("start the daemon: %w", err)
	}
	e.onCleanup("daemon", func(ctx context.Context) error { d.Close(ctx); return nil })
	e.d = d
	e.provider = d.Provider()
	var ok bool
	if e.snaps, ok = vm.As[vm.Snapshotter](e.provider, vm.CapSnapshot); !ok {
		return fmt.Errorf("provider %s cannot restore snapshots: %w", e.provider.Name(), vm.ErrUnsupported)
	}
	if e.dialer, ok = vm.As[vm.AgentDialer](e.provider, vm.CapAgent); !ok {
		return fmt.Errorf("provider %s has no guest agent channel: %w", e.provider.Name(), vm.ErrUnsupported)
	}
	e.progress("template (%d vCPU, %d MiB)", e.opts.VCPUs, e.opts.MemoryMiB)
	lastStep := ""
	req := api.TemplateRequest{Name: benchTemplate, VCPUs: e.opts.VCPUs, MemoryMiB: e.opts.MemoryMiB}
	if _, err := d.BuildTemplate(ctx, req, func(step string) {
		if step != lastStep {
			lastStep = step
			e.progress("  %s", step)
		}
	}); err != nil {
		return fmt.Errorf("build template: %w", err)
	}
	e.templateName = benchTemplate
	// Only after the template's VM booted: an "auto" accelerator is decided
	// by the first boot.
	info := e.provider.Info(ctx)
	host.Accel, host.QEMUVersion = info.Accel, info.Version
	if host.Accel == "" {
		host.Accel = "none"
	}
	if e.template, err = d.TemplateSnapshot(benchTemplate); err != nil {
		return err
	}
	img, err := d.GuestImage(ctx)
	if err != nil {
		return err
	}
	e.bootSpec = vm.Spec{
		Name: "bench", VCPUs: e.opts.VCPUs, MemoryMiB: e.opts.MemoryMiB,
		Kernel: img.Kernel, Initrd: img.Initrd, Cmdline: img.Cmdline,
	}
	if img.Rootfs != nil {
		// A cold boot of the image mounts its root filesystem as the
		// template did: read-only, with a writable disk (one for every
		// boot of the run; they come one after another).
		if err := os.MkdirAll(e.subdir("boot"), 0o755); err != nil {
			return err
		}
		disk := filepath.Join(e.subdir("boot"), "writable.raw")
		if err := template.MakeWritableDisk(ctx, disk, template.DefaultDiskMiB); err != nil {
			return err
		}
		e.bootSpec.RootDisk, e.bootSpec.WritableDisk = img.Rootfs.Path, disk
		e.bootSpec.Cmdline = strings.TrimSpace(img.Cmdline + " " + template.RootCmdline(vm.WritableDiskSerial))
		host.Image = img.Source
	}
	return nil
}
