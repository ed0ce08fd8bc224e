package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"strings"
	"sync"
	"time"

	"github.com/warmpool/warmpool/network"
	"github.com/warmpool/warmpool/store"
	"github.com/warmpool/warmpool/vm"
)

// Labels a pool puts on its snapshot (and so on the restores it asks for):
// which pool, and the network the pool's VMs get.
const (
	labelPool        = "warmpool.pool"
	labelNetwork     = "warmpool.network"
	labelEgressAllow = "warmpool.egress_allow"
)

// netSlots binds network slots to the daemon's VMs. It is the only writer
// of store.NetSlots: a slot's record is written before the VM that uses it
// is made, gets the VM's ID in the transaction that records the VM, and is
// removed in the one that forgets it, so a restart (after kill -9 too)
// finds every slot either bound to a VM it knows, kept for a machine, or
// left over, and removes the last kind.
//
// A pool VM's slot is released with its VM (scrubbed and kept for reuse
// when verified clean, else destroyed). A machine keeps its slot, and so
// its address, from its first VM to the daemon's shutdown with
// --stop-all, across recreation, stop and suspend; the record keeps the
// address even then, so the next start makes the slot again where it was.
type netSlots struct {
	mgr *network.Manager // nil: no networking
	// off says why there is no networking when the configuration asks for
	// it (not root, a provider without networking); empty otherwise.
	off string
	st  *store.Store
	log *slog.Logger

	mu        sync.Mutex
	byVM      map[string]network.Slot // slots bound to a VM, by VM ID
	byMachine map[string]network.Slot // slots kept for a machine, by machine name
	filling   bool
	closed    bool           // no more refills: close destroys what is idle
	fills     sync.WaitGroup // the refill in flight
}

// newNetSlots checks the network configuration against the host. A range
// that overlaps the host's addresses or routes is an error: the daemon does
// not start, and nothing is created. Without root (namespaces, TAPs and
// nftables need it) networking is off and the daemon says why.
func newNetSlots(cfg Config, stateDir string, prov vm.Provider, st *store.Store, log *slog.Logger, root bool) (*netSlots, error) {
	n := &netSlots{st: st, log: log.With("component", "network"), byVM: map[string]network.Slot{}, byMachine: map[string]network.Slot{}}
	if cfg.Network.CIDR == "" {
		return n, nil
	}
	switch {
	case !root:
		n.off = "network slots need root (namespaces, TAP devices, nftables); only pools and machines with network: none run"
	case !prov.Capabilities().Has(vm.CapNetwork):
		n.off = fmt.Sprintf("provider %s cannot attach a network interface; only pools and machines with network: none run", prov.Name())
	}
	if n.off != "" {
		n.log.Error("networking is off", "reason", n.off, "network.cidr", cfg.Network.CIDR)
		return n, nil
	}
	ncfg := cfg.networkConfig(network.TagFor(stateDir))
	ncfg.Logger = log
	mgr, err := network.New(ncfg)
	if err != nil {
		return nil, fmt.Errorf("network: %w", err)
	}
	n.mgr = mgr
	return n, nil
}

// status is what `warmpool status` says of networking: on with its
// range, off and why, or "" when not configured.
func (n *netSlots) status(cidr string) string {
	switch {
	case n.mgr != nil:
		return "on, " + cidr
	case n.off != "":
		return "off: " + n.off
	}
	return ""
}

// configured reports whether the configuration asks for networking, whether
// or not it can be had.
func (n *netSlots) configured() bool { return n.mgr != nil || n.off != "" }

// policy resolves a pool's or machine's network setting: "" is isolated
// when networking is configured and none otherwise. It fails for a policy
// the daemon cannot give.
func (n *netSlots) policy(given string, allow []string) (network.Policy, []network.Allow, error) {
	if given == "" && !n.configured() {
		return network.PolicyNone, nil, nil
	}
	p, err := network.ParsePolicy(given)
	if err != nil {
		return "", nil, err
	}
	a, err := network.ParseAllow(allow)
	if err != nil {
		return "", nil, err
	}
	if p == network.PolicyNone {
		return p, nil, nil
	}
	if n.mgr == nil {
		why := n.off
		if why == "" {
			why = "network.cidr is not set"
		}
		return "", nil, fmt.Errorf("network %s: %s", p, why)
	}
	return p, a, nil
}

