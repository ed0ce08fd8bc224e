package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"path"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/yamux"

	"github.com/warmpool/warmpool/agent/proto"
	"github.com/warmpool/warmpool/vm"
)

// Types of the stream operations, shared with the wire format.
type (
	FileInfo    = proto.FileInfo
	ProcessInfo = proto.ProcessInfo
	ExitStatus  = proto.ExitStatus
)

// Session is a multiplexed connection to one guest agent: every call is
// its own stream with its own flow control, so one command's output that
// nobody reads holds up nothing else, and many calls run at once over the
// agent's single channel. It is safe for concurrent use.
type Session struct {
	conn net.Conn
	mux  *yamux.Session
}

// DialSession connects to the agent of VM id and switches the connection
// to multiplexed streams. A handshake that goes unanswered is tried again
// on a new connection: an agent still in an earlier host's session (one
// that left without bye, or a snapshot taken mid-session) takes the first
// attempt's bytes for a broken frame and reads lines again.
func DialSession(ctx context.Context, d vm.AgentDialer, id string) (*Session, error) {
	var last error
	for wait := 2 * time.Second; wait <= 8*time.Second; wait *= 2 {
		s, err := dialSessionOnce(ctx, d, id, wait)
		if err == nil {
			return s, nil
		}
		last = err
		if ctx.Err() != nil || !errors.Is(err, context.DeadlineExceeded) {
			break
		}
	}
	return nil, last
}

func dialSessionOnce(ctx context.Context, d vm.AgentDialer, id string, helloTimeout time.Duration) (*Session, error) {
	conn, err := d.DialAgent(ctx, id)
	if err != nil {
		return nil, fmt.Errorf("dial agent of %s: %w", id, err)
	}
	ok := false
	defer func() {
		if !ok {
			conn.Close()
		}
	}()
	hctx, cancel := context.WithTimeout(ctx, helloTimeout)
	defer cancel()
	stop := context.AfterFunc(hctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	// Hello and the switch in one write: the agent answers them in order.
	buf := []byte{'\n'}
	for i, op := range []string{proto.OpHello, proto.OpMux} {
		b, err := proto.Encode(&proto.Request{Version: proto.Version, ID: uint64(i + 1), Op: op})
		if err != nil {
			return nil, err
		}
		buf = append(buf, b...)
	}
	if _, err := conn.Write(buf); err != nil {
		stop()
		return nil, fmt.Errorf("agent of %s: send handshake: %w", id, deadlineErr(hctx, err))
	}
	r := proto.NewReader(conn)
	var hello *proto.Hello
	for {
		line, err := r.Next()
		if err != nil {
			stop()
			return nil, fmt.Errorf("agent handshake with %s: %w", id, deadlineErr(hctx, err))
		}
		var resp proto.Response
		if json.Unmarshal(line, &resp) != nil {
			continue
		}
		switch {
		case resp.ID == 1 && resp.Kind == proto.KindHello && resp.Hello != nil:
			hello = resp.Hello
			if hello.Version != proto.Version {
				return nil, fmt.Errorf("agent of %s speaks protocol %d, want %d: %w", id, hello.Version, proto.Version, vm.ErrInvalid)
			}
		case resp.ID == 2 && resp.Kind == proto.KindOK && hello != nil:
			if !stop() {
				return nil, fmt.Errorf("agent handshake with %s: %w", id, context.DeadlineExceeded)
			}
			_ = conn.SetDeadline(time.Time{})
			rest := r.Buffered()
			mux, err := yamux.Client(proto.NewBatchConn(&prefixedConn{Conn: conn, rest: rest}), proto.YamuxConfig())
			if err != nil {
				return nil, fmt.Errorf("agent session with %s: %w", id, err)
			}
			ok = true
			return &Session{conn: conn, mux: mux}, nil
		case resp.ID == 2 && resp.Kind == proto.KindError:
			return nil, fmt.Errorf("agent of %s cannot stream (%s): %w", id, resp.Error, vm.ErrUnsupported)
		}
	}
}

func deadlineErr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return fmt.Errorf("%w: %v", ctx.Err(), err)
	}
	return err
}

