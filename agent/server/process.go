package server

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"slices"
	"sort"
	"sync"
	"syscall"
	"time"

	"github.com/creack/pty"

	"github.com/warmpool/warmpool/agent/proto"
)

// DefaultOutputBuffer is how much output the agent keeps per process.
const DefaultOutputBuffer = 1 << 20

// keptExited is how many ended processes the agent remembers (for ps, logs
// and wait) before forgetting the oldest.
const keptExited = 16

// maxProcesses bounds the processes the agent runs at once.
const maxProcesses = 1024

// processTable is every process the agent started, across host connections:
// a detached process outlives the connection that started it.
type processTable struct {
	mu     sync.Mutex
	procs  map[int]*process
	exited []int // PIDs of ended processes, oldest first
}

func newProcessTable() *processTable { return &processTable{procs: map[int]*process{}} }

// process is one command the agent started.
type process struct {
	pid     int
	spec    proto.ProcessSpec
	started time.Time
	cmd     *exec.Cmd
	out     *outBuf
	ptmx    *os.File // the terminal's master side when spec.TTY

	stdinMu sync.Mutex
	stdin   io.WriteCloser // nil when stdin is closed or was never open

	done chan struct{} // closed once exit is set
	exit proto.ExitStatus
}

func (t *processTable) get(pid int) (*process, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if p := t.procs[pid]; p != nil {
		return p, nil
	}
	return nil, &codedError{code: proto.CodeNoProcess, err: fmt.Errorf("no process %d started by the agent", pid)}
}

func (t *processTable) list() []proto.ProcessInfo {
	t.mu.Lock()
	ps := make([]*process, 0, len(t.procs))
	for _, p := range t.procs {
		ps = append(ps, p)
	}
	t.mu.Unlock()
	sort.Slice(ps, func(i, j int) bool { return ps[i].started.Before(ps[j].started) })
	out := make([]proto.ProcessInfo, 0, len(ps))
	for _, p := range ps {
		out = append(out, p.info())
	}
	return out
}

func (p *process) info() proto.ProcessInfo {
	i := proto.ProcessInfo{PID: p.pid, Argv: p.spec.Argv, TTY: p.spec.TTY, Detached: p.spec.Detach || p.spec.Keep, Tag: p.spec.Tag, Dir: p.spec.Dir,
		StartedUnixNano: p.started.UnixNano(), Running: true}
	select {
	case <-p.done:
		e := p.exit
		i.Running, i.Exit = false, &e
	default:
	}
	return i
}

// codedError carries a protocol error code.
type codedError struct {
	code string
	err  error
}

func (e *codedError) Error() string { return e.err.Error() }
func (e *codedError) Unwrap() error { return e.err }

var errProcessTimeout = errors.New("process timed out")

