// Package lifecycle keeps named long-lived machines in the state their callers
// asked for. Callers say "ensure it is ready" (or stop it, or hold it); one
// goroutine per machine creates, starts, health-watches, recovers, idles,
// suspends and stops its VM, and reports every step as an event.
//
// Each machine's goroutine never blocks on a VM: slow steps (boot, stop,
// snapshot) run as operations in their own goroutine and report back, so a
// forced stop, a Get or an Ensure on a running machine is answered at once
// even while a graceful stop hangs.
//
// Events (subject = machine name):
//
//	machine.state            every transition: from, to, event, reason, vm_id
//	machine.drift            fields: the spec fields that force a recreate
//	machine.failed           error, attempt (a start failed or the VM broke)
//	machine.recovering       attempt, delay_ms, delay, counted (false for a vanished VM)
//	machine.recovered        vm_id, attempts
//	machine.gave_up          attempts, error
//	machine.vanished         vm_id (the provider lost the VM during start)
//	machine.ping_failed      error, failures (below HealthFailures)
//	machine.health_failed    error, failures, process_gone, vanished
//	machine.crashed          vm_id, reason, exited_at (the provider reported the VM's exit; recovery starts at once)
//	machine.idle             balloon_mib, guest_used_mib, reserve_mib
//	machine.idle_failed      step (shrink|suspend), error
//	machine.idle_policy      shrink_after, suspend_after, reserve_mib, default (changed by SetIdle or Ensure)
//	machine.woke             memory_mib          machine.wake_failed  error
//	machine.suspended        vm_id, snapshot_dir machine.resumed      vm_id
//	machine.snapshot_discarded error (resume failed; the next start is cold)
//	machine.stop_requested   force               machine.stop_forced  reason
//	machine.hold / machine.unhold / machine.hold_expired   hold, owner, holds
//	machine.restored         state, recorded_state, vm_id, reason
//
// Providers: Inspect must report StatusStopped (or ErrNotFound) once a guest
// powered itself off, or graceful stops wait for StopTimeout and force. A
// provider with vm.CapExitEvents reports a VM's exit as it happens: a
// running machine whose VM exits crashes and recovers at once, and Ensure
// asks its Alive before answering from a running machine. Without it, the
// health loop notices a dead VM at its next ping.
package lifecycle

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/warmpool/warmpool/vm"
)

// Machine is a snapshot of one machine as callers see it. Its JSON shape is
// part of the external contract: fields may be added, none renamed.
type Machine struct {
	Name  string      `json:"name"`
	State State       `json:"state"`
	Spec  MachineSpec `json:"spec"`
	// Desired is what callers last asked for: "running" or "stopped". A
	// restarted daemon uses it, not State, to decide what to do.
	Desired    Desired   `json:"desired"`
	VMID       string    `json:"vm_id,omitempty"`
	Since      time.Time `json:"since"`
	LastError  *string   `json:"last_error"`
	Holds      []Hold    `json:"holds"`
	BalloonMiB *int      `json:"balloon_mib"`
	// Attempts counts failed start attempts in a row; 0 when healthy.
	Attempts     int       `json:"attempts"`
	LastActivity time.Time `json:"last_activity"`
	// Snapshot is where a suspended machine's memory is.
	Snapshot *vm.Snapshot `json:"snapshot,omitempty"`
}

// Desired is the caller's intent for a machine.
type Desired string

const (
	DesiredRunning Desired = "running"
	DesiredStopped Desired = "stopped"
)

// Record is what the daemon persists (the Machine given to OnChange) and
// hands back to Restore after a restart.
type Record = Machine

// Hold is a lease that keeps a machine from idling. A machine idles only when
// it has no holds at all.
type Hold struct {
	ID        string     `json:"id"`
	Owner     string     `json:"owner"`
	CreatedAt time.Time  `json:"created_at"`
	ExpiresAt *time.Time `json:"expires_at"`
}

const maxOwnerLen = 256

// Manager owns every machine.
type Manager struct {
	cfg    Config
	ctx    context.Context // cancelled by Close: aborts in-flight operations
	cancel context.CancelFunc
	wg     sync.WaitGroup

	// exits is the provider's exit feed when it has one (CapExitEvents):
	// a crashed VM is known when it happens, not at the next ping.
	exits     vm.ExitNotifier
	stopExits func()

	mu       sync.Mutex
	machines map[string]*machine
	closed   bool
}

