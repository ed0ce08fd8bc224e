// Package server is the guest side of the warmpool agent protocol. It is pure
// Go with every effect on the operating system injected through Options, so
// the same code answers inside a VM (cmd/warmpool-agent), in host tests over
// net.Pipe, and in the fake provider.
package server

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"os"
	"os/exec"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/warmpool/warmpool/agent/proto"
)

// Options are the agent's effects on the system. A nil function is a no-op,
// which is what tests and the fake provider want; SystemOptions returns the
// real ones.
type Options struct {
	// AddEntropy mixes host-supplied bytes into the kernel's random pool and
	// reseeds it so that clones of one snapshot diverge. An error wrapping
	// ErrNotReseeded means the bytes were added but the CRNG was not
	// reseeded: the hand-off succeeds and says so; any other error fails it.
	AddEntropy  func([]byte) error
	SetTime     func(time.Time) error
	SetHostname func(string) error
	// SetNetwork applies a hand-off's network mode (proto.NetworkUp or
	// proto.NetworkNone).
	SetNetwork func(mode string) error
	// PowerOff is called after the shutdown request has been answered.
	PowerOff func() error
	// Stats reports memory and uptime; nil reads /proc.
	Stats func() (proto.Stats, error)
	// Env is the base environment of every exec; nil means os.Environ().
	Env []string
	// Root is where an exec's User is looked up (etc/passwd, etc/group
	// below it); empty means "/".
	Root string
	// OutputBuffer is how many bytes of output the agent keeps per
	// process; zero means DefaultOutputBuffer.
	OutputBuffer int
	// Agent names the agent in hello replies.
	Agent  string
	Logger *slog.Logger
	// State carries the handoff environment across connections. Serve is
	// called once per host connection, and a host that reconnects (after a
	// snapshot restore, say) expects the environment it handed over before.
	// Nil gives each Serve call its own state.
	State *State
}

// ErrNotReseeded is wrapped by an AddEntropy error when the entropy was
// added but the kernel's CRNG could not be reseeded from it.
var ErrNotReseeded = errors.New("entropy added but the CRNG was not reseeded")

// State is what a handoff leaves behind for later requests.
type State struct {
	mu  sync.Mutex
	env map[string]string
	// procs outlive the connection that started them.
	procs *processTable
	// spares is the parked shell a command may take over.
	spares spares
}

// NewState returns an empty state to share between Serve calls.
func NewState() *State { return &State{env: map[string]string{}, procs: newProcessTable()} }

func (s *State) setEnv(env map[string]string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	maps.Copy(s.env, env)
}

func (s *State) environ() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]string, 0, len(s.env))
	for _, k := range slices.Sorted(maps.Keys(s.env)) {
		out = append(out, k+"="+s.env[k])
	}
	return out
}

// Serve answers requests read from conn until conn reports an error or EOF
// (the host went away) or ctx ends. It closes conn, cancels the commands the
// connection started, and waits for its handlers before returning, so that
// nothing it wrote can leak into the next connection. A host that disconnects
// mid-message only loses that message. The returned error is nil when the
// host simply went away.
func Serve(ctx context.Context, conn io.ReadWriteCloser, opts Options) error {
	if opts.State == nil {
		opts.State = NewState()
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Agent == "" {
		opts.Agent = "warmpool-agent"
	}
	ctx, cancel := context.WithCancel(ctx)
	s := &session{opts: opts, conn: conn, ctx: ctx, execs: map[uint64]context.CancelFunc{}}
	defer func() {
		cancel()
		s.wg.Wait()
	}()
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	defer conn.Close()

	r := proto.NewReader(conn)
	for {
		line, err := r.Next()
		if errors.Is(err, proto.ErrFrameTooLarge) {
			s.reply(&proto.Response{Kind: proto.KindError, Code: proto.CodeBadRequest, Error: err.Error()})
			continue
		}
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, io.EOF) || errors.Is(err, io.ErrClosedPipe) || errors.Is(err, os.ErrClosed) {
				return nil
			}
			return fmt.Errorf("read agent request: %w", err)
		}
		var req proto.Request
		if err := json.Unmarshal(line, &req); err != nil {
			// Most likely the tail of a message from a connection that is
			// gone; the next line starts fresh.
			opts.Logger.Debug("skipping malformed request", "err", err, "len", len(line))
			continue
		}
		if req.Op == proto.OpMux && req.Version == proto.Version {
			s.reply(&proto.Response{ID: req.ID, Kind: proto.KindOK})
			s.muxed.Store(true)
			return s.serveMux(muxConn{Reader: io.MultiReader(bytes.NewReader(r.Buffered()), conn), conn: conn})
		}
		s.dispatch(&req)
	}
}

