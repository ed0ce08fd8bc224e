package daemon

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"slices"
	"time"

	"github.com/warmpool/warmpool/agent"
	"github.com/warmpool/warmpool/api"
	"github.com/warmpool/warmpool/events"
	"github.com/warmpool/warmpool/lease"
	"github.com/warmpool/warmpool/pool"
	"github.com/warmpool/warmpool/store"
	"github.com/warmpool/warmpool/vm"
)

func (d *Daemon) leaseAPI(l store.Lease) api.Lease {
	return api.Lease{
		Address:   d.net.address(l.VMID),
		ID:        l.ID,
		Pool:      l.Pool,
		VMID:      l.VMID,
		Owner:     l.Owner,
		CreatedAt: l.CreatedAt,
		ExpiresAt: l.ExpiresAt,
		Labels:    l.Labels,
		Timings:   api.Timings{WaitMS: l.WaitMS, HandoffMS: l.HandoffMS, TotalMS: l.TotalMS},
	}
}

// newLeases is the lease registry over the daemon's store. A release
// destroys the VM through the provider (the pool gave it up at hand-off)
// and removes the lease with the VM's record.
func (d *Daemon) newLeases() (*lease.Registry, error) {
	return lease.New(lease.Config{
		Store:     d.st,
		DestroyVM: d.destroyHandedOut,
		OnRelease: func(l store.Lease, expired bool) {
			d.bus.Publish(events.Event{Kind: "lease.released", Subject: l.ID, Detail: map[string]any{"pool": l.Pool, "vm_id": l.VMID}})
			if expired {
				d.bus.Publish(events.Event{Kind: "lease.expired", Subject: l.ID, Detail: map[string]any{"pool": l.Pool}})
			}
		},
		Interval: d.cfg.Intervals.LeaseCheck.Std(),
		Logger:   d.log.With("component", "lease"),
	})
}

// destroyHandedOut destroys a VM the pool handed off (the pool no longer
// owns it), removing its record and running also in one transaction, and
// drops the hand-off connection kept for it (idempotent, and of no use
// once the VM was handed off, so also when the destroy failed). A VM
// already gone counts as destroyed.
func (d *Daemon) destroyHandedOut(ctx context.Context, vmID string, also func(*store.Tx) error) error {
	d.handoffer.Forget(vmID)
	d.guests.drop(vmID)
	if err := d.prov.destroyWith(ctx, vmID, also); err != nil && !errors.Is(err, vm.ErrNotFound) {
		return err
	}
	return nil
}

// newLeaseID is "l-" and 16 random hex digits: a valid name and hostname.
func newLeaseID() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return "l-" + hex.EncodeToString(b[:])
}

