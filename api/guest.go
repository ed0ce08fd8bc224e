package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/coder/websocket"

	"github.com/warmpool/warmpool/agent"
	"github.com/warmpool/warmpool/vm"
)

// Target is the VM an operation works in: a lease's or a machine's.
type Target struct {
	Lease   string
	Machine string
}

func (t Target) String() string {
	if t.Machine != "" {
		return "machine " + t.Machine
	}
	return "lease " + t.Lease
}

// GuestBackend is the part of a Backend that works inside VMs: processes
// and files, through the guest agent's multiplexed session.
type GuestBackend interface {
	// Guest returns the agent session of t's VM; Release is called once
	// the request is done with it (a machine is held until then). An
	// unknown lease or machine wraps vm.ErrNotFound.
	Guest(ctx context.Context, t Target) (*Guest, error)
}

// Guest is the agent session of one VM with the exec defaults of its image.
type Guest struct {
	*agent.Session
	// Env goes before a request's entries; Dir and User apply when a
	// request names none.
	Env       []string
	Dir, User string
	// Release ends the caller's use; nil means nothing to do.
	Release func()
}

// WithDefaults puts the image's and the lease's exec defaults under r.
func (g *Guest) WithDefaults(r agent.ProcessRequest) agent.ProcessRequest {
	if len(g.Env) > 0 {
		r.Env = append(append([]string(nil), g.Env...), r.Env...)
	}
	if r.Dir == "" {
		r.Dir = g.Dir
	}
	if r.User == "" {
		r.User = g.User
	}
	return r
}

// Types of the process and file APIs; they are the guest agent's.
type (
	FileInfo    = agent.FileInfo
	ProcessInfo = agent.ProcessInfo
	ExitStatus  = agent.ExitStatus
	WatchEvent  = agent.WatchEvent
)

// ErrWatchEnded ends a watch whose directory went away.
var ErrWatchEnded = agent.ErrWatchEnded

// WatchFrame is one line of GET .../files/watch: an event (Type, Name,
// Dir), or the last line, End (the directory went away, after its own
// event) or Error.
type WatchFrame struct {
	Type  string `json:"type,omitempty"`
	Name  string `json:"name,omitempty"`
	Dir   bool   `json:"dir,omitempty"`
	End   bool   `json:"end,omitempty"`
	Error *Error `json:"error,omitempty"`
}

// ProcessRequest starts a process in a VM: over the exec WebSocket
// (attached) or POST .../processes (detached).
type ProcessRequest struct {
	Argv []string `json:"argv"`
	Env  []string `json:"env,omitempty"`
	Dir  string   `json:"dir,omitempty"`
	User string   `json:"user,omitempty"`
	// TTY runs the process on a terminal of Rows x Cols (0: 24x80).
	TTY  bool `json:"tty,omitempty"`
	Rows int  `json:"rows,omitempty"`
	Cols int  `json:"cols,omitempty"`
	// Stdin keeps the process's stdin open for the client to write.
	Stdin   bool     `json:"stdin,omitempty"`
	Timeout Duration `json:"timeout,omitempty"`
	// Tag is free text kept with the process and listed by ps.
	Tag string `json:"tag,omitempty"`
}

// Validate names the first field of r that is wrong.
func (r ProcessRequest) Validate() error {
	if err := (ExecRequest{Argv: r.Argv, Env: r.Env, Timeout: r.Timeout}).Validate(); err != nil {
		return err
	}
	if r.Rows < 0 || r.Cols < 0 || r.Rows > 0xffff || r.Cols > 0xffff {
		return &vm.FieldError{Field: "rows/cols", Value: fmt.Sprintf("%dx%d", r.Rows, r.Cols), Reason: "must be between 0 and 65535"}
	}
	if len(r.Tag) > 1024 {
		return &vm.FieldError{Field: "tag", Value: truncate(r.Tag, 40), Reason: "longer than 1024 bytes"}
	}
	return nil
}

func (r ProcessRequest) agent(detach bool) agent.ProcessRequest {
	return agent.ProcessRequest{Argv: r.Argv, Env: r.Env, Dir: r.Dir, User: r.User, TTY: r.TTY, Rows: r.Rows, Cols: r.Cols,
		Stdin: r.Stdin, Detach: detach, Timeout: r.Timeout.Std(), Tag: r.Tag}
}

