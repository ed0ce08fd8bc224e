package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/warmpool/warmpool/agent"
	"github.com/warmpool/warmpool/api"
	"github.com/warmpool/warmpool/lifecycle"
	"github.com/warmpool/warmpool/store"
	"github.com/warmpool/warmpool/vm"
)

const machineLabel = lifecycle.LabelMachine

// machines connects the lifecycle manager to the store and the API. The
// desired spec of a machine is the API's (PutMachine, config); the
// manager's own record is kept next to it so a restart can restore it.
type machines struct {
	d  *Daemon
	m  *lifecycle.Manager
	mu sync.Mutex
	// specs are the recorded desired specs by machine name.
	specs map[string]api.MachineSpec
}

func (d *Daemon) newMachines() (*machines, error) {
	ms := &machines{d: d, specs: map[string]api.MachineSpec{}}
	m, err := lifecycle.NewManager(lifecycle.Config{
		Idle:         ms.defaultIdle(),
		Provider:     d.prov,
		StateDir:     d.stateDir,
		Ping:         func(ctx context.Context, v vm.VM) error { return d.pingVM(ctx, v.ID) },
		Shutdown:     d.agentShutdown,
		GuestMemUsed: d.guestMemUsed,
		Events:       d.bus,
		Logger:       d.log.With("component", "machines"),
		OnChange:     ms.onChange,
	})
	if err != nil {
		return nil, err
	}
	ms.m = m
	recs, err := store.List(d.st, store.Machines)
	if err != nil {
		return nil, err
	}
	for _, r := range recs {
		var spec api.MachineSpec
		if len(r.Spec) > 0 {
			if err := json.Unmarshal(r.Spec, &spec); err != nil {
				return nil, fmt.Errorf("decode machine %s: %w", r.Name, err)
			}
		}
		ms.specs[r.Name] = spec
	}
	return ms, nil
}