// poolLabels returns snapshot labels for pool p's restores.
func poolLabels(base map[string]string, p store.Pool) map[string]string {
	out := maps.Clone(base)
	if out == nil {
		out = map[string]string{}
	}
	out[labelPool] = p.Name
	out[labelNetwork] = p.Network
	if len(p.EgressAllow) > 0 {
		out[labelEgressAllow] = strings.Join(p.EgressAllow, ",")
	} else {
		delete(out, labelEgressAllow)
	}
	return out
}

func splitAllow(s string) []string {
	if s == "" {
		return nil
	}
	return strings.Split(s, ",")
}

// binding is a slot taken for a VM about to be made.
type binding struct {
	slot    network.Slot
	machine string
	kept    bool // the machine already held it
}

// bind takes the slot a VM about to be made for owner gets: the one the
// machine keeps, or one from the manager with policy. nil when the VM gets
// no network.
func (n *netSlots) bind(ctx context.Context, machine string, policy network.Policy, allow []network.Allow) (*binding, error) {
	if policy == network.PolicyNone || policy == "" {
		if machine != "" && n.mgr != nil {
			// A machine that no longer wants a network gives its slot back.
			n.mu.Lock()
			s, ok := n.byMachine[machine]
			delete(n.byMachine, machine)
			n.mu.Unlock()
			if ok {
				n.forgetAndRelease(ctx, s)
			}
		}
		return nil, nil
	}
	if n.mgr == nil {
		return nil, fmt.Errorf("network %s: networking is off", policy)
	}
	if machine != "" {
		n.mu.Lock()
		s, ok := n.byMachine[machine]
		n.mu.Unlock()
		if ok {
			if s.Policy != policy || !sameAllow(s.Allow, allow) {
				ns, err := n.mgr.SetPolicy(ctx, s.ID, policy, allow)
				if err != nil {
					return nil, err
				}
				if err := n.put(store.NetSlot{ID: ns.ID, Machine: machine}, ns); err != nil {
					return nil, err
				}
				n.mu.Lock()
				n.byMachine[machine] = ns
				n.mu.Unlock()
				s = ns
			}
			return &binding{slot: s, machine: machine, kept: true}, nil
		}
	}
	s, err := n.mgr.Acquire(ctx, policy, allow)
	n.refill()
	if err != nil {
		return nil, err
	}
	if err := n.put(store.NetSlot{ID: s.ID, Machine: machine, CreatedAt: time.Now()}, s); err != nil {
		n.release(ctx, s)
		return nil, err
	}
	if machine != "" {
		n.mu.Lock()
		n.byMachine[machine] = s
		n.mu.Unlock()
	}
	return &binding{slot: s, machine: machine}, nil
}

func sameAllow(a, b []network.Allow) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func (n *netSlots) put(rec store.NetSlot, s network.Slot) error {
	b, err := json.Marshal(s)
	if err != nil {
		return err
	}
	rec.Slot = b
	if rec.CreatedAt.IsZero() {
		rec.CreatedAt = time.Now()
	}
	if err := store.Put(n.st, store.NetSlots, rec); err != nil {
		return fmt.Errorf("record network slot %s: %w", s.ID, err)
	}
	return nil
}

// boundTx records in tx that b's slot now belongs to VM id; the caller
// runs it in the transaction that records the VM.
func (n *netSlots) boundTx(b *binding, id string) func(*store.Tx) error {
	if b == nil {
		return nil
	}
	return func(tx *store.Tx) error {
		rec, err := store.NetSlots.Get(tx, b.slot.ID)
		if err != nil {
			return fmt.Errorf("network slot %s of VM %s: %w", b.slot.ID, id, err)
		}
		rec.VMID = id
		return store.NetSlots.Put(tx, rec)
	}
}

// bound notes in memory what boundTx recorded.
func (n *netSlots) bound(b *binding, id string) {
	if b == nil {
		return
	}
	n.mu.Lock()
	n.byVM[id] = b.slot
	n.mu.Unlock()
}

// unbind gives back b's slot after the VM it was taken for could not be
// made: a machine keeps it, anything else releases it.
func (n *netSlots) unbind(ctx context.Context, b *binding) {
	if b == nil || b.machine != "" {
		return
	}
	n.forgetAndRelease(ctx, b.slot)
}

