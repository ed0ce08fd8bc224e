// Package agent is the host side of the warmpool guest agent protocol (see
// package agent/proto for the wire format). A Client multiplexes concurrent
// calls over one connection to the agent; exec output streams to the
// caller's writers as it arrives.
package agent

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"github.com/warmpool/warmpool/agent/proto"
	"github.com/warmpool/warmpool/vm"
)

var (
	// ErrClosed: the connection to the agent is gone (closed by the caller,
	// the guest, or a snapshot restore). Dial again.
	ErrClosed = errors.New("agent connection closed")
	// ErrTimeout: an exec outlived its ExecRequest.Timeout and was killed.
	ErrTimeout = errors.New("command timed out")
	// ErrExecFailed: the command could not be started (not found, not executable).
	ErrExecFailed = errors.New("command could not be started")
)

// RemoteError is an error reported by the agent.
type RemoteError struct {
	Op      string
	Code    string
	Message string
}

func (e *RemoteError) Error() string {
	return fmt.Sprintf("agent %s: %s (%s)", e.Op, e.Message, e.Code)
}

// Unwrap maps agent error codes to this package's sentinel errors.
func (e *RemoteError) Unwrap() error {
	switch e.Code {
	case proto.CodeTimeout:
		return ErrTimeout
	case proto.CodeExecFailed:
		return ErrExecFailed
	case proto.CodeCanceled:
		return context.Canceled
	case proto.CodeBadRequest, proto.CodeUnsupportedVersion, proto.CodeIsDir, proto.CodeNotDir, proto.CodePermitted:
		return vm.ErrInvalid
	case proto.CodeNotFound, proto.CodeNoProcess:
		return vm.ErrNotFound
	case proto.CodeExists, proto.CodeNotEmpty:
		return vm.ErrInvalidState
	case proto.CodeNoSpace, proto.CodeLimit:
		return vm.ErrExhausted
	case proto.CodeUnknownOp:
		// An agent older than the operation (a template built before it).
		return vm.ErrUnsupported
	}
	return nil
}

// HandoffRequest gives a guest restored from a shared snapshot its own identity.
type HandoffRequest struct {
	// Entropy is mixed into the guest kernel's random pool (at most 4096 bytes).
	Entropy []byte
	// Time sets the guest's wall clock; zero leaves it alone.
	Time     time.Time
	Hostname string
	// Env is added to the environment of every later Exec.
	Env map[string]string
	// Network is proto.NetworkUp, proto.NetworkNone or empty (leave the
	// interface alone); Handoffer fills it in from the VM's NIC.
	Network string
}

// HandoffResult is what the guest agent reports it did with a hand-off's
// entropy.
type HandoffResult struct {
	// Reported is false when the agent said nothing (one built before
	// agents reported it); the other fields are then zero.
	Reported bool
	// EntropyBytes were mixed into the guest kernel's random pool.
	EntropyBytes int
	// Reseeded: the guest's CRNG was reseeded from that pool, so its random
	// numbers no longer follow the snapshot it was restored from.
	Reseeded bool
	// NotReseeded is the guest's reason when entropy was added without a
	// reseed.
	NotReseeded string
	// Steps is how long each hand-off step took in the guest.
	Steps map[string]time.Duration
}

// ExecRequest is a command to run in the guest.
type ExecRequest struct {
	Argv []string
	Env  []string // KEY=VALUE
	Dir  string
	// User is NAME, UID, NAME:GROUP or UID:GID in the guest's account
	// files; empty runs as root.
	User string
	// Stdin is the command's whole standard input (at most 512 KiB).
	Stdin []byte
	// Timeout kills the command after that long; zero means no limit (the
	// call's context still applies).
	Timeout time.Duration
}

