package e2b

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"connectrpc.com/connect"

	"github.com/warmpool/warmpool/agent"
	"github.com/warmpool/warmpool/api"
)

// Processes are the guest agent's: envd's Start is an agent process
// started with Keep, so that its output streams to the Start request with
// nothing lost, and it runs on when that request goes away first (as envd
// runs a command whose client disconnected until it ends or its timeout);
// Connect attaches to it again by its PID. The PIDs are the guest's.

// eventStream sends envd process events on one Start or Connect stream;
// output, keepalives and the end come from different goroutines.
type eventStream struct {
	mu     sync.Mutex
	stream *connect.ServerStream[processStream]
	pty    bool
}

func (e *eventStream) send(ev processEvent) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.stream.Send(&processStream{Event: ev})
}

// output is an io.Writer of data events for one of the process's streams.
func (e *eventStream) output(stderr bool) io.Writer {
	return writerFunc(func(b []byte) (int, error) {
		// Sent before Write returns, so b needs no copy.
		data := &dataEvent{}
		switch {
		case e.pty:
			data.PTY = b
		case stderr:
			data.Stderr = b
		default:
			data.Stdout = b
		}
		if err := e.send(processEvent{Data: data}); err != nil {
			return 0, err
		}
		return len(b), nil
	})
}

// keepalive sends a keepalive event every interval the client asked for
// (Keepalive-Ping-Interval) until ctx ends.
func (e *eventStream) keepalive(ctx context.Context, every time.Duration) {
	sendKeepalives(ctx, every, func() error { return e.send(processEvent{Keepalive: &struct{}{}}) })
}

// sendKeepalives calls send every interval (none when it is not positive)
// on a goroutine of its own, until ctx ends or send fails.
func sendKeepalives(ctx context.Context, every time.Duration, send func() error) {
	if every <= 0 {
		return
	}
	go func() {
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				if send() != nil {
					return
				}
			}
		}
	}()
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(b []byte) (int, error) { return f(b) }

// endOf is envd's end event for an agent exit status: a command killed by
// a signal has exit code -1 and did not exit, as Go's os/exec reports it.
func endOf(e api.ExitStatus) *endEvent {
	if e.Signal > 0 {
		status := "signal: " + syscall.Signal(e.Signal).String()
		return &endEvent{ExitCode: -1, Exited: false, Status: status, Error: &status}
	}
	status := fmt.Sprintf("exit status %d", e.Code)
	end := &endEvent{ExitCode: int32(e.Code), Exited: true, Status: status}
	if e.Code != 0 {
		end.Error = &status
	}
	return end
}

// processTimeout is the command's lifetime: the request's deadline (the
// SDK's timeoutMs, sent as Connect-Timeout-Ms), as envd kills a command
// at its request's timeout; none without a deadline.
func processTimeout(ctx context.Context) time.Duration {
	dl, ok := ctx.Deadline()
	if !ok {
		return 0
	}
	return max(time.Until(dl), time.Millisecond)
}

func (s *Server) startProcess(ctx context.Context, req *connect.Request[startRequest], stream *connect.ServerStream[processStream]) error {
	sbx := sandboxFrom(ctx)
	m := req.Msg
	if m.Process == nil || m.Process.Cmd == "" {
		return connect.NewError(connect.CodeInvalidArgument, errors.New("process.cmd: must name a command"))
	}
	user, err := requestUser(req, "")
	if err != nil {
		return err
	}
	g, done, err := s.guest(ctx, sbx)
	if err != nil {
		return err
	}
	defer done()
	preq := agent.ProcessRequest{
		Argv:    append([]string{m.Process.Cmd}, m.Process.Args...),
		Env:     envList(m.Process.Envs),
		User:    user,
		Stdin:   m.Stdin != nil && *m.Stdin,
		Keep:    true,
		Timeout: processTimeout(ctx),
	}
	if m.Tag != nil {
		preq.Tag = *m.Tag
	}
	if m.PTY != nil {
		// A terminal's input is its stdin: always open.
		preq.TTY, preq.Stdin = true, true
		if m.PTY.Size != nil {
			preq.Rows, preq.Cols = int(m.PTY.Size.Rows), int(m.PTY.Size.Cols)
		}
	}
	if err := (api.ProcessRequest{Argv: preq.Argv, Env: preq.Env, Rows: preq.Rows, Cols: preq.Cols, Tag: preq.Tag}).Validate(); err != nil {
		return connect.NewError(connect.CodeInvalidArgument, err)
	}
	preq = g.WithDefaults(preq)
	// envd starts a command in the user's home directory unless told
	// otherwise; the image's working directory, when it has one, wins.
	if m.Process.Cwd != nil && *m.Process.Cwd != "" {
		if preq.Dir, err = resolvePath(ctx, g, user, *m.Process.Cwd); err != nil {
			return err
		}
	} else if preq.Dir == "" {
		if preq.Dir, err = homeOf(ctx, g, runAs(g, user)); err != nil {
			return err
		}
	}
	p, err := g.Start(ctx, preq)
	if err != nil {
		return guestError(sbx, err)
	}
	// With Keep, closing the stream leaves the command running.
	defer p.Close()
	ev := &eventStream{stream: stream, pty: preq.TTY}
	if err := ev.send(processEvent{Start: &startEvent{PID: uint32(p.PID)}}); err != nil {
		return err
	}
	kctx, stop := context.WithCancel(ctx)
	defer stop()
	ev.keepalive(kctx, keepaliveInterval(req.Header()))
	exit, err := p.Output(ev.output(false), ev.output(true))
	return s.end(ctx, sbx, ev, exit, err)
}