// destroyedTx returns what to do in the transaction that forgets VM id,
// and what to do once it committed: a pool VM's slot record goes and the
// slot is released; a machine's slot stays with the machine.
func (n *netSlots) destroyedTx(id string) (func(*store.Tx) error, func(context.Context)) {
	if n == nil || n.mgr == nil {
		return nil, func(context.Context) {}
	}
	n.mu.Lock()
	s, ok := n.byVM[id]
	n.mu.Unlock()
	if !ok {
		return nil, func(context.Context) {}
	}
	tx := func(tx *store.Tx) error {
		rec, err := store.NetSlots.Get(tx, s.ID)
		if errors.Is(err, vm.ErrNotFound) {
			return nil
		}
		if err != nil {
			return err
		}
		if rec.Machine != "" {
			rec.VMID = ""
			return store.NetSlots.Put(tx, rec)
		}
		return store.NetSlots.Delete(tx, s.ID)
	}
	after := func(ctx context.Context) {
		n.mu.Lock()
		delete(n.byVM, id)
		kept := false
		for _, ms := range n.byMachine {
			kept = kept || ms.ID == s.ID
		}
		n.mu.Unlock()
		if !kept {
			n.release(ctx, s)
		}
	}
	return tx, after
}

func (n *netSlots) forgetAndRelease(ctx context.Context, s network.Slot) {
	if err := store.Delete(n.st, store.NetSlots, s.ID); err != nil && !errors.Is(err, vm.ErrNotFound) {
		n.log.Error("forget network slot", "slot", s.ID, "err", err)
	}
	n.release(ctx, s)
}

func (n *netSlots) release(ctx context.Context, s network.Slot) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
	defer cancel()
	if err := n.mgr.Release(ctx, s.ID); err != nil {
		n.log.Error("release network slot", "slot", s.ID, "err", err)
	}
	n.refill()
}

// refill makes clean slots in the background until the manager has its
// warm ones.
func (n *netSlots) refill() {
	if n.mgr == nil {
		return
	}
	n.mu.Lock()
	if n.filling || n.closed {
		n.mu.Unlock()
		return
	}
	n.filling = true
	n.fills.Add(1)
	n.mu.Unlock()
	go func() {
		defer n.fills.Done()
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := n.mgr.Fill(ctx); err != nil {
			n.log.Warn("make warm network slots", "err", err)
		}
		n.mu.Lock()
		n.filling = false
		n.mu.Unlock()
	}()
}

