package daemon

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/warmpool/warmpool/agent"
	"github.com/warmpool/warmpool/api"
	"github.com/warmpool/warmpool/events"
	"github.com/warmpool/warmpool/pool"
	"github.com/warmpool/warmpool/store"
	"github.com/warmpool/warmpool/vm"
)

// liveLease is a lease the daemon serves. pl is nil for a lease adopted
// from an earlier run. Either way release destroys the VM through the
// provider: the pool gave it up at hand-off.
type liveLease struct {
	rec store.Lease
	pl  *pool.Lease
}

func (l *liveLease) api() api.Lease {
	return api.Lease{
		ID:        l.rec.ID,
		Pool:      l.rec.Pool,
		VMID:      l.rec.VMID,
		Owner:     l.rec.Owner,
		CreatedAt: l.rec.CreatedAt,
		ExpiresAt: l.rec.ExpiresAt,
		Timings:   api.Timings{WaitMS: l.rec.WaitMS, HandoffMS: l.rec.HandoffMS, TotalMS: l.rec.TotalMS},
	}
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
	// The lease ID becomes the guest's hostname, and the VM's store record
	// names it before the VM is touched.
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
	err = d.st.Update(func(tx *store.Tx) error {
		v, err := store.VMs.Get(tx, pl.VM.ID)
		if err != nil {
			return err
		}
		v.Role, v.Lease, v.Pool = store.RoleLeased, id, poolName
		if err := store.VMs.Put(tx, v); err != nil {
			return err
		}
		return store.Leases.Put(tx, rec)
	})
	if err != nil {
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
		defer cancel()
		if rerr := d.destroyLeased(rctx, pl.VM.ID); rerr != nil {
			d.log.Error("destroy VM of a lease that could not be recorded", "vm", pl.VM.ID, "err", rerr)
		}
		return api.Lease{}, fmt.Errorf("record lease of pool %s: %w", poolName, err)
	}
	// The recorded total stops before the write that records it; the live
	// lease's includes it.
	rec.TotalMS = time.Since(now.Add(-pl.Timings.Total)).Milliseconds()
	l := &liveLease{rec: rec, pl: pl}
	d.leaseMu.Lock()
	d.leases[id] = l
	d.leaseMu.Unlock()
	d.bus.Publish(events.Event{Kind: "lease.acquired", Subject: id, Detail: map[string]any{"pool": poolName, "vm_id": pl.VM.ID}})
	return l.api(), nil
}

// handoff gives a freshly resumed warm VM its identity. It first marks the
// VM leased in the store, so that a crash from here on can never put a VM
// that a tenant may have seen back into a pool.
func (d *Daemon) handoff(ctx context.Context, v vm.VM, ident pool.Identity) error {
	id := ident.LeaseID
	err := d.st.Update(func(tx *store.Tx) error {
		rec, err := store.VMs.Get(tx, v.ID)
		if err != nil {
			return err
		}
		rec.Role, rec.Lease = store.RoleLeased, id
		return store.VMs.Put(tx, rec)
	})
	if err != nil {
		return fmt.Errorf("mark VM %s leased: %w", v.ID, err)
	}
	entropy := make([]byte, 32)
	if _, err := rand.Read(entropy); err != nil {
		return fmt.Errorf("entropy for %s: %w", v.ID, err)
	}
	timings, err := d.handoffer.Handoff(ctx, v, agent.HandoffRequest{Entropy: entropy, Time: time.Now(), Hostname: id})
	d.log.Debug("hand-off", "vm", v.ID, "lease", id, "prepared", timings.Prepared,
		"dial_ms", timings.Dial.Milliseconds(), "handoff_ping_ms", timings.Handoff.Milliseconds(),
		"entropy_bytes", timings.Result.EntropyBytes, "reseeded", timings.Result.Reseeded)
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
	err := d.st.Update(func(tx *store.Tx) error {
		rec, err := store.VMs.Get(tx, v.ID)
		if errors.Is(err, vm.ErrNotFound) {
			return nil // destroyed already
		}
		if err != nil {
			return err
		}
		if rec.Role == store.RoleNew {
			rec.Role = store.RoleWarm
		}
		rec.Pool = poolName
		return store.VMs.Put(tx, rec)
	})
	if err != nil {
		d.log.Error("record warm VM", "pool", poolName, "vm", v.ID, "err", err)
	}
}

func (d *Daemon) onVMDestroyed(poolName, id string) {
	d.handoffer.Forget(id)
	if err := store.Delete(d.st, store.VMs, id); err != nil {
		d.log.Error("forget destroyed VM", "pool", poolName, "vm", id, "err", err)
	}
}