// StartedProcess answers POST .../processes.
type StartedProcess struct {
	PID int `json:"pid"`
}

// SignalRequest is POST .../processes/{pid}/signal.
type SignalRequest struct {
	// Signal is a name ("TERM", "SIGINT") or a number; empty means TERM.
	Signal string `json:"signal,omitempty"`
}

// Validate names the first field of r that is wrong.
func (r SignalRequest) Validate() error {
	_, err := ParseSignal(r.Signal)
	return err
}

// ResizeRequest is POST .../processes/{pid}/resize.
type ResizeRequest struct {
	Rows int `json:"rows"`
	Cols int `json:"cols"`
}

// Validate names the first field of r that is wrong.
func (r ResizeRequest) Validate() error {
	if r.Rows <= 0 || r.Cols <= 0 || r.Rows > 0xffff || r.Cols > 0xffff {
		return &vm.FieldError{Field: "rows/cols", Value: fmt.Sprintf("%dx%d", r.Rows, r.Cols), Reason: "must be between 1 and 65535"}
	}
	return nil
}

// MkdirRequest is POST .../files/mkdir.
type MkdirRequest struct {
	Path    string `json:"path"`
	Mode    uint32 `json:"mode,omitempty"`
	Parents bool   `json:"parents,omitempty"`
}

// Validate names the first field of r that is wrong.
func (r MkdirRequest) Validate() error { return validateGuestPath("path", r.Path) }

// RenameRequest is POST .../files/rename.
type RenameRequest struct {
	From string `json:"from"`
	To   string `json:"to"`
}

// Validate names the first field of r that is wrong.
func (r RenameRequest) Validate() error {
	if err := validateGuestPath("from", r.From); err != nil {
		return err
	}
	return validateGuestPath("to", r.To)
}

func validateGuestPath(field, p string) error {
	if p == "" || p[0] != '/' {
		return &vm.FieldError{Field: field, Value: p, Reason: "must be an absolute guest path"}
	}
	if len(p) > 4096 {
		return &vm.FieldError{Field: field, Value: truncate(p, 40), Reason: "longer than 4096 bytes"}
	}
	return nil
}

var signalNames = map[string]syscall.Signal{
	"HUP": syscall.SIGHUP, "INT": syscall.SIGINT, "QUIT": syscall.SIGQUIT, "KILL": syscall.SIGKILL,
	"USR1": syscall.SIGUSR1, "USR2": syscall.SIGUSR2, "TERM": syscall.SIGTERM, "CONT": syscall.SIGCONT,
	"STOP": syscall.SIGSTOP, "TSTP": syscall.SIGTSTP, "WINCH": syscall.SIGWINCH, "ALRM": syscall.SIGALRM,
	"PIPE": syscall.SIGPIPE,
}

// ParseSignal reads a signal name ("TERM", "SIGTERM", any case) or number;
// empty means SIGTERM.
func ParseSignal(s string) (syscall.Signal, error) {
	if s == "" {
		return syscall.SIGTERM, nil
	}
	if n, err := strconv.Atoi(s); err == nil {
		if n <= 0 || n > 64 {
			return 0, &vm.FieldError{Field: "signal", Value: s, Reason: "must be between 1 and 64"}
		}
		return syscall.Signal(n), nil
	}
	if sig, ok := signalNames[strings.TrimPrefix(strings.ToUpper(s), "SIG")]; ok {
		return sig, nil
	}
	return 0, &vm.FieldError{Field: "signal", Value: s, Reason: "unknown signal name"}
}

// WebSocket messages of the exec stream (see the README): binary messages
// start with a stream byte, text messages are JSON.
const (
	WSStdin  byte = 0
	WSStdout byte = 1
	WSStderr byte = 2
)

// ExecControl is a text message from the client on the exec WebSocket.
type ExecControl struct {
	// Type is "stdin_close", "resize" or "signal".
	Type   string `json:"type"`
	Rows   int    `json:"rows,omitempty"`
	Cols   int    `json:"cols,omitempty"`
	Signal string `json:"signal,omitempty"`
}

