package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"strings"
	"sync"
	"time"

	"github.com/warmpool/warmpool/agent"
	"github.com/warmpool/warmpool/api"
	"github.com/warmpool/warmpool/lifecycle"
	"github.com/warmpool/warmpool/store"
	"github.com/warmpool/warmpool/template"
	"github.com/warmpool/warmpool/vm"
)

const machineLabel = lifecycle.LabelMachine

// machines connects the lifecycle manager to the store and the API. A
// machine's desired spec (the API's shape: PutMachine, EnsureMachine,
// config) lives only in its store record; the manager's own record (what
// its VM runs) is kept next to it so a restart can restore it.
type machines struct {
	d       *Daemon
	m       *lifecycle.Manager
	metrics *machineMetrics

	locksMu sync.Mutex
	// locks serialise the changes of one machine's spec with handing the
	// result to the manager, so an ensure that merged first never reaches
	// the manager after one that merged later.
	locks map[string]chan struct{}

	specsMu sync.Mutex
	// specs holds the desired spec of each machine as last committed to
	// the store. record is the one writer of specs and updates it after its
	// transaction commits, so it never disagrees with the store; it spares
	// the common ensure (one that asks for nothing new) a store read and
	// two JSON decodes of the whole record. Values are never modified.
	specs map[string]api.MachineSpec
}

// newMachines starts the machine manager; a nil clock is the wall clock.
func (d *Daemon) newMachines(clock lifecycle.Clock) (*machines, error) {
	ms := &machines{d: d, locks: map[string]chan struct{}{}, specs: map[string]api.MachineSpec{}}
	ms.metrics = newMachineMetrics(func() ([]api.Machine, error) { return d.Machines(context.Background()) })
	if err := ms.metrics.register(d.reg); err != nil {
		return nil, err
	}
	m, err := lifecycle.NewManager(lifecycle.Config{
		Clock:        clock,
		Idle:         ms.defaultIdle(),
		Provider:     d.prov,
		StateDir:     d.stateDir,
		Ping:         func(ctx context.Context, v vm.VM) error { return d.pingVM(ctx, v.ID) },
		Shutdown:     d.agentShutdown,
		GuestMemUsed: d.guestMemUsed,
		Events:       countingPublisher{metrics: ms.metrics, next: d.bus},
		Logger:       d.log.With("component", "machines"),
		OnChange:     ms.onChange,
	})
	if err != nil {
		return nil, err
	}
	ms.m = m
	return ms, nil
}

// decodeSpec reads the desired spec of a machine record.
func decodeSpec(r store.Machine) (api.MachineSpec, error) {
	var spec api.MachineSpec
	if len(r.Spec) > 0 {
		if err := json.Unmarshal(r.Spec, &spec); err != nil {
			return api.MachineSpec{}, fmt.Errorf("decode spec of machine %s: %w", r.Name, err)
		}
	}
	return spec, nil
}

// lock takes the machine's lock, or gives up when ctx ends.
func (ms *machines) lock(ctx context.Context, name string) (unlock func(), err error) {
	ms.locksMu.Lock()
	l, ok := ms.locks[name]
	if !ok {
		l = make(chan struct{}, 1)
		ms.locks[name] = l
	}
	ms.locksMu.Unlock()
	select {
	case l <- struct{}{}:
		return func() { <-l }, nil
	case <-ctx.Done():
		return nil, fmt.Errorf("machine %s: waiting for another change of it: %w", name, ctx.Err())
	}
}

// restore hands the manager the machine records of an earlier run, after
// reconcile has decided which machine VMs survive.
func (ms *machines) restore(ctx context.Context) error {
	recs, err := store.List(ms.d.st, store.Machines)
	if err != nil {
		return err
	}
	var lrecs []lifecycle.Record
	specs := map[string]api.MachineSpec{}
	for _, r := range recs {
		if len(r.Record) == 0 {
			continue
		}
		var lr lifecycle.Record
		if err := json.Unmarshal(r.Record, &lr); err != nil {
			return fmt.Errorf("decode machine %s: %w", r.Name, err)
		}
		if specs[r.Name], err = decodeSpec(r); err != nil {
			return err
		}
		lrecs = append(lrecs, lr)
	}
	if len(lrecs) == 0 {
		return nil
	}
	err = ms.m.Restore(ctx, lrecs)
	// A restored machine runs on the policy recorded with it; the daemon's
	// default may have changed in the config since.
	for _, lr := range lrecs {
		ms.applyIdle(ctx, lr.Name, specs[lr.Name])
	}
	return err
}