// prefixedConn replays what the line reader had buffered.
type prefixedConn struct {
	net.Conn
	rest []byte
}

func (c *prefixedConn) Read(p []byte) (int, error) {
	if len(c.rest) > 0 {
		n := copy(p, c.rest)
		c.rest = c.rest[n:]
		return n, nil
	}
	return c.Conn.Read(p)
}

// byeTimeout bounds the goodbye Close sends before it disconnects.
const byeTimeout = time.Second

// Close ends the session and every stream on it; attached processes in the
// guest are killed, detached ones keep running. It first tells the agent,
// so that the agent reads the next connection in the line format.
func (s *Session) Close() error {
	if !s.mux.IsClosed() {
		ctx, cancel := context.WithTimeout(context.Background(), byeTimeout)
		_, _ = s.call(ctx, &proto.StreamRequest{Op: proto.SOpBye})
		cancel()
	}
	return s.mux.Close()
}

// Done is closed once the session has ended.
func (s *Session) Done() <-chan struct{} { return s.mux.CloseChan() }

// stream is one open operation.
type stream struct {
	st   *yamux.Stream
	fr   *proto.FrameReader
	wmu  sync.Mutex
	fw   *proto.FrameWriter
	stop func() bool
}

// open starts an operation; ctx ending aborts its stream.
func (s *Session) open(ctx context.Context, req *proto.StreamRequest) (*stream, error) {
	ys, err := s.mux.OpenStream()
	if err != nil {
		return nil, fmt.Errorf("agent %s: %w: %v", req.Op, ErrClosed, err)
	}
	st := &stream{st: ys, fr: proto.NewFrameReader(ys), fw: proto.NewFrameWriter(ys)}
	st.stop = context.AfterFunc(ctx, st.abort)
	if err := st.fw.JSON(proto.FrameRequest, req); err != nil {
		st.close()
		return nil, fmt.Errorf("agent %s: send request: %w", req.Op, err)
	}
	return st, nil
}

// abort ends the stream at once in both directions.
func (st *stream) abort() {
	_ = st.st.SetDeadline(time.Unix(1, 0))
	_ = st.st.Close()
}

func (st *stream) close() {
	st.stop()
	_ = st.st.Close()
}

func (st *stream) frame(typ byte, p []byte) error {
	st.wmu.Lock()
	defer st.wmu.Unlock()
	return st.fw.Frame(typ, p)
}

// result reads the stream's StreamResult and turns an error into one.
func (st *stream) result(ctx context.Context, op string) (proto.StreamResult, error) {
	var r proto.StreamResult
	if err := st.fr.Expect(proto.FrameResult, &r); err != nil {
		return r, st.readErr(ctx, op, err)
	}
	if r.Error != "" || r.Code != "" {
		return r, &RemoteError{Op: op, Code: r.Code, Message: r.Error}
	}
	return r, nil
}

func (st *stream) readErr(ctx context.Context, op string, err error) error {
	if ctx.Err() != nil {
		return fmt.Errorf("agent %s: %w", op, ctx.Err())
	}
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, yamux.ErrStreamClosed) ||
		errors.Is(err, yamux.ErrSessionShutdown) || errors.Is(err, yamux.ErrConnectionReset) {
		return fmt.Errorf("agent %s: %w: %v", op, ErrClosed, err)
	}
	return fmt.Errorf("agent %s: %w", op, err)
}

// call runs a one-result operation.
func (s *Session) call(ctx context.Context, req *proto.StreamRequest) (proto.StreamResult, error) {
	st, err := s.open(ctx, req)
	if err != nil {
		return proto.StreamResult{}, err
	}
	defer st.close()
	return st.result(ctx, req.Op)
}

// Ping checks that the agent answers on this session.
func (s *Session) Ping(ctx context.Context) error {
	_, err := s.call(ctx, &proto.StreamRequest{Op: proto.SOpPing})
	return err
}

