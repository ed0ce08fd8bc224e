package daemon

import (
	"context"
	"fmt"
	"slices"
	"time"

	"github.com/warmpool/warmpool/agent"
	"github.com/warmpool/warmpool/store"
	"github.com/warmpool/warmpool/vm"
)

// reconcilePingTimeout bounds the agent ping of a leased VM found at start.
const reconcilePingTimeout = 10 * time.Second

// warmCandidate is a warm VM from an earlier run that may go back into its
// pool once pools are registered.
type warmCandidate struct {
	pool string
	vm   vm.VM
}

// reconcile makes the provider's VMs and the store's records agree, before
// the API serves anything:
//
//   - a record whose VM is gone (or stopped) is removed, with its lease;
//   - a leased VM whose lease is recorded, unexpired, and whose agent
//     answers keeps its lease; otherwise it is destroyed;
//   - a warm VM restored from its pool's current template snapshot and
//     still paused is a candidate to be adopted into the pool (adoptWarm);
//   - a machine's VM stays for the machine manager;
//   - everything else (template builds, VMs whose purpose was never
//     recorded, VMs the store does not know) is destroyed.
//
// Afterwards the store's VMs are exactly the provider's.
func (d *Daemon) reconcile(ctx context.Context) ([]warmCandidate, error) {
	live, err := d.prov.List(ctx)
	if err != nil {
		return nil, fmt.Errorf("list VMs: %w", err)
	}
	liveByID := map[string]vm.VM{}
	for _, v := range live {
		liveByID[v.ID] = v
	}
	recs, err := store.List(d.st, store.VMs)
	if err != nil {
		return nil, err
	}
	leases, err := store.List(d.st, store.Leases)
	if err != nil {
		return nil, err
	}
	leaseByID := map[string]store.Lease{}
	for _, l := range leases {
		leaseByID[l.ID] = l
	}
	poolRecs, err := store.List(d.st, store.Pools)
	if err != nil {
		return nil, err
	}
	pools := map[string]store.Pool{}
	for _, p := range poolRecs {
		pools[p.Name] = p
	}

	var warm []warmCandidate
	keptLeases := map[string]bool{}
	now := time.Now()
	destroy := func(id, why string) {
		d.log.Info("destroying VM left by an earlier run", "vm", id, "reason", why)
		if err := d.prov.Destroy(ctx, id); err != nil {
			d.log.Error("destroy VM left by an earlier run", "vm", id, "err", err)
		}
	}
	for _, rec := range recs {
		v, alive := liveByID[rec.ID]
		delete(liveByID, rec.ID)
		if !alive {
			d.log.Info("forgetting VM that no longer exists", "vm", rec.ID, "role", rec.Role)
			if err := d.vms.forget(rec.ID, nil); err != nil {
				return nil, err
			}
			continue
		}
		if v.Status == vm.StatusStopped {
			destroy(rec.ID, "stopped")
			continue
		}
		switch rec.Role {
		case store.RoleWarm:
			p, ok := pools[rec.Pool]
			t, tok := d.template(p.Template)
			switch {
			case !ok:
				destroy(rec.ID, "its pool is gone")
			case !tok || rec.Template != t.Name || rec.SnapshotDir != t.Snapshot.Dir:
				destroy(rec.ID, "restored from an older template generation")
			case v.Status != vm.StatusPaused:
				// Warm VMs wait paused; a running one may have been
				// resumed for a tenant before the crash.
				destroy(rec.ID, "warm VM is "+string(v.Status))
			default:
				warm = append(warm, warmCandidate{pool: rec.Pool, vm: v})
			}
		case store.RoleLeased:
			l, ok := leaseByID[rec.Lease]
			switch {
			case !ok || l.VMID != rec.ID:
				destroy(rec.ID, "hand-off was never completed")
			case l.Expired(now):
				destroy(rec.ID, "lease expired while the daemon was down")
			default:
				if err := d.pingVM(ctx, rec.ID); err != nil {
					destroy(rec.ID, "agent does not answer: "+err.Error())
					continue
				}
				keptLeases[l.ID] = true
			}
		case store.RoleMachine:
			if !d.mach.knows(rec.Machine) {
				destroy(rec.ID, "its machine is gone")
			}
		default:
			destroy(rec.ID, "left in role "+string(rec.Role))
		}
	}
	for _, id := range sortedKeys(liveByID) {
		if d.mach.ownsVM(liveByID[id]) {
			// A machine VM whose record was not written before a crash:
			// the machine manager recognises it by its labels.
			if err := d.vms.adoptMachine(liveByID[id], liveByID[id].Spec.Labels[machineLabel]); err != nil {
				return nil, err
			}
			continue
		}
		destroy(id, "not in the state")
	}
	for _, l := range leases {
		if !keptLeases[l.ID] {
			d.log.Info("dropping lease whose VM is gone", "lease", l.ID, "vm", l.VMID)
			if err := d.leases.Drop(l.ID); err != nil {
				return nil, err
			}
		}
	}
	return warm, nil
}

// adoptWarm hands the surviving warm VMs back to their pools; one the pool
// will not take (full, unregistered) is destroyed. Each pool is registered
// with a minimum of 0 first, so that it restores nothing until
// registerPools gives it its real minimum.
func (d *Daemon) adoptWarm(ctx context.Context, warm []warmCandidate) {
	registered := map[string]bool{}
	for _, c := range warm {
		if registered[c.pool] {
			continue
		}
		registered[c.pool] = true
		rec, err := store.Get(d.st, store.Pools, c.pool)
		if err != nil {
			continue // Adopt below fails and the VM is destroyed
		}
		t, ok := d.template(rec.Template)
		if !ok {
			continue
		}
		spec := stackSpec(rec, t)
		spec.Min = 0
		if err := d.pools.Register(spec); err != nil {
			d.log.Error("register pool to adopt its warm VMs", "pool", c.pool, "err", err)
		}
	}
	for _, c := range warm {
		if err := d.pools.Adopt(c.pool, c.vm); err != nil {
			d.log.Info("destroying warm VM its pool did not take back", "pool", c.pool, "vm", c.vm.ID, "err", err)
			if err := d.prov.Destroy(ctx, c.vm.ID); err != nil {
				d.log.Error("destroy warm VM", "vm", c.vm.ID, "err", err)
			}
			continue
		}
		d.log.Info("adopted warm VM", "pool", c.pool, "vm", c.vm.ID)
	}
}

// checkAccounted logs when the provider runs VMs the store does not list or
// the other way round; after reconcile there should be none.
func (d *Daemon) checkAccounted(ctx context.Context) error {
	live, err := d.prov.List(ctx)
	if err != nil {
		return err
	}
	recs, err := store.List(d.st, store.VMs)
	if err != nil {
		return err
	}
	var liveIDs, recIDs []string
	for _, v := range live {
		liveIDs = append(liveIDs, v.ID)
	}
	for _, r := range recs {
		recIDs = append(recIDs, r.ID)
	}
	slices.Sort(liveIDs)
	if !slices.Equal(liveIDs, recIDs) {
		d.log.Warn("provider and state disagree after reconcile", "provider", liveIDs, "state", recIDs)
	}
	return nil
}

func (d *Daemon) pingVM(ctx context.Context, id string) error {
	ctx, cancel := context.WithTimeout(ctx, reconcilePingTimeout)
	defer cancel()
	if s := d.guests.open(id); s != nil {
		return s.Ping(ctx)
	}
	c, err := agent.Dial(ctx, d.prov, id)
	if err != nil {
		return err
	}
	defer c.Close()
	return c.Ping(ctx)
}
