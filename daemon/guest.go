package daemon

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/warmpool/warmpool/agent"
	"github.com/warmpool/warmpool/api"
	"github.com/warmpool/warmpool/lifecycle"
	"github.com/warmpool/warmpool/vm"
)

// guestSessions keeps one multiplexed agent session per VM, opened by the
// first call that works inside it (exec, processes, files) and shared by
// every later one: QEMU's agent channel takes one connection at a time, so
// concurrent execs need the streams of one session. While a session is
// open, the daemon's other agent calls for that VM (ping, stats, shutdown)
// go through it too.
type guestSessions struct {
	d  *Daemon
	mu sync.Mutex
	m  map[string]*guestSession
}

type guestSession struct {
	mu      sync.Mutex
	s       *agent.Session
	dropped bool
}

func newGuestSessions(d *Daemon) *guestSessions {
	return &guestSessions{d: d, m: map[string]*guestSession{}}
}

// get returns the open session of VM id, dialing it if there is none.
func (g *guestSessions) get(ctx context.Context, id string) (*agent.Session, error) {
	g.mu.Lock()
	e := g.m[id]
	if e == nil {
		e = &guestSession{}
		g.m[id] = e
	}
	g.mu.Unlock()
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.s != nil {
		select {
		case <-e.s.Done():
			e.s = nil
		default:
			return e.s, nil
		}
	}
	if e.dropped {
		return nil, fmt.Errorf("agent of %s: the VM is going away: %w", id, vm.ErrInvalidState)
	}
	s, err := agent.DialSession(ctx, g.d.prov, id)
	if err != nil {
		return nil, err
	}
	e.s = s
	return s, nil
}

// openGuestSession dials the agent session of a VM just handed to a
// tenant while the tenant reads the acquire's answer, so that its first
// exec or file call does not wait for the dial (a tenant that makes none
// leaves an idle connection, closed with the lease). A failed dial is
// only logged: the first call dials again and reports its own error.
func (d *Daemon) openGuestSession(vmID string) {
	if d.checkOpen() != nil {
		return
	}
	d.bg.Add(1)
	go func() {
		defer d.bg.Done()
		ctx, cancel := context.WithTimeout(context.Background(), guestDialTimeout)
		defer cancel()
		if _, err := d.guests.get(ctx, vmID); err != nil {
			d.log.Debug("open the agent session of a new lease", "vm", vmID, "err", err)
		}
	}()
}

// guestDialTimeout bounds openGuestSession's dial.
const guestDialTimeout = 10 * time.Second

// open returns VM id's session if one is open, else nil.
func (g *guestSessions) open(id string) *agent.Session {
	g.mu.Lock()
	e := g.m[id]
	g.mu.Unlock()
	if e == nil {
		return nil
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.s == nil {
		return nil
	}
	select {
	case <-e.s.Done():
		return nil
	default:
		return e.s
	}
}

// drop closes VM id's session: the VM is being destroyed, stopped or
// suspended.
func (g *guestSessions) drop(id string) {
	g.mu.Lock()
	e := g.m[id]
	delete(g.m, id)
	g.mu.Unlock()
	if e == nil {
		return
	}
	e.mu.Lock()
	e.dropped = true
	s := e.s
	e.s = nil
	e.mu.Unlock()
	if s != nil {
		s.Close()
	}
}

func (g *guestSessions) closeAll() {
	g.mu.Lock()
	ids := make([]string, 0, len(g.m))
	for id := range g.m {
		ids = append(ids, id)
	}
	g.mu.Unlock()
	for _, id := range ids {
		g.drop(id)
	}
}

// onMachineChange drops the session of a machine whose VM no longer runs.
func (g *guestSessions) onMachineChange(m lifecycle.Machine) {
	if m.VMID == "" {
		return
	}
	switch m.State {
	case lifecycle.Running, lifecycle.Idle, lifecycle.Starting, lifecycle.Created:
		return
	}
	g.drop(m.VMID)
}

// Guest implements api.GuestBackend: the agent session of a lease's VM, or
// of a machine's (started if need be, and held while the caller works in
// it).
func (d *Daemon) Guest(ctx context.Context, t api.Target) (*api.Guest, error) {
	if err := d.checkOpen(); err != nil {
		return nil, err
	}
	if t.Machine != "" {
		return d.machineGuest(ctx, t.Machine)
	}
	l, err := d.leases.Get(t.Lease)
	if err != nil {
		return nil, err
	}
	s, err := d.guests.get(ctx, l.VMID)
	if err != nil {
		return nil, fmt.Errorf("lease %s: %w", t.Lease, err)
	}
	// The image's environment, then the lease's; a request's own comes last.
	def := d.withImageDefaults(l.Template, agent.ProcessRequest{Env: l.Env})
	return &api.Guest{Session: s, Env: def.Env, Dir: def.Dir, User: def.User}, nil
}

func (d *Daemon) machineGuest(ctx context.Context, name string) (*api.Guest, error) {
	if !d.mach.knows(name) {
		return nil, fmt.Errorf("machine %s: %w", name, vm.ErrNotFound)
	}
	if _, err := d.EnsureMachine(ctx, name, api.MachineEnsureRequest{}); err != nil {
		return nil, err
	}
	h, err := d.mach.m.Hold(ctx, name, "guest session", 0)
	if err != nil {
		return nil, fmt.Errorf("machine %s: %w", name, err)
	}
	release := func() {
		if err := d.mach.m.Unhold(name, h.ID); err != nil && !errors.Is(err, vm.ErrNotFound) {
			d.log.Warn("release guest session hold", "machine", name, "err", err)
		}
	}
	m, err := d.mach.m.Get(name)
	if err != nil || m.VMID == "" {
		release()
		return nil, fmt.Errorf("machine %s has no VM: %w", name, vm.ErrInvalidState)
	}
	s, err := d.guests.get(ctx, m.VMID)
	if err != nil {
		release()
		return nil, fmt.Errorf("machine %s: %w", name, err)
	}
	return &api.Guest{Session: s, Release: release}, nil
}