// Acquire implements api.Backend.
func (d *Daemon) Acquire(ctx context.Context, poolName string, req api.AcquireRequest) (api.Lease, error) {
	if err := d.checkOpen(); err != nil {
		return api.Lease{}, err
	}
	spec, err := store.Get(d.st, store.Pools, poolName)
	if err != nil {
		return api.Lease{}, fmt.Errorf("acquire from pool %s: %w", poolName, err)
	}
	if max := d.cfg.Limits.MaxLeases; max > 0 && d.leaseCount() >= max {
		return api.Lease{}, fmt.Errorf("acquire from pool %s: %d leases are live, the limit (limits.max_leases): %w", poolName, max, vm.ErrExhausted)
	}
	id := newLeaseID()
	wait := req.Wait
	if wait <= 0 {
		wait = api.DefaultWait
	}
	// The lease ID becomes the guest's hostname at hand-off.
	actx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	pl, err := d.pools.Acquire(actx, poolName, pool.Identity{LeaseID: id})
	if err != nil {
		if errors.Is(err, pool.ErrNothingReady) {
			if why := d.poolLastError(spec); why != "" {
				return api.Lease{}, fmt.Errorf("acquire from pool %s: no VM ready within %s (the pool cannot refill: %s): %w", poolName, wait, why, api.ErrNothingReady)
			}
			return api.Lease{}, fmt.Errorf("acquire from pool %s: no VM ready within %s: %w", poolName, wait, api.ErrNothingReady)
		}
		return api.Lease{}, fmt.Errorf("acquire from pool %s: %w", poolName, err)
	}
	now := time.Now()
	rec := store.Lease{
		ID:         id,
		Pool:       poolName,
		VMID:       pl.VM.ID,
		Owner:      req.Owner,
		Labels:     req.Labels,
		Env:        req.Env,
		Template:   spec.Template,
		CreatedAt:  now,
		TTL:        or(req.TTL.Std(), d.cfg.Limits.LeaseTTL.Std()),
		Generation: 0,
		WaitMS:     pl.Timings.Wait.Milliseconds(),
		HandoffMS:  pl.Timings.Handoff.Milliseconds(),
		TotalMS:    time.Since(now.Add(-pl.Timings.Total)).Milliseconds(),
	}
	if tpl, ok := d.template(spec.Template); ok {
		rec.Generation = tpl.Generation
	}
	if rec.TTL > 0 {
		exp := now.Add(rec.TTL)
		rec.ExpiresAt = &exp
	}
	// The lease and its VM's leased role are committed together, once.
	// Until then the VM's record says warm, which a crash cannot turn into
	// a pool VM again: the hand-off resumed it, and a restart puts only
	// paused warm VMs back into their pools (reconcile).
	if err := d.leases.Add(rec, func(tx *store.Tx) error { return d.vms.leasedTx(tx, pl.VM.ID, id) }); err != nil {
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
		defer cancel()
		if rerr := d.destroyHandedOut(rctx, pl.VM.ID, nil); rerr != nil {
			d.log.Error("destroy VM of a lease that could not be recorded", "vm", pl.VM.ID, "err", rerr)
		}
		return api.Lease{}, fmt.Errorf("acquire from pool %s: %w", poolName, err)
	}
	d.bus.Publish(events.Event{Kind: "lease.acquired", Subject: id, Detail: map[string]any{"pool": poolName, "vm_id": pl.VM.ID}})
	if pl.Timings.Wait == 0 {
		// A VM from the pool's ready ones was warmed up through a session,
		// so dialling one costs it little. One restored for this acquire
		// runs that code for the first time, at the CPU's cost, while the
		// pool restores for the next waiters: its tenant's first call dials.
		d.openGuestSession(pl.VM.ID)
	}
	// The recorded total stops before the write that records it; the
	// acquire's answer includes it.
	rec.TotalMS = time.Since(now.Add(-pl.Timings.Total)).Milliseconds()
	return d.leaseAPI(rec), nil
}

// handoff gives a freshly resumed warm VM its identity.
func (d *Daemon) handoff(ctx context.Context, v vm.VM, ident pool.Identity) error {
	id := ident.LeaseID
	entropy := make([]byte, 32)
	if _, err := rand.Read(entropy); err != nil {
		return fmt.Errorf("entropy for %s: %w", v.ID, err)
	}
	timings, err := d.handoffer.Handoff(ctx, v, agent.HandoffRequest{Entropy: entropy, Time: time.Now(), Hostname: id})
	d.log.Debug("hand-off", "vm", v.ID, "lease", id, "prepared", timings.Prepared,
		"dial_ms", timings.Dial.Milliseconds(), "handoff_ping_ms", timings.Handoff.Milliseconds(),
		"entropy_bytes", timings.Result.EntropyBytes, "reseeded", timings.Result.Reseeded, "guest_steps", timings.Result.Steps)
	if err != nil {
		return fmt.Errorf("hand off VM %s: %w", v.ID, err)
	}
	d.entropy.record(d.log, v.ID, id, len(entropy), timings.Result)
	return nil
}

// validateWarm checks that a warm VM is still there and not stopped.
func (d *Daemon) validateWarm(ctx context.Context, v vm.VM) error {
	got, err := d.prov.Inspect(ctx, v.ID)
	if err != nil {
		return err
	}
	if got.Status == vm.StatusStopped || got.Status == vm.StatusUnknown {
		return fmt.Errorf("VM %s is %s: %w", v.ID, got.Status, vm.ErrInvalidState)
	}
	return nil
}

// onVMCreated records that a VM the pool restored is warm in poolName.
func (d *Daemon) onVMCreated(poolName string, v vm.VM) {
	if err := d.vms.warm(v.ID, poolName); err != nil {
		d.log.Error("record warm VM", "pool", poolName, "vm", v.ID, "err", err)
	}
}