type session struct {
	opts Options
	conn io.ReadWriteCloser
	ctx  context.Context
	wg   sync.WaitGroup

	writeMu sync.Mutex
	// muxed is set once the connection speaks yamux: a line-format answer
	// of an exec still running must not be written into it.
	muxed  atomic.Bool
	execMu sync.Mutex
	execs  map[uint64]context.CancelFunc
}

func (s *session) reply(resp *proto.Response) {
	b, err := proto.Encode(resp)
	if err != nil {
		b, _ = proto.Encode(&proto.Response{ID: resp.ID, Kind: proto.KindError, Code: proto.CodeInternal, Error: err.Error()})
	}
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	if s.ctx.Err() != nil || s.muxed.Load() {
		return
	}
	if _, err := s.conn.Write(b); err != nil {
		s.opts.Logger.Debug("write agent response", "id", resp.ID, "err", err)
	}
}

func (s *session) fail(id uint64, code string, err error) {
	s.reply(&proto.Response{ID: id, Kind: proto.KindError, Code: code, Error: err.Error()})
}

func (s *session) dispatch(req *proto.Request) {
	if req.Version != proto.Version {
		s.fail(req.ID, proto.CodeUnsupportedVersion, fmt.Errorf("protocol version %d not supported, agent speaks %d", req.Version, proto.Version))
		return
	}
	switch req.Op {
	case proto.OpHello:
		s.reply(&proto.Response{ID: req.ID, Kind: proto.KindHello, Hello: &proto.Hello{Version: proto.Version, Agent: s.opts.Agent, Kernel: kernelRelease()}})
	case proto.OpPing:
		s.reply(&proto.Response{ID: req.ID, Kind: proto.KindOK})
	case proto.OpHandoff:
		if req.Handoff == nil {
			s.fail(req.ID, proto.CodeBadRequest, errors.New("handoff request without handoff"))
			return
		}
		res, err := s.handoff(req.Handoff)
		if err != nil {
			s.fail(req.ID, proto.CodeInternal, err)
			return
		}
		s.reply(&proto.Response{ID: req.ID, Kind: proto.KindOK, Handoff: &res})
	case proto.OpStats:
		read := s.opts.Stats
		if read == nil {
			read = ReadProcStats
		}
		st, err := read()
		if err != nil {
			s.fail(req.ID, proto.CodeInternal, err)
			return
		}
		s.reply(&proto.Response{ID: req.ID, Kind: proto.KindStats, Stats: &st})
	case proto.OpExec:
		if req.Exec == nil || len(req.Exec.Argv) == 0 {
			s.fail(req.ID, proto.CodeBadRequest, errors.New("exec request without argv"))
			return
		}
		s.startExec(req.ID, req.Exec)
	case proto.OpCancel:
		s.execMu.Lock()
		cancel := s.execs[req.Target]
		s.execMu.Unlock()
		if cancel != nil {
			cancel()
		}
		s.reply(&proto.Response{ID: req.ID, Kind: proto.KindOK})
	case proto.OpShutdown:
		s.reply(&proto.Response{ID: req.ID, Kind: proto.KindOK})
		if s.opts.PowerOff != nil {
			s.opts.Logger.Info("powering off on host request")
			if err := s.opts.PowerOff(); err != nil {
				s.opts.Logger.Error("power off", "err", err)
			}
		}
	default:
		s.fail(req.ID, proto.CodeUnknownOp, fmt.Errorf("unknown operation %q", req.Op))
	}
}

