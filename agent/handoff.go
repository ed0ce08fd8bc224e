package agent

import (
	"context"
	"crypto/rand"
	"fmt"
	"sync"
	"time"

	"github.com/warmpool/warmpool/agent/proto"
	"github.com/warmpool/warmpool/vm"
)

// Handoffer hands warm VMs to tenants: fresh entropy, clock, hostname and a
// ping, the way both the daemon and the benchmark lease a VM.
//
// The expensive part of a first hand-off is not the agent's work but the
// guest running it for the first time. Under TCG every guest code path a
// freshly restored QEMU process runs is translated on first use (the Go
// runtime's reads, JSON, the kernel's ioctl, settimeofday and virtio paths),
// which made dial+hello+handoff of a restored VM take 100-300 ms while the
// same calls take 1-3 ms the second time. So Prepare, which runs before a VM
// enters its pool, resumes it once, does a throwaway hand-off, pauses it
// again and keeps the connection open. A paused QEMU keeps its translated code, and at acquire
// Handoff only sends the tenant's identity over the open connection.
//
// A Handoffer is safe for concurrent use by many VMs; each VM must be
// prepared, validated and handed off by one goroutine at a time, as a pool
// does.
type Handoffer struct {
	// WarmExec, when set, is a command Prepare runs once (its result
	// ignored), over a session as a tenant's commands run, so that under
	// TCG the tenant's first command finds the session, process creation
	// and the command itself already translated. It makes each Prepare
	// longer. Set it before first use.
	WarmExec []string

	prov   vm.Provider
	dialer vm.AgentDialer

	mu       sync.Mutex
	prepared map[string]*Client
	closed   bool
}

// NewHandoffer returns a Handoffer that resumes and pauses VMs with prov and
// reaches their agents through dialer (usually the same provider).
func NewHandoffer(prov vm.Provider, dialer vm.AgentDialer) *Handoffer {
	return &Handoffer{prov: prov, dialer: dialer, prepared: map[string]*Client{}}
}

// HandoffTimings break a hand-off down into its steps.
type HandoffTimings struct {
	// Prepared says the VM had been prepared, so Dial is zero.
	Prepared bool
	// Dial is connecting and the version handshake (unprepared VMs only).
	Dial time.Duration
	// Handoff is the hand-off and the ping sent with it, until both answered.
	Handoff time.Duration
	// Result is what the guest agent did with the tenant's entropy.
	Result HandoffResult
}

// Total is the whole hand-off.
func (t HandoffTimings) Total() time.Duration { return t.Dial + t.Handoff }

// warmExecTimeout bounds Prepare's warm-up command.
const warmExecTimeout = 10 * time.Second

// prepareEntropy is how many random bytes the throwaway hand-off adds. They
// are real randomness: a prepared VM's random state already differs from
// its siblings' before the tenant's own entropy is added at hand-off.
const prepareEntropy = 32

// Prepare readies the paused VM v for a fast hand-off and leaves it paused:
// it resumes v, connects to its agent, runs WarmExec if set, does a
// hand-off of random entropy and the current time plus a ping, pauses v
// again and keeps the connection for Handoff. On error v may be left running; the caller destroys it.
func (h *Handoffer) Prepare(ctx context.Context, v vm.VM) error {
	h.forget(v.ID)
	// Resumed before dialing: not every provider's agent channel accepts a
	// connection while the guest cannot run (Firecracker's vsock handshake
	// needs the guest).
	if err := h.prov.Resume(ctx, v.ID); err != nil {
		return fmt.Errorf("prepare %s: resume: %w", v.ID, err)
	}
	if len(h.WarmExec) > 0 {
		h.warm(ctx, v.ID)
	}
	c, err := Dial(ctx, h.dialer, v.ID)
	if err != nil {
		return fmt.Errorf("prepare %s: %w", v.ID, err)
	}
	keep := false
	defer func() {
		if !keep {
			c.Close()
		}
	}()
	entropy := make([]byte, prepareEntropy)
	if _, err := rand.Read(entropy); err != nil {
		return fmt.Errorf("prepare %s: entropy: %w", v.ID, err)
	}
	// The guest keeps its hostname; setting it runs the code path the
	// tenant's hand-off will.
	st, err := c.Stats(ctx)
	if err != nil {
		return fmt.Errorf("prepare %s: %w", v.ID, err)
	}
	if _, err := c.HandoffAndPing(ctx, HandoffRequest{Entropy: entropy, Time: time.Now(), Hostname: st.Hostname, Network: NetworkMode(v)}); err != nil {
		return fmt.Errorf("prepare %s: %w", v.ID, err)
	}
	if err := h.prov.Pause(ctx, v.ID); err != nil {
		return fmt.Errorf("prepare %s: pause: %w", v.ID, err)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		return fmt.Errorf("prepare %s: handoffer closed: %w", v.ID, ErrClosed)
	}
	h.prepared[v.ID] = c
	keep = true
	// A VM destroyed without a hand-off closes its end; drop the client then.
	go func() {
		<-c.done
		h.mu.Lock()
		if h.prepared[v.ID] == c {
			delete(h.prepared, v.ID)
		}
		h.mu.Unlock()
	}()
	return nil
}