// ExecEvent is a text message from the server on the exec WebSocket: the
// first carries PID, the last Exit or Error.
type ExecEvent struct {
	PID   int         `json:"pid,omitempty"`
	Exit  *ExitStatus `json:"exit,omitempty"`
	Error *Error      `json:"error,omitempty"`
}

// wsReadLimit bounds one client message (stdin chunks are far smaller).
const wsReadLimit = 4 << 20

func (s *Server) guestRoutes(handle func(method, path string, h http.HandlerFunc)) {
	gb, ok := s.opts.Backend.(GuestBackend)
	if !ok {
		return
	}
	for _, prefix := range []string{"/v1/leases/{id}", "/v1/machines/{name}"} {
		g := func(h func(http.ResponseWriter, *http.Request, *Guest)) http.HandlerFunc {
			return func(w http.ResponseWriter, r *http.Request) {
				t, ok := targetOf(w, r)
				if !ok {
					return
				}
				guest, err := gb.Guest(r.Context(), t)
				if err != nil {
					s.fail(w, r, err)
					return
				}
				if guest.Release != nil {
					defer guest.Release()
				}
				h(w, r, guest)
			}
		}
		handle("GET", prefix+"/exec", g(s.execWS))
		handle("GET", prefix+"/processes", g(s.listProcesses))
		handle("POST", prefix+"/processes", g(s.startProcess))
		handle("GET", prefix+"/processes/{pid}/logs", g(s.processLogs))
		handle("POST", prefix+"/processes/{pid}/signal", g(s.signalProcess))
		handle("POST", prefix+"/processes/{pid}/resize", g(s.resizeProcess))
		handle("POST", prefix+"/processes/{pid}/stdin", g(s.processStdin))
		handle("POST", prefix+"/processes/{pid}/wait", g(s.waitProcess))
		handle("GET", prefix+"/files", g(s.readFile))
		handle("PUT", prefix+"/files", g(s.writeFile))
		handle("DELETE", prefix+"/files", g(s.removeFile))
		handle("GET", prefix+"/files/stat", g(s.statFile))
		handle("GET", prefix+"/files/list", g(s.listFiles))
		handle("POST", prefix+"/files/mkdir", g(s.mkdir))
		handle("POST", prefix+"/files/rename", g(s.renameFile))
		handle("GET", prefix+"/files/watch", g(s.watchFiles))
	}
}

func targetOf(w http.ResponseWriter, r *http.Request) (Target, bool) {
	if r.PathValue("name") != "" {
		name, ok := pathName(w, r, "name", "machine")
		return Target{Machine: name}, ok
	}
	id, ok := pathName(w, r, "id", "lease")
	return Target{Lease: id}, ok
}

func pathPID(w http.ResponseWriter, r *http.Request) (int, bool) {
	pid, err := strconv.Atoi(r.PathValue("pid"))
	if err != nil || pid <= 0 {
		writeError(w, ErrorFor(&vm.FieldError{Field: "pid", Value: r.PathValue("pid"), Reason: "must be a positive number"}))
		return 0, false
	}
	return pid, true
}

func queryPath(w http.ResponseWriter, r *http.Request) (string, bool) {
	p := r.URL.Query().Get("path")
	if err := validateGuestPath("path", p); err != nil {
		writeError(w, ErrorFor(err))
		return "", false
	}
	return p, true
}

func queryBool(r *http.Request, key string) bool {
	b, _ := strconv.ParseBool(r.URL.Query().Get(key))
	return b
}