// start runs spec. The process's output goes to its outBuf; hold makes the
// caller's cursor (returned) a holding one from the first byte, so that an
// attached host misses nothing and slows the process when it reads slowly.
func (s *session) startProcess(spec *proto.ProcessSpec, hold bool) (*process, *outCursor, error) {
	if len(spec.Argv) == 0 || spec.Argv[0] == "" {
		return nil, nil, &codedError{code: proto.CodeBadRequest, err: errors.New("process without argv")}
	}
	t := s.opts.State.procs
	t.mu.Lock()
	running := len(t.procs) - len(t.exited)
	t.mu.Unlock()
	if running >= maxProcesses {
		return nil, nil, &codedError{code: proto.CodeExecFailed, err: fmt.Errorf("%d processes running, the most the agent runs at once", running)}
	}
	cmd, err := s.command(spec.Argv, spec.Env, spec.Dir, spec.User)
	if err != nil {
		return nil, nil, err
	}
	size := s.opts.OutputBuffer
	if size <= 0 {
		size = DefaultOutputBuffer
	}
	p := &process{spec: *spec, out: newOutBuf(size), done: make(chan struct{}), cmd: cmd}
	p.spec.Argv = slices.Clone(spec.Argv)
	var cur *outCursor
	if hold {
		cur = p.out.cursor(true, true)
	}
	var pumps []io.Reader
	wait := cmd.Wait
	if sp := s.opts.State.spares.take(spec, cmd.Env); sp != nil {
		if pumps, err = sp.run(spec); err == nil {
			cmd, wait = sp.cmd, sp.wait
			p.cmd = cmd
		} else {
			// The spare died as it was taken: the command starts as usual.
			s.opts.Logger.Debug("spare shell lost", "err", err)
		}
	}
	switch {
	case pumps != nil:
		// It runs in the spare.
	case spec.TTY:
		rows, cols := spec.Rows, spec.Cols
		if rows <= 0 || cols <= 0 {
			rows, cols = 24, 80
		}
		attrs := cmd.SysProcAttr
		attrs.Setpgid = false
		attrs.Setsid, attrs.Setctty = true, true
		ptmx, err := pty.StartWithAttrs(cmd, &pty.Winsize{Rows: uint16(rows), Cols: uint16(cols)}, attrs)
		if err != nil {
			return nil, nil, &codedError{code: proto.CodeExecFailed, err: fmt.Errorf("start %q on a terminal: %w", spec.Argv[0], err)}
		}
		p.ptmx = ptmx
		if spec.Stdin {
			p.stdin = nopCloser{ptmx}
		}
		pumps = append(pumps, ptmx)
	default:
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			return nil, nil, err
		}
		stderr, err := cmd.StderrPipe()
		if err != nil {
			return nil, nil, err
		}
		if spec.Stdin {
			w, err := cmd.StdinPipe()
			if err != nil {
				return nil, nil, err
			}
			p.stdin = w
		}
		if err := cmd.Start(); err != nil {
			return nil, nil, &codedError{code: proto.CodeExecFailed, err: fmt.Errorf("start %q: %w", spec.Argv[0], err)}
		}
		pumps = append(pumps, stdout, stderr)
	}
	p.pid = cmd.Process.Pid
	p.started = time.Now()
	t.mu.Lock()
	if old := t.procs[p.pid]; old != nil {
		// The kernel reused the PID of an ended process we remembered.
		t.exited = slices.DeleteFunc(t.exited, func(pid int) bool { return pid == old.pid })
	}
	t.procs[p.pid] = p
	t.mu.Unlock()

	ctx, cancel := context.Background(), context.CancelFunc(func() {})
	if spec.TimeoutMillis > 0 {
		ctx, cancel = context.WithTimeoutCause(ctx, time.Duration(spec.TimeoutMillis)*time.Millisecond, errProcessTimeout)
	}
	go func() {
		defer cancel()
		select {
		case <-ctx.Done():
			p.signal(syscall.SIGKILL)
		case <-p.done:
		}
	}()
	go func() {
		var wg sync.WaitGroup
		for i, r := range pumps {
			fd := proto.FrameStdout
			if i == 1 {
				fd = proto.FrameStderr
			}
			wg.Go(func() { pump(p.out, fd, r) })
		}
		wg.Wait()
		err := wait()
		if p.ptmx != nil {
			p.ptmx.Close()
		}
		p.closeStdin()
		p.exit = exitStatus(err)
		if context.Cause(ctx) == errProcessTimeout {
			p.exit.Error = fmt.Sprintf("%q killed after %s", spec.Argv[0], time.Duration(spec.TimeoutMillis)*time.Millisecond)
			p.exit.ErrCode = proto.CodeTimeout
		}
		close(p.done)
		p.out.close()
		s.replenish(spec)
		t.mu.Lock()
		t.exited = append(t.exited, p.pid)
		for len(t.exited) > keptExited {
			if t.procs[t.exited[0]] != nil {
				delete(t.procs, t.exited[0])
			}
			t.exited = t.exited[1:]
		}
		t.mu.Unlock()
	}()
	return p, cur, nil
}

type nopCloser struct{ io.Writer }

