package daemon

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/warmpool/warmpool/agent/proto"
	agentserver "github.com/warmpool/warmpool/agent/server"
	"github.com/warmpool/warmpool/provider/fake"
	"github.com/warmpool/warmpool/provider/firecracker"
	"github.com/warmpool/warmpool/provider/qemu"
	"github.com/warmpool/warmpool/vm"
)

// newProvider builds the provider cfg names. Each keeps its VMs under
// stateDir/vms (QEMU's runtime files: in a tmpfs directory named after
// stateDir) so that VMs of different state directories never mix. It is
// the one place in the daemon that knows providers by name; everything else
// reaches them through vm.Provider, its Info and vm.As.
func newProvider(cfg Config, stateDir string, log *slog.Logger) (vm.Provider, error) {
	if len(cfg.local.fakeLatency) > 0 && cfg.Provider != "fake" {
		return nil, &vm.FieldError{Field: "fake_latency", Value: cfg.Provider, Reason: "only the fake provider has latencies to set"}
	}
	switch cfg.Provider {
	case "qemu":
		p, err := qemu.New(qemu.Options{StateDir: stateDir, RunDir: qemu.DefaultRunDir(stateDir), Accel: cfg.Accel, AccelCache: qemu.DefaultAccelCache(), TBSizeMiB: cfg.local.tbSizeMiB, Logger: log.With("component", "qemu")})
		if err != nil {
			return nil, fmt.Errorf("provider qemu: %w", err)
		}
		return p, nil
	case "firecracker":
		opts := firecracker.Options{StateDir: stateDir, Binary: cfg.Firecracker.Binary, Logger: log.With("component", "firecracker")}
		if cfg.Firecracker.Jailer != "" {
			opts.JailerBinary = cfg.Firecracker.Jailer
			uid, gid := cfg.Firecracker.UID, cfg.Firecracker.GID
			if uid == 0 && gid == 0 {
				uid, gid = os.Getuid(), os.Getgid()
			}
			opts.Jailer = &firecracker.JailerOptions{UID: uid, GID: gid, ChrootBase: filepath.Join(stateDir, "jail"), ExtraArgs: cfg.Firecracker.JailerArgs}
		}
		p, err := firecracker.New(opts)
		if err != nil {
			return nil, fmt.Errorf("provider firecracker: %w", err)
		}
		return p, nil
	case "fake":
		p := newFakeProvider()
		for name, d := range cfg.local.fakeLatency {
			op, err := fake.ParseOp(name)
			if err != nil {
				return nil, fmt.Errorf("fake latency: %w", err)
			}
			p.SetLatency(op, d)
		}
		return p, nil
	}
	return nil, checkProviderName(cfg.Provider)
}

// CheckFakeLatency refuses an operation name that Options.FakeLatency
// cannot delay, naming those it can.
func CheckFakeLatency(op string) error {
	_, err := fake.ParseOp(op)
	return err
}

// defaultProvider is the provider of a configuration that names none.
const defaultProvider = "qemu"

// checkProviderName refuses a provider newProvider cannot build.
func checkProviderName(name string) error {
	switch name {
	case "qemu", "firecracker", "fake":
		return nil
	}
	return &vm.FieldError{Field: "provider", Value: name, Reason: "must be qemu, firecracker or fake"}
}

// newFakeProvider is the in-memory provider with the real agent server
// answering every VM's agent connection in-process. Commands run by exec
// run on the host: the fake is for tests and demos, not for isolation.
// A shutdown request stops the VM, as a real guest powering off would, so a
// graceful stop does not wait out its deadline.
func newFakeProvider() *fake.Provider {
	state := agentserver.NewState()
	var p *fake.Provider
	p = fake.New(fake.Options{AgentHandler: func(c net.Conn) {
		// The fake guest has no kernel to give entropy to; it takes it and
		// reports it as a guest whose CRNG reseeded would.
		opts := agentserver.Options{State: state, Agent: "fake-agent", AddEntropy: func([]byte) error { return nil }}
		if id, ok := fake.AgentConnVM(c); ok {
			opts.PowerOff = func() error { return p.Kill(id) }
			opts.Stats = func() (proto.Stats, error) { return fakeGuestStats(p, id) }
		}
		_ = agentserver.Serve(context.Background(), c, opts)
	}})
	return p
}

// fakeGuestUsedMiB is the memory the fake guest says it uses: about what
// the real busybox guest uses, so that an idle machine's balloon shrinks
// below its memory as a real one's does.
const fakeGuestUsedMiB = 40

// fakeGuestStats is the guest's view of the fake VM id, as a real guest's
// /proc/meminfo would show it: its memory (what the balloon leaves it), of
// which fakeGuestUsedMiB is in use. The host's /proc would make every
// machine look as busy as the host, so an idle balloon would never shrink.
func fakeGuestStats(p *fake.Provider, id string) (proto.Stats, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	v, err := p.Inspect(ctx, id)
	if err != nil {
		return proto.Stats{}, fmt.Errorf("fake guest stats of %s: %w", id, err)
	}
	totalMiB := v.Spec.MemoryMiB
	if b, err := p.BalloonStats(ctx, id); err == nil && b.ActualMiB > 0 {
		totalMiB = b.ActualMiB
	}
	freeKiB := uint64(max(totalMiB-fakeGuestUsedMiB, 0)) << 10
	return proto.Stats{
		MemTotalKiB: uint64(totalMiB) << 10, MemFreeKiB: freeKiB, MemAvailableKiB: freeKiB,
		UptimeMillis: time.Since(v.CreatedAt).Milliseconds(), Procs: 1, UnixNano: time.Now().UnixNano(),
	}, nil
}