// execWS runs an attached process over a WebSocket: the first client
// message is the ProcessRequest, then stdin and control messages; the
// server sends the PID, output and the exit.
func (s *Server) execWS(w http.ResponseWriter, r *http.Request, sess *Guest) {
	noDeadline(w)
	conn, err := websocket.Accept(w, r, &websocket.AcceptOptions{CompressionMode: websocket.CompressionDisabled})
	if err != nil {
		return // Accept has answered the client
	}
	defer conn.CloseNow()
	conn.SetReadLimit(wsReadLimit)
	// The process runs on the request's context (the daemon's shutdown
	// cancels it); the socket on its own, which ends with this handler:
	// coder/websocket closes a connection whose context ends mid-call, and
	// the last event must still reach the client.
	ctx := r.Context()
	connCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	defer cancel()
	sendEvent := func(e ExecEvent) error {
		b, _ := json.Marshal(e)
		wctx, cancel := context.WithTimeout(connCtx, 5*time.Second)
		defer cancel()
		return conn.Write(wctx, websocket.MessageText, b)
	}
	fail := func(err error) {
		_ = sendEvent(ExecEvent{Error: ErrorFor(cutShort(ctx, err))})
		conn.Close(websocket.StatusNormalClosure, "")
	}
	typ, first, err := conn.Read(connCtx)
	if err != nil {
		return
	}
	var req ProcessRequest
	if typ != websocket.MessageText {
		fail(&vm.FieldError{Field: "message", Value: "binary", Reason: "the first message must be the JSON process request"})
		return
	}
	if err := DecodeRequest(strings.NewReader(string(first)), wsReadLimit, &req, false); err != nil {
		fail(err)
		return
	}
	p, err := sess.Start(ctx, sess.WithDefaults(req.agent(false)))
	if errors.Is(err, agent.ErrExecFailed) {
		// As a shell reports a command it cannot run.
		_ = sendEvent(ExecEvent{Exit: &ExitStatus{Code: 127, Error: err.Error(), ErrCode: "exec_failed"}})
		conn.Close(websocket.StatusNormalClosure, "")
		return
	}
	if err != nil {
		fail(err)
		return
	}
	defer p.Close()
	if err := sendEvent(ExecEvent{PID: p.PID}); err != nil {
		return
	}
	go s.execInput(connCtx, conn, sess, p, req.TTY)
	var wmu sync.Mutex
	out := func(stream byte) io.Writer {
		return writerFunc(func(b []byte) (int, error) {
			wmu.Lock()
			defer wmu.Unlock()
			msg := make([]byte, 1+len(b))
			msg[0] = stream
			copy(msg[1:], b)
			if err := conn.Write(connCtx, websocket.MessageBinary, msg); err != nil {
				return 0, err
			}
			return len(b), nil
		})
	}
	exit, err := p.Output(out(WSStdout), out(WSStderr))
	if err = cutShort(ctx, err); err != nil {
		if errors.Is(err, agent.ErrTimeout) {
			_ = sendEvent(ExecEvent{Exit: &ExitStatus{Code: 124, Error: err.Error(), ErrCode: "timeout"}})
			conn.Close(websocket.StatusNormalClosure, "")
			return
		}
		fail(err)
		return
	}
	_ = sendEvent(ExecEvent{Exit: &exit})
	conn.Close(websocket.StatusNormalClosure, "")
}

// execInput forwards the client's stdin and control messages.
func (s *Server) execInput(ctx context.Context, conn *websocket.Conn, sess *Guest, p *agent.Process, tty bool) {
	for {
		typ, msg, err := conn.Read(ctx)
		if err != nil {
			return
		}
		if typ == websocket.MessageBinary {
			if len(msg) > 1 && msg[0] == WSStdin {
				if _, err := p.Write(msg[1:]); err != nil {
					return
				}
			}
			continue
		}
		var c ExecControl
		if json.Unmarshal(msg, &c) != nil {
			continue
		}
		switch c.Type {
		case "stdin_close":
			_ = p.CloseStdin()
		case "resize":
			if tty && c.Rows > 0 && c.Cols > 0 {
				_ = sess.Resize(ctx, p.PID, c.Rows, c.Cols)
			}
		case "signal":
			if sig, err := ParseSignal(c.Signal); err == nil {
				_ = sess.Signal(ctx, p.PID, sig)
			}
		}
	}
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }

func (s *Server) listProcesses(w http.ResponseWriter, r *http.Request, sess *Guest) {
	ps, err := sess.Processes(r.Context())
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, nonNil(ps))
}

func (s *Server) startProcess(w http.ResponseWriter, r *http.Request, sess *Guest) {
	var req ProcessRequest
	if !s.decode(w, r, &req, false) {
		return
	}
	p, err := sess.Start(r.Context(), sess.WithDefaults(req.agent(true)))
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusCreated, StartedProcess{PID: p.PID})
}