// defaultIdle is the idle policy of machines whose spec sets none.
func (ms *machines) defaultIdle() lifecycle.IdlePolicy {
	def := ms.d.cfg.MachineDefaults
	return lifecycle.IdlePolicy{
		ShrinkAfter:  def.IdleAfter.Std(),
		SuspendAfter: def.SuspendAfter.Std(),
		ReserveMiB:   or(def.IdleReserveMiB, defaultIdleReserveMiB),
	}
}

// idlePolicy is the policy in force for spec: its own steps, else the
// daemon's defaults.
func (ms *machines) idlePolicy(spec api.MachineSpec) lifecycle.IdlePolicy {
	p := ms.defaultIdle()
	if spec.IdleAfter != nil {
		p.ShrinkAfter = spec.IdleAfter.Std()
	}
	if spec.SuspendAfter != nil {
		p.SuspendAfter = spec.SuspendAfter.Std()
	}
	return p
}

// applyIdle hands a machine the manager already runs its new idle policy
// at once: unlike a spec change it needs no ensure, and never a recreate.
func (ms *machines) applyIdle(ctx context.Context, name string, spec api.MachineSpec) {
	cur, err := ms.m.Get(name)
	if err != nil {
		return // not started yet: its first ensure carries the policy
	}
	want := ms.idlePolicy(spec)
	if cur.Spec.Idle != nil && *cur.Spec.Idle == want {
		return
	}
	if _, err := ms.m.SetIdle(ctx, name, &want); err != nil {
		ms.d.log.Warn("apply idle policy", "machine", name, "err", err)
	}
}

// knows reports whether the machine is recorded. When the store cannot
// tell, it says yes: the callers decide whether to destroy a VM.
func (ms *machines) knows(name string) bool {
	_, ok, err := ms.get(name)
	if err != nil {
		ms.d.log.Error("look up machine", "machine", name, "err", err)
		return true
	}
	return ok
}

func (ms *machines) ownsVM(v vm.VM) bool {
	name := v.Spec.Labels[machineLabel]
	return name != "" && ms.knows(name)
}

// get returns the machine's recorded desired spec.
func (ms *machines) get(name string) (api.MachineSpec, bool, error) {
	ms.specsMu.Lock()
	spec, ok := ms.specs[name]
	ms.specsMu.Unlock()
	if ok {
		return spec, true, nil
	}
	r, err := store.Get(ms.d.st, store.Machines, name)
	if errors.Is(err, vm.ErrNotFound) {
		return api.MachineSpec{}, false, nil
	}
	if err != nil {
		return api.MachineSpec{}, false, fmt.Errorf("look up machine %s: %w", name, err)
	}
	spec, err = decodeSpec(r)
	if err != nil {
		return api.MachineSpec{}, false, err
	}
	ms.remember(name, spec)
	return spec, true, nil
}

func (ms *machines) remember(name string, spec api.MachineSpec) {
	ms.specsMu.Lock()
	ms.specs[name] = spec
	ms.specsMu.Unlock()
}