// Stats is the guest's view of its memory and uptime.
type Stats struct {
	MemTotalKiB     uint64
	MemFreeKiB      uint64
	MemAvailableKiB uint64
	Uptime          time.Duration
	Load1           float64
	Procs           int
	Hostname        string
	// Time is the guest's wall clock when it took the stats.
	Time time.Time
}

// Info describes the agent, as reported by the version handshake.
type Info struct {
	Version int
	Agent   string
	Kernel  string
}

// Client talks to one guest agent over one connection. It is safe for
// concurrent use.
type Client struct {
	conn net.Conn

	writeMu sync.Mutex

	mu      sync.Mutex
	nextID  uint64
	calls   map[uint64]*pending
	err     error // set once the connection is finished
	done    chan struct{}
	closeMu sync.Once
}

// NewClient starts a client on conn without any handshake; Dial is the usual
// way in. The client owns conn and closes it in Close.
func NewClient(conn net.Conn) *Client {
	var seed [8]byte
	_, _ = rand.Read(seed[:])
	c := &Client{
		conn: conn,
		// IDs start at a random point so that a late answer meant for an
		// earlier connection can never be taken for one of ours.
		nextID: binary.LittleEndian.Uint64(seed[:]) >> 12,
		calls:  map[uint64]*pending{},
		done:   make(chan struct{}),
	}
	go c.readLoop()
	return c
}

// Dial opens a connection to the agent of VM id and checks that the agent
// speaks this protocol version.
func Dial(ctx context.Context, d vm.AgentDialer, id string) (*Client, error) {
	conn, err := d.DialAgent(ctx, id)
	if err != nil {
		return nil, fmt.Errorf("dial agent of %s: %w", id, err)
	}
	c := NewClient(conn)
	info, err := c.helloRetrying(ctx)
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("agent handshake with %s: %w", id, err)
	}
	if info.Version != proto.Version {
		c.Close()
		return nil, fmt.Errorf("agent of %s speaks protocol %d, want %d: %w", id, info.Version, proto.Version, vm.ErrInvalid)
	}
	return c, nil
}

// WaitReady dials the agent of VM id and pings it until it answers or ctx
// ends. A booting guest has no agent yet, so each failed attempt is retried
// after a short pause; the error returned on timeout is the last attempt's.
func WaitReady(ctx context.Context, d vm.AgentDialer, id string) error {
	var last error
	for delay := 5 * time.Millisecond; ; delay = min(delay*2, 100*time.Millisecond) {
		last = pingOnce(ctx, d, id)
		if last == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for agent of %s: %w (last attempt: %v)", id, ctx.Err(), last)
		case <-time.After(delay):
		}
	}
}

func pingOnce(ctx context.Context, d vm.AgentDialer, id string) error {
	// A guest that has not opened its end yet leaves the request unanswered,
	// so each attempt gets its own short deadline.
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	c, err := Dial(ctx, d, id)
	if err != nil {
		return err
	}
	defer c.Close()
	return c.Ping(ctx)
}

// Close closes the connection; calls in flight fail with ErrClosed.
func (c *Client) Close() error {
	var err error
	c.closeMu.Do(func() { err = c.conn.Close() })
	<-c.done
	return err
}

func (c *Client) readLoop() {
	r := proto.NewReader(c.conn)
	var err error
	for {
		var line []byte
		line, err = r.Next()
		if errors.Is(err, proto.ErrFrameTooLarge) {
			continue
		}
		if err != nil {
			break
		}
		var resp proto.Response
		if json.Unmarshal(line, &resp) != nil {
			continue
		}
		c.mu.Lock()
		p := c.calls[resp.ID]
		if p != nil && resp.Final() {
			delete(c.calls, resp.ID)
		}
		c.mu.Unlock()
		if p != nil {
			// Blocks only while an exec's writer is slow, which holds up
			// that exec's own output, as it should.
			select {
			case p.ch <- &resp:
			case <-p.gone:
			}
		}
	}
	c.mu.Lock()
	c.err = fmt.Errorf("%w: %v", ErrClosed, err)
	calls := c.calls
	c.calls = nil
	c.mu.Unlock()
	for _, p := range calls {
		close(p.ch)
	}
	close(c.done)
}