// Stats reads the guest's memory and uptime.
func (s *Session) Stats(ctx context.Context) (Stats, error) {
	r, err := s.call(ctx, &proto.StreamRequest{Op: proto.SOpStats})
	if err != nil {
		return Stats{}, err
	}
	if r.Stats == nil {
		return Stats{}, errors.New("agent stats: answer without stats")
	}
	st := r.Stats
	return Stats{MemTotalKiB: st.MemTotalKiB, MemFreeKiB: st.MemFreeKiB, MemAvailableKiB: st.MemAvailableKiB,
		Uptime: st.Uptime(), Load1: st.Load1, Procs: st.Procs, Hostname: st.Hostname, Time: time.Unix(0, st.UnixNano)}, nil
}

// ProcessRequest is a process to start in the guest.
type ProcessRequest struct {
	Argv []string
	Env  []string // KEY=VALUE
	Dir  string
	User string
	// TTY runs the process on a terminal of Rows x Cols (0: 24x80).
	TTY        bool
	Rows, Cols int
	// Stdin keeps the process's stdin open for Process.Stdin or Input.
	Stdin bool
	// Detach lets the process outlive the call: Start returns its PID and
	// its output is kept for Logs and Attach.
	Detach bool
	// Keep streams the process's output like an attached one but lets it
	// run on when the stream ends first (Close, a cancelled ctx): it is
	// then reached by its PID, as a detached one.
	Keep    bool
	Timeout time.Duration
	Tag     string
	// Spare starts Argv, a `bash [flags] -c SCRIPT` (see CanSpare), as the
	// agent's spare shell: the call returns once the shell has read its
	// profile and run SCRIPT in a subshell (its output discarded), and the
	// next command of the same shape (flags, environment, user) runs in
	// that shell at once. The agent then keeps a spare of the last such
	// command's shape.
	Spare bool
}

// CanSpare says whether argv is a command a spare shell can run: bash, its
// flags, -c and a script.
func CanSpare(argv []string) bool {
	n := len(argv)
	return n >= 3 && argv[n-2] == "-c" && path.Base(argv[0]) == "bash"
}

func (r ProcessRequest) spec() (*proto.ProcessSpec, error) {
	if len(r.Argv) == 0 || r.Argv[0] == "" {
		return nil, &vm.FieldError{Field: "argv", Value: r.Argv, Reason: "must name a command"}
	}
	if r.Timeout < 0 {
		return nil, &vm.FieldError{Field: "timeout", Value: r.Timeout, Reason: "must not be negative"}
	}
	if r.Rows < 0 || r.Cols < 0 || r.Rows > 0xffff || r.Cols > 0xffff {
		return nil, &vm.FieldError{Field: "rows/cols", Value: fmt.Sprintf("%dx%d", r.Rows, r.Cols), Reason: "must be between 0 and 65535"}
	}
	sp := &proto.ProcessSpec{Argv: r.Argv, Env: r.Env, Dir: r.Dir, User: r.User, TTY: r.TTY, Rows: r.Rows, Cols: r.Cols,
		Detach: r.Detach, Keep: r.Keep && !r.Detach, Stdin: r.Stdin, Tag: r.Tag, Spare: r.Spare}
	if r.Timeout > 0 {
		sp.TimeoutMillis = max(1, r.Timeout.Milliseconds())
	}
	return sp, nil
}

// Process is a process started attached to its stream. Its output must be
// read (Output) for it to make progress; Close kills it if it still runs.
type Process struct {
	PID  int
	argv string
	st   *stream
	ctx  context.Context
}

// Start starts a process. A command that cannot start returns an error
// wrapping ErrExecFailed. For a detached process the returned Process only
// carries the PID.
func (s *Session) Start(ctx context.Context, req ProcessRequest) (*Process, error) {
	sp, err := req.spec()
	if err != nil {
		return nil, err
	}
	st, err := s.open(ctx, &proto.StreamRequest{Op: proto.SOpExec, Process: sp})
	if err != nil {
		return nil, err
	}
	r, err := st.result(ctx, proto.SOpExec)
	if err != nil {
		st.close()
		return nil, err
	}
	p := &Process{PID: r.PID, argv: req.Argv[0], st: st, ctx: ctx}
	if req.Detach {
		st.close()
		p.st = nil
	}
	return p, nil
}