// record changes the machine's desired spec in one transaction: change
// gets the recorded spec (the default shape when there is none) and
// returns the new one. A spec that comes back unchanged is not rewritten.
func (ms *machines) record(name string, change func(cur api.MachineSpec) api.MachineSpec) (api.MachineSpec, error) {
	var spec api.MachineSpec
	err := ms.d.st.Update(func(tx *store.Tx) error {
		rec, err := store.Machines.Get(tx, name)
		found := err == nil
		if err != nil && !errors.Is(err, vm.ErrNotFound) {
			return err
		}
		cur := api.MachineSpec{}.WithDefaults()
		if found {
			if cur, err = decodeSpec(rec); err != nil {
				return err
			}
		}
		spec = change(cur)
		if err := spec.Validate(); err != nil {
			return err
		}
		if found && spec.Equal(cur) {
			return nil
		}
		specJSON, err := json.Marshal(spec)
		if err != nil {
			return err
		}
		rec.Name, rec.Spec, rec.UpdatedAt = name, specJSON, time.Now()
		return store.Machines.Put(tx, rec)
	})
	if err != nil {
		return api.MachineSpec{}, fmt.Errorf("record machine %s: %w", name, err)
	}
	ms.remember(name, spec)
	return spec, nil
}

func (ms *machines) onChange(m lifecycle.Machine) {
	ms.d.guests.onMachineChange(m)
	rec, err := json.Marshal(m)
	if err != nil {
		ms.d.log.Error("encode machine", "machine", m.Name, "err", err)
		return
	}
	err = ms.d.st.Update(func(tx *store.Tx) error {
		// The desired spec is the API's to change; only the record is ours.
		cur, err := store.Machines.Get(tx, m.Name)
		if err != nil && !errors.Is(err, vm.ErrNotFound) {
			return err
		}
		cur.Name, cur.Record, cur.UpdatedAt = m.Name, rec, time.Now()
		if err := store.Machines.Put(tx, cur); err != nil {
			return err
		}
		if m.VMID == "" {
			return nil
		}
		return ms.d.vms.machineTx(tx, m.VMID, m.Name)
	})
	if err != nil {
		ms.d.log.Error("record machine", "machine", m.Name, "err", err)
	}
}

func (ms *machines) close() {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := ms.m.Close(ctx); err != nil {
		ms.d.log.Warn("close machine manager", "err", err)
	}
}

func (ms *machines) stopAll(ctx context.Context) {
	for _, m := range ms.m.List() {
		if err := ms.m.Stop(ctx, m.Name, false); err != nil {
			ms.d.log.Warn("stop machine at shutdown", "machine", m.Name, "err", err)
		}
	}
}

func (d *Daemon) agentShutdown(ctx context.Context, v vm.VM) error {
	// The agent's one channel may be a session's; a second connection
	// would wait for it to end.
	d.guests.drop(v.ID)
	c, err := agent.Dial(ctx, d.prov, v.ID)
	if err != nil {
		return err
	}
	defer c.Close()
	return c.Shutdown(ctx)
}

func (d *Daemon) guestMemUsed(ctx context.Context, v vm.VM) (int, error) {
	var s agent.Stats
	if sess := d.guests.open(v.ID); sess != nil {
		var err error
		if s, err = sess.Stats(ctx); err != nil {
			return 0, err
		}
	} else {
		c, err := agent.Dial(ctx, d.prov, v.ID)
		if err != nil {
			return 0, err
		}
		defer c.Close()
		if s, err = c.Stats(ctx); err != nil {
			return 0, err
		}
	}
	return int((s.MemTotalKiB - s.MemAvailableKiB) / 1024), nil
}

func (ms *machines) apiMachine(name string, spec api.MachineSpec) api.Machine {
	idle := ms.idlePolicy(spec)
	out := api.Machine{Name: name, State: api.MachineNotExist, Spec: spec,
		IdleAfter: api.Duration(idle.ShrinkAfter), SuspendAfter: api.Duration(idle.SuspendAfter)}
	m, err := ms.m.Get(name)
	if err != nil {
		return out
	}
	out.State = string(m.State)
	out.Since = m.Since
	out.LastError = m.LastError
	out.Holds = len(m.Holds)
	out.BalloonMiB = m.BalloonMiB
	out.VMID = m.VMID // none when stopped: the lifecycle destroys a stopped machine's VM
	out.Address = ms.d.net.machineAddress(name)
	return out
}