// start registers a call and sends its request.
func (c *Client) start(req *proto.Request) (*pending, error) {
	ps, err := c.startAll(req)
	if err != nil {
		return nil, err
	}
	return ps[0], nil
}

// startAll registers one call per request and sends them all in one write,
// so that a guest woken by the first finds the rest already there: one
// round trip for the lot.
func (c *Client) startAll(reqs ...*proto.Request) ([]*pending, error) {
	ps := make([]*pending, 0, len(reqs))
	forgetAll := func() {
		for _, p := range ps {
			c.forget(p)
		}
	}
	// The leading newline ends any fragment an earlier connection left in
	// the guest's buffer; the agent ignores empty lines.
	buf := []byte{'\n'}
	for _, req := range reqs {
		p := &pending{ch: make(chan *proto.Response, 16), gone: make(chan struct{})}
		c.mu.Lock()
		if c.calls == nil {
			err := c.err
			c.mu.Unlock()
			forgetAll()
			return nil, err
		}
		c.nextID++
		p.id = c.nextID
		c.calls[p.id] = p
		c.mu.Unlock()
		ps = append(ps, p)

		req.Version = proto.Version
		req.ID = p.id
		b, err := proto.Encode(req)
		if err != nil {
			forgetAll()
			return nil, fmt.Errorf("agent %s: %w", req.Op, err)
		}
		buf = append(buf, b...)
	}
	c.writeMu.Lock()
	defer c.writeMu.Unlock()
	if _, err := c.conn.Write(buf); err != nil {
		forgetAll()
		return nil, fmt.Errorf("agent %s: send request: %w: %v", reqs[0].Op, ErrClosed, err)
	}
	return ps, nil
}

// pending is a call waiting for answers. ch is closed when the connection
// ends; gone is closed when the caller stops listening.
type pending struct {
	id       uint64
	ch       chan *proto.Response
	gone     chan struct{}
	goneOnce sync.Once
}

// forget stops delivering answers for id; the caller no longer reads them.
func (c *Client) forget(p *pending) {
	c.mu.Lock()
	if c.calls[p.id] == p {
		delete(c.calls, p.id)
	}
	c.mu.Unlock()
	p.goneOnce.Do(func() { close(p.gone) })
}

// call sends req and waits for its final response.
func (c *Client) call(ctx context.Context, req *proto.Request) (*proto.Response, error) {
	p, err := c.start(req)
	if err != nil {
		return nil, err
	}
	defer c.forget(p)
	return c.wait(ctx, p, req.Op)
}

// wait returns the final response of the call p (an operation op).
func (c *Client) wait(ctx context.Context, p *pending, op string) (*proto.Response, error) {
	for {
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("agent %s: %w", op, ctx.Err())
		case resp, ok := <-p.ch:
			if !ok {
				return nil, fmt.Errorf("agent %s: %w", op, c.closedErr())
			}
			if !resp.Final() {
				continue
			}
			if resp.Kind == proto.KindError {
				return nil, &RemoteError{Op: op, Code: resp.Code, Message: resp.Error}
			}
			return resp, nil
		}
	}
}

func (c *Client) closedErr() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return c.err
	}
	return ErrClosed
}

// Hello performs the version handshake.
func (c *Client) Hello(ctx context.Context) (Info, error) {
	resp, err := c.call(ctx, &proto.Request{Op: proto.OpHello})
	if err != nil {
		return Info{}, err
	}
	if resp.Hello == nil {
		return Info{}, fmt.Errorf("agent hello: answer without hello")
	}
	return Info{Version: resp.Hello.Version, Agent: resp.Hello.Agent, Kernel: resp.Hello.Kernel}, nil
}

