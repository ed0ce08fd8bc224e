package lifecycle

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/warmpool/warmpool/events"
	"github.com/warmpool/warmpool/vm"
)

// testProvider is a small in-memory provider with a guest "memory" that
// survives snapshots, and hooks to make steps fail or hang.
type testProvider struct {
	mu          sync.Mutex
	caps        vm.Capabilities
	vms         map[string]*testVM
	seq         int
	creates     int
	createErrs  []error       // popped by each Create
	createGate  chan struct{} // when set, Create waits for it to close
	stops       []time.Duration
	destroys    []string
	balloonSets []int
	snapshots   int
	suspends    int
	restores    int
	spent       map[string]bool // suspended VMs, which never run again
	restored    map[string]bool // single-use snapshot dirs already restored
}

type testVM struct {
	v         vm.VM
	agentDead bool
	balloon   int
	memory    map[string]string
}

func newTestProvider() *testProvider {
	return &testProvider{
		caps: vm.Capabilities{vm.CapSnapshot: true, vm.CapBalloon: true, vm.CapDataDisk: true, vm.CapAdopt: true},
		vms:  map[string]*testVM{},
	}
}

func (p *testProvider) Name() string                  { return "test" }
func (p *testProvider) Capabilities() vm.Capabilities { return p.caps }
func (p *testProvider) Info(context.Context) vm.Info  { return vm.Info{Name: p.Name()} }

func (p *testProvider) Create(ctx context.Context, spec vm.Spec) (vm.VM, error) {
	p.mu.Lock()
	gate := p.createGate
	p.mu.Unlock()
	if gate != nil {
		select {
		case <-gate:
		case <-ctx.Done():
			return vm.VM{}, ctx.Err()
		}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.creates++
	if len(p.createErrs) > 0 {
		err := p.createErrs[0]
		p.createErrs = p.createErrs[1:]
		if err != nil {
			return vm.VM{}, err
		}
	}
	if spec.DataDisk != "" {
		if _, err := os.Stat(spec.DataDisk); err != nil {
			return vm.VM{}, fmt.Errorf("attach data disk: %w", err)
		}
	}
	return p.addLocked(spec, vm.StatusRunning, map[string]string{}), nil
}

func (p *testProvider) addLocked(spec vm.Spec, st vm.Status, mem map[string]string) vm.VM {
	p.seq++
	v := vm.VM{ID: fmt.Sprintf("vm-%d", p.seq), Provider: "test", Spec: spec, Status: st, PID: 1000 + p.seq, CreatedAt: time.Now()}
	p.vms[v.ID] = &testVM{v: v, balloon: spec.MemoryMiB, memory: mem}
	return v
}

func (p *testProvider) get(id string) (*testVM, error) {
	tv, ok := p.vms[id]
	if !ok {
		return nil, fmt.Errorf("vm %s: %w", id, vm.ErrNotFound)
	}
	return tv, nil
}

func (p *testProvider) setStatus(id string, st vm.Status) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	tv, err := p.get(id)
	if err != nil {
		return err
	}
	tv.v.Status = st
	return nil
}

func (p *testProvider) Pause(_ context.Context, id string) error {
	return p.setStatus(id, vm.StatusPaused)
}
func (p *testProvider) Resume(_ context.Context, id string) error {
	p.mu.Lock()
	spent := p.spent[id]
	p.mu.Unlock()
	if spent {
		return fmt.Errorf("resume suspended vm %s: %w", id, vm.ErrInvalidState)
	}
	return p.setStatus(id, vm.StatusRunning)
}

func (p *testProvider) Stop(_ context.Context, id string, grace time.Duration) error {
	p.mu.Lock()
	p.stops = append(p.stops, grace)
	p.mu.Unlock()
	return p.setStatus(id, vm.StatusStopped)
}

func (p *testProvider) Destroy(_ context.Context, id string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if _, err := p.get(id); err != nil {
		return err
	}
	delete(p.vms, id)
	p.destroys = append(p.destroys, id)
	return nil
}

func (p *testProvider) Inspect(_ context.Context, id string) (vm.VM, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	tv, err := p.get(id)
	if err != nil {
		return vm.VM{}, err
	}
	return tv.v, nil
}

