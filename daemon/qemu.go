package daemon

import (
	"context"
	"fmt"
	"log/slog"
	"net"

	"github.com/warmpool/warmpool/agent"
	"github.com/warmpool/warmpool/guest"
	"github.com/warmpool/warmpool/provider/qemu"
	"github.com/warmpool/warmpool/template"
	"github.com/warmpool/warmpool/vm"
)

// newQEMU is the QEMU provider keeping its VMs under stateDir/vms. Stopping
// a VM asks its guest agent to power off first (the provider cannot import
// the agent package), then falls back to ACPI.
func newQEMU(cfg Config, stateDir string, log *slog.Logger) (vm.Provider, error) {
	p, err := qemu.New(qemu.Options{
		StateDir: stateDir,
		Accel:    cfg.Accel,
		Logger:   log.With("component", "qemu"),
		GuestShutdown: func(ctx context.Context, conn net.Conn) error {
			c := agent.NewClient(conn)
			defer c.Close()
			return c.Shutdown(ctx)
		},
	})
	if err != nil {
		return nil, fmt.Errorf("provider qemu: %w", err)
	}
	return p, nil
}

type builtTemplate struct {
	Snapshot    vm.Snapshot
	ImageDigest string
}

// buildTemplate cold-boots img with the given shape through p (so the build
// VM is recorded while it exists) and snapshots it into dir.
func buildTemplate(ctx context.Context, name string, p *ownedProvider, img guest.Image, vcpus, mem int, dir string, progress func(string)) (builtTemplate, error) {
	t, err := template.Build(ctx, template.BuildOptions{
		Name:      name,
		Provider:  p,
		Image:     img,
		VCPUs:     vcpus,
		MemoryMiB: mem,
		Dir:       dir,
		Progress:  progress,
	})
	if err != nil {
		return builtTemplate{}, err
	}
	return builtTemplate{Snapshot: t.Snapshot, ImageDigest: t.ImageDigest}, nil
}