// Machines implements api.Backend.
func (d *Daemon) Machines(ctx context.Context) ([]api.Machine, error) {
	recs, err := store.List(d.st, store.Machines)
	if err != nil {
		return nil, fmt.Errorf("list machines: %w", err)
	}
	out := make([]api.Machine, 0, len(recs))
	for _, r := range recs {
		spec, err := decodeSpec(r)
		if err != nil {
			return nil, err
		}
		out = append(out, d.mach.apiMachine(r.Name, spec))
	}
	return out, nil
}

// PutMachine implements api.Backend. A changed idle policy applies at once
// to a machine that runs; a changed shape applies at its next ensure (a
// recreate, data disk kept).
func (d *Daemon) PutMachine(ctx context.Context, name string, req api.MachineRequest) (api.Machine, error) {
	if err := d.checkMachineRequest(name, req); err != nil {
		return api.Machine{}, err
	}
	unlock, err := d.mach.lock(ctx, name)
	if err != nil {
		return api.Machine{}, err
	}
	defer unlock()
	if _, _, err := d.net.policy(req.Network, req.EgressAllow); err != nil {
		return api.Machine{}, fmt.Errorf("machine %s: %w", name, err)
	}
	if err := d.checkMachineImage(ctx, name, req.Image); err != nil {
		return api.Machine{}, err
	}
	spec, err := d.mach.record(name, func(api.MachineSpec) api.MachineSpec { return req })
	if err != nil {
		return api.Machine{}, err
	}
	d.mach.applyIdle(ctx, name, spec)
	return d.mach.apiMachine(name, spec), nil
}

// checkMachineImage refuses, before a spec naming it is recorded, an image
// a machine could not boot: a name no image has, a directory without one,
// a root filesystem disk the provider cannot attach.
func (d *Daemon) checkMachineImage(ctx context.Context, name, image string) error {
	if image == "" {
		return nil
	}
	img, err := d.guestImage(ctx, image, nil)
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("machine %s: %w", name, &vm.FieldError{Field: "image", Value: image, Reason: err.Error()})
	}
	if err != nil {
		return fmt.Errorf("machine %s: %w", name, err)
	}
	if img.Rootfs != nil && !d.prov.Capabilities().Has(vm.CapRootDisk) {
		return fmt.Errorf("machine %s: image %s has a root filesystem disk, which provider %s cannot attach: %w", name, image, d.prov.Name(), vm.ErrUnsupported)
	}
	return nil
}

func (d *Daemon) checkMachineRequest(name string, req api.Validator) error {
	if err := d.checkOpen(); err != nil {
		return err
	}
	if err := vm.ValidateName("machine", name); err != nil {
		return fmt.Errorf("machine: %w", err)
	}
	if err := req.Validate(); err != nil {
		return fmt.Errorf("machine %s: %w", name, err)
	}
	return nil
}

