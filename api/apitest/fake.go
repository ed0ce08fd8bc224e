// Package apitest provides an in-memory api.Backend for tests of the server,
// the client and the CLI.
package apitest

import (
	"context"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/warmpool/warmpool/agent"
	"github.com/warmpool/warmpool/api"
	"github.com/warmpool/warmpool/events"
	"github.com/warmpool/warmpool/vm"
)

// Backend is an in-memory api.Backend. Acquire hands out a lease when the
// pool has Ready > 0 and fails with api.ErrNothingReady otherwise. Exec runs
// a tiny built-in command set: "echo ARGS...", "fail" (writes to stderr),
// "exit N", "vanish" (writes, then fails as if the VM died).
type Backend struct {
	mu        sync.Mutex
	templates map[string]api.Template
	pools     map[string]api.Pool
	leases    map[string]api.Lease
	machines  map[string]api.Machine
	holds     map[string]api.Hold
	nextID    int
	// Mutations counts every call that changed state, so tests can assert
	// that a rejected request changed nothing.
	mutations int
	calls     []string

	// guests are the agent sessions Guest serves, by target.
	guests map[string]*agent.Session
	// leaseEnv is each lease's default environment (AcquireRequest.Env).
	leaseEnv map[string][]string

	Bus *events.Bus
	Now func() time.Time
}

// New returns a backend holding a template "base" and an empty pool "web"
// of it with Ready 2.
func New() *Backend {
	b := &Backend{
		templates: map[string]api.Template{},
		pools:     map[string]api.Pool{},
		leases:    map[string]api.Lease{},
		machines:  map[string]api.Machine{},
		holds:     map[string]api.Hold{},
		Bus:       events.NewBus(),
		Now:       func() time.Time { return time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC) },
	}
	b.templates["base"] = api.Template{Name: "base", VCPUs: 1, MemoryMiB: 256, Generation: 1, CreatedAt: b.Now()}
	b.pools["web"] = api.Pool{Name: "web", Template: "base", Min: 2, Max: 4, Ready: 2, Target: 2, Allowed: -1, Generation: 1}
	return b
}

var _ api.Backend = (*Backend)(nil)

// Mutations reports how many state-changing calls succeeded.
func (b *Backend) Mutations() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.mutations
}

// Calls lists every backend method called, in order.
func (b *Backend) Calls() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return slices.Clone(b.calls)
}

// ResetCalls forgets the recorded calls.
func (b *Backend) ResetCalls() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.calls = nil
}

func (b *Backend) call(name string) {
	b.calls = append(b.calls, name)
}

func (b *Backend) id(prefix string) string {
	b.nextID++
	return prefix + "-" + strconv.Itoa(b.nextID)
}

func sorted[T any](m map[string]T) []T {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	out := make([]T, 0, len(m))
	for _, k := range keys {
		out = append(out, m[k])
	}
	return out
}

// Templates implements api.Backend.
func (b *Backend) Templates(ctx context.Context) ([]api.Template, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.call("Templates")
	return sorted(b.templates), nil
}

// BuildTemplate implements api.Backend; it reports three progress steps.
func (b *Backend) BuildTemplate(ctx context.Context, req api.TemplateRequest, progress func(string)) (api.Template, error) {
	for _, step := range []string{"boot", "wait for agent", "snapshot"} {
		progress(step)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.call("BuildTemplate")
	t := b.templates[req.Name]
	t.Name, t.Image = req.Name, req.Image
	t.VCPUs, t.MemoryMiB = max(req.VCPUs, 1), max(req.MemoryMiB, 256)
	t.Generation++
	t.CreatedAt = b.Now()
	b.templates[req.Name] = t
	b.mutations++
	return t, nil
}

// Pools implements api.Backend.
func (b *Backend) Pools(ctx context.Context) ([]api.Pool, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.call("Pools")
	return sorted(b.pools), nil
}

// SetPool implements api.Backend.
func (b *Backend) SetPool(ctx context.Context, name string, req api.PoolRequest) (api.Pool, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.call("SetPool")
	if _, ok := b.templates[req.Template]; !ok {
		return api.Pool{}, &vm.FieldError{Field: "template", Value: req.Template, Reason: "no such template"}
	}
	p := b.pools[name]
	p.Name, p.Template, p.Min, p.Max, p.MaxAge, p.Adaptive = name, req.Template, req.Min, req.Max, req.MaxAge, req.Adaptive
	p.Target, p.Allowed = req.Min, -1
	p.Generation = b.templates[req.Template].Generation
	b.pools[name] = p
	b.mutations++
	return p, nil
}

// DeletePool implements api.Backend.
func (b *Backend) DeletePool(ctx context.Context, name string) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.call("DeletePool")
	if _, ok := b.pools[name]; !ok {
		return fmt.Errorf("pool %s: %w", name, vm.ErrNotFound)
	}
	delete(b.pools, name)
	b.mutations++
	return nil
}