// Write sends b to the process's stdin.
func (p *Process) Write(b []byte) (int, error) {
	n := 0
	for len(b) > 0 {
		chunk := b[:min(len(b), proto.DataChunk)]
		if err := p.st.frame(proto.FrameStdin, chunk); err != nil {
			return n, fmt.Errorf("stdin of %q: %w", p.argv, err)
		}
		n += len(chunk)
		b = b[len(chunk):]
	}
	return n, nil
}

// CloseStdin closes the process's stdin (a terminal's stays open).
func (p *Process) CloseStdin() error { return p.st.frame(proto.FrameStdinEnd, nil) }

// Output copies the process's output to stdout and stderr (nil discards)
// until it exits, and returns how it ended. A write error to either
// writer stops the copy, and so the process, which Close then kills.
func (p *Process) Output(stdout, stderr io.Writer) (ExitStatus, error) {
	return copyOutput(p.ctx, p.st, p.argv, stdout, stderr)
}

// Close ends the stream; a process still running is killed unless it was
// started with Keep.
func (p *Process) Close() error {
	if p.st != nil {
		p.st.close()
	}
	return nil
}

func copyOutput(ctx context.Context, st *stream, what string, stdout, stderr io.Writer) (ExitStatus, error) {
	for {
		typ, data, err := st.fr.Next()
		if err != nil {
			return ExitStatus{Code: -1}, st.readErr(ctx, "exec "+what, err)
		}
		switch typ {
		case proto.FrameStdout, proto.FrameStderr:
			w := stdout
			if typ == proto.FrameStderr {
				w = stderr
			}
			if w == nil {
				continue
			}
			if _, err := w.Write(data); err != nil {
				return ExitStatus{Code: -1}, fmt.Errorf("exec %s: write output: %w", what, err)
			}
		case proto.FrameExit:
			var e ExitStatus
			if err := json.Unmarshal(data, &e); err != nil {
				return ExitStatus{Code: -1}, fmt.Errorf("exec %s: decode exit: %w", what, err)
			}
			if e.ErrCode != "" {
				return e, &RemoteError{Op: proto.SOpExec, Code: e.ErrCode, Message: e.Error}
			}
			return e, nil
		case proto.FrameResult:
			var r proto.StreamResult
			_ = json.Unmarshal(data, &r)
			if r.Error != "" {
				return ExitStatus{Code: -1}, &RemoteError{Op: proto.SOpExec, Code: r.Code, Message: r.Error}
			}
			// The end of a non-following read: no exit yet.
			return ExitStatus{Code: -1}, errNotExited
		}
	}
}

// errNotExited ends Logs of a process that still runs.
var errNotExited = errors.New("process still running")

// Run starts req, feeds it stdin (nil: none), copies its output and
// returns its exit status: Start, Output and Close in one.
func (s *Session) Run(ctx context.Context, req ProcessRequest, stdin io.Reader, stdout, stderr io.Writer) (ExitStatus, error) {
	req.Stdin = stdin != nil
	req.Detach = false
	p, err := s.Start(ctx, req)
	if err != nil {
		return ExitStatus{Code: -1}, err
	}
	defer p.Close()
	if stdin != nil {
		go func() {
			if _, err := io.Copy(p, stdin); err == nil {
				_ = p.CloseStdin()
			}
		}()
	}
	return p.Output(stdout, stderr)
}

// Processes lists the processes the agent started.
func (s *Session) Processes(ctx context.Context) ([]ProcessInfo, error) {
	r, err := s.call(ctx, &proto.StreamRequest{Op: proto.SOpList})
	return r.Processes, err
}

// Signal sends sig to process pid (and its process group).
func (s *Session) Signal(ctx context.Context, pid int, sig syscall.Signal) error {
	_, err := s.call(ctx, &proto.StreamRequest{Op: proto.SOpSignal, PID: pid, Signal: int(sig)})
	return err
}

// Resize sets the window size of process pid's terminal.
func (s *Session) Resize(ctx context.Context, pid, rows, cols int) error {
	_, err := s.call(ctx, &proto.StreamRequest{Op: proto.SOpResize, PID: pid, Rows: rows, Cols: cols})
	return err
}

