package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"time"

	"github.com/warmpool/warmpool/network"
	"github.com/warmpool/warmpool/store"
	"github.com/warmpool/warmpool/vm"
)

// vmPurpose says what a VM about to be created is for. The daemon puts it in
// the context of the call that creates the VM, so the VM's store record says
// so from the moment it exists.
type vmPurpose struct {
	role    store.Role
	machine string
}

type purposeKey struct{}

func withPurpose(ctx context.Context, p vmPurpose) context.Context {
	return context.WithValue(ctx, purposeKey{}, p)
}

// ownedProvider has every VM its inner provider creates or restores
// recorded (by recs) before handing it back, and the record removed once
// the VM is destroyed. Pools, the template builder and the machine manager
// all create VMs through it, so whatever crashes where, the next start
// finds each VM either in the store (and knows what it was for) or in
// provider.List only (and destroys it).
type ownedProvider struct {
	inner vm.Provider
	recs  *vmRecords
	log   *slog.Logger
	// onIncompatible, when set, hears of every restore the provider refused
	// with vm.ErrIncompatible: retrying cannot fix those, rebuilding can.
	onIncompatible func(snap vm.Snapshot, err error)
	// net binds a network slot to every VM whose pool or machine has a
	// network; machineNetwork is a machine's policy.
	net            *netSlots
	machineNetwork func(machine string) (network.Policy, []network.Allow, error)
}

func (p *ownedProvider) Name() string                     { return p.inner.Name() }
func (p *ownedProvider) Capabilities() vm.Capabilities    { return p.inner.Capabilities() }
func (p *ownedProvider) Info(ctx context.Context) vm.Info { return p.inner.Info(ctx) }

func (p *ownedProvider) Create(ctx context.Context, spec vm.Spec) (vm.VM, error) {
	b, err := p.bindNetwork(ctx, spec.Labels)
	if err != nil {
		return vm.VM{}, fmt.Errorf("create VM: %w", err)
	}
	if b != nil {
		spec.NIC = &vm.NIC{MAC: network.GuestMAC.String(), Netns: b.slot.NetnsPath(), TAP: b.slot.TAP()}
	}
	v, err := p.inner.Create(ctx, spec)
	if err != nil {
		p.net.unbind(ctx, b)
		return v, err
	}
	return v, p.record(ctx, v, "", b)
}

