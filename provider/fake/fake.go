// Package fake is an in-memory vm.Provider for tests: VMs are records in a
// map, snapshots are a small JSON file, and every operation can be slowed
// down, made to fail or made to hang, so that callers can be tested against
// the failures real hypervisors produce. It is safe for concurrent use.
package fake

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/warmpool/warmpool/vm"
)

// Name is the provider name reported by Name and stamped on VMs and snapshots.
const Name = "fake"

// Op names one provider operation, for latency and fault injection.
type Op string

const (
	OpCreate       Op = "create"
	OpPause        Op = "pause"
	OpResume       Op = "resume"
	OpStop         Op = "stop"
	OpDestroy      Op = "destroy"
	OpInspect      Op = "inspect"
	OpList         Op = "list"
	OpSnapshot     Op = "snapshot"
	OpRestore      Op = "restore"
	OpSetBalloon   Op = "set-balloon"
	OpBalloonStats Op = "balloon-stats"
	OpDialAgent    Op = "dial-agent"
	OpSuspend      Op = "suspend"
)

// ErrInjected is what an injected fault returns unless Fault.Err says otherwise.
var ErrInjected = errors.New("injected fault")

// Fault makes calls of one operation fail or hang. Failing calls have no
// effect on the provider's state, like a hypervisor that refused the request.
type Fault struct {
	// FailNth fails the Nth call (counting from 1, over the provider's
	// lifetime) of the operation. Zero disables it.
	FailNth int
	// FailFraction fails each call with this probability, drawn from the
	// provider's seeded RNG so that a test is reproducible.
	FailFraction float64
	// Hang blocks every call until its context ends, then returns ctx.Err().
	Hang bool
	// Err is returned (wrapped) by failing calls; nil means ErrInjected.
	Err error
}

// Hook runs in every call after its latency, with the ID the call is about:
// the VM's (the new VM's for Create), the snapshot's for Restore, "" for
// List. A non-nil error fails the call. It lets a test fail or slow down one stack but not another.
type Hook func(ctx context.Context, op Op, target string) error

// Options configure a Provider. The zero value is a provider with no
// latency, no faults and no agent.
type Options struct {
	// CreateLatency and RestoreLatency are how long Create and Restore take.
	CreateLatency  time.Duration
	RestoreLatency time.Duration
	// Latency adds per-operation delays, overriding the two above.
	Latency map[Op]time.Duration
	// Faults injects failures per operation.
	Faults map[Op]Fault
	// Seed seeds the RNG behind Fault.FailFraction.
	Seed uint64
	// Hook, when set, runs at the start of every call.
	Hook Hook
	// AgentHandler serves the guest side of every connection DialAgent
	// returns. Nil means the provider has no agent channel: CapAgent is not
	// advertised and DialAgent returns an error wrapping vm.ErrUnsupported.
	AgentHandler func(net.Conn)
	// NoExitEvents hides CapExitEvents, as a provider that cannot tell
	// when a VM dies; OnExit then never reports anything.
	NoExitEvents bool
}

// Provider is the in-memory provider. Calls on different VMs share no lock
// (VMs are found through a sync.Map, settings through an atomic pointer), so
// that the fake never makes a pool benchmark measure the fake's own lock
// contention: a reader parked behind a restore's write lock costs tens of
// microseconds on a loaded machine.
type Provider struct {
	settingsMu sync.Mutex               // serialises Set* (copy on write)
	settings   atomic.Pointer[settings] // read on every call without a lock
	agent      func(net.Conn)
	rngMu      sync.Mutex
	rng        *rand.Rand
	calls      map[Op]*atomic.Int64 // fixed set of keys, written only in New

	seq       atomic.Uint64
	vms       sync.Map // VM ID -> *machine
	snapMu    sync.Mutex
	snapshots map[string]vm.Snapshot
	suspends  map[string]*suspendState // single-use snapshots by ID; made on first Suspend

	noExitEvents bool
	exits        vm.ExitFeed
}

// settings are the faults, latencies and hook in force; never modified once
// published.
type settings struct {
	latency map[Op]time.Duration
	faults  map[Op]Fault
	hook    Hook
}