// end sends the end event of a process whose output ended with exit and
// err, or the error the stream ends with.
func (s *Server) end(ctx context.Context, sbx string, ev *eventStream, exit api.ExitStatus, err error) error {
	switch {
	case err == nil:
	case errors.Is(err, agent.ErrTimeout):
		// Killed at its timeout: the agent says so beside the exit.
	case ctx.Err() != nil:
		// The client went away (the command runs on) or its deadline came.
		return rpcError(context.Cause(ctx))
	default:
		return guestError(sbx, err)
	}
	stop := ev.send(processEvent{End: endOf(exit)})
	if stop != nil && ctx.Err() == nil {
		return stop
	}
	return nil
}

// pidOf finds the running process sel names: by PID or by tag.
func (s *Server) pidOf(ctx context.Context, g *api.Guest, sbx string, sel processSelector) (api.ProcessInfo, error) {
	ps, err := g.Processes(ctx)
	if err != nil {
		return api.ProcessInfo{}, guestError(sbx, err)
	}
	for _, p := range ps {
		if !p.Running {
			continue
		}
		if sel.PID != nil && p.PID == int(*sel.PID) || sel.PID == nil && sel.Tag != nil && p.Tag == *sel.Tag {
			return p, nil
		}
	}
	return api.ProcessInfo{}, connect.NewError(connect.CodeNotFound, fmt.Errorf("sandbox %s: no running process with %s", sbx, selectorString(sel)))
}

// selectedProcess opens sandbox sbx's guest and finds the process sel
// names; done releases the guest and is set only when err is nil.
func (s *Server) selectedProcess(ctx context.Context, sbx string, sel processSelector) (g *api.Guest, pid int, done func(), err error) {
	g, done, err = s.guest(ctx, sbx)
	if err != nil {
		return nil, 0, nil, err
	}
	if pid, err = s.selectedPID(ctx, g, sbx, sel); err != nil {
		done()
		return nil, 0, nil, err
	}
	return g, pid, done, nil
}

// selectedPID is the PID sel names, looked up only for a tag.
func (s *Server) selectedPID(ctx context.Context, g *api.Guest, sbx string, sel processSelector) (int, error) {
	if sel.PID != nil {
		if *sel.PID == 0 || *sel.PID > math.MaxInt32 {
			return 0, connect.NewError(connect.CodeNotFound, fmt.Errorf("sandbox %s: no process with pid %d", sbx, *sel.PID))
		}
		return int(*sel.PID), nil
	}
	if sel.Tag == nil {
		return 0, connect.NewError(connect.CodeInvalidArgument, errors.New("process: name a pid or a tag"))
	}
	p, err := s.pidOf(ctx, g, sbx, sel)
	return p.PID, err
}

// connectProcess is envd's Connect: what a running process writes from
// now on, and its end.
func (s *Server) connectProcess(ctx context.Context, req *connect.Request[connectProcessRequest], stream *connect.ServerStream[processStream]) error {
	sbx := sandboxFrom(ctx)
	g, done, err := s.guest(ctx, sbx)
	if err != nil {
		return err
	}
	defer done()
	p, err := s.pidOf(ctx, g, sbx, req.Msg.Process)
	if err != nil {
		return err
	}
	ev := &eventStream{stream: stream, pty: p.TTY}
	if err := ev.send(processEvent{Start: &startEvent{PID: uint32(p.PID)}}); err != nil {
		return err
	}
	kctx, stop := context.WithCancel(ctx)
	defer stop()
	ev.keepalive(kctx, keepaliveInterval(req.Header()))
	exit, err := g.Attach(ctx, p.PID, false, ev.output(false), ev.output(true))
	return s.end(ctx, sbx, ev, exit, err)
}

func (s *Server) listProcesses(ctx context.Context, req *connect.Request[listRequest]) (*connect.Response[listResponse], error) {
	sbx := sandboxFrom(ctx)
	g, done, err := s.guest(ctx, sbx)
	if err != nil {
		return nil, err
	}
	defer done()
	ps, err := g.Processes(ctx)
	if err != nil {
		return nil, guestError(sbx, err)
	}
	out := &listResponse{Processes: []processInfo{}}
	for _, p := range ps {
		if !p.Running || len(p.Argv) == 0 {
			continue
		}
		info := processInfo{PID: uint32(p.PID), Config: processConfig{Cmd: p.Argv[0], Args: slices.Clone(p.Argv[1:]), Envs: map[string]string{}}}
		if p.Dir != "" {
			info.Config.Cwd = &p.Dir
		}
		if p.Tag != "" {
			info.Tag = &p.Tag
		}
		out.Processes = append(out.Processes, info)
	}
	return connect.NewResponse(out), nil
}