// address is where the host reaches VM id, nil when it has no network.
func (n *netSlots) address(id string) *string {
	if n == nil {
		return nil
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	s, ok := n.byVM[id]
	if !ok {
		return nil
	}
	a := s.Address.String()
	return &a
}

// machineAddress is the address machine keeps, nil when it has none.
func (n *netSlots) machineAddress(machine string) *string {
	if n == nil {
		return nil
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	s, ok := n.byMachine[machine]
	if !ok {
		return nil
	}
	a := s.Address.String()
	return &a
}

// reconcile runs at start, before the VMs are reconciled: the manager
// adopts the slots the records name (making again those whose namespace
// is gone) and removes every other of this daemon's.
func (n *netSlots) reconcile(ctx context.Context) error {
	recs, err := store.List(n.st, store.NetSlots)
	if err != nil {
		return err
	}
	if n.mgr == nil {
		if len(recs) > 0 {
			n.log.Warn("network slots recorded but networking is off: their VMs lose their network", "slots", len(recs))
		}
		return nil
	}
	var known []network.Slot
	byID := map[string]store.NetSlot{}
	for _, r := range recs {
		var s network.Slot
		if err := json.Unmarshal(r.Slot, &s); err != nil {
			n.log.Error("unreadable network slot record, dropping it", "slot", r.ID, "err", err)
			continue
		}
		known = append(known, s)
		byID[s.ID] = r
	}
	held, rerr := n.mgr.Reconcile(ctx, known)
	if rerr != nil {
		n.log.Error("reconcile network slots", "err", rerr)
	}
	kept := map[string]bool{}
	n.mu.Lock()
	for _, s := range held {
		kept[s.ID] = true
		r := byID[s.ID]
		if r.VMID != "" {
			n.byVM[r.VMID] = s
		}
		if r.Machine != "" {
			n.byMachine[r.Machine] = s
		}
	}
	n.mu.Unlock()
	for _, r := range recs {
		if !kept[r.ID] {
			if err := store.Delete(n.st, store.NetSlots, r.ID); err != nil {
				return err
			}
		}
	}
	if held == nil && rerr != nil {
		return rerr
	}
	return nil
}

// sweep runs at start once the VMs and machines are reconciled: a slot
// whose VM is gone (and that no machine keeps), or that was taken for a VM
// never made, or kept for a machine that is gone, is released.
func (n *netSlots) sweep(ctx context.Context, machineKnown func(string) bool) error {
	if n.mgr == nil {
		return nil
	}
	recs, err := store.List(n.st, store.NetSlots)
	if err != nil {
		return err
	}
	for _, r := range recs {
		vmKnown := false
		if r.VMID != "" {
			_, err := store.Get(n.st, store.VMs, r.VMID)
			vmKnown = err == nil
		}
		machineKeeps := r.Machine != "" && machineKnown(r.Machine)
		if vmKnown || machineKeeps {
			if !vmKnown && r.VMID != "" {
				r.VMID = ""
				if err := store.Put(n.st, store.NetSlots, r); err != nil {
					return err
				}
			}
			continue
		}
		n.log.Info("releasing a network slot whose VM is gone", "slot", r.ID, "vm", r.VMID, "machine", r.Machine)
		n.mu.Lock()
		s, ok := n.byVM[r.VMID]
		delete(n.byVM, r.VMID)
		if !ok {
			s, ok = n.byMachine[r.Machine]
		}
		delete(n.byMachine, r.Machine)
		n.mu.Unlock()
		if !ok {
			var rs network.Slot
			if json.Unmarshal(r.Slot, &rs) != nil {
				continue
			}
			s = rs
		}
		n.forgetAndRelease(ctx, s)
	}
	n.refill()
	return nil
}

// close runs at shutdown, after the VMs that go with it are gone: idle
// slots are destroyed; with stopAll the slots machines keep are too (their
// records stay, so the next start makes them again at the same address).
// Slots of VMs that outlive the daemon stay for the next start to adopt.
func (n *netSlots) close(ctx context.Context, stopAll bool) error {
	if n.mgr == nil {
		return nil
	}
	n.mu.Lock()
	n.closed = true
	n.mu.Unlock()
	n.fills.Wait()
	var errs []error
	if stopAll {
		n.mu.Lock()
		inUse := map[string]bool{}
		for _, s := range n.byVM {
			inUse[s.ID] = true
		}
		var machineSlots []network.Slot
		for _, s := range n.byMachine {
			if !inUse[s.ID] {
				machineSlots = append(machineSlots, s)
			}
		}
		n.mu.Unlock()
		for _, s := range machineSlots {
			errs = append(errs, n.mgr.Destroy(ctx, s.ID))
		}
	}
	errs = append(errs, n.mgr.Close(ctx))
	return errors.Join(errs...)
}

// machineNetwork is the network policy machine's recorded spec asks for.
func (d *Daemon) machineNetwork(machine string) (network.Policy, []network.Allow, error) {
	spec, _, err := d.mach.get(machine)
	if err != nil {
		return "", nil, err
	}
	return d.net.policy(spec.Network, spec.EgressAllow)
}

// templateNIC is the interface templates are built with: every template of
// a provider that can leave one attached to nothing has it, attached to
// nothing while it is built, whatever the policy of the pools that will
// use it (Firecracker backs it with a TAP of the build VM's own that
// carries nothing, so it needs root). A clone must have its template's
// devices, so one template then serves pools of every policy: isolated and
// egress clones are attached to their slot's TAP, and the agent removes
// the interface of a none clone at hand-off (the interface is attached to
// nothing meanwhile).
func templateNIC(p vm.Provider) *vm.NIC {
	if c := p.Capabilities(); !c.Has(vm.CapNetwork) || !c.Has(vm.CapNetworkUnattached) {
		return nil
	}
	return &vm.NIC{MAC: network.GuestMAC.String()}
}