// Release implements api.Backend. Releasing an unknown lease is a no-op.
func (d *Daemon) Release(ctx context.Context, id string) error {
	d.leaseMu.Lock()
	l := d.leases[id]
	delete(d.leases, id)
	d.leaseMu.Unlock()
	if l == nil {
		return nil
	}
	if err := d.destroyLeased(ctx, l.rec.VMID); err != nil {
		d.leaseMu.Lock()
		d.leases[id] = l
		d.leaseMu.Unlock()
		return fmt.Errorf("release lease %s: destroy VM %s: %w", id, l.rec.VMID, err)
	}
	err := d.st.Update(func(tx *store.Tx) error {
		if err := store.Leases.Delete(tx, id); err != nil {
			return err
		}
		return store.VMs.Delete(tx, l.rec.VMID)
	})
	if err != nil {
		return fmt.Errorf("release lease %s: %w", id, err)
	}
	d.bus.Publish(events.Event{Kind: "lease.released", Subject: id, Detail: map[string]any{"pool": l.rec.Pool, "vm_id": l.rec.VMID}})
	return nil
}

// destroyLeased destroys a handed-out VM: the pool gave it up at hand-off,
// so it is the lease's to destroy. A VM already gone counts as destroyed.
func (d *Daemon) destroyLeased(ctx context.Context, vmID string) error {
	err := d.prov.Destroy(ctx, vmID)
	if err != nil && !errors.Is(err, vm.ErrNotFound) {
		return err
	}
	d.handoffer.Forget(vmID)
	return nil
}

// Leases implements api.Backend.
func (d *Daemon) Leases(ctx context.Context) ([]api.Lease, error) {
	var out []api.Lease
	for _, l := range d.liveLeases() {
		out = append(out, l.api())
	}
	return out, nil
}

func (d *Daemon) liveLeases() []*liveLease {
	d.leaseMu.Lock()
	defer d.leaseMu.Unlock()
	out := make([]*liveLease, 0, len(d.leases))
	for _, k := range sortedKeys(d.leases) {
		out = append(out, d.leases[k])
	}
	return out
}

func (d *Daemon) leaseCount() int {
	d.leaseMu.Lock()
	defer d.leaseMu.Unlock()
	return len(d.leases)
}

func (d *Daemon) lease(id string) (*liveLease, error) {
	d.leaseMu.Lock()
	defer d.leaseMu.Unlock()
	l := d.leases[id]
	if l == nil {
		return nil, fmt.Errorf("lease %s: %w", id, vm.ErrNotFound)
	}
	return l, nil
}

// Exec implements api.Backend. A command that cannot start or that times
// out is reported like a shell would (127, 124) with the reason on stderr,
// so the CLI can pass the exit code through.
func (d *Daemon) Exec(ctx context.Context, id string, req api.ExecRequest, stdout, stderr io.Writer) (int, error) {
	if err := d.checkOpen(); err != nil {
		return -1, err
	}
	l, err := d.lease(id)
	if err != nil {
		return -1, err
	}
	c, err := agent.Dial(ctx, d.prov, l.rec.VMID)
	if err != nil {
		return -1, fmt.Errorf("exec in lease %s: %w", id, err)
	}
	defer c.Close()
	timeout := or(req.Timeout.Std(), d.cfg.Limits.ExecTimeout.Std())
	code, err := c.Exec(ctx, agent.ExecRequest{Argv: req.Argv, Env: req.Env, Dir: req.Dir, Stdin: req.Stdin, Timeout: timeout}, stdout, stderr)
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

// expireLeases destroys leases whose TTL has passed until ctx ends or the
// daemon shuts down.
func (d *Daemon) expireLeases(ctx context.Context) {
	defer d.bg.Done()
	t := time.NewTicker(d.cfg.Intervals.LeaseCheck.Std())
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			for _, l := range d.liveLeases() {
				if !l.rec.Expired(now) {
					continue
				}
				d.log.Info("lease expired", "lease", l.rec.ID, "vm", l.rec.VMID)
				if err := d.Release(ctx, l.rec.ID); err != nil {
					d.log.Error("destroy expired lease", "lease", l.rec.ID, "err", err)
					continue
				}
				d.bus.Publish(events.Event{Kind: "lease.expired", Subject: l.rec.ID, Detail: map[string]any{"pool": l.rec.Pool}})
			}
		}
	}
}