// Acquire implements api.Backend.
func (b *Backend) Acquire(ctx context.Context, pool string, req api.AcquireRequest) (api.Lease, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.call("Acquire")
	p, ok := b.pools[pool]
	if !ok {
		return api.Lease{}, fmt.Errorf("pool %s: %w", pool, vm.ErrNotFound)
	}
	if p.Ready == 0 {
		p.Counters.Timeouts++
		b.pools[pool] = p
		return api.Lease{}, fmt.Errorf("acquire from pool %s within %s: %w", pool, req.Wait, api.ErrNothingReady)
	}
	p.Ready--
	p.Leased++
	p.Counters.Acquired++
	p.Counters.Hits++
	b.pools[pool] = p
	now := b.Now()
	l := api.Lease{ID: b.id("lease"), Pool: pool, VMID: b.id("vm"), Owner: req.Owner, CreatedAt: now,
		Timings: api.Timings{HandoffMS: 3, TotalMS: 4}, Labels: req.Labels}
	if req.TTL > 0 {
		exp := now.Add(req.TTL.Std())
		l.ExpiresAt = &exp
	}
	b.leases[l.ID] = l
	if len(req.Env) > 0 {
		if b.leaseEnv == nil {
			b.leaseEnv = map[string][]string{}
		}
		b.leaseEnv[l.ID] = req.Env
	}
	b.mutations++
	return l, nil
}

// Release implements api.Backend.
func (b *Backend) Release(ctx context.Context, leaseID string) error {
	b.mu.Lock()
	b.call("Release")
	if l, ok := b.leases[leaseID]; ok {
		delete(b.leases, leaseID)
		delete(b.leaseEnv, leaseID)
		if p, ok := b.pools[l.Pool]; ok {
			p.Leased--
			b.pools[l.Pool] = p
		}
		b.mutations++
	}
	s := b.guests["lease/"+leaseID]
	delete(b.guests, "lease/"+leaseID)
	b.mu.Unlock()
	if s != nil {
		// As the VM's end would: what ran in it ends too.
		killAll(ctx, s)
	}
	return nil
}

// Leases implements api.Backend.
func (b *Backend) Leases(ctx context.Context) ([]api.Lease, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.call("Leases")
	return sorted(b.leases), nil
}

// SetLeaseTTL implements api.Backend.
func (b *Backend) SetLeaseTTL(ctx context.Context, leaseID string, req api.LeaseTTLRequest) (api.Lease, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.call("SetLeaseTTL")
	l, ok := b.leases[leaseID]
	if !ok {
		return api.Lease{}, fmt.Errorf("lease %s: %w", leaseID, vm.ErrNotFound)
	}
	l.ExpiresAt = nil
	if req.TTL > 0 {
		exp := b.Now().Add(req.TTL.Std())
		l.ExpiresAt = &exp
	}
	b.leases[leaseID] = l
	b.mutations++
	return l, nil
}

// Exec implements api.Backend.
func (b *Backend) Exec(ctx context.Context, leaseID string, req api.ExecRequest, stdout, stderr io.Writer) (int, error) {
	b.mu.Lock()
	b.call("Exec")
	_, ok := b.leases[leaseID]
	b.mu.Unlock()
	if !ok {
		return -1, fmt.Errorf("lease %s: %w", leaseID, vm.ErrNotFound)
	}
	switch req.Argv[0] {
	case "echo":
		_, err := io.WriteString(stdout, strings.Join(req.Argv[1:], " ")+"\n")
		return 0, err
	case "fail":
		_, err := io.WriteString(stderr, "failing as asked\n")
		return 1, err
	case "vanish":
		// Output, then the VM goes away mid-command.
		if _, err := io.WriteString(stdout, "partial\n"); err != nil {
			return -1, err
		}
		return -1, fmt.Errorf("lease %s: agent connection lost: %w", leaseID, vm.ErrInvalidState)
	case "exit":
		if len(req.Argv) < 2 {
			return 0, nil
		}
		code, err := strconv.Atoi(req.Argv[1])
		if err != nil {
			return -1, &vm.FieldError{Field: "argv", Value: req.Argv[1], Reason: "exit code must be a number"}
		}
		return code, nil
	}
	return 127, nil
}