// onVMDestroyed drops the hand-off connection of a VM the pool destroyed;
// destroying it through ownedProvider removed its record.
func (d *Daemon) onVMDestroyed(poolName, id string) {
	d.handoffer.Forget(id)
	d.guests.drop(id)
}

// Release implements api.Backend. Releasing an unknown lease is a no-op.
func (d *Daemon) Release(ctx context.Context, id string) error {
	_, err := d.leases.Release(ctx, id)
	return err
}

// Leases implements api.Backend.
func (d *Daemon) Leases(ctx context.Context) ([]api.Lease, error) {
	leases, err := d.leases.List()
	if err != nil {
		return nil, err
	}
	out := make([]api.Lease, 0, len(leases))
	for _, l := range leases {
		out = append(out, d.leaseAPI(l))
	}
	return out, nil
}

// SetLeaseTTL implements api.Backend.
func (d *Daemon) SetLeaseTTL(ctx context.Context, id string, req api.LeaseTTLRequest) (api.Lease, error) {
	if err := d.checkOpen(); err != nil {
		return api.Lease{}, err
	}
	l, err := d.leases.SetTTL(id, req.TTL.Std())
	if err != nil {
		return api.Lease{}, err
	}
	return d.leaseAPI(l), nil
}

// leaseCount is the number of live leases, 0 when the store cannot say.
func (d *Daemon) leaseCount() int {
	n, err := d.leases.Count()
	if err != nil {
		d.log.Error("count leases", "err", err)
	}
	return n
}

// Exec implements api.Backend. A command that cannot start or that times
// out is reported like a shell would (127, 124) with the reason on stderr,
// so the CLI can pass the exit code through.
func (d *Daemon) Exec(ctx context.Context, id string, req api.ExecRequest, stdout, stderr io.Writer) (int, error) {
	if err := d.checkOpen(); err != nil {
		return -1, err
	}
	l, err := d.leases.Get(id)
	if err != nil {
		return -1, err
	}
	s, err := d.guests.get(ctx, l.VMID)
	if err != nil {
		return -1, fmt.Errorf("exec in lease %s: %w", id, err)
	}
	timeout := or(req.Timeout.Std(), d.cfg.Limits.ExecTimeout.Std())
	// The image's environment, then the lease's, then the exec's own: the
	// later wins.
	env := req.Env
	if len(l.Env) > 0 {
		env = append(slices.Clip(l.Env), req.Env...)
	}
	var stdin io.Reader
	if len(req.Stdin) > 0 {
		stdin = bytes.NewReader(req.Stdin)
	}
	exit, err := s.Run(ctx, d.withImageDefaults(l.Template, agent.ProcessRequest{Argv: req.Argv, Env: env, Dir: req.Dir, User: req.User, Timeout: timeout}), stdin, stdout, stderr)
	code := exit.Code
	switch {
	case errors.Is(err, agent.ErrExecFailed):
		fmt.Fprintf(stderr, "warmpool: %v\n", err)
		return 127, nil
	case errors.Is(err, agent.ErrTimeout):
		fmt.Fprintf(stderr, "warmpool: %q killed after %s\n", req.Argv[0], timeout)
		return 124, nil
	case err != nil:
		return -1, fmt.Errorf("exec in lease %s: %w", id, err)
	}
	return code, nil
}

// withImageDefaults fills in what the exec request leaves out from the
// image the lease's template was built from: its Env goes first (the
// request's entries win), its WorkingDir and User apply unless the request
// names its own. A busybox template has none.
func (d *Daemon) withImageDefaults(templateName string, req agent.ProcessRequest) agent.ProcessRequest {
	t, ok := d.template(templateName)
	if !ok {
		return req
	}
	return applyExecDefaults(t.Exec, req)
}

func applyExecDefaults(defaults *store.ExecDefaults, req agent.ProcessRequest) agent.ProcessRequest {
	if defaults == nil {
		return req
	}
	req.Env = append(slices.Clip(defaults.Env), req.Env...)
	req.Dir = or(req.Dir, defaults.WorkingDir)
	req.User = or(req.User, defaults.User)
	return req
}