// helloRetrying sends the handshake again on the same connection while it
// goes unanswered. A host that left a multiplexed session without saying
// bye (killed, say) and a new host that connected before the agent saw the
// old one go can find the agent still reading yamux: it takes the first
// hello for a broken frame, drops it and reads lines again, so a second
// hello is answered.
func (c *Client) helloRetrying(ctx context.Context) (Info, error) {
	for wait := time.Second; ; wait *= 2 {
		hctx, cancel := context.WithTimeout(ctx, wait)
		info, err := c.Hello(hctx)
		cancel()
		if err == nil || ctx.Err() != nil || !errors.Is(err, context.DeadlineExceeded) || wait >= 8*time.Second {
			return info, err
		}
	}
}

// Ping checks that the agent answers.
func (c *Client) Ping(ctx context.Context) error {
	_, err := c.call(ctx, &proto.Request{Op: proto.OpPing})
	return err
}

// Handoff gives the guest its own entropy, clock, hostname and environment,
// and returns what the guest did with the entropy.
func (c *Client) Handoff(ctx context.Context, h HandoffRequest) (HandoffResult, error) {
	req, err := handoffRequest(h)
	if err != nil {
		return HandoffResult{}, err
	}
	resp, err := c.call(ctx, req)
	if err != nil {
		return HandoffResult{}, err
	}
	return handoffResult(resp), nil
}

// HandoffAndPing sends a hand-off and a ping together and waits for both
// answers: the ping proves the agent still answers after the hand-off
// without costing a second round trip.
func (c *Client) HandoffAndPing(ctx context.Context, h HandoffRequest) (HandoffResult, error) {
	req, err := handoffRequest(h)
	if err != nil {
		return HandoffResult{}, err
	}
	ps, err := c.startAll(req, &proto.Request{Op: proto.OpPing})
	if err != nil {
		return HandoffResult{}, err
	}
	defer func() {
		for _, p := range ps {
			c.forget(p)
		}
	}()
	resp, err := c.wait(ctx, ps[0], proto.OpHandoff)
	if err != nil {
		return HandoffResult{}, err
	}
	if _, err := c.wait(ctx, ps[1], proto.OpPing); err != nil {
		return HandoffResult{}, err
	}
	return handoffResult(resp), nil
}

func handoffResult(resp *proto.Response) HandoffResult {
	r := resp.Handoff
	if r == nil {
		return HandoffResult{}
	}
	res := HandoffResult{Reported: true, EntropyBytes: r.EntropyBytes, Reseeded: r.Reseeded, NotReseeded: r.NotReseeded}
	if len(r.StepsMicros) > 0 {
		res.Steps = make(map[string]time.Duration, len(r.StepsMicros))
		for name, us := range r.StepsMicros {
			res.Steps[name] = time.Duration(us) * time.Microsecond
		}
	}
	return res
}

func handoffRequest(h HandoffRequest) (*proto.Request, error) {
	if len(h.Entropy) > proto.MaxEntropy {
		return nil, &vm.FieldError{Field: "entropy", Value: fmt.Sprintf("%d bytes", len(h.Entropy)), Reason: fmt.Sprintf("at most %d bytes", proto.MaxEntropy)}
	}
	size := 0
	for k, v := range h.Env {
		size += len(k) + len(v)
	}
	if size > proto.MaxEnv {
		return nil, &vm.FieldError{Field: "env", Value: fmt.Sprintf("%d bytes", size), Reason: fmt.Sprintf("at most %d bytes", proto.MaxEnv)}
	}
	switch h.Network {
	case "", proto.NetworkUp, proto.NetworkNone:
	default:
		return nil, &vm.FieldError{Field: "network", Value: h.Network, Reason: "must be up, none or empty"}
	}
	req := &proto.Handoff{Entropy: h.Entropy, Hostname: h.Hostname, Env: h.Env, Network: h.Network}
	if !h.Time.IsZero() {
		req.UnixNano = h.Time.UnixNano()
	}
	return &proto.Request{Op: proto.OpHandoff, Handoff: req}, nil
}

