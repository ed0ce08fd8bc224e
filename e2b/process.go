package e2b

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"connectrpc.com/connect"

	"github.com/warmpool/warmpool/api"
	"github.com/warmpool/warmpool/vm"
)

// process is a command started through envd's Start: one exec of the
// Backend, alive as long as the Start stream that began it. Its output
// goes to that stream and to every Connect stream attached since.
type process struct {
	pid    uint32
	config processConfig
	tag    *string
	cancel context.CancelFunc
	done   chan struct{}

	mu     sync.Mutex
	sinks  map[int]func(processEvent) error
	nextID int
	killed bool
	end    *processEvent
}

func (p *process) attach(sink func(processEvent) error) (detach func()) {
	p.mu.Lock()
	defer p.mu.Unlock()
	id := p.nextID
	p.nextID++
	p.sinks[id] = sink
	return func() {
		p.mu.Lock()
		delete(p.sinks, id)
		p.mu.Unlock()
	}
}

// emit sends ev to every attached stream; a stream that fails is dropped
// (its client went away).
func (p *process) emit(ev processEvent) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if ev.End != nil {
		p.end = &ev
	}
	for id, sink := range p.sinks {
		if err := sink(ev); err != nil {
			delete(p.sinks, id)
		}
	}
}

func (p *process) kill() {
	p.mu.Lock()
	p.killed = true
	p.mu.Unlock()
	p.cancel()
}

func (p *process) wasKilled() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.killed
}

// processTable holds the running processes of every sandbox.
type processTable struct {
	mu      sync.Mutex
	nextPID uint32
	bySbx   map[string]map[uint32]*process
}

func newProcessTable() *processTable {
	return &processTable{nextPID: 1, bySbx: map[string]map[uint32]*process{}}
}

func (t *processTable) add(sbx string, cfg processConfig, tag *string, cancel context.CancelFunc) *process {
	t.mu.Lock()
	defer t.mu.Unlock()
	p := &process{pid: t.nextPID, config: cfg, tag: tag, cancel: cancel, done: make(chan struct{}), sinks: map[int]func(processEvent) error{}}
	t.nextPID++
	if t.bySbx[sbx] == nil {
		t.bySbx[sbx] = map[uint32]*process{}
	}
	t.bySbx[sbx][p.pid] = p
	return p
}

func (t *processTable) remove(sbx string, pid uint32) {
	t.mu.Lock()
	defer t.mu.Unlock()
	delete(t.bySbx[sbx], pid)
	if len(t.bySbx[sbx]) == 0 {
		delete(t.bySbx, sbx)
	}
}

func (t *processTable) find(sbx string, sel processSelector) (*process, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, p := range t.bySbx[sbx] {
		if sel.PID != nil && p.pid == *sel.PID || sel.PID == nil && sel.Tag != nil && p.tag != nil && *p.tag == *sel.Tag {
			return p, nil
		}
	}
	return nil, connect.NewError(connect.CodeNotFound, fmt.Errorf("sandbox %s: no running process with %s", sbx, selectorString(sel)))
}

func (t *processTable) list(sbx string) []*process {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make([]*process, 0, len(t.bySbx[sbx]))
	for _, p := range t.bySbx[sbx] {
		out = append(out, p)
	}
	slices.SortFunc(out, func(a, b *process) int { return int(a.pid) - int(b.pid) })
	return out
}

// forget kills the processes of a sandbox being killed.
func (t *processTable) forget(sbx string) {
	for _, p := range t.list(sbx) {
		p.kill()
	}
}

// streamWriter turns exec output into data events.
type streamWriter struct {
	p      *process
	stderr bool
}

func (w streamWriter) Write(b []byte) (int, error) {
	data := &dataEvent{}
	// The event outlives the call: the writer may reuse b.
	c := slices.Clone(b)
	if w.stderr {
		data.Stderr = c
	} else {
		data.Stdout = c
	}
	w.p.emit(processEvent{Data: data})
	return len(b), nil
}