type machine struct {
	mu      sync.Mutex
	vm      vm.VM
	gone    bool // destroyed while a call held a pointer to it
	balloon int
	conns   []net.Conn
	// suspendedTo is the single-use snapshot the VM was suspended to; such
	// a VM never runs again.
	suspendedTo string
}

var allOps = []Op{OpCreate, OpPause, OpResume, OpStop, OpDestroy, OpInspect, OpList, OpSnapshot, OpRestore, OpSetBalloon, OpBalloonStats, OpDialAgent, OpSuspend}

// ParseOp returns the operation called name ("resume", "set-balloon", ...).
func ParseOp(name string) (Op, error) {
	for _, op := range allOps {
		if string(op) == name {
			return op, nil
		}
	}
	names := make([]string, len(allOps))
	for i, op := range allOps {
		names[i] = string(op)
	}
	return "", &vm.FieldError{Field: "op", Value: name, Reason: "must be one of " + strings.Join(names, ", ")}
}

var (
	_ vm.Provider     = (*Provider)(nil)
	_ vm.Snapshotter  = (*Provider)(nil)
	_ vm.Ballooner    = (*Provider)(nil)
	_ vm.AgentDialer  = (*Provider)(nil)
	_ vm.ExitNotifier = (*Provider)(nil)
)

// New returns a provider configured by opts. opts' maps are copied.
func New(opts Options) *Provider {
	p := &Provider{
		agent:     opts.AgentHandler,
		rng:       rand.New(rand.NewPCG(opts.Seed, opts.Seed^0x9e3779b97f4a7c15)),
		calls:     make(map[Op]*atomic.Int64),
		snapshots: make(map[string]vm.Snapshot),

		noExitEvents: opts.NoExitEvents,
	}
	for _, op := range allOps {
		p.calls[op] = new(atomic.Int64)
	}
	s := &settings{latency: make(map[Op]time.Duration), faults: make(map[Op]Fault), hook: opts.Hook}
	// Restore and Create latencies become entries of the map unless
	// Latency overrides them.
	if opts.CreateLatency != 0 {
		s.latency[OpCreate] = opts.CreateLatency
	}
	if opts.RestoreLatency != 0 {
		s.latency[OpRestore] = opts.RestoreLatency
	}
	for op, d := range opts.Latency {
		s.latency[op] = d
	}
	for op, f := range opts.Faults {
		s.faults[op] = f
	}
	p.settings.Store(s)
	return p
}

// updateSettings publishes a modified copy of the settings.
func (p *Provider) updateSettings(change func(s *settings)) {
	p.settingsMu.Lock()
	defer p.settingsMu.Unlock()
	old := p.settings.Load()
	s := &settings{latency: make(map[Op]time.Duration, len(old.latency)), faults: make(map[Op]Fault, len(old.faults)), hook: old.hook}
	for op, d := range old.latency {
		s.latency[op] = d
	}
	for op, f := range old.faults {
		s.faults[op] = f
	}
	change(s)
	p.settings.Store(s)
}

// Name implements vm.Provider.
func (p *Provider) Name() string { return Name }

// Info implements vm.Provider. The fake boots no kernel, so callers need
// no guest image for it.
func (p *Provider) Info(context.Context) vm.Info { return vm.Info{Name: Name, NoGuestImage: true} }

// Capabilities implements vm.Provider.
func (p *Provider) Capabilities() vm.Capabilities {
	return vm.Capabilities{
		vm.CapSnapshot: true,
		vm.CapSuspend:  true,
		vm.CapBalloon:  true,
		vm.CapAgent:    p.agent != nil,

		vm.CapExitEvents: !p.noExitEvents,
	}
}

// SetFault replaces the fault injected into op; the zero Fault clears it.
func (p *Provider) SetFault(op Op, f Fault) {
	p.updateSettings(func(s *settings) { s.faults[op] = f })
}

// SetLatency replaces the delay of op.
func (p *Provider) SetLatency(op Op, d time.Duration) {
	p.updateSettings(func(s *settings) { s.latency[op] = d })
}