// restore hands the manager the machine records of an earlier run, after
// reconcile has decided which machine VMs survive.
func (ms *machines) restore(ctx context.Context) error {
	recs, err := store.List(ms.d.st, store.Machines)
	if err != nil {
		return err
	}
	var lrecs []lifecycle.Record
	for _, r := range recs {
		if len(r.Record) == 0 {
			continue
		}
		var lr lifecycle.Record
		if err := json.Unmarshal(r.Record, &lr); err != nil {
			return fmt.Errorf("decode machine %s: %w", r.Name, err)
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
		if spec, ok := ms.get(lr.Name); ok {
			ms.applyIdle(ctx, lr.Name, spec)
		}
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

func (ms *machines) knows(name string) bool {
	ms.mu.Lock()
	defer ms.mu.Unlock()
	_, ok := ms.specs[name]
	return ok
}

func (ms *machines) ownsVM(v vm.VM) bool {
	name := v.Spec.Labels[machineLabel]
	return name != "" && ms.knows(name)
}

func (ms *machines) get(name string) (api.MachineSpec, bool) {
	ms.mu.Lock()
	defer ms.mu.Unlock()
	s, ok := ms.specs[name]
	return s, ok
}

func (ms *machines) onChange(m lifecycle.Machine) {
	rec, err := json.Marshal(m)
	if err != nil {
		ms.d.log.Error("encode machine", "machine", m.Name, "err", err)
		return
	}
	spec, _ := ms.get(m.Name)
	specJSON, _ := json.Marshal(spec)
	err = ms.d.st.Update(func(tx *store.Tx) error {
		if err := store.Machines.Put(tx, store.Machine{Name: m.Name, Spec: specJSON, Record: rec, UpdatedAt: time.Now()}); err != nil {
			return err
		}
		if m.VMID == "" {
			return nil
		}
		v, err := store.VMs.Get(tx, m.VMID)
		if errors.Is(err, vm.ErrNotFound) {
			return nil
		}
		if err != nil {
			return err
		}
		v.Role, v.Machine = store.RoleMachine, m.Name
		return store.VMs.Put(tx, v)
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
	c, err := agent.Dial(ctx, d.prov, v.ID)
	if err != nil {
		return err
	}
	defer c.Close()
	return c.Shutdown(ctx)
}

func (d *Daemon) guestMemUsed(ctx context.Context, v vm.VM) (int, error) {
	c, err := agent.Dial(ctx, d.prov, v.ID)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	s, err := c.Stats(ctx)
	if err != nil {
		return 0, err
	}
	return int((s.MemTotalKiB - s.MemAvailableKiB) / 1024), nil
}

func (ms *machines) apiMachine(name string) api.Machine {
	spec, _ := ms.get(name)
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
	return out
}

// Machines implements api.Backend.
func (d *Daemon) Machines(ctx context.Context) ([]api.Machine, error) {
	d.mach.mu.Lock()
	names := sortedKeys(d.mach.specs)
	d.mach.mu.Unlock()
	out := make([]api.Machine, 0, len(names))
	for _, n := range names {
		out = append(out, d.mach.apiMachine(n))
	}
	return out, nil
}

// PutMachine implements api.Backend. A changed idle policy applies at once
// to a machine that runs; a changed shape applies at its next ensure (a
// recreate, data disk kept).
func (d *Daemon) PutMachine(ctx context.Context, name string, req api.MachineRequest) (api.Machine, error) {
	if err := d.putMachine(ctx, name, req); err != nil {
		return api.Machine{}, err
	}
	d.mach.applyIdle(ctx, name, req)
	return d.mach.apiMachine(name), nil
}

// putMachine records req as the machine's desired spec.
func (d *Daemon) putMachine(ctx context.Context, name string, req api.MachineRequest) error {
	if err := d.checkOpen(); err != nil {
		return err
	}
	if err := vm.ValidateName("machine", name); err != nil {
		return fmt.Errorf("record machine: %w", err)
	}
	if err := req.Validate(); err != nil {
		return fmt.Errorf("record machine %s: %w", name, err)
	}
	specJSON, err := json.Marshal(req)
	if err != nil {
		return err
	}
	err = d.st.Update(func(tx *store.Tx) error {
		rec, err := store.Machines.Get(tx, name)
		if err != nil && !errors.Is(err, vm.ErrNotFound) {
			return err
		}
		rec.Name, rec.Spec, rec.UpdatedAt = name, specJSON, time.Now()
		return store.Machines.Put(tx, rec)
	})
	if err != nil {
		return fmt.Errorf("record machine %s: %w", name, err)
	}
	d.mach.mu.Lock()
	d.mach.specs[name] = req
	d.mach.mu.Unlock()
	return nil
}

// EnsureMachine implements api.Backend. Without req the recorded spec
// applies; a machine never recorded gets the default shape
// (api.DefaultMachineVCPUs, api.DefaultMachineMemoryMiB, no data disk), so
// "ensure it is ready" needs no arguments.
func (d *Daemon) EnsureMachine(ctx context.Context, name string, req *api.MachineRequest) (api.Machine, error) {
	if err := d.checkOpen(); err != nil {
		return api.Machine{}, err
	}
	if req == nil {
		if _, ok := d.mach.get(name); !ok {
			def := api.MachineSpec{}.WithDefaults()
			req = &def
		}
	}
	if req != nil {
		if err := d.putMachine(ctx, name, *req); err != nil {
			return api.Machine{}, err
		}
	}
	spec, ok := d.mach.get(name)
	if !ok {
		return api.Machine{}, fmt.Errorf("ensure machine %s: no such machine: %w", name, vm.ErrNotFound)
	}
	img, err := d.guestImage(ctx, "", nil)
	if err != nil {
		return api.Machine{}, fmt.Errorf("ensure machine %s: %w", name, err)
	}
	idle := d.mach.idlePolicy(spec)
	ls := lifecycle.MachineSpec{
		Name:         name,
		VCPUs:        spec.VCPUs,
		MemoryMiB:    spec.MemoryMiB,
		Kernel:       img.Kernel,
		Initrd:       img.Initrd,
		Cmdline:      strings.TrimSpace(img.Cmdline + " " + spec.Cmdline),
		KernelDigest: img.Digest,
		DataDiskMiB:  spec.DataDiskMiB,
		Idle:         &idle,
	}
	if _, err := d.mach.m.Ensure(ctx, ls); err != nil {
		return api.Machine{}, err
	}
	return d.mach.apiMachine(name), nil
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