// bindNetwork takes the network slot of a VM about to be made with labels
// (a machine's, or a pool's restore); nil when it gets no network.
func (p *ownedProvider) bindNetwork(ctx context.Context, labels map[string]string) (*binding, error) {
	if p.net == nil {
		return nil, nil
	}
	var (
		policy network.Policy
		allow  []network.Allow
		err    error
	)
	machine := labels[machineLabel]
	switch {
	case machine != "" && p.machineNetwork != nil:
		policy, allow, err = p.machineNetwork(machine)
	case labels[labelPool] != "":
		policy, allow, err = p.net.policy(labels[labelNetwork], splitAllow(labels[labelEgressAllow]))
	default:
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	return p.net.bind(ctx, machine, policy, allow)
}

func (p *ownedProvider) Restore(ctx context.Context, snap vm.Snapshot) (vm.VM, error) {
	s, ok := vm.As[vm.Snapshotter](p.inner, vm.CapSnapshot)
	if !ok {
		return vm.VM{}, fmt.Errorf("restore from %s: %w", snap.ID, vm.ErrUnsupported)
	}
	b, err := p.bindNetwork(ctx, snap.Spec.Labels)
	if err != nil {
		return vm.VM{}, fmt.Errorf("restore from %s: %w", snap.ID, err)
	}
	orig := snap
	switch {
	case snap.Spec.NIC != nil && b != nil:
		snap = snap.WithNIC(b.slot.NetnsPath(), b.slot.TAP())
	case snap.Spec.NIC != nil:
		snap = snap.WithNIC("", "")
	case b != nil && templateNIC(p.inner) == nil:
		p.net.unbind(ctx, b)
		return vm.VM{}, fmt.Errorf("restore from %s: provider %s builds templates without a network interface, so pool VMs can have network none only", snap.ID, p.inner.Name())
	case b != nil:
		p.net.unbind(ctx, b)
		err := fmt.Errorf("restore from %s: the template has no network interface (built before networking), rebuild it: %w", snap.ID, vm.ErrIncompatible)
		if p.onIncompatible != nil {
			p.onIncompatible(orig, err)
		}
		return vm.VM{}, err
	}
	v, err := s.Restore(ctx, snap)
	if err != nil {
		p.net.unbind(ctx, b)
		if errors.Is(err, vm.ErrIncompatible) && p.onIncompatible != nil {
			p.onIncompatible(orig, err)
		}
		return v, err
	}
	return v, p.record(ctx, v, snap.Dir, b)
}

// record writes the VM's record. When that fails the VM is destroyed: a VM
// the store does not know about must not be used.
func (p *ownedProvider) record(ctx context.Context, v vm.VM, snapshotDir string, b *binding) error {
	err := p.recs.created(ctx, v, snapshotDir, p.net.boundTx(b, v.ID))
	if err == nil {
		p.net.bound(b, v.ID)
		return nil
	}
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
	defer cancel()
	if derr := p.inner.Destroy(dctx, v.ID); derr != nil {
		p.log.Error("destroy VM that could not be recorded", "vm", v.ID, "err", derr)
	}
	p.net.unbind(dctx, b)
	return fmt.Errorf("record VM %s: %w", v.ID, err)
}

// Destroy destroys the VM and removes its record.
func (p *ownedProvider) Destroy(ctx context.Context, id string) error {
	return p.destroyWith(ctx, id, nil)
}

// destroyWith destroys the VM and, once it is gone, removes its record
// and runs also in one transaction: a release removes the lease with it.
// A VM the provider does not know counts as destroyed.
func (p *ownedProvider) destroyWith(ctx context.Context, id string, also func(*store.Tx) error) error {
	err := p.inner.Destroy(ctx, id)
	if err != nil && !errors.Is(err, vm.ErrNotFound) {
		return err
	}
	slotTx, releaseSlot := p.net.destroyedTx(id)
	if ferr := p.recs.forget(id, joinTx(also, slotTx)); ferr != nil {
		if also != nil {
			return fmt.Errorf("forget destroyed VM %s: %w", id, ferr)
		}
		p.log.Error("forget destroyed VM", "vm", id, "err", ferr)
	}
	releaseSlot(ctx)
	return err
}

func (p *ownedProvider) Pause(ctx context.Context, id string) error  { return p.inner.Pause(ctx, id) }
func (p *ownedProvider) Resume(ctx context.Context, id string) error { return p.inner.Resume(ctx, id) }
func (p *ownedProvider) Stop(ctx context.Context, id string, grace time.Duration) error {
	return p.inner.Stop(ctx, id, grace)
}
func (p *ownedProvider) Inspect(ctx context.Context, id string) (vm.VM, error) {
	return p.inner.Inspect(ctx, id)
}
func (p *ownedProvider) List(ctx context.Context) ([]vm.VM, error) { return p.inner.List(ctx) }

func (p *ownedProvider) Snapshot(ctx context.Context, id, dir string) (vm.Snapshot, error) {
	s, ok := vm.As[vm.Snapshotter](p.inner, vm.CapSnapshot)
	if !ok {
		return vm.Snapshot{}, fmt.Errorf("snapshot %s: %w", id, vm.ErrUnsupported)
	}
	return s.Snapshot(ctx, id, dir)
}

func (p *ownedProvider) SetBalloon(ctx context.Context, id string, targetMiB int) error {
	b, ok := vm.As[vm.Ballooner](p.inner, vm.CapBalloon)
	if !ok {
		return fmt.Errorf("balloon of %s: %w", id, vm.ErrUnsupported)
	}
	return b.SetBalloon(ctx, id, targetMiB)
}

func (p *ownedProvider) BalloonStats(ctx context.Context, id string) (vm.BalloonStats, error) {
	b, ok := vm.As[vm.Ballooner](p.inner, vm.CapBalloon)
	if !ok {
		return vm.BalloonStats{}, fmt.Errorf("balloon of %s: %w", id, vm.ErrUnsupported)
	}
	return b.BalloonStats(ctx, id)
}

func (p *ownedProvider) DialAgent(ctx context.Context, id string) (net.Conn, error) {
	d, ok := vm.As[vm.AgentDialer](p.inner, vm.CapAgent)
	if !ok {
		return nil, fmt.Errorf("agent of %s: %w", id, vm.ErrUnsupported)
	}
	return d.DialAgent(ctx, id)
}

// Suspend passes the single-use snapshot through so machines with a data disk
// can suspend; without it lifecycle falls back to a template snapshot, which
// providers refuse for VMs with a data disk.
func (p *ownedProvider) Suspend(ctx context.Context, id, dir string) (vm.Snapshot, error) {
	s, ok := vm.As[vm.Suspender](p.inner, vm.CapSuspend)
	if !ok {
		return vm.Snapshot{}, fmt.Errorf("suspend %s: %w", id, vm.ErrUnsupported)
	}
	return s.Suspend(ctx, id, dir)
}

func (p *ownedProvider) PrepareBoot(ctx context.Context, spec vm.Spec) (vm.Spec, error) {
	b, ok := vm.As[vm.BootPreparer](p.inner, vm.CapPrepareBoot)
	if !ok {
		return vm.Spec{}, fmt.Errorf("prepare boot of %s: %w", spec.Kernel, vm.ErrUnsupported)
	}
	return b.PrepareBoot(ctx, spec)
}

// The wrapper implements every optional interface and advertises its inner
// provider's capabilities, so callers reaching it through vm.As get what
// the inner provider offers; a missing method would silently downgrade
// behaviour.
var (
	_ vm.Provider     = (*ownedProvider)(nil)
	_ vm.Snapshotter  = (*ownedProvider)(nil)
	_ vm.Suspender    = (*ownedProvider)(nil)
	_ vm.Ballooner    = (*ownedProvider)(nil)
	_ vm.AgentDialer  = (*ownedProvider)(nil)
	_ vm.BootPreparer = (*ownedProvider)(nil)
)

// joinTx runs every non-nil function in one transaction.
func joinTx(fs ...func(*store.Tx) error) func(*store.Tx) error {
	var live []func(*store.Tx) error
	for _, f := range fs {
		if f != nil {
			live = append(live, f)
		}
	}
	if len(live) == 0 {
		return nil
	}
	return func(tx *store.Tx) error {
		for _, f := range live {
			if err := f(tx); err != nil {
				return err
			}
		}
		return nil
	}
}