// SetHook replaces the hook; nil removes it.
func (p *Provider) SetHook(h Hook) {
	p.updateSettings(func(s *settings) { s.hook = h })
}

// Calls reports how many times op was called, failed calls included.
func (p *Provider) Calls(op Op) int {
	if c, ok := p.calls[op]; ok {
		return int(c.Load())
	}
	return 0
}

// Kill makes a VM die as if its hypervisor process crashed: it becomes
// stopped, its agent connections close, it stays listed until Destroy, and
// OnExit subscribers hear of it (unless Options.NoExitEvents).
func (p *Provider) Kill(id string) error {
	m := p.machine(id)
	if m == nil {
		return fmt.Errorf("kill %s: %w", id, vm.ErrNotFound)
	}
	m.mu.Lock()
	if m.gone {
		m.mu.Unlock()
		return fmt.Errorf("kill %s: %w", id, vm.ErrNotFound)
	}
	wasAlive := m.vm.Status != vm.StatusStopped
	m.vm.Status = vm.StatusStopped
	m.closeConns()
	m.mu.Unlock()
	if wasAlive && !p.noExitEvents {
		p.exits.Notify(vm.Exit{ID: id, At: time.Now(), Reason: "killed"})
	}
	return nil
}

// OnExit implements vm.ExitNotifier: Kill is the only exit the fake's
// caller does not ask for.
func (p *Provider) OnExit(fn func(vm.Exit)) (stop func()) { return p.exits.OnExit(fn) }

// Alive implements vm.ExitNotifier.
func (p *Provider) Alive(id string) bool {
	m := p.machine(id)
	if m == nil {
		return false
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return !m.gone && m.vm.Status != vm.StatusStopped
}

// loadSnapshot registers the snapshot.json that Snapshot wrote into
// snap.Dir, if it is snap's. Later IDs start above its number, so that no
// new snapshot takes its ID.
func (p *Provider) loadSnapshot(snap vm.Snapshot) (vm.Snapshot, bool) {
	if snap.Dir == "" {
		return vm.Snapshot{}, false
	}
	data, err := os.ReadFile(filepath.Join(snap.Dir, "snapshot.json"))
	if err != nil {
		return vm.Snapshot{}, false
	}
	var disk vm.Snapshot
	if json.Unmarshal(data, &disk) != nil || disk.ID != snap.ID || disk.Provider != Name {
		return vm.Snapshot{}, false
	}
	if n, err := strconv.ParseUint(strings.TrimPrefix(disk.ID, "fake-snap-"), 10, 64); err == nil {
		for {
			cur := p.seq.Load()
			if cur >= n || p.seq.CompareAndSwap(cur, n) {
				break
			}
		}
	}
	p.snapMu.Lock()
	defer p.snapMu.Unlock()
	p.snapshots[disk.ID] = disk
	return disk, true
}

// AddSnapshot records a snapshot of spec without booting anything, so tests
// can restore from it directly. The snapshot has no files.
func (p *Provider) AddSnapshot(spec vm.Spec) vm.Snapshot {
	snap := vm.Snapshot{
		ID:        "fake-snap-" + strconv.FormatUint(p.seq.Add(1), 10),
		Provider:  Name,
		Spec:      spec,
		CreatedAt: time.Now(),
	}
	p.snapMu.Lock()
	defer p.snapMu.Unlock()
	p.snapshots[snap.ID] = snap
	return snap
}

// begin counts the call and applies latency, hook and faults. It returns nil
// when the call may go ahead.
func (p *Provider) begin(ctx context.Context, op Op, target string) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("fake %s %s: %w", op, target, err)
	}
	n := int(p.calls[op].Add(1))
	s := p.settings.Load()
	f := s.faults[op]
	fail := f.FailNth == n
	if !fail && f.FailFraction > 0 {
		p.rngMu.Lock()
		fail = p.rng.Float64() < f.FailFraction
		p.rngMu.Unlock()
	}
	latency := s.latency[op]
	hook := s.hook

	if latency > 0 {
		t := time.NewTimer(latency)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("fake %s %s: %w", op, target, ctx.Err())
		}
	}
	if hook != nil {
		if err := hook(ctx, op, target); err != nil {
			return fmt.Errorf("fake %s %s: %w", op, target, err)
		}
	}
	if f.Hang {
		<-ctx.Done()
		return fmt.Errorf("fake %s %s: hung: %w", op, target, ctx.Err())
	}
	if fail {
		err := f.Err
		if err == nil {
			err = ErrInjected
		}
		return fmt.Errorf("fake %s %s (call %d): %w", op, target, n, err)
	}
	return nil
}