func (s *Server) startProcess(ctx context.Context, req *connect.Request[startRequest], stream *connect.ServerStream[processStream]) error {
	sbx := sandboxFrom(ctx)
	m := req.Msg
	if m.Process == nil || m.Process.Cmd == "" {
		return connect.NewError(connect.CodeInvalidArgument, errors.New("process.cmd: must name a command"))
	}
	if m.PTY != nil {
		return errNoPTY
	}
	if m.Stdin != nil && *m.Stdin {
		return errNoStdin
	}
	if err := s.running(ctx, sbx); err != nil {
		return err
	}
	execReq := api.ExecRequest{
		Argv:    append([]string{m.Process.Cmd}, m.Process.Args...),
		Env:     envList(m.Process.Envs),
		Timeout: api.Duration(execTimeout(ctx)),
	}
	if m.Process.Cwd != nil {
		execReq.Dir = *m.Process.Cwd
	}
	user, err := requestUser(req, "")
	if err != nil {
		return err
	}
	execReq.User = user
	if err := execReq.Validate(); err != nil {
		return connect.NewError(connect.CodeInvalidArgument, err)
	}
	pctx, cancel := context.WithCancel(ctx)
	defer cancel()
	p := s.procs.add(sbx, *m.Process, m.Tag, cancel)
	// Gone from the table before its end event goes out: a client that
	// lists processes once a command ended must not see it.
	var removeOnce sync.Once
	remove := func() { removeOnce.Do(func() { s.procs.remove(sbx, p.pid) }) }
	defer remove()
	defer close(p.done)

	var sendMu sync.Mutex
	send := func(ev processEvent) error {
		sendMu.Lock()
		defer sendMu.Unlock()
		return stream.Send(&processStream{Event: ev})
	}
	if err := send(processEvent{Start: &startEvent{PID: p.pid}}); err != nil {
		return err
	}
	defer p.attach(send)()
	if every := keepaliveInterval(req.Header()); every > 0 {
		go func() {
			t := time.NewTicker(every)
			defer t.Stop()
			for {
				select {
				case <-pctx.Done():
					return
				case <-t.C:
					p.emit(processEvent{Keepalive: &struct{}{}})
				}
			}
		}()
	}
	code, err := s.opts.Backend.Exec(pctx, sbx, execReq, streamWriter{p: p}, streamWriter{p: p, stderr: true})
	remove()
	switch {
	case p.wasKilled():
		msg := "signal: killed"
		p.emit(processEvent{End: &endEvent{ExitCode: -1, Exited: false, Status: msg, Error: &msg}})
		return nil
	case ctx.Err() != nil:
		return rpcError(context.Cause(ctx))
	case errors.Is(err, vm.ErrNotFound):
		return connect.NewError(connect.CodeUnavailable, fmt.Errorf("sandbox %s is not running: %w", sbx, err))
	case err != nil:
		return rpcError(err)
	}
	status := fmt.Sprintf("exit status %d", code)
	end := &endEvent{ExitCode: int32(code), Exited: true, Status: status}
	if code != 0 {
		end.Error = &status
	}
	p.emit(processEvent{End: end})
	return nil
}

func (s *Server) connectProcess(ctx context.Context, req *connect.Request[connectProcessRequest], stream *connect.ServerStream[processStream]) error {
	sbx := sandboxFrom(ctx)
	p, err := s.procs.find(sbx, req.Msg.Process)
	if err != nil {
		return err
	}
	var sendMu sync.Mutex
	send := func(ev processEvent) error {
		sendMu.Lock()
		defer sendMu.Unlock()
		return stream.Send(&processStream{Event: ev})
	}
	if err := send(processEvent{Start: &startEvent{PID: p.pid}}); err != nil {
		return err
	}
	detach := p.attach(send)
	defer detach()
	select {
	case <-p.done:
		return nil
	case <-ctx.Done():
		return rpcError(context.Cause(ctx))
	}
}

func (s *Server) listProcesses(ctx context.Context, req *connect.Request[listRequest]) (*connect.Response[listResponse], error) {
	sbx := sandboxFrom(ctx)
	if err := s.running(ctx, sbx); err != nil {
		return nil, err
	}
	out := &listResponse{Processes: []processInfo{}}
	for _, p := range s.procs.list(sbx) {
		out.Processes = append(out.Processes, processInfo{Config: p.config, PID: p.pid, Tag: p.tag})
	}
	return connect.NewResponse(out), nil
}

// sendSignal ends the process: SIGKILL and SIGTERM both end today's exec,
// which kills the command in the guest.
func (s *Server) sendSignal(ctx context.Context, req *connect.Request[sendSignalRequest]) (*connect.Response[empty], error) {
	sbx := sandboxFrom(ctx)
	switch req.Msg.Signal {
	case 9, 15:
	default:
		return nil, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("signal %d: want SIGNAL_SIGKILL or SIGNAL_SIGTERM", req.Msg.Signal))
	}
	p, err := s.procs.find(sbx, req.Msg.Process)
	if err != nil {
		return nil, err
	}
	p.kill()
	return connect.NewResponse(&empty{}), nil
}
