package daemon

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/warmpool/warmpool/guest"
	"github.com/warmpool/warmpool/pool"
	"github.com/warmpool/warmpool/store"
	"github.com/warmpool/warmpool/vm"
)

// Local is a daemon running in the caller's process: the configuration,
// state directory, provider, reconciliation, pools, templates and machines
// of `warmpool serve`, built by the same code, but no API server. Callers
// drive it through its api.Backend methods, so that what they measure
// (`warmpool bench`) is what a client of `warmpool serve` gets.
type Local struct {
	*Daemon
	cancel context.CancelFunc
	once   sync.Once
}

// Open starts a daemon in-process. The caller must Close it; with
// opts.StopAll, Close leaves no VM of it running.
func Open(ctx context.Context, opts Options) (*Local, error) {
	opts.noListen = true
	// Background loops end at Close even while ctx lives on.
	ctx, cancel := context.WithCancel(ctx)
	d, _, err := start(ctx, opts)
	if err != nil {
		cancel()
		return nil, err
	}
	return &Local{Daemon: d, cancel: cancel}, nil
}

// Close shuts the daemon down as SIGTERM shuts `warmpool serve` down: the
// warm VMs are destroyed; with Options.StopAll the leased VMs and machines
// too, then whatever else the provider still runs. Later calls do nothing.
func (l *Local) Close(ctx context.Context) {
	l.once.Do(func() {
		l.closing.Store(true)
		l.cancel()
		l.bg.Wait()
		l.repair.close()
		l.shutdown(ctx)
	})
}

// Provider is the provider the daemon runs its VMs on, without the
// daemon's records: a VM created or restored through it is the caller's to
// destroy (a stop-all shutdown destroys what is left). It is for measuring
// what the daemon builds on (booting or restoring a VM by hand, reading a
// VM's process), not for changing the VMs the daemon manages.
func (d *Daemon) Provider() vm.Provider { return d.prov.inner }

// SetAdaptive replaces the adaptive section's tuning for pools made
// adaptive from now on (bench replays a trace on a clock it chooses after
// measuring restores).
func (d *Daemon) SetAdaptive(c pool.AdaptiveConfig) error { return d.pools.SetAdaptive(c) }

// Parallelism is how many restores the pools run at once
// (limits.parallelism).
func (d *Daemon) Parallelism() int { return d.cfg.Limits.Parallelism }

// TemplateSnapshot returns the snapshot the VMs of template name are
// restored from.
func (d *Daemon) TemplateSnapshot(name string) (vm.Snapshot, error) {
	t, err := store.Get(d.st, store.Templates, name)
	if err != nil {
		return vm.Snapshot{}, fmt.Errorf("template %s: %w", name, err)
	}
	return t.Snapshot, nil
}

// GuestImage returns the image machines boot and templates are built
// from, building it into the cache on first use.
func (d *Daemon) GuestImage(ctx context.Context) (guest.Image, error) {
	return d.guestImage(ctx, "", nil)
}

// NewFakeProvider returns a new in-memory provider without latencies, for
// measuring code above the provider (a pool on its own) at no VM's cost.
func NewFakeProvider() vm.Provider { return newFakeProvider() }

// destroyLeftovers destroys every VM the provider still runs: at a
// stop-all shutdown, after pools, leases and machines let go of theirs,
// what is left was started by the daemon (the provider keeps its VMs in
// the state directory) and has nobody left to use it.
func (d *Daemon) destroyLeftovers(ctx context.Context) error {
	vms, err := d.prov.List(ctx)
	if err != nil {
		return fmt.Errorf("list VMs: %w", err)
	}
	var errs []error
	for _, v := range vms {
		dctx, cancel := context.WithTimeout(ctx, time.Minute)
		err := d.prov.Destroy(dctx, v.ID)
		cancel()
		switch {
		case err == nil:
			d.log.Info("destroyed a VM left at shutdown", "vm", v.ID)
		case !errors.Is(err, vm.ErrNotFound):
			errs = append(errs, fmt.Errorf("destroy VM %s: %w", v.ID, err))
		}
	}
	return errors.Join(errs...)
}

// localConfig is what Options set for a daemon run in-process; it has no
// configuration keys.
type localConfig struct {
	imageCacheDir string
	fakeLatency   map[string]time.Duration
	tbSizeMiB     int
}