// Wait waits for process pid to exit.
func (s *Session) Wait(ctx context.Context, pid int) (ExitStatus, error) {
	r, err := s.call(ctx, &proto.StreamRequest{Op: proto.SOpWait, PID: pid})
	if err != nil {
		return ExitStatus{Code: -1}, err
	}
	if r.Exit == nil {
		return ExitStatus{Code: -1}, errors.New("agent wait: answer without exit")
	}
	return *r.Exit, nil
}

// Input copies r into process pid's stdin, closing it at r's end when
// closeAtEnd is set.
func (s *Session) Input(ctx context.Context, pid int, r io.Reader, closeAtEnd bool) error {
	st, err := s.open(ctx, &proto.StreamRequest{Op: proto.SOpInput, PID: pid})
	if err != nil {
		return err
	}
	defer st.close()
	if _, err := io.Copy(st.fw.Data(proto.FrameStdin), r); err != nil {
		return fmt.Errorf("agent input to %d: %w", pid, err)
	}
	if closeAtEnd {
		if err := st.frame(proto.FrameStdinEnd, nil); err != nil {
			return fmt.Errorf("agent input to %d: %w", pid, err)
		}
	} else {
		_ = st.st.Close()
	}
	_, err = st.result(ctx, proto.SOpInput)
	return err
}

// Logs copies the output kept for process pid (from the oldest byte kept)
// to stdout and stderr. With follow it goes on until the process exits and
// returns its status; without, it returns once it has caught up, with
// exited false when the process still runs.
func (s *Session) Logs(ctx context.Context, pid int, follow bool, stdout, stderr io.Writer) (e ExitStatus, exited bool, err error) {
	return s.output(ctx, &proto.StreamRequest{Op: proto.SOpLogs, PID: pid, Follow: follow}, stdout, stderr)
}

// Attach follows process pid's output from now (or from the oldest byte
// kept, fromStart) until it exits.
func (s *Session) Attach(ctx context.Context, pid int, fromStart bool, stdout, stderr io.Writer) (ExitStatus, error) {
	e, _, err := s.output(ctx, &proto.StreamRequest{Op: proto.SOpAttach, PID: pid, FromStart: fromStart}, stdout, stderr)
	return e, err
}

func (s *Session) output(ctx context.Context, req *proto.StreamRequest, stdout, stderr io.Writer) (ExitStatus, bool, error) {
	st, err := s.open(ctx, req)
	if err != nil {
		return ExitStatus{Code: -1}, false, err
	}
	defer st.close()
	if _, err := st.result(ctx, req.Op); err != nil {
		return ExitStatus{Code: -1}, false, err
	}
	e, err := copyOutput(ctx, st, fmt.Sprint(req.PID), stdout, stderr)
	if errors.Is(err, errNotExited) {
		return e, false, nil
	}
	return e, err == nil, err
}

// ReadFile opens a guest file for reading (or, with archive, a tar stream
// of a file or directory tree). The reader returns the bytes as they come
// from the guest and an error if the guest fails part way; close it when
// done.
func (s *Session) ReadFile(ctx context.Context, path string, archive bool) (FileInfo, io.ReadCloser, error) {
	st, err := s.open(ctx, &proto.StreamRequest{Op: proto.SOpFSRead, Path: path, Archive: archive})
	if err != nil {
		return FileInfo{}, nil, err
	}
	r, err := st.result(ctx, proto.SOpFSRead)
	if err != nil {
		st.close()
		return FileInfo{}, nil, err
	}
	if r.File == nil {
		st.close()
		return FileInfo{}, nil, errors.New("agent read: answer without file")
	}
	return *r.File, &downloadReader{st: st, ctx: ctx, path: path}, nil
}

type downloadReader struct {
	st   *stream
	ctx  context.Context
	path string
	rest []byte
	err  error
}

