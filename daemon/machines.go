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
	return ms.m.Restore(ctx, lrecs)
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
	if m.State == lifecycle.Stopped && m.VMID != "" {
		ms.destroyStopped(m)
	}
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

// destroyStopped destroys the powered-off VM of a stopped machine. The
// next ensure boots a new VM anyway (the data disk is kept apart), and until
// then the dead VM would hold its directory and, under QEMU, its RAM file
// in /dev/shm; destroying it also keeps the state's VMs equal to the
// processes that run.
func (ms *machines) destroyStopped(m lifecycle.Machine) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := ms.d.prov.Destroy(ctx, m.VMID); err != nil && !errors.Is(err, vm.ErrNotFound) {
		ms.d.log.Warn("destroy VM of stopped machine", "machine", m.Name, "vm", m.VMID, "err", err)
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
	out := api.Machine{Name: name, State: api.MachineNotExist, Spec: spec}
	m, err := ms.m.Get(name)
	if err != nil {
		return out
	}
	out.State = string(m.State)
	out.Since = m.Since
	out.LastError = m.LastError
	out.Holds = len(m.Holds)
	out.BalloonMiB = m.BalloonMiB
	if m.State != lifecycle.Stopped {
		// A stopped machine's VM is destroyed (destroyStopped).
		out.VMID = m.VMID
	}
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

// PutMachine implements api.Backend.
func (d *Daemon) PutMachine(ctx context.Context, name string, req api.MachineRequest) (api.Machine, error) {
	if err := d.checkOpen(); err != nil {
		return api.Machine{}, err
	}
	specJSON, err := json.Marshal(req)
	if err != nil {
		return api.Machine{}, err
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
		return api.Machine{}, fmt.Errorf("record machine %s: %w", name, err)
	}
	d.mach.mu.Lock()
	d.mach.specs[name] = req
	d.mach.mu.Unlock()
	return d.mach.apiMachine(name), nil
}

// EnsureMachine implements api.Backend.
func (d *Daemon) EnsureMachine(ctx context.Context, name string, req *api.MachineRequest) (api.Machine, error) {
	if err := d.checkOpen(); err != nil {
		return api.Machine{}, err
	}
	if req != nil {
		if _, err := d.PutMachine(ctx, name, *req); err != nil {
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
	ls := lifecycle.MachineSpec{
		Name:         name,
		VCPUs:        spec.VCPUs,
		MemoryMiB:    spec.MemoryMiB,
		Kernel:       img.Kernel,
		Initrd:       img.Initrd,
		Cmdline:      strings.TrimSpace(img.Cmdline + " " + spec.Cmdline),
		KernelDigest: img.Digest,
		DataDiskMiB:  spec.DataDiskMiB,
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