// Machines implements api.Backend.
func (b *Backend) Machines(ctx context.Context) ([]api.Machine, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.call("Machines")
	return sorted(b.machines), nil
}

// PutMachine implements api.Backend.
func (b *Backend) PutMachine(ctx context.Context, name string, req api.MachineRequest) (api.Machine, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.call("PutMachine")
	m, ok := b.machines[name]
	if !ok {
		m = api.Machine{Name: name, State: api.MachineNotExist, Since: b.Now()}
	}
	m.Spec = req
	b.machines[name] = m
	b.mutations++
	return m, nil
}

// EnsureMachine implements api.Backend.
func (b *Backend) EnsureMachine(ctx context.Context, name string, req api.MachineEnsureRequest) (api.Machine, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.call("EnsureMachine")
	m, ok := b.machines[name]
	if !ok {
		// Like the daemon: a new machine starts from the default shape.
		m.Spec = api.MachineSpec{}.WithDefaults()
	}
	m.Name = name
	m.Spec = req.Merge(m.Spec)
	if err := m.Spec.Validate(); err != nil {
		return api.Machine{}, fmt.Errorf("ensure machine %s: %w", name, err)
	}
	if m.State != api.MachineRunning {
		m.State, m.Since = api.MachineRunning, b.Now()
		b.Bus.Publish(events.Event{Kind: "machine.state", Subject: name, Detail: map[string]any{"to": api.MachineRunning}})
	}
	m.VMID = "vm-" + name
	b.machines[name] = m
	b.mutations++
	return m, nil
}

// StopMachine implements api.Backend.
func (b *Backend) StopMachine(ctx context.Context, name string, force bool) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.call("StopMachine")
	m, ok := b.machines[name]
	if !ok {
		return fmt.Errorf("machine %s: %w", name, vm.ErrNotFound)
	}
	m.State, m.Since = api.MachineStopped, b.Now()
	b.machines[name] = m
	b.mutations++
	return nil
}

// HoldMachine implements api.Backend.
func (b *Backend) HoldMachine(ctx context.Context, name string, req api.HoldRequest) (api.Hold, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.call("HoldMachine")
	m, ok := b.machines[name]
	if !ok {
		return api.Hold{}, fmt.Errorf("machine %s: %w", name, vm.ErrNotFound)
	}
	h := api.Hold{ID: b.id("hold"), Machine: name, Owner: req.Owner, CreatedAt: b.Now()}
	if req.TTL > 0 {
		exp := h.CreatedAt.Add(req.TTL.Std())
		h.ExpiresAt = &exp
	}
	b.holds[h.ID] = h
	m.Holds++
	b.machines[name] = m
	b.mutations++
	return h, nil
}

// ReleaseHold implements api.Backend.
func (b *Backend) ReleaseHold(ctx context.Context, name, holdID string) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.call("ReleaseHold")
	h, ok := b.holds[holdID]
	if !ok || h.Machine != name {
		return nil
	}
	delete(b.holds, holdID)
	if m, ok := b.machines[name]; ok {
		m.Holds--
		b.machines[name] = m
	}
	b.mutations++
	return nil
}

// Subscribe implements api.Backend.
func (b *Backend) Subscribe(filter func(events.Event) bool) *events.Subscription {
	return b.Bus.Subscribe(64, filter)
}

// Status implements api.Backend.
func (b *Backend) Status(ctx context.Context) (api.Status, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.call("Status")
	return api.Status{Version: "test", Provider: "fake", Capabilities: []string{"snapshot"}, StateDir: "/nonexistent",
		StartedAt: b.Now(), Templates: len(b.templates), Pools: len(b.pools), Leases: len(b.leases),
		Machines: len(b.machines), VMs: len(b.leases) + len(b.machines)}, nil
}