// placeholder lists a VM as creating while Create or Restore is in
// progress, as a real provider lists a hypervisor process that is starting.
func (p *Provider) placeholder(spec vm.Spec, snapshot string) string {
	id := "fake-" + strconv.FormatUint(p.seq.Add(1), 10)
	p.vms.Store(id, &machine{vm: vm.VM{
		ID:        id,
		Provider:  Name,
		Spec:      spec,
		Status:    vm.StatusCreating,
		Snapshot:  snapshot,
		CreatedAt: time.Now(),
	}, balloon: spec.MemoryMiB})
	return id
}

// finish moves a placeholder to status, or removes it when err is set.
func (p *Provider) finish(id string, status vm.Status, err error) (vm.VM, error) {
	m := p.machine(id)
	ok := m != nil
	if ok {
		m.mu.Lock()
		defer m.mu.Unlock()
		ok = !m.gone
	}
	if !ok {
		// Destroyed while starting: the caller must not get a VM that is gone.
		if err == nil {
			err = fmt.Errorf("%s destroyed while starting: %w", id, vm.ErrNotFound)
		}
		return vm.VM{}, err
	}
	if err != nil {
		m.gone = true
		p.vms.Delete(id)
		return vm.VM{}, err
	}
	m.vm.Status = status
	return m.vm, nil
}

// Create implements vm.Provider.
func (p *Provider) Create(ctx context.Context, spec vm.Spec) (vm.VM, error) {
	if err := spec.Validate(); err != nil {
		return vm.VM{}, fmt.Errorf("fake create: %w", err)
	}
	if err := ctx.Err(); err != nil {
		return vm.VM{}, fmt.Errorf("fake create: %w", err)
	}
	id := p.placeholder(spec, "")
	return p.finish(id, vm.StatusRunning, p.begin(ctx, OpCreate, id))
}

// Restore implements vm.Snapshotter. The new VM is paused.
func (p *Provider) Restore(ctx context.Context, snap vm.Snapshot) (vm.VM, error) {
	if snap.ID == "" {
		return vm.VM{}, fmt.Errorf("fake restore: %w", &vm.FieldError{Field: "snapshot", Value: snap.ID, Reason: "must not be empty"})
	}
	if err := ctx.Err(); err != nil {
		return vm.VM{}, fmt.Errorf("fake restore from %s: %w", snap.ID, err)
	}
	p.snapMu.Lock()
	known, ok := p.snapshots[snap.ID]
	p.snapMu.Unlock()
	if !ok {
		// A snapshot another Provider wrote (the daemon's previous run)
		// restores from its file, as a real hypervisor's would.
		known, ok = p.loadSnapshot(snap)
	}
	if !ok {
		return vm.VM{}, fmt.Errorf("fake restore from %s: snapshot %w", snap.ID, vm.ErrNotFound)
	}
	release, err := p.claimSuspended(snap.ID)
	if err != nil {
		return vm.VM{}, fmt.Errorf("fake restore from %s: %w", snap.ID, err)
	}
	id := p.placeholder(known.Spec, snap.ID)
	v, err := p.finish(id, vm.StatusPaused, p.begin(ctx, OpRestore, snap.ID))
	release(err == nil, id)
	return v, err
}

func (p *Provider) machine(id string) *machine {
	m, _ := p.vms.Load(id)
	mm, _ := m.(*machine)
	return mm
}

