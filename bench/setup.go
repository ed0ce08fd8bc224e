package bench

import (
	"context"
	"fmt"
	"net"
	"time"

	"github.com/warmpool/warmpool/agent"
	"github.com/warmpool/warmpool/agent/server"
	"github.com/warmpool/warmpool/provider/fake"
	"github.com/warmpool/warmpool/vm"
)

// Latencies of the fake provider. They only need to keep the run's shape
// (restore far cheaper than boot) so that the smoke run exercises every code
// path quickly; its numbers say nothing about real VMs.
const (
	fakeCreateLatency  = 40 * time.Millisecond
	fakeRestoreLatency = 2 * time.Millisecond
)

// setup creates the provider and the one template every scenario shares.
func setup(ctx context.Context, e *env, host *Host) error {
	switch e.opts.Provider {
	case "fake":
		return setupFake(ctx, e, host)
	case "qemu":
		return setupQEMU(ctx, e, host)
	}
	return fmt.Errorf("unknown provider %q", e.opts.Provider)
}

func setupFake(ctx context.Context, e *env, host *Host) error {
	// Agent sessions end when the run ends, even if a connection is leaked.
	agentCtx, stopAgents := context.WithCancel(context.WithoutCancel(ctx))
	e.onCleanup("fake agents", func(context.Context) error { stopAgents(); return nil })
	p := newFakeProvider(agentCtx, fakeCreateLatency, fakeRestoreLatency)
	for op, d := range e.opts.FakeLatency {
		p.SetLatency(op, d)
	}
	e.provider, e.snaps, e.dialer = p, p, p
	e.bootSpec = vm.Spec{Name: "bench", VCPUs: e.opts.VCPUs, MemoryMiB: e.opts.MemoryMiB}
	host.Accel = "none"
	snap, err := snapshotTemplate(ctx, e, e.subdir("template"))
	if err != nil {
		return err
	}
	e.template = snap
	return nil
}

// newFakeProvider returns a fake provider whose agent is the real agent
// server in-process, so that readiness checks and handoffs take the same
// code path as with real VMs.
func newFakeProvider(ctx context.Context, create, restore time.Duration) *fake.Provider {
	return fake.New(fake.Options{
		CreateLatency:  create,
		RestoreLatency: restore,
		AgentHandler: func(c net.Conn) {
			_ = server.Serve(ctx, c, server.Options{})
		},
	})
}

// snapshotTemplate boots the boot spec, waits for its agent, pauses it and
// snapshots it into dir, the way a template is made.
func snapshotTemplate(ctx context.Context, e *env, dir string) (vm.Snapshot, error) {
	ctx, cancel := context.WithTimeout(ctx, readyTimeout)
	defer cancel()
	// Like template.Build: clones share the template's memory file, which a
	// balloon in every clone could punch holes into.
	spec := e.bootSpec
	spec.NoBalloon = true
	v, err := e.provider.Create(ctx, spec)
	if err != nil {
		return vm.Snapshot{}, fmt.Errorf("boot template VM: %w", err)
	}
	defer e.destroy(ctx, v.ID) //nolint:errcheck // the final sweep retries
	e.accel = accelOf(v.PID)
	if err := agent.WaitReady(ctx, e.dialer, v.ID); err != nil {
		return vm.Snapshot{}, fmt.Errorf("template VM %s: %w", v.ID, err)
	}
	if err := e.provider.Pause(ctx, v.ID); err != nil {
		return vm.Snapshot{}, fmt.Errorf("pause template VM %s: %w", v.ID, err)
	}
	snap, err := e.snaps.Snapshot(ctx, v.ID, dir)
	if err != nil {
		return vm.Snapshot{}, fmt.Errorf("snapshot template VM %s into %s: %w", v.ID, dir, err)
	}
	return snap, nil
}