func (p *testProvider) List(context.Context) ([]vm.VM, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []vm.VM
	for _, tv := range p.vms {
		out = append(out, tv.v)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out, nil
}

type snapFile struct {
	Spec   vm.Spec           `json:"spec"`
	Memory map[string]string `json:"memory"`
	// Source is the suspended VM of a single-use snapshot.
	Source string `json:"source,omitempty"`
}

// Snapshot refuses data disks, as real providers do (clones would share
// the disk).
func (p *testProvider) Snapshot(_ context.Context, id, dir string) (vm.Snapshot, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if tv, ok := p.vms[id]; ok && tv.v.Spec.DataDisk != "" {
		return vm.Snapshot{}, fmt.Errorf("snapshot of a vm with a data disk: %w", vm.ErrUnsupported)
	}
	snap, err := p.saveLocked(id, dir, false)
	if err == nil {
		p.snapshots++
	}
	return snap, err
}

// Suspend is offered only when the test grants vm.CapSuspend.
func (p *testProvider) Suspend(_ context.Context, id, dir string) (vm.Snapshot, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.caps.Has(vm.CapSuspend) {
		return vm.Snapshot{}, fmt.Errorf("suspend: %w", vm.ErrUnsupported)
	}
	snap, err := p.saveLocked(id, dir, true)
	if err == nil {
		p.suspends++
		if p.spent == nil {
			p.spent = map[string]bool{}
		}
		p.spent[id] = true
	}
	return snap, err
}

func (p *testProvider) saveLocked(id, dir string, singleUse bool) (vm.Snapshot, error) {
	tv, err := p.get(id)
	if err != nil {
		return vm.Snapshot{}, err
	}
	if tv.v.Status != vm.StatusPaused || p.spent[id] {
		return vm.Snapshot{}, fmt.Errorf("snapshot of %s vm: %w", tv.v.Status, vm.ErrInvalidState)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return vm.Snapshot{}, err
	}
	sf := snapFile{Spec: tv.v.Spec, Memory: tv.memory}
	if singleUse {
		sf.Source = id
	}
	b, _ := json.Marshal(sf)
	if err := os.WriteFile(filepath.Join(dir, "state.json"), b, 0o600); err != nil {
		return vm.Snapshot{}, err
	}
	return vm.Snapshot{ID: "snap-" + id, Provider: "test", Dir: dir, Spec: tv.v.Spec, CreatedAt: time.Now(), SingleUse: singleUse}, nil
}

func (p *testProvider) Restore(_ context.Context, snap vm.Snapshot) (vm.VM, error) {
	b, err := os.ReadFile(filepath.Join(snap.Dir, "state.json"))
	if err != nil {
		return vm.VM{}, fmt.Errorf("read snapshot: %w", err)
	}
	var sf snapFile
	if err := json.Unmarshal(b, &sf); err != nil {
		return vm.VM{}, err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if sf.Source != "" {
		if tv, ok := p.vms[sf.Source]; ok && tv.v.Status != vm.StatusStopped {
			return vm.VM{}, fmt.Errorf("restore while suspended vm %s exists: %w", sf.Source, vm.ErrInvalidState)
		}
		if p.restored[snap.Dir] {
			return vm.VM{}, fmt.Errorf("single-use snapshot %s restored twice: %w", snap.Dir, vm.ErrInvalidState)
		}
		if p.restored == nil {
			p.restored = map[string]bool{}
		}
		p.restored[snap.Dir] = true
	}
	p.restores++
	return p.addLocked(sf.Spec, vm.StatusPaused, sf.Memory), nil
}

func (p *testProvider) SetBalloon(_ context.Context, id string, target int) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	tv, err := p.get(id)
	if err != nil {
		return err
	}
	tv.balloon = target
	p.balloonSets = append(p.balloonSets, target)
	return nil
}

func (p *testProvider) BalloonStats(_ context.Context, id string) (vm.BalloonStats, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	tv, err := p.get(id)
	if err != nil {
		return vm.BalloonStats{}, err
	}
	return vm.BalloonStats{TargetMiB: tv.balloon, ActualMiB: tv.balloon}, nil
}

// ping is the agent: it answers while the VM runs and its agent is alive.
func (p *testProvider) ping(_ context.Context, v vm.VM) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	tv, err := p.get(v.ID)
	if err != nil {
		return err
	}
	if tv.v.Status != vm.StatusRunning || tv.agentDead {
		return errors.New("connection refused")
	}
	return nil
}

// kill makes the VM's process exit, as if it crashed.
func (p *testProvider) kill(id string) { _ = p.setStatus(id, vm.StatusStopped) }

// vanish removes the VM behind the manager's back.
func (p *testProvider) vanish(id string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.vms, id)
}

func (p *testProvider) setAgentDead(id string, dead bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if tv, ok := p.vms[id]; ok {
		tv.agentDead = dead
	}
}

func (p *testProvider) writeMemory(id, k, v string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.vms[id].memory[k] = v
}

func (p *testProvider) readMemory(id, k string) string {
	p.mu.Lock()
	defer p.mu.Unlock()
	if tv, ok := p.vms[id]; ok {
		return tv.memory[k]
	}
	return ""
}

func (p *testProvider) vm(id string) (vm.VM, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	tv, ok := p.vms[id]
	if !ok {
		return vm.VM{}, false
	}
	return tv.v, true
}