func (s *Server) sendSignal(ctx context.Context, req *connect.Request[sendSignalRequest]) (*connect.Response[empty], error) {
	sbx := sandboxFrom(ctx)
	var sig syscall.Signal
	switch req.Msg.Signal {
	case 9:
		sig = syscall.SIGKILL
	case 15:
		sig = syscall.SIGTERM
	default:
		return nil, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("signal %d: want SIGNAL_SIGKILL or SIGNAL_SIGTERM", req.Msg.Signal))
	}
	g, pid, done, err := s.selectedProcess(ctx, sbx, req.Msg.Process)
	if err != nil {
		return nil, err
	}
	defer done()
	if err := g.Signal(ctx, pid, sig); err != nil {
		return nil, guestError(sbx, err)
	}
	return connect.NewResponse(&empty{}), nil
}

// input is a process's stdin, or its terminal's input.
func (in *processInput) bytes() []byte {
	if in == nil {
		return nil
	}
	if in.PTY != nil {
		return in.PTY
	}
	return in.Stdin
}

func (s *Server) sendInput(ctx context.Context, req *connect.Request[sendInputRequest]) (*connect.Response[empty], error) {
	sbx := sandboxFrom(ctx)
	g, pid, done, err := s.selectedProcess(ctx, sbx, req.Msg.Process)
	if err != nil {
		return nil, err
	}
	defer done()
	if err := g.Input(ctx, pid, bytes.NewReader(req.Msg.Input.bytes()), false); err != nil {
		return nil, inputError(sbx, pid, err)
	}
	return connect.NewResponse(&empty{}), nil
}

// inputError says what to do about input to a process started without
// stdin.
func inputError(sbx string, pid int, err error) error {
	var re *agent.RemoteError
	if errors.As(err, &re) && strings.Contains(re.Message, "no open stdin") {
		return connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("process %d has no open stdin: start it with stdin: true", pid))
	}
	return guestError(sbx, err)
}

// streamInput is envd's StreamInput: a start naming the process, then
// input until the client ends the stream, all in one agent input stream.
func (s *Server) streamInput(ctx context.Context, cs *connect.ClientStream[streamInputRequest]) (*connect.Response[empty], error) {
	sbx := sandboxFrom(ctx)
	if !cs.Receive() {
		if err := cs.Err(); err != nil {
			return nil, err
		}
		return nil, connect.NewError(connect.CodeInvalidArgument, errors.New("stream input: no start message"))
	}
	first := cs.Msg()
	if first.Start == nil {
		return nil, connect.NewError(connect.CodeInvalidArgument, errors.New("stream input: the first message must be start, naming the process"))
	}
	g, pid, done, err := s.selectedProcess(ctx, sbx, first.Start.Process)
	if err != nil {
		return nil, err
	}
	defer done()
	pr, pw := io.Pipe()
	fed := make(chan error, 1)
	go func() {
		err := g.Input(ctx, pid, pr, false)
		// Unblocks the client loop below when the guest refused early.
		pr.CloseWithError(io.ErrClosedPipe)
		fed <- err
	}()
	for cs.Receive() {
		if d := cs.Msg().Data; d != nil {
			if _, err := pw.Write(d.Input.bytes()); err != nil {
				break
			}
		}
	}
	if err := cs.Err(); err != nil {
		pw.CloseWithError(err)
		<-fed
		return nil, err
	}
	pw.Close()
	if err := <-fed; err != nil {
		return nil, inputError(sbx, pid, err)
	}
	return connect.NewResponse(&empty{}), nil
}

func (s *Server) closeStdin(ctx context.Context, req *connect.Request[closeStdinRequest]) (*connect.Response[empty], error) {
	sbx := sandboxFrom(ctx)
	g, pid, done, err := s.selectedProcess(ctx, sbx, req.Msg.Process)
	if err != nil {
		return nil, err
	}
	defer done()
	if err := g.Input(ctx, pid, bytes.NewReader(nil), true); err != nil {
		return nil, inputError(sbx, pid, err)
	}
	return connect.NewResponse(&empty{}), nil
}

// update is envd's Update: a terminal's new size.
func (s *Server) update(ctx context.Context, req *connect.Request[updateRequest]) (*connect.Response[empty], error) {
	sbx := sandboxFrom(ctx)
	if req.Msg.PTY == nil || req.Msg.PTY.Size == nil {
		return nil, connect.NewError(connect.CodeInvalidArgument, errors.New("pty.size: an update must carry the terminal's new size"))
	}
	size := req.Msg.PTY.Size
	if err := (api.ResizeRequest{Rows: int(size.Rows), Cols: int(size.Cols)}).Validate(); err != nil {
		return nil, connect.NewError(connect.CodeInvalidArgument, err)
	}
	g, pid, done, err := s.selectedProcess(ctx, sbx, req.Msg.Process)
	if err != nil {
		return nil, err
	}
	defer done()
	if err := g.Resize(ctx, pid, int(size.Rows), int(size.Cols)); err != nil {
		return nil, guestError(sbx, err)
	}
	return connect.NewResponse(&empty{}), nil
}