func (d *downloadReader) Read(p []byte) (int, error) {
	for len(d.rest) == 0 {
		if d.err != nil {
			return 0, d.err
		}
		typ, data, err := d.st.fr.Next()
		switch {
		case err != nil:
			d.err = d.st.readErr(d.ctx, "read "+d.path, err)
		case typ == proto.FrameData:
			d.rest = data
		case typ == proto.FrameEnd:
			d.err = io.EOF
		case typ == proto.FrameResult:
			var r proto.StreamResult
			_ = json.Unmarshal(data, &r)
			d.err = &RemoteError{Op: proto.SOpFSRead, Code: r.Code, Message: r.Error}
		}
	}
	n := copy(p, d.rest)
	d.rest = d.rest[n:]
	return n, nil
}

func (d *downloadReader) Close() error {
	d.st.close()
	return nil
}

// WriteRequest says where and how an upload lands.
type WriteRequest struct {
	Path string
	// Mode is the file's permission bits; zero means 0644.
	Mode    uint32
	ModTime time.Time
	// Parents creates missing parent directories.
	Parents bool
	// Archive unpacks a tar stream into the directory Path.
	Archive bool
}

// WriteFile streams r into the guest. The file appears at its path, with
// its mode, only once all of r arrived: an upload that fails or is
// cancelled leaves nothing behind. When the guest refuses the upload early
// (no such directory, disk full) the rest of r is not read.
func (s *Session) WriteFile(ctx context.Context, req WriteRequest, r io.Reader) (FileInfo, error) {
	sreq := &proto.StreamRequest{Op: proto.SOpFSWrite, Path: req.Path, Mode: req.Mode, Parents: req.Parents, Archive: req.Archive}
	if !req.ModTime.IsZero() {
		sreq.ModTimeUnixNano = req.ModTime.UnixNano()
	}
	st, err := s.open(ctx, sreq)
	if err != nil {
		return FileInfo{}, err
	}
	defer st.close()
	type answer struct {
		r   proto.StreamResult
		err error
	}
	answered := make(chan answer, 1)
	go func() {
		res, err := st.result(ctx, proto.SOpFSWrite)
		answered <- answer{res, err}
	}()
	sendErr := make(chan error, 1)
	stopSend := make(chan struct{})
	go func() {
		buf := make([]byte, proto.DataChunk)
		for {
			select {
			case <-stopSend:
				sendErr <- nil
				return
			default:
			}
			n, rerr := r.Read(buf)
			if n > 0 {
				if err := st.frame(proto.FrameData, buf[:n]); err != nil {
					sendErr <- err
					return
				}
			}
			if errors.Is(rerr, io.EOF) {
				sendErr <- st.frame(proto.FrameEnd, nil)
				return
			}
			if rerr != nil {
				sendErr <- fmt.Errorf("read upload for %s: %w", req.Path, rerr)
				return
			}
		}
	}()
	select {
	case a := <-answered:
		// Early (a refusal) or after the end frame. The sender stops at
		// its next frame; r is not read once this returns.
		close(stopSend)
		st.abort()
		<-sendErr
		if a.err != nil {
			return FileInfo{}, a.err
		}
		if a.r.File == nil {
			return FileInfo{}, errors.New("agent write: answer without file")
		}
		return *a.r.File, nil
	case err := <-sendErr:
		if err != nil {
			st.abort()
			<-answered
			return FileInfo{}, err
		}
		a := <-answered
		if a.err != nil {
			return FileInfo{}, a.err
		}
		if a.r.File == nil {
			return FileInfo{}, errors.New("agent write: answer without file")
		}
		return *a.r.File, nil
	}
}

// Stat describes a guest path; noFollow describes a symlink itself.
func (s *Session) Stat(ctx context.Context, path string, noFollow bool) (FileInfo, error) {
	r, err := s.call(ctx, &proto.StreamRequest{Op: proto.SOpFSStat, Path: path, NoFollow: noFollow})
	return fileOf(r, err)
}

// ListDir lists a guest directory.
func (s *Session) ListDir(ctx context.Context, path string) ([]FileInfo, error) {
	r, err := s.call(ctx, &proto.StreamRequest{Op: proto.SOpFSList, Path: path})
	if err != nil {
		return nil, err
	}
	return r.Entries, nil
}

