package daemon

// Temporary stand-ins until package template and provider/qemu land.

import (
	"context"
	"errors"
	"log/slog"
	"time"

	"github.com/warmpool/warmpool/agent"
	"github.com/warmpool/warmpool/guest"
	"github.com/warmpool/warmpool/vm"
)

type builtTemplate struct {
	Snapshot    vm.Snapshot
	ImageDigest string
}

func buildTemplate(ctx context.Context, name string, p *ownedProvider, img guest.Image, vcpus, mem int, dir string, progress func(string)) (builtTemplate, error) {
	progress("boot")
	v, err := p.Create(ctx, vm.Spec{Name: name, VCPUs: vcpus, MemoryMiB: mem, Kernel: img.Kernel, Initrd: img.Initrd, Cmdline: img.Cmdline})
	if err != nil {
		return builtTemplate{}, err
	}
	defer p.Destroy(context.WithoutCancel(ctx), v.ID)
	wctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if err := agent.WaitReady(wctx, p, v.ID); err != nil {
		return builtTemplate{}, err
	}
	if err := p.Pause(ctx, v.ID); err != nil {
		return builtTemplate{}, err
	}
	progress("snapshot")
	snap, err := p.Snapshot(ctx, v.ID, dir)
	return builtTemplate{Snapshot: snap, ImageDigest: img.Digest}, err
}

func newQEMU(Config, string, *slog.Logger) (vm.Provider, error) {
	return nil, errors.New("qemu provider not available yet")
}