// processLogs streams a process's kept output as ExecFrame lines; with
// follow=true until it exits (the last frame carries the exit code). With
// from=now it attaches instead: only what the process writes from then on,
// until it exits.
func (s *Server) processLogs(w http.ResponseWriter, r *http.Request, sess *Guest) {
	pid, ok := pathPID(w, r)
	if !ok {
		return
	}
	follow := queryBool(r, "follow")
	from := r.URL.Query().Get("from")
	if from != "" && from != "start" && from != "now" {
		writeError(w, ErrorFor(&vm.FieldError{Field: "from", Value: from, Reason: `"start" or "now"`}))
		return
	}
	if follow || from == "now" {
		noDeadline(w)
	}
	fw := newFrameWriter(w, http.StatusOK)
	var exit ExitStatus
	var exited bool
	var err error
	if from == "now" {
		// Attach: what the process writes from now on, until it exits.
		exit, err = sess.Attach(r.Context(), pid, false, streamWriter{fw, "stdout"}, streamWriter{fw, "stderr"})
		exited = err == nil
	} else {
		exit, exited, err = sess.Logs(r.Context(), pid, follow, streamWriter{fw, "stdout"}, streamWriter{fw, "stderr"})
	}
	fw.close()
	switch {
	case err != nil && !fw.started():
		s.fail(w, r, err)
	case err != nil:
		fw.final(ExecFrame{Error: ErrorFor(err)})
	case exited:
		fw.final(ExecFrame{ExitCode: &exit.Code})
	default:
		fw.final(ExecFrame{Running: true})
	}
}