func (nopCloser) Close() error { return nil }

// pump copies r into out until r ends. A terminal's master reports EIO
// once the last process holding the terminal is gone: that is its end.
func pump(out *outBuf, fd byte, r io.Reader) {
	buf := make([]byte, 64<<10)
	for {
		n, err := r.Read(buf)
		out.write(fd, buf[:n])
		if err != nil {
			return
		}
	}
}

func exitStatus(err error) proto.ExitStatus {
	var exitErr *exec.ExitError
	switch {
	case err == nil:
		return proto.ExitStatus{}
	case errors.As(err, &exitErr):
		st := proto.ExitStatus{Code: exitErr.ExitCode()}
		if ws, ok := exitErr.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			st.Code, st.Signal = 128+int(ws.Signal()), int(ws.Signal())
		}
		return st
	}
	return proto.ExitStatus{Code: -1, Error: err.Error(), ErrCode: proto.CodeInternal}
}

// signal sends sig to the process's group, so that what it started gets it
// too, as a terminal's Ctrl-C reaches a whole job.
func (p *process) signal(sig syscall.Signal) error {
	select {
	case <-p.done:
		return &codedError{code: proto.CodeNoProcess, err: fmt.Errorf("process %d has exited", p.pid)}
	default:
	}
	err := syscall.Kill(-p.pid, sig)
	if errors.Is(err, syscall.ESRCH) {
		err = syscall.Kill(p.pid, sig)
	}
	if err != nil {
		return fmt.Errorf("signal %d to process %d: %w", sig, p.pid, err)
	}
	return nil
}

func (p *process) writeStdin(b []byte) error {
	p.stdinMu.Lock()
	defer p.stdinMu.Unlock()
	if p.stdin == nil {
		return &codedError{code: proto.CodeBadRequest, err: fmt.Errorf("process %d has no open stdin", p.pid)}
	}
	_, err := p.stdin.Write(b)
	return err
}

func (p *process) closeStdin() {
	p.stdinMu.Lock()
	defer p.stdinMu.Unlock()
	if p.stdin != nil {
		p.stdin.Close()
		p.stdin = nil
	}
}

func (p *process) resize(rows, cols int) error {
	if p.ptmx == nil {
		return &codedError{code: proto.CodeBadRequest, err: fmt.Errorf("process %d has no terminal", p.pid)}
	}
	if rows <= 0 || cols <= 0 || rows > 0xffff || cols > 0xffff {
		return &codedError{code: proto.CodeBadRequest, err: fmt.Errorf("window size %dx%d", rows, cols)}
	}
	select {
	case <-p.done:
		return &codedError{code: proto.CodeNoProcess, err: fmt.Errorf("process %d has exited", p.pid)}
	default:
	}
	return pty.Setsize(p.ptmx, &pty.Winsize{Rows: uint16(rows), Cols: uint16(cols)})
}

// command builds the exec.Cmd of a process: the agent's environment, the
// user's (HOME, USER, LOGNAME), the hand-off's and the request's on top,
// in its own process group so that a signal or a kill reaches what it
// started too.
func (s *session) command(argv, env []string, dir, user string) (*exec.Cmd, error) {
	cmd := exec.Command(argv[0], argv[1:]...)
	base := s.opts.Env
	if base == nil {
		base = os.Environ()
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	var userEnv []string
	if user != "" {
		root := s.opts.Root
		if root == "" {
			root = "/"
		}
		u, err := resolveUser(root, user)
		if err != nil {
			return nil, &codedError{code: proto.CodeExecFailed, err: fmt.Errorf("run %q as %q: %w", argv[0], user, err)}
		}
		cmd.SysProcAttr.Credential = &syscall.Credential{Uid: u.UID, Gid: u.GID, Groups: u.Groups}
		userEnv = u.environ()
	}
	cmd.Env = slices.Concat(base, userEnv, s.opts.State.environ(), env)
	cmd.Dir = dir
	return cmd, nil
}