// EnsureMachine implements api.Backend. The fields req gives replace the
// recorded ones; a machine never recorded starts from the default shape
// (api.DefaultMachineVCPUs, api.DefaultMachineMemoryMiB, no data disk), so
// "ensure it is ready" needs no arguments. The merged spec is recorded
// before the machine is brought to it, and an ensure that asks for nothing
// new writes nothing.
func (d *Daemon) EnsureMachine(ctx context.Context, name string, req api.MachineEnsureRequest) (api.Machine, error) {
	start := time.Now()
	if err := d.checkMachineRequest(name, req); err != nil {
		return api.Machine{}, err
	}
	// Before the lock: the first use may build the image, and an ensure of
	// another shape must not wait for that.
	img, err := d.guestImage(ctx, "", nil)
	if err != nil {
		return api.Machine{}, fmt.Errorf("ensure machine %s: %w", name, err)
	}
	if req.Image != nil {
		if err := d.checkMachineImage(ctx, name, *req.Image); err != nil {
			return api.Machine{}, fmt.Errorf("ensure %w", err)
		}
	}
	unlock, err := d.mach.lock(ctx, name)
	if err != nil {
		return api.Machine{}, err
	}
	defer unlock()
	spec, err := d.mach.merge(name, req)
	if err != nil {
		return api.Machine{}, err
	}
	if spec.Image != "" {
		if img, err = d.guestImage(ctx, spec.Image, nil); err != nil {
			return api.Machine{}, fmt.Errorf("ensure machine %s: %w", name, err)
		}
	}
	cmdline := img.Cmdline
	var rootDisk string
	if img.Rootfs != nil && !d.prov.Capabilities().Has(vm.CapRootDisk) {
		return api.Machine{}, fmt.Errorf("ensure machine %s: image %s has a root filesystem disk, which provider %s cannot attach: %w", name, spec.Image, d.prov.Name(), vm.ErrUnsupported)
	}
	if img.Rootfs != nil {
		// A machine's root writes live in memory: what it keeps goes on
		// its data disk, which survives recreate and suspend.
		rootDisk = img.Rootfs.Path
		cmdline += " " + template.RootCmdline("tmpfs")
	}
	idle := d.mach.idlePolicy(spec)
	ls := lifecycle.MachineSpec{
		Name:         name,
		VCPUs:        spec.VCPUs,
		MemoryMiB:    spec.MemoryMiB,
		Kernel:       img.Kernel,
		Initrd:       img.Initrd,
		Cmdline:      strings.TrimSpace(cmdline + " " + spec.Cmdline),
		KernelDigest: img.Digest,
		RootDisk:     rootDisk,
		DataDiskMiB:  spec.DataDiskMiB,
		Idle:         &idle,
	}
	if _, err := d.mach.m.Ensure(ctx, ls); err != nil {
		return api.Machine{}, err
	}
	d.mach.metrics.observeEnsure(name, time.Since(start))
	return d.mach.apiMachine(name, spec), nil
}

// merge records req merged into the machine's spec. The common ensure asks
// for nothing new; it reads the record and writes nothing.
func (ms *machines) merge(name string, req api.MachineEnsureRequest) (api.MachineSpec, error) {
	cur, ok, err := ms.get(name)
	if err != nil {
		return api.MachineSpec{}, err
	}
	if !ok {
		cur = api.MachineSpec{}.WithDefaults()
	}
	next := req.Merge(cur)
	if _, _, err := ms.d.net.policy(next.Network, next.EgressAllow); err != nil {
		return api.MachineSpec{}, fmt.Errorf("machine %s: %w", name, err)
	}
	if ok && next.Equal(cur) {
		return cur, nil
	}
	return ms.record(name, req.Merge)
}

// StopMachine implements api.Backend.
func (d *Daemon) StopMachine(ctx context.Context, name string, force bool) error {
	if !d.mach.knows(name) {
		return fmt.Errorf("stop machine %s: %w", name, vm.ErrNotFound)
	}
	err := d.mach.m.Stop(ctx, name, force)
	if errors.Is(err, vm.ErrNotFound) {
		return nil // recorded but never started: already stopped
	}
	return err
}

// HoldMachine implements api.Backend.
func (d *Daemon) HoldMachine(ctx context.Context, name string, req api.HoldRequest) (api.Hold, error) {
	if !d.mach.knows(name) {
		return api.Hold{}, fmt.Errorf("hold machine %s: %w", name, vm.ErrNotFound)
	}
	h, err := d.mach.m.Hold(ctx, name, req.Owner, req.TTL.Std())
	if errors.Is(err, vm.ErrNotFound) {
		// Recorded, never ensured: there is nothing to keep awake yet.
		return api.Hold{}, fmt.Errorf("hold machine %s: it was never started; ensure it first: %w", name, vm.ErrInvalidState)
	}
	if err != nil {
		return api.Hold{}, err
	}
	return api.Hold{ID: h.ID, Machine: name, Owner: h.Owner, CreatedAt: h.CreatedAt, ExpiresAt: h.ExpiresAt}, nil
}

// ReleaseHold implements api.Backend.
func (d *Daemon) ReleaseHold(ctx context.Context, name, holdID string) error {
	err := d.mach.m.Unhold(name, holdID)
	if errors.Is(err, vm.ErrNotFound) {
		return nil
	}
	return err
}