func (s *session) handoff(h *proto.Handoff) (proto.HandoffResult, error) {
	var res proto.HandoffResult
	if len(h.Entropy) > proto.MaxEntropy {
		return res, fmt.Errorf("handoff entropy of %d bytes exceeds %d", len(h.Entropy), proto.MaxEntropy)
	}
	res.StepsMicros = make(map[string]int64, 4)
	step := time.Now()
	took := func(name string) {
		now := time.Now()
		res.StepsMicros[name] = now.Sub(step).Microseconds()
		step = now
	}
	if len(h.Entropy) > 0 && s.opts.AddEntropy != nil {
		err := s.opts.AddEntropy(h.Entropy)
		switch {
		case errors.Is(err, ErrNotReseeded):
			res.EntropyBytes, res.NotReseeded = len(h.Entropy), err.Error()
			s.opts.Logger.Warn("hand-off entropy added without a CRNG reseed", "bytes", len(h.Entropy), "err", err)
		case err != nil:
			return res, fmt.Errorf("add %d bytes of entropy: %w", len(h.Entropy), err)
		default:
			res.EntropyBytes, res.Reseeded = len(h.Entropy), true
		}
		took("entropy")
	}
	if h.UnixNano != 0 && s.opts.SetTime != nil {
		t := time.Unix(0, h.UnixNano)
		if err := s.opts.SetTime(t); err != nil {
			return res, fmt.Errorf("set clock to %s: %w", t.UTC().Format(time.RFC3339Nano), err)
		}
		took("clock") // monotonic: setting the clock does not skew it
	}
	if h.Hostname != "" && s.opts.SetHostname != nil {
		if err := s.opts.SetHostname(h.Hostname); err != nil {
			return res, fmt.Errorf("set hostname %q: %w", h.Hostname, err)
		}
		took("hostname")
	}
	if len(h.Env) > 0 {
		s.opts.State.setEnv(h.Env)
	}
	if err := s.setNetwork(h.Network); err != nil {
		return res, err
	}
	took("network")
	return res, nil
}

func (s *session) startExec(id uint64, e *proto.Exec) {
	ctx, cancel := context.WithCancel(s.ctx)
	if e.TimeoutMillis > 0 {
		ctx, cancel = context.WithTimeoutCause(s.ctx, time.Duration(e.TimeoutMillis)*time.Millisecond, errExecTimeout)
	}
	s.execMu.Lock()
	if _, dup := s.execs[id]; dup {
		s.execMu.Unlock()
		cancel()
		s.fail(id, proto.CodeBadRequest, fmt.Errorf("request ID %d already running", id))
		return
	}
	s.execs[id] = cancel
	s.execMu.Unlock()
	s.wg.Go(func() {
		defer func() {
			s.execMu.Lock()
			delete(s.execs, id)
			s.execMu.Unlock()
			cancel()
		}()
		s.runExec(ctx, id, e)
	})
}

var errExecTimeout = errors.New("exec timed out")

func (s *session) runExec(ctx context.Context, id uint64, e *proto.Exec) {
	cmd, err := s.command(e.Argv, e.Env, e.Dir, e.User)
	if err != nil {
		s.fail(id, errorCode(err), err)
		return
	}
	if len(e.Stdin) > 0 {
		cmd.Stdin = bytes.NewReader(e.Stdin)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		s.fail(id, proto.CodeInternal, err)
		return
	}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		s.fail(id, proto.CodeInternal, err)
		return
	}
	if err := cmd.Start(); err != nil {
		s.fail(id, proto.CodeExecFailed, fmt.Errorf("start %q: %w", e.Argv[0], err))
		return
	}
	done := make(chan struct{})
	go func() {
		select {
		case <-ctx.Done():
			_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		case <-done:
		}
	}()
	var pipes sync.WaitGroup
	pipes.Go(func() { s.stream(id, proto.KindStdout, stdout) })
	pipes.Go(func() { s.stream(id, proto.KindStderr, stderr) })
	// Output must be read to the end before Wait closes the pipes.
	pipes.Wait()
	err = cmd.Wait()
	close(done)
	switch {
	case context.Cause(ctx) == errExecTimeout:
		s.fail(id, proto.CodeTimeout, fmt.Errorf("%q killed after %s", e.Argv[0], time.Duration(e.TimeoutMillis)*time.Millisecond))
		return
	case ctx.Err() != nil:
		s.fail(id, proto.CodeCanceled, fmt.Errorf("%q canceled by the host", e.Argv[0]))
		return
	}
	code := 0
	var exitErr *exec.ExitError
	if errors.As(err, &exitErr) {
		code = exitErr.ExitCode()
		if ws, ok := exitErr.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			code = 128 + int(ws.Signal())
		}
	} else if err != nil {
		s.fail(id, proto.CodeInternal, fmt.Errorf("wait for %q: %w", e.Argv[0], err))
		return
	}
	s.reply(&proto.Response{ID: id, Kind: proto.KindExit, ExitCode: code})
}

func (s *session) stream(id uint64, kind string, r io.Reader) {
	buf := make([]byte, proto.MaxChunk)
	for {
		n, err := r.Read(buf)
		if n > 0 {
			s.reply(&proto.Response{ID: id, Kind: kind, Data: buf[:n]})
		}
		if err != nil {
			return
		}
	}
}