// Exec runs a command in the guest, copying its output to stdout and stderr
// (either may be nil to discard) as it arrives, and returns its exit code (128+N
// when killed by signal N). A command that could not start returns
// ErrExecFailed, one that outlived req.Timeout ErrTimeout; if ctx ends first,
// the command is killed.
func (c *Client) Exec(ctx context.Context, req ExecRequest, stdout, stderr io.Writer) (int, error) {
	if len(req.Argv) == 0 {
		return -1, &vm.FieldError{Field: "argv", Value: "", Reason: "must name a command"}
	}
	if len(req.Stdin) > proto.MaxStdin {
		return -1, &vm.FieldError{Field: "stdin", Value: fmt.Sprintf("%d bytes", len(req.Stdin)), Reason: fmt.Sprintf("at most %d bytes", proto.MaxStdin)}
	}
	if req.Timeout < 0 {
		return -1, &vm.FieldError{Field: "timeout", Value: req.Timeout, Reason: "must not be negative"}
	}
	e := &proto.Exec{Argv: req.Argv, Env: req.Env, Dir: req.Dir, User: req.User, Stdin: req.Stdin}
	if req.Timeout > 0 {
		e.TimeoutMillis = max(1, req.Timeout.Milliseconds())
	}
	p, err := c.start(&proto.Request{Op: proto.OpExec, Exec: e})
	if err != nil {
		return -1, err
	}
	defer c.forget(p)
	var writeErr error
	write := func(w io.Writer, b []byte) {
		if w != nil && writeErr == nil {
			if _, err := w.Write(b); err != nil {
				writeErr = fmt.Errorf("agent exec %q: write output: %w", req.Argv[0], err)
			}
		}
	}
	for {
		select {
		case <-ctx.Done():
			c.forget(p)
			// Best effort: the command dies with the connection anyway.
			cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
			_, _ = c.call(cctx, &proto.Request{Op: proto.OpCancel, Target: p.id})
			cancel()
			return -1, fmt.Errorf("agent exec %q: %w", req.Argv[0], ctx.Err())
		case resp, ok := <-p.ch:
			if !ok {
				return -1, fmt.Errorf("agent exec %q: %w", req.Argv[0], c.closedErr())
			}
			switch resp.Kind {
			case proto.KindStdout:
				write(stdout, resp.Data)
			case proto.KindStderr:
				write(stderr, resp.Data)
			case proto.KindExit:
				return resp.ExitCode, writeErr
			case proto.KindError:
				return -1, &RemoteError{Op: proto.OpExec, Code: resp.Code, Message: resp.Error}
			default:
				return -1, fmt.Errorf("agent exec %q: unexpected answer %q", req.Argv[0], resp.Kind)
			}
		}
	}
}

// Stats reads the guest's memory and uptime.
func (c *Client) Stats(ctx context.Context) (Stats, error) {
	resp, err := c.call(ctx, &proto.Request{Op: proto.OpStats})
	if err != nil {
		return Stats{}, err
	}
	if resp.Stats == nil {
		return Stats{}, fmt.Errorf("agent stats: answer without stats")
	}
	s := resp.Stats
	return Stats{
		MemTotalKiB: s.MemTotalKiB, MemFreeKiB: s.MemFreeKiB, MemAvailableKiB: s.MemAvailableKiB,
		Uptime: s.Uptime(), Load1: s.Load1, Procs: s.Procs, Hostname: s.Hostname,
		Time: time.Unix(0, s.UnixNano),
	}, nil
}

// Shutdown asks the guest to power off. It returns once the agent has
// acknowledged; the VM stops shortly after.
func (c *Client) Shutdown(ctx context.Context) error {
	_, err := c.call(ctx, &proto.Request{Op: proto.OpShutdown})
	return err
}