// transition applies change to a VM under the VM's own lock.
func (p *Provider) transition(ctx context.Context, op Op, id string, change func(m *machine) error) error {
	if err := p.begin(ctx, op, id); err != nil {
		return err
	}
	m := p.machine(id)
	if m == nil {
		return fmt.Errorf("fake %s %s: %w", op, id, vm.ErrNotFound)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.gone {
		return fmt.Errorf("fake %s %s: %w", op, id, vm.ErrNotFound)
	}
	if err := change(m); err != nil {
		return fmt.Errorf("fake %s %s: %w", op, id, err)
	}
	return nil
}

func invalidState(s vm.Status) error {
	return fmt.Errorf("VM is %s: %w", s, vm.ErrInvalidState)
}

// Pause implements vm.Provider.
func (p *Provider) Pause(ctx context.Context, id string) error {
	return p.transition(ctx, OpPause, id, func(m *machine) error {
		switch m.vm.Status {
		case vm.StatusRunning, vm.StatusPaused:
			m.vm.Status = vm.StatusPaused
			return nil
		}
		return invalidState(m.vm.Status)
	})
}

// Resume implements vm.Provider.
func (p *Provider) Resume(ctx context.Context, id string) error {
	return p.transition(ctx, OpResume, id, func(m *machine) error {
		if m.suspendedTo != "" {
			return fmt.Errorf("suspended to snapshot %s: %w", m.suspendedTo, vm.ErrInvalidState)
		}
		switch m.vm.Status {
		case vm.StatusRunning, vm.StatusPaused:
			m.vm.Status = vm.StatusRunning
			return nil
		}
		return invalidState(m.vm.Status)
	})
}

// Stop implements vm.Provider. The fake guest always powers off at once.
func (p *Provider) Stop(ctx context.Context, id string, grace time.Duration) error {
	return p.transition(ctx, OpStop, id, func(m *machine) error {
		if m.vm.Status == vm.StatusCreating {
			return invalidState(m.vm.Status)
		}
		m.vm.Status = vm.StatusStopped
		m.closeConns()
		return nil
	})
}

// Destroy implements vm.Provider.
func (p *Provider) Destroy(ctx context.Context, id string) error {
	if err := p.transition(ctx, OpDestroy, id, func(m *machine) error {
		m.closeConns()
		m.gone = true
		return nil
	}); err != nil {
		return err
	}
	p.vms.Delete(id)
	return nil
}

// Inspect implements vm.Provider.
func (p *Provider) Inspect(ctx context.Context, id string) (vm.VM, error) {
	var out vm.VM
	err := p.transition(ctx, OpInspect, id, func(m *machine) error {
		out = m.vm
		return nil
	})
	return out, err
}

// List implements vm.Provider, oldest VM first.
func (p *Provider) List(ctx context.Context) ([]vm.VM, error) {
	if err := p.begin(ctx, OpList, ""); err != nil {
		return nil, err
	}
	var machines []*machine
	p.vms.Range(func(_, m any) bool {
		machines = append(machines, m.(*machine))
		return true
	})
	out := make([]vm.VM, 0, len(machines))
	for _, m := range machines {
		m.mu.Lock()
		if !m.gone {
			out = append(out, m.vm)
		}
		m.mu.Unlock()
	}
	sort.Slice(out, func(i, j int) bool {
		if !out[i].CreatedAt.Equal(out[j].CreatedAt) {
			return out[i].CreatedAt.Before(out[j].CreatedAt)
		}
		return out[i].ID < out[j].ID
	})
	return out, nil
}

// Snapshot implements vm.Snapshotter: it writes snapshot.json into dir.
func (p *Provider) Snapshot(ctx context.Context, id string, dir string) (vm.Snapshot, error) {
	if dir == "" {
		return vm.Snapshot{}, fmt.Errorf("fake snapshot %s: %w", id, &vm.FieldError{Field: "dir", Value: dir, Reason: "must not be empty"})
	}
	var spec vm.Spec
	err := p.transition(ctx, OpSnapshot, id, func(m *machine) error {
		if m.vm.Status != vm.StatusPaused {
			return invalidState(m.vm.Status)
		}
		spec = m.vm.Spec
		return nil
	})
	if err != nil {
		return vm.Snapshot{}, err
	}
	snap := vm.Snapshot{
		ID:        "fake-snap-" + strconv.FormatUint(p.seq.Add(1), 10),
		Provider:  Name,
		Dir:       dir,
		Spec:      spec,
		CreatedAt: time.Now(),
	}
	data, err := json.MarshalIndent(snap, "", "  ")
	if err != nil {
		return vm.Snapshot{}, fmt.Errorf("fake snapshot %s: %w", id, err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return vm.Snapshot{}, fmt.Errorf("fake snapshot %s: %w", id, err)
	}
	if err := os.WriteFile(filepath.Join(dir, "snapshot.json"), data, 0o644); err != nil {
		return vm.Snapshot{}, fmt.Errorf("fake snapshot %s: %w", id, err)
	}
	p.snapMu.Lock()
	p.snapshots[snap.ID] = snap
	p.snapMu.Unlock()
	return snap, nil
}

// errNoBalloon answers balloon calls on VMs created with Spec.NoBalloon and
// their clones, as a real provider without the device does.
var errNoBalloon = fmt.Errorf("VM has no balloon device (Spec.NoBalloon): %w", vm.ErrUnsupported)

// SetBalloon implements vm.Ballooner. The fake guest gives memory back at once.
func (p *Provider) SetBalloon(ctx context.Context, id string, targetMiB int) error {
	return p.transition(ctx, OpSetBalloon, id, func(m *machine) error {
		if m.vm.Spec.NoBalloon {
			return errNoBalloon
		}
		if err := vm.ValidateRange("target_mib", targetMiB, 1, m.vm.Spec.MemoryMiB); err != nil {
			return err
		}
		if m.vm.Status != vm.StatusRunning && m.vm.Status != vm.StatusPaused {
			return invalidState(m.vm.Status)
		}
		m.balloon = targetMiB
		return nil
	})
}

// BalloonStats implements vm.Ballooner.
func (p *Provider) BalloonStats(ctx context.Context, id string) (vm.BalloonStats, error) {
	var st vm.BalloonStats
	err := p.transition(ctx, OpBalloonStats, id, func(m *machine) error {
		if m.vm.Spec.NoBalloon {
			return errNoBalloon
		}
		if m.vm.Status != vm.StatusRunning && m.vm.Status != vm.StatusPaused {
			return invalidState(m.vm.Status)
		}
		st = vm.BalloonStats{
			TargetMiB:    m.balloon,
			ActualMiB:    m.balloon,
			TotalMiB:     m.balloon,
			FreeMiB:      m.balloon / 2,
			AvailableMiB: m.balloon / 2,
		}
		return nil
	})
	return st, err
}

// DialAgent implements vm.AgentDialer over net.Pipe: the other end is served
// by Options.AgentHandler in its own goroutine and is closed when the VM
// stops, dies or is destroyed.
func (p *Provider) DialAgent(ctx context.Context, id string) (net.Conn, error) {
	if p.agent == nil {
		return nil, fmt.Errorf("fake dial agent %s: no agent handler configured: %w", id, vm.ErrUnsupported)
	}
	var host net.Conn
	err := p.transition(ctx, OpDialAgent, id, func(m *machine) error {
		if m.vm.Status != vm.StatusRunning {
			return invalidState(m.vm.Status)
		}
		var guest net.Conn
		host, guest = net.Pipe()
		m.conns = append(m.conns, guest)
		go p.agent(agentConn{Conn: guest, vmID: id})
		return nil
	})
	if err != nil {
		return nil, err
	}
	return host, nil
}

// agentConn tells the agent handler which VM the connection belongs to, so a
// handler can act on that VM (power it off, say) the way a real guest would.
type agentConn struct {
	net.Conn
	vmID string
}

// AgentConnVM returns the ID of the VM whose agent connection c is, for
// connections passed to Options.AgentHandler.
func AgentConnVM(c net.Conn) (string, bool) {
	ac, ok := c.(agentConn)
	return ac.vmID, ok
}

func (m *machine) closeConns() {
	for _, c := range m.conns {
		_ = c.Close()
	}
	m.conns = nil
}