// NewManager checks cfg, fills in defaults and returns a manager with no
// machines. Call Restore to take over machines of an earlier run.
func NewManager(cfg Config) (*Manager, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, fmt.Errorf("machine manager config: %w", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	m := &Manager{cfg: cfg, ctx: ctx, cancel: cancel, machines: map[string]*machine{}}
	if n, ok := vm.As[vm.ExitNotifier](cfg.Provider, vm.CapExitEvents); ok {
		m.exits = n
		m.stopExits = n.OnExit(m.vmExited)
	}
	return m, nil
}

// vmExited hands a VM's exit to the machine whose VM it is, if any (most
// exits are of pool VMs).
func (m *Manager) vmExited(e vm.Exit) {
	m.mu.Lock()
	var owner *machine
	for _, mc := range m.machines {
		if mc.current().VMID == e.ID {
			owner = mc
			break
		}
	}
	m.mu.Unlock()
	if owner == nil {
		return
	}
	select {
	case owner.cmds <- command{kind: cmdExited, exit: e}:
	case <-owner.exited:
	}
}

// vmAlive says, without waiting, whether the VM's process still runs, as
// far as the provider can tell cheaply; true when it cannot.
func (m *Manager) vmAlive(id string) bool {
	return m.exits == nil || m.exits.Alive(id)
}

// Ensure makes the machine exist, run and match spec, and returns once its
// guest agent answers. It creates a missing machine, restarts a stopped or
// failed one, wakes an idle one, restores a suspended one and recreates one
// whose spec drifted. Concurrent calls share the same work. If ctx ends
// first, Ensure returns its error but the machine keeps coming up.
func (m *Manager) Ensure(ctx context.Context, spec MachineSpec) (Machine, error) {
	if err := spec.Validate(); err != nil {
		return Machine{}, fmt.Errorf("ensure machine: %w", err)
	}
	if spec.Idle != nil {
		p := *spec.Idle // the caller's struct must not change the machine later
		spec.Idle = &p
	}
	if spec.DataDiskMiB > 0 && !m.cfg.Provider.Capabilities().Has(vm.CapDataDisk) {
		return Machine{}, fmt.Errorf("ensure machine %s: data_disk_mib: provider %s has no data disks: %w",
			spec.Name, m.cfg.Provider.Name(), vm.ErrUnsupported)
	}
	if err := checkDataDiskNotShrunk(m.cfg.StateDir, spec); err != nil {
		return Machine{}, wrapName("ensure", spec.Name, err)
	}
	mc, err := m.machine(spec.Name, &spec)
	if err != nil {
		return Machine{}, wrapName("ensure", spec.Name, err)
	}
	r, err := mc.call(ctx, command{kind: cmdEnsure, spec: spec})
	if err != nil {
		return r.machine, wrapName("ensure", spec.Name, err)
	}
	return r.machine, nil
}

// Stop powers the machine off: gracefully (agent shutdown, else the
// provider's ACPI stop) within Config.StopTimeout, then by force. With force
// it skips the graceful step and overtakes a graceful stop in progress. Once
// powered off the VM is destroyed (the next Ensure boots a new one), so a
// stopped machine holds no VM, no process and no memory. The data disk
// stays; a suspended machine's snapshot is discarded.
func (m *Manager) Stop(ctx context.Context, name string, force bool) error {
	mc, err := m.machine(name, nil)
	if err != nil {
		return wrapName("stop", name, err)
	}
	if _, err := mc.call(ctx, command{kind: cmdStop, force: force}); err != nil {
		return wrapName("stop", name, err)
	}
	return nil
}

// Hold adds a lease on the machine for owner; ttl 0 means until Unhold.
// Holding counts as activity and wakes an idle machine, but does not start a
// stopped or suspended one (that is Ensure's job).
func (m *Manager) Hold(ctx context.Context, name, owner string, ttl time.Duration) (Hold, error) {
	if ttl < 0 {
		return Hold{}, wrapName("hold", name, &vm.FieldError{Field: "ttl", Value: ttl, Reason: "must not be negative"})
	}
	if len(owner) > maxOwnerLen {
		return Hold{}, wrapName("hold", name, &vm.FieldError{Field: "owner", Value: owner[:32] + "...", Reason: "longer than 256 bytes"})
	}
	mc, err := m.machine(name, nil)
	if err != nil {
		return Hold{}, wrapName("hold", name, err)
	}
	r, err := mc.call(ctx, command{kind: cmdHold, owner: owner, ttl: ttl})
	if err != nil {
		return Hold{}, wrapName("hold", name, err)
	}
	return r.hold, nil
}

// Unhold releases one hold. Releasing the last hold starts the idle clock.
func (m *Manager) Unhold(name, holdID string) error {
	mc, err := m.machine(name, nil)
	if err != nil {
		return wrapName("unhold", name, err)
	}
	if _, err := mc.call(context.Background(), command{kind: cmdUnhold, holdID: holdID}); err != nil {
		return fmt.Errorf("unhold %s of machine %s: %w", holdID, name, err)
	}
	return nil
}

// SetIdle replaces the machine's idle policy (nil: the manager's
// Config.Idle) without an Ensure: the machine is neither started nor
// recreated, only its idle steps are rescheduled. It counts as activity.
// The next Ensure's spec carries its own policy and replaces this one.
func (m *Manager) SetIdle(ctx context.Context, name string, p *IdlePolicy) (Machine, error) {
	if p != nil {
		if err := p.validate(); err != nil {
			return Machine{}, wrapName("set idle policy of", name, err)
		}
		c := *p
		p = &c
	}
	mc, err := m.machine(name, nil)
	if err != nil {
		return Machine{}, wrapName("set idle policy of", name, err)
	}
	r, err := mc.call(ctx, command{kind: cmdSetIdle, idle: p})
	if err != nil {
		return r.machine, wrapName("set idle policy of", name, err)
	}
	return r.machine, nil
}

// Touch records activity on the machine (any API call about it counts) and
// wakes it if idle. Unknown names are ignored.
func (m *Manager) Touch(name string) {
	mc, err := m.machine(name, nil)
	if err != nil {
		return
	}
	select {
	case mc.cmds <- command{kind: cmdTouch}:
	case <-mc.exited:
	}
}

// Get returns the machine's current view without waiting for its goroutine.
func (m *Manager) Get(name string) (Machine, error) {
	mc, err := m.machine(name, nil)
	if err != nil {
		return Machine{}, wrapName("get", name, err)
	}
	return mc.current(), nil
}

// List returns every machine, sorted by name.
func (m *Manager) List() []Machine {
	m.mu.Lock()
	all := make([]*machine, 0, len(m.machines))
	for _, mc := range m.machines {
		all = append(all, mc)
	}
	m.mu.Unlock()
	out := make([]Machine, 0, len(all))
	for _, mc := range all {
		out = append(out, mc.current())
	}
	slices.SortFunc(out, func(a, b Machine) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// Close stops every machine goroutine and aborts operations in flight. VMs
// keep running; a new Manager can Restore them.
func (m *Manager) Close(ctx context.Context) error {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return nil
	}
	m.closed = true
	if m.stopExits != nil {
		m.stopExits()
	}
	all := make([]*machine, 0, len(m.machines))
	for _, mc := range m.machines {
		all = append(all, mc)
	}
	m.mu.Unlock()
	m.cancel()
	for _, mc := range all {
		close(mc.quit)
	}
	done := make(chan struct{})
	go func() { m.wg.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("close machine manager: %w", ctx.Err())
	}
}

// machine returns the named machine. With a spec, a missing machine is
// added in NotExist and starts coming up at once.
func (m *Manager) machine(name string, spec *MachineSpec) (*machine, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil, ErrClosed
	}
	if mc, ok := m.machines[name]; ok {
		return mc, nil
	}
	if spec == nil {
		return nil, vm.ErrNotFound
	}
	mc := newMachine(m, name, initial{state: NotExist, want: DesiredRunning, spec: *spec})
	m.machines[name] = mc
	m.start(mc)
	return mc, nil
}

func (m *Manager) start(mc *machine) {
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		mc.run()
	}()
}

func newHoldID() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return "h-" + hex.EncodeToString(b[:])
}

// checkDataDiskNotShrunk refuses a spec whose data disk is smaller than the
// existing file: shrinking would cut off data, and data is never lost.
func checkDataDiskNotShrunk(stateDir string, spec MachineSpec) error {
	if spec.DataDiskMiB == 0 {
		return nil
	}
	fi, err := os.Stat(dataDiskPath(stateDir, spec.Name))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("inspect data disk: %w", err)
	}
	if have := fi.Size() >> 20; have > int64(spec.DataDiskMiB) {
		return &vm.FieldError{Field: "data_disk_mib", Value: spec.DataDiskMiB,
			Reason: fmt.Sprintf("smaller than the existing data disk (%d MiB); shrinking would lose data", have)}
	}
	return nil
}