// Mkdir makes a guest directory (and its parents with parents, which also
// accepts one that exists).
func (s *Session) Mkdir(ctx context.Context, path string, mode uint32, parents bool) (FileInfo, error) {
	r, err := s.call(ctx, &proto.StreamRequest{Op: proto.SOpFSMkdir, Path: path, Mode: mode, Parents: parents})
	return fileOf(r, err)
}

// Remove removes a guest file, symlink or empty directory, or with
// recursive a whole tree.
func (s *Session) Remove(ctx context.Context, path string, recursive bool) error {
	_, err := s.call(ctx, &proto.StreamRequest{Op: proto.SOpFSRemove, Path: path, Recursive: recursive})
	return err
}

// Rename moves a guest path.
func (s *Session) Rename(ctx context.Context, from, to string) (FileInfo, error) {
	r, err := s.call(ctx, &proto.StreamRequest{Op: proto.SOpFSRename, Path: from, To: to})
	return fileOf(r, err)
}

func fileOf(r proto.StreamResult, err error) (FileInfo, error) {
	if err != nil {
		return FileInfo{}, err
	}
	if r.File == nil {
		return FileInfo{}, errors.New("agent: answer without file")
	}
	return *r.File, nil
}

// WatchEvent is one change below a watched directory.
type WatchEvent = proto.WatchEvent

// Watch is a running watch of a guest directory; read its events with
// Next and end it with Close.
type Watch struct {
	st   *stream
	ctx  context.Context
	path string
	// Dir describes the watched directory.
	Dir     FileInfo
	pending []WatchEvent
	err     error
}

// ErrWatchEnded is what Next returns once the watched directory went away
// (its removal or move was the last event).
var ErrWatchEnded = errors.New("the watched directory went away")

// Watch starts watching the guest directory path (every directory below
// it too, with recursive) and returns once the guest's kernel watches it:
// every change from then on is reported. A missing path wraps
// vm.ErrNotFound, a file vm.ErrInvalid, a guest at its inotify limits
// vm.ErrExhausted. ctx ending ends the watch.
func (s *Session) Watch(ctx context.Context, path string, recursive bool) (*Watch, error) {
	st, err := s.open(ctx, &proto.StreamRequest{Op: proto.SOpFSWatch, Path: path, Recursive: recursive})
	if err != nil {
		return nil, err
	}
	r, err := st.result(ctx, proto.SOpFSWatch)
	if err != nil {
		st.close()
		return nil, err
	}
	w := &Watch{st: st, ctx: ctx, path: path}
	if r.File != nil {
		w.Dir = *r.File
	}
	return w, nil
}

// Next returns the next event, waiting for it. It returns ErrWatchEnded
// once the directory went away, an error wrapping vm.ErrExhausted when the
// guest's queue overflowed (events were lost), and ctx's error once ctx
// ended.
func (w *Watch) Next() (WatchEvent, error) {
	for len(w.pending) == 0 {
		if w.err != nil {
			return WatchEvent{}, w.err
		}
		typ, data, err := w.st.fr.Next()
		switch {
		case err != nil:
			w.err = w.st.readErr(w.ctx, "watch "+w.path, err)
		case typ == proto.FrameEvents:
			var evs proto.WatchEvents
			if err := json.Unmarshal(data, &evs); err != nil {
				w.err = fmt.Errorf("agent watch %s: decode events: %w", w.path, err)
				continue
			}
			w.pending = evs.Events
		case typ == proto.FrameResult:
			var r proto.StreamResult
			_ = json.Unmarshal(data, &r)
			if r.Error != "" || r.Code != "" {
				w.err = &RemoteError{Op: proto.SOpFSWatch, Code: r.Code, Message: r.Error}
			} else {
				w.err = fmt.Errorf("watch %s: %w", w.path, ErrWatchEnded)
			}
		}
	}
	ev := w.pending[0]
	w.pending = w.pending[1:]
	return ev, nil
}

// Close ends the watch, and a Next waiting in another goroutine; the
// guest's watch is gone once the agent sees the stream end.
func (w *Watch) Close() error {
	w.st.stop()
	w.st.abort()
	return nil
}