func (p *testProvider) counts() (creates, snapshots, restores int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.creates, p.snapshots + p.suspends, p.restores
}

// newFakeClock is a manual clock at a fixed instant.
func newFakeClock() *ManualClock {
	return NewManualClock(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
}

// harness is a manager on a testProvider and a fakeClock, with its events.
type harness struct {
	t     *testing.T
	p     *testProvider
	clock *ManualClock
	mgr   *Manager
	cfg   Config
	sub   *events.Subscription
	bus   *events.Bus

	// stepTimeout bounds each ensure, state wait and event wait, and the
	// manager's Close; zero means fakeStepTimeout. A real-VM harness sets
	// what a TCG boot on a loaded machine needs.
	stepTimeout time.Duration

	mu      sync.Mutex
	changes []Machine
}

// fakeStepTimeout bounds one harness step on fakes: plenty, since nothing
// waits for real time but the machine goroutines.
const fakeStepTimeout = 20 * time.Second

func (h *harness) step() time.Duration {
	if h.stepTimeout > 0 {
		return h.stepTimeout
	}
	return fakeStepTimeout
}

func newHarness(t *testing.T, tweak func(*Config)) *harness {
	t.Helper()
	h := &harness{t: t, p: newTestProvider(), clock: newFakeClock(), bus: events.NewBus()}
	h.sub = h.bus.Subscribe(4096, nil)
	dir := t.TempDir()
	h.cfg = Config{
		Provider:       h.p,
		StateDir:       dir,
		Ping:           h.p.ping,
		Events:         h.bus,
		Clock:          h.clock,
		StartTimeout:   10 * time.Second,
		PingTimeout:    5 * time.Second,
		StopTimeout:    10 * time.Second,
		HealthInterval: time.Minute,
		HealthFailures: 3,
		Backoff:        Backoff{Initial: time.Second, Max: 8 * time.Second, MaxAttempts: 5},
		Rand:           func() float64 { return 0.5 },
		OnChange: func(m Machine) {
			h.mu.Lock()
			h.changes = append(h.changes, m)
			h.mu.Unlock()
		},
	}
	if tweak != nil {
		tweak(&h.cfg)
	}
	h.newManager()
	t.Cleanup(h.bus.Close)
	return h
}

func (h *harness) newManager() {
	h.t.Helper()
	mgr, err := NewManager(h.cfg)
	if err != nil {
		h.t.Fatalf("NewManager: %v", err)
	}
	h.mgr = mgr
	h.t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), h.step())
		defer cancel()
		if err := mgr.Close(ctx); err != nil {
			h.t.Errorf("Close: %v", err)
		}
	})
}

func (h *harness) ensure(spec MachineSpec) Machine {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), max(h.step(), h.cfg.StartTimeout))
	defer cancel()
	m, err := h.mgr.Ensure(ctx, spec)
	if err != nil {
		h.t.Fatalf("Ensure(%s): %v", spec.Name, err)
	}
	if m.State != Running {
		h.t.Fatalf("Ensure(%s) returned state %s, want running", spec.Name, m.State)
	}
	return m
}

// waitState polls until the machine reaches want.
func (h *harness) waitState(name string, want State) Machine {
	h.t.Helper()
	var m Machine
	deadline := time.Now().Add(h.step())
	for time.Now().Before(deadline) {
		var err error
		m, err = h.mgr.Get(name)
		if err == nil && m.State == want {
			return m
		}
		time.Sleep(time.Millisecond)
	}
	h.t.Fatalf("machine %s is %s (last error %v), want %s", name, m.State, deref(m.LastError), want)
	return m
}

// waitEvent returns the next event of kind about subject (any when empty)
// that matches ok, skipping the others.
func (h *harness) waitEvent(subject, kind string, ok func(events.Event) bool) events.Event {
	h.t.Helper()
	timeout := time.After(h.step())
	for {
		select {
		case e := <-h.sub.C:
			if (subject == "" || e.Subject == subject) && e.Kind == kind && (ok == nil || ok(e)) {
				return e
			}
		case <-timeout:
			h.t.Fatalf("no %s event for %s", kind, subject)
			return events.Event{}
		}
	}
}

// drain returns every event published so far.
func (h *harness) drain() []events.Event {
	var out []events.Event
	for {
		select {
		case e := <-h.sub.C:
			out = append(out, e)
		default:
			return out
		}
	}
}

func deref(s *string) string {
	if s == nil {
		return "<nil>"
	}
	return *s
}

func baseSpec(name string) MachineSpec {
	return MachineSpec{Name: name, VCPUs: 1, MemoryMiB: 256, Kernel: "/img/vmlinuz", Initrd: "/img/initrd", KernelDigest: "sha256:aaa"}
}
