package daemon

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/warmpool/warmpool/store"
	"github.com/warmpool/warmpool/vm"
)

// vmRecords is the only writer of VM records. A record is written when
// its VM is created or restored, changed as the VM becomes warm, leased or
// a machine's, and removed once when the VM is destroyed (by
// ownedProvider.Destroy, or together with its lease by a release).
type vmRecords struct {
	st       *store.Store
	provider string
	// snapshotOwner maps a snapshot directory to the template and
	// generation it belongs to.
	snapshotOwner func(dir string) (template string, generation int)
}

// created records a VM the provider just created or restored from the
// snapshot in snapshotDir, with the purpose its context carries.
func (r *vmRecords) created(ctx context.Context, v vm.VM, snapshotDir string, also func(*store.Tx) error) error {
	purpose, _ := ctx.Value(purposeKey{}).(vmPurpose)
	rec := store.VM{
		ID:          v.ID,
		Provider:    r.provider,
		Role:        purpose.role,
		Machine:     purpose.machine,
		SnapshotDir: snapshotDir,
		CreatedAt:   time.Now(),
	}
	if rec.Role == "" {
		rec.Role = store.RoleNew
	}
	if snapshotDir != "" && r.snapshotOwner != nil {
		rec.Template, rec.Generation = r.snapshotOwner(snapshotDir)
	}
	return r.st.Update(func(tx *store.Tx) error {
		if err := store.VMs.Put(tx, rec); err != nil {
			return err
		}
		if also != nil {
			return also(tx)
		}
		return nil
	})
}

// update changes the record of VM id in tx; a VM destroyed meanwhile has
// no record and is left alone.
func (r *vmRecords) update(tx *store.Tx, id string, change func(*store.VM)) error {
	rec, err := store.VMs.Get(tx, id)
	if errors.Is(err, vm.ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	change(&rec)
	return store.VMs.Put(tx, rec)
}

// warm records that VM id waits in pool.
func (r *vmRecords) warm(id, pool string) error {
	return r.st.Update(func(tx *store.Tx) error {
		return r.update(tx, id, func(v *store.VM) {
			if v.Role == store.RoleNew {
				v.Role = store.RoleWarm
			}
			v.Pool = pool
		})
	})
}

// leasedTx records in tx that VM id belongs to lease from now on. It fails
// for a VM without a record: such a VM must not reach a tenant.
func (r *vmRecords) leasedTx(tx *store.Tx, id, lease string) error {
	rec, err := store.VMs.Get(tx, id)
	if err != nil {
		return fmt.Errorf("mark VM %s leased: %w", id, err)
	}
	rec.Role, rec.Lease = store.RoleLeased, lease
	return store.VMs.Put(tx, rec)
}

// machineTx records in tx that VM id runs machine.
func (r *vmRecords) machineTx(tx *store.Tx, id, machine string) error {
	return r.update(tx, id, func(v *store.VM) { v.Role, v.Machine = store.RoleMachine, machine })
}

// adoptMachine records a machine's VM found running without a record (its
// record was not written before a crash).
func (r *vmRecords) adoptMachine(v vm.VM, machine string) error {
	return store.Put(r.st, store.VMs, store.VM{ID: v.ID, Provider: r.provider, Role: store.RoleMachine, Machine: machine, CreatedAt: v.CreatedAt})
}

// forget removes the record of a destroyed VM and, in the same
// transaction, runs also when it is set.
func (r *vmRecords) forget(id string, also func(*store.Tx) error) error {
	return r.st.Update(func(tx *store.Tx) error {
		if err := store.VMs.Delete(tx, id); err != nil {
			return err
		}
		if also != nil {
			return also(tx)
		}
		return nil
	})
}
