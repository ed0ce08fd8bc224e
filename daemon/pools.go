package daemon

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/warmpool/warmpool/api"
	"github.com/warmpool/warmpool/pool"
	"github.com/warmpool/warmpool/store"
	"github.com/warmpool/warmpool/vm"
)

func stackSpec(p store.Pool, t store.Template) pool.StackSpec {
	snap := t.Snapshot
	// The pool's name and network ride on the restores it asks for, so
	// the provider wrapper gives each VM its slot.
	snap.Spec.Labels = poolLabels(snap.Spec.Labels, p)
	return pool.StackSpec{
		Name:     p.Name,
		Key:      vm.StackKey{Template: t.Name, VCPUs: t.VCPUs, MemoryMiB: t.MemoryMiB},
		Snapshot: snap,
		Min:      p.Min,
		Max:      p.Max,
		MaxAge:   p.MaxAge,
		Adaptive: p.Adaptive,
	}
}

// registerPools gives the pool manager every recorded pool whose template
// exists, with that template's current snapshot.
func (d *Daemon) registerPools() error {
	recs, err := store.List(d.st, store.Pools)
	if err != nil {
		return err
	}
	for _, p := range recs {
		t, ok := d.template(p.Template)
		if !ok {
			d.log.Warn("pool waits for its template", "pool", p.Name, "template", p.Template)
			continue
		}
		if _, _, err := d.net.policy(p.Network, p.EgressAllow); err != nil {
			d.log.Error("pool does not run", "pool", p.Name, "err", err)
			continue
		}
		if err := d.pools.Register(stackSpec(p, t)); err != nil {
			return fmt.Errorf("register pool %s: %w", p.Name, err)
		}
	}
	return nil
}

// SetPool implements api.Backend.
func (d *Daemon) SetPool(ctx context.Context, name string, req api.PoolRequest) (api.Pool, error) {
	if err := d.checkOpen(); err != nil {
		return api.Pool{}, err
	}
	t, ok := d.template(req.Template)
	if !ok {
		return api.Pool{}, fmt.Errorf("set pool %s: template %s: %w (build it first)", name, req.Template, vm.ErrNotFound)
	}
	rec := store.Pool{Name: name, Template: req.Template, Min: req.Min, Max: req.Max, MaxAge: req.MaxAge.Std(), Adaptive: req.Adaptive,
		Network: req.Network, EgressAllow: req.EgressAllow, UpdatedAt: time.Now()}
	// Everything that can refuse the request runs before the store changes.
	if _, _, err := d.net.policy(rec.Network, rec.EgressAllow); err != nil {
		return api.Pool{}, fmt.Errorf("set pool %s: %w", name, err)
	}
	if err := stackSpec(rec, t).Validate(); err != nil {
		return api.Pool{}, fmt.Errorf("set pool %s: %w", name, err)
	}
	if err := d.checkPoolMemory(rec, t); err != nil {
		return api.Pool{}, fmt.Errorf("set pool %s: %w", name, err)
	}
	prev, prevErr := store.Get(d.st, store.Pools, name)
	if err := store.Put(d.st, store.Pools, rec); err != nil {
		return api.Pool{}, fmt.Errorf("set pool %s: %w", name, err)
	}
	if prevErr == nil && (prev.Network != rec.Network || !slices.Equal(prev.EgressAllow, rec.EgressAllow)) {
		// Warm VMs sit in slots of the old policy: start the pool over.
		if err := d.pools.Unregister(name); err != nil && !errors.Is(err, vm.ErrNotFound) {
			return api.Pool{}, fmt.Errorf("set pool %s: %w", name, err)
		}
	}
	if err := d.pools.Register(stackSpec(rec, t)); err != nil {
		return api.Pool{}, fmt.Errorf("set pool %s: %w", name, err)
	}
	return d.poolAPI(rec), nil
}

// DeletePool implements api.Backend.
func (d *Daemon) DeletePool(ctx context.Context, name string) error {
	if err := d.checkOpen(); err != nil {
		return err
	}
	if _, err := store.Get(d.st, store.Pools, name); err != nil {
		return fmt.Errorf("delete pool %s: %w", name, err)
	}
	if err := store.Delete(d.st, store.Pools, name); err != nil {
		return fmt.Errorf("delete pool %s: %w", name, err)
	}
	if err := d.pools.Unregister(name); err != nil && !errors.Is(err, vm.ErrNotFound) {
		return fmt.Errorf("delete pool %s: %w", name, err)
	}
	return nil
}

// Pools implements api.Backend.
func (d *Daemon) Pools(ctx context.Context) ([]api.Pool, error) {
	recs, err := store.List(d.st, store.Pools)
	if err != nil {
		return nil, err
	}
	out := make([]api.Pool, 0, len(recs))
	for _, p := range recs {
		out = append(out, d.poolAPI(p))
	}
	return out, nil
}

func (d *Daemon) poolAPI(p store.Pool) api.Pool {
	out := api.Pool{Name: p.Name, Template: p.Template, Min: p.Min, Max: p.Max, MaxAge: api.Duration(p.MaxAge), Adaptive: p.Adaptive, Target: p.Min, Allowed: -1,
		Network: p.Network, EgressAllow: p.EgressAllow}
	if policy, _, err := d.net.policy(p.Network, p.EgressAllow); err == nil {
		out.Network = string(policy)
	} else {
		why := err.Error()
		out.LastError = &why
	}
	if t, ok := d.template(p.Template); ok {
		out.Generation = uint64(t.Generation)
	}
	leases, err := d.leases.List()
	if err != nil {
		d.log.Error("list leases", "err", err)
	}
	for _, l := range leases {
		if l.Pool == p.Name {
			out.Leased++
		}
	}
	if why := d.poolLastError(p); why != "" {
		out.LastError = &why
	}
	st, err := d.pools.Status(p.Name)
	if err != nil {
		return out
	}
	out.Ready, out.Restoring = st.Ready, st.Restoring
	out.Target, out.Waiting, out.Allowed, out.IdleVMSeconds = st.Target, st.Waiting, st.Allowed, st.IdleVMSeconds
	out.RestoreMS = float64(st.Restore.Microseconds()) / 1000
	if st.Adaptive {
		out.Rate, out.RefillMS = st.Rate, float64(st.Refill.Microseconds())/1000
		if st.TargetReason != "" {
			reason, at := st.TargetReason, st.TargetChanged
			out.TargetReason, out.TargetChanged = &reason, &at
		}
	}
	c := st.Counters
	out.Counters = api.PoolCounters{
		Acquired:           c.Acquired,
		Hits:               c.Hits,
		Waits:              c.Waits,
		Timeouts:           c.Timeouts,
		Evicted:            c.Evicted,
		ValidationFailures: c.ValidationFailures,
	}
	return out
}
