package apitest

import (
	"context"
	"fmt"
	"net"
	"syscall"

	"github.com/warmpool/warmpool/agent"
	"github.com/warmpool/warmpool/agent/server"
	"github.com/warmpool/warmpool/api"
	"github.com/warmpool/warmpool/vm"
)

var _ api.GuestBackend = (*Backend)(nil)

// Guest implements api.GuestBackend with a real guest agent (agent/server)
// serving each lease and machine in this process: its commands run on the
// host and its paths are the host's, which is what tests of the server,
// the client and the CLI want. A lease's acquire Env is its default
// environment, as the daemon's.
func (b *Backend) Guest(ctx context.Context, t api.Target) (*api.Guest, error) {
	b.mu.Lock()
	key, ok := "lease/"+t.Lease, false
	if t.Machine != "" {
		key = "machine/" + t.Machine
		_, ok = b.machines[t.Machine]
	} else {
		_, ok = b.leases[t.Lease]
	}
	if b.guests == nil {
		b.guests = map[string]*agent.Session{}
	}
	s := b.guests[key]
	env := b.leaseEnv[t.Lease]
	b.mu.Unlock()
	if !ok {
		return nil, fmt.Errorf("%s: %w", t, vm.ErrNotFound)
	}
	if s != nil {
		select {
		case <-s.Done():
		default:
			return &api.Guest{Session: s, Env: env}, nil
		}
	}
	s, err := agent.DialSession(ctx, pipeAgent{state: server.NewState()}, key)
	if err != nil {
		return nil, err
	}
	b.mu.Lock()
	b.guests[key] = s
	b.mu.Unlock()
	return &api.Guest{Session: s, Env: env}, nil
}

// pipeAgent serves the agent on the far end of a pipe.
type pipeAgent struct{ state *server.State }

func (p pipeAgent) DialAgent(ctx context.Context, id string) (net.Conn, error) {
	host, guest := net.Pipe()
	go func() { _ = server.Serve(context.Background(), guest, server.Options{State: p.state}) }()
	return host, nil
}

// killAll kills every process s's agent runs and closes s.
func killAll(ctx context.Context, s *agent.Session) {
	if ps, err := s.Processes(ctx); err == nil {
		for _, p := range ps {
			if p.Running {
				_ = s.Signal(ctx, p.PID, syscall.SIGKILL)
			}
		}
	}
	s.Close()
}