func (s *Server) signalProcess(w http.ResponseWriter, r *http.Request, sess *Guest) {
	pid, ok := pathPID(w, r)
	if !ok {
		return
	}
	var req SignalRequest
	if !s.decode(w, r, &req, true) {
		return
	}
	sig, _ := ParseSignal(req.Signal)
	if err := sess.Signal(r.Context(), pid, sig); err != nil {
		s.fail(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) resizeProcess(w http.ResponseWriter, r *http.Request, sess *Guest) {
	pid, ok := pathPID(w, r)
	if !ok {
		return
	}
	var req ResizeRequest
	if !s.decode(w, r, &req, false) {
		return
	}
	if err := sess.Resize(r.Context(), pid, req.Rows, req.Cols); err != nil {
		s.fail(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) processStdin(w http.ResponseWriter, r *http.Request, sess *Guest) {
	pid, ok := pathPID(w, r)
	if !ok {
		return
	}
	noDeadline(w)
	if err := sess.Input(r.Context(), pid, r.Body, queryBool(r, "close")); err != nil {
		s.fail(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) waitProcess(w http.ResponseWriter, r *http.Request, sess *Guest) {
	pid, ok := pathPID(w, r)
	if !ok {
		return
	}
	noDeadline(w)
	exit, err := sess.Wait(r.Context(), pid)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, exit)
}

// FileHeader carries a file's FileInfo (JSON) on reads and writes.
const FileHeader = "X-Warmpool-File"

// ErrorTrailer carries the error of a read that failed after its body
// began (JSON Error).
const ErrorTrailer = "X-Warmpool-Error"

func (s *Server) readFile(w http.ResponseWriter, r *http.Request, sess *Guest) {
	p, ok := queryPath(w, r)
	if !ok {
		return
	}
	archive := r.URL.Query().Get("archive")
	if archive != "" && archive != "tar" {
		writeError(w, ErrorFor(&vm.FieldError{Field: "archive", Value: archive, Reason: `only "tar"`}))
		return
	}
	noDeadline(w)
	fi, body, err := sess.ReadFile(r.Context(), p, archive == "tar")
	if err != nil {
		s.fail(w, r, err)
		return
	}
	defer body.Close()
	info, _ := json.Marshal(fi)
	w.Header().Set(FileHeader, string(info))
	w.Header().Set("Trailer", ErrorTrailer)
	if archive == "tar" {
		w.Header().Set("Content-Type", "application/x-tar")
	} else {
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Header().Set("Last-Modified", fi.ModTime().UTC().Format(http.TimeFormat))
	}
	w.WriteHeader(http.StatusOK)
	buf := make([]byte, 128<<10)
	if _, err := io.CopyBuffer(onlyWriter{w}, body, buf); err != nil && r.Context().Err() == nil {
		b, _ := json.Marshal(ErrorFor(err))
		w.Header().Set(ErrorTrailer, string(b))
	}
}

type onlyWriter struct{ io.Writer }

func (s *Server) writeFile(w http.ResponseWriter, r *http.Request, sess *Guest) {
	p, ok := queryPath(w, r)
	if !ok {
		return
	}
	q := r.URL.Query()
	req := agent.WriteRequest{Path: p, Parents: queryBool(r, "parents")}
	switch a := q.Get("archive"); a {
	case "":
	case "tar":
		req.Archive = true
	default:
		writeError(w, ErrorFor(&vm.FieldError{Field: "archive", Value: a, Reason: `only "tar"`}))
		return
	}
	if m := q.Get("mode"); m != "" {
		mode, err := strconv.ParseUint(m, 8, 32)
		if err != nil || mode > 0o7777 {
			writeError(w, ErrorFor(&vm.FieldError{Field: "mode", Value: m, Reason: "must be octal permission bits, e.g. 0644"}))
			return
		}
		req.Mode = uint32(mode)
	}
	if m := q.Get("mtime"); m != "" {
		t, err := time.Parse(time.RFC3339Nano, m)
		if err != nil {
			writeError(w, ErrorFor(&vm.FieldError{Field: "mtime", Value: m, Reason: "must be RFC 3339"}))
			return
		}
		req.ModTime = t
	}
	noDeadline(w)
	fi, err := sess.WriteFile(r.Context(), req, r.Body)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, fi)
}

func (s *Server) removeFile(w http.ResponseWriter, r *http.Request, sess *Guest) {
	p, ok := queryPath(w, r)
	if !ok {
		return
	}
	if err := sess.Remove(r.Context(), p, queryBool(r, "recursive")); err != nil {
		s.fail(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) statFile(w http.ResponseWriter, r *http.Request, sess *Guest) {
	p, ok := queryPath(w, r)
	if !ok {
		return
	}
	fi, err := sess.Stat(r.Context(), p, queryBool(r, "nofollow"))
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, fi)
}

func (s *Server) listFiles(w http.ResponseWriter, r *http.Request, sess *Guest) {
	p, ok := queryPath(w, r)
	if !ok {
		return
	}
	ents, err := sess.ListDir(r.Context(), p)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, nonNil(ents))
}

func (s *Server) mkdir(w http.ResponseWriter, r *http.Request, sess *Guest) {
	var req MkdirRequest
	if !s.decode(w, r, &req, false) {
		return
	}
	fi, err := sess.Mkdir(r.Context(), req.Path, req.Mode, req.Parents)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, fi)
}

func (s *Server) renameFile(w http.ResponseWriter, r *http.Request, sess *Guest) {
	var req RenameRequest
	if !s.decode(w, r, &req, false) {
		return
	}
	fi, err := sess.Rename(r.Context(), req.From, req.To)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, fi)
}

// watchFiles streams the changes below a guest directory as WatchFrame
// lines, each flushed as it comes, until the client goes away or the
// directory does. The status and headers go out as soon as the guest
// watches the directory, so a client knows from then on nothing is missed.
func (s *Server) watchFiles(w http.ResponseWriter, r *http.Request, sess *Guest) {
	p, ok := queryPath(w, r)
	if !ok {
		return
	}
	noDeadline(w)
	ctx := r.Context()
	wt, err := sess.Watch(ctx, p, queryBool(r, "recursive"))
	if err != nil {
		s.fail(w, r, err)
		return
	}
	defer wt.Close()
	info, _ := json.Marshal(wt.Dir)
	w.Header().Set(FileHeader, string(info))
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	enc := json.NewEncoder(w)
	send := func(f WatchFrame) error {
		if err := enc.Encode(f); err != nil {
			return err
		}
		return rc.Flush()
	}
	if rc.Flush() != nil {
		return
	}
	for {
		ev, err := wt.Next()
		switch {
		case errors.Is(err, agent.ErrWatchEnded):
			_ = send(WatchFrame{End: true})
			return
		case err != nil:
			if ctx.Err() == nil {
				_ = send(WatchFrame{Error: ErrorFor(err)})
			}
			return
		}
		if send(WatchFrame{Type: ev.Type, Name: ev.Name, Dir: ev.Dir}) != nil {
			return
		}
	}
}