// warm runs WarmExec once in VM id the way a tenant's commands run: over
// a multiplexed session, as a streamed process. Under TCG the tenant's
// first session then finds the agent's session, stream and exec code
// translated, not only the command's. A command that cannot run here, or
// an agent that does not answer, only loses the warm-up; a broken agent
// fails the dial that follows.
func (h *Handoffer) warm(ctx context.Context, id string) {
	wctx, cancel := context.WithTimeout(ctx, warmExecTimeout)
	defer cancel()
	s, err := DialSession(wctx, h.dialer, id)
	if err != nil {
		return
	}
	defer s.Close()
	// A shell warm-up stays as the agent's spare: the tenant's first
	// command of its shape then starts without reading the profile.
	_, _ = s.Run(wctx, ProcessRequest{Argv: h.WarmExec, Timeout: warmExecTimeout, Spare: CanSpare(h.WarmExec)}, nil, nil, nil)
}

// Validate wraps a pool's validation (pass the result as
// pool.Config.Validate): a VM seen for the first time (just restored, or
// adopted after a restart), or whose kept connection is gone, is prepared
// and then checked with check (which may be nil). A VM whose kept
// connection is still open is not checked again: the connection ends when
// the hypervisor process does, and a paused guest can show nothing more.
// That keeps a query to the hypervisor off the acquire path.
func (h *Handoffer) Validate(check func(ctx context.Context, v vm.VM) error) func(ctx context.Context, v vm.VM) error {
	return func(ctx context.Context, v vm.VM) error {
		if h.isPrepared(v.ID) {
			return nil
		}
		if err := h.Prepare(ctx, v); err != nil {
			return err
		}
		if check == nil {
			return nil
		}
		return check(ctx, v)
	}
}

// Handoff gives the running VM v its tenant's identity (req) and pings it
// (both in one round trip), over the connection Prepare kept if there is one, else over a new one,
// which it closes before returning either way: the tenant's own calls dial
// afresh.
func (h *Handoffer) Handoff(ctx context.Context, v vm.VM, req HandoffRequest) (HandoffTimings, error) {
	var t HandoffTimings
	start := time.Now()
	c := h.take(v.ID)
	if c != nil {
		t.Prepared = true
	} else {
		var err error
		if c, err = Dial(ctx, h.dialer, v.ID); err != nil {
			return t, err
		}
		t.Dial = time.Since(start)
	}
	defer c.Close()
	if req.Network == "" {
		req.Network = NetworkMode(v)
	}
	step := time.Now()
	res, err := c.HandoffAndPing(ctx, req)
	if err != nil {
		return t, fmt.Errorf("hand off VM %s: %w", v.ID, err)
	}
	t.Handoff = time.Since(step)
	t.Result = res
	return t, nil
}

// isPrepared reports whether VM id has a kept connection from Prepare.
func (h *Handoffer) isPrepared(id string) bool {
	h.mu.Lock()
	c := h.prepared[id]
	h.mu.Unlock()
	if c == nil {
		return false
	}
	select {
	case <-c.done:
		return false
	default:
		return true
	}
}

// take removes and returns v's kept connection if it is still open.
func (h *Handoffer) take(id string) *Client {
	h.mu.Lock()
	c := h.prepared[id]
	delete(h.prepared, id)
	h.mu.Unlock()
	if c == nil {
		return nil
	}
	select {
	case <-c.done:
		c.Close()
		return nil
	default:
		return c
	}
}

// forget closes the kept connection of VM id, if any.
func (h *Handoffer) forget(id string) {
	h.mu.Lock()
	c := h.prepared[id]
	delete(h.prepared, id)
	h.mu.Unlock()
	if c != nil {
		c.Close()
	}
}

// Forget closes the connection kept for VM id. A pool that destroys a
// prepared VM need not call it (the connection ends with the VM), but a
// caller that keeps the VM and hands it off some other way should.
func (h *Handoffer) Forget(id string) { h.forget(id) }

// Close closes every kept connection; later Prepare calls fail. VMs stay as
// they are, and a Handoff after Close dials afresh.
func (h *Handoffer) Close() {
	h.mu.Lock()
	h.closed = true
	clients := h.prepared
	h.prepared = map[string]*Client{}
	h.mu.Unlock()
	for _, c := range clients {
		c.Close()
	}
}

// NetworkMode is the hand-off network mode of VM v: a guest with an
// interface attached to a TAP refreshes its neighbours, one whose
// interface is attached to nothing (network policy none) loses it, and a
// guest without one is left alone.
func NetworkMode(v vm.VM) string {
	switch {
	case v.Spec.NIC.Attached():
		return proto.NetworkUp
	case v.Spec.NIC != nil:
		return proto.NetworkNone
	}
	return ""
}
