package api

import (
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"mime"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/warmpool/warmpool/events"
	"github.com/warmpool/warmpool/vm"
)

// ServerOptions configures NewServer.
type ServerOptions struct {
	Backend Backend
	// Gatherer serves GET /metrics; nil means prometheus.DefaultGatherer.
	Gatherer prometheus.Gatherer
	// Token, when set, is required as "Authorization: Bearer TOKEN" on every
	// request except GET /healthz that does not arrive over a Unix socket
	// served by Serve. Serve refuses a TCP listener without one.
	Token  string
	Logger *slog.Logger
	// MaxBodyBytes limits request bodies; 0 means MaxBodyBytes.
	MaxBodyBytes int64
	// EventHeartbeat is how often an idle event stream gets a comment line
	// so proxies and clients can tell it is alive; 0 means 15s.
	EventHeartbeat time.Duration
}

// Server is the HTTP handler for the warmpool API.
type Server struct {
	opts    ServerOptions
	log     *slog.Logger
	mux     *http.ServeMux
	metrics http.Handler
	// draining ends event streams so that a graceful shutdown can finish.
	drainOnce sync.Once
	draining  chan struct{}
}

// NewServer returns the API handler for opts.Backend.
func NewServer(opts ServerOptions) *Server {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Gatherer == nil {
		opts.Gatherer = prometheus.DefaultGatherer
	}
	if opts.MaxBodyBytes <= 0 {
		opts.MaxBodyBytes = MaxBodyBytes
	}
	if opts.EventHeartbeat <= 0 {
		opts.EventHeartbeat = 15 * time.Second
	}
	s := &Server{
		opts:     opts,
		log:      opts.Logger,
		mux:      http.NewServeMux(),
		draining: make(chan struct{}),
		metrics: promhttp.HandlerFor(opts.Gatherer, promhttp.HandlerOpts{
			ErrorLog: slog.NewLogLogger(opts.Logger.Handler(), slog.LevelWarn),
		}),
	}
	s.routes()
	return s
}

// Drain ends every event stream and makes new ones return at once, so that
// http.Server.Shutdown does not wait for clients that never hang up.
func (s *Server) Drain() { s.drainOnce.Do(func() { close(s.draining) }) }

func (s *Server) routes() {
	allowed := map[string][]string{}
	handle := func(method, path string, h http.HandlerFunc) {
		s.mux.HandleFunc(method+" "+path, h)
		allowed[path] = append(allowed[path], method)
	}
	handle("GET", "/healthz", s.healthz)
	handle("GET", "/metrics", s.metrics.ServeHTTP)
	handle("GET", "/v1/status", s.status)
	handle("GET", "/v1/templates", s.listTemplates)
	handle("POST", "/v1/templates", s.buildTemplate)
	handle("GET", "/v1/pools", s.listPools)
	handle("GET", "/v1/pools/{name}", s.getPool)
	handle("PUT", "/v1/pools/{name}", s.setPool)
	handle("DELETE", "/v1/pools/{name}", s.deletePool)
	handle("POST", "/v1/pools/{name}/acquire", s.acquire)
	handle("GET", "/v1/leases", s.listLeases)
	handle("DELETE", "/v1/leases/{id}", s.release)
	handle("PUT", "/v1/leases/{id}/ttl", s.setLeaseTTL)
	handle("POST", "/v1/leases/{id}/exec", s.exec)
	handle("GET", "/v1/machines", s.listMachines)
	handle("GET", "/v1/machines/{name}", s.getMachine)
	handle("PUT", "/v1/machines/{name}", s.putMachine)
	handle("POST", "/v1/machines/{name}/ensure", s.ensureMachine)
	handle("POST", "/v1/machines/{name}/stop", s.stopMachine)
	handle("POST", "/v1/machines/{name}/hold", s.holdMachine)
	handle("DELETE", "/v1/machines/{name}/holds/{id}", s.releaseHold)
	handle("GET", "/v1/events", s.events)
	s.guestRoutes(handle)
	// A method-less pattern per path answers wrong methods with a JSON 405
	// instead of the mux's plain-text one.
	for path, methods := range allowed {
		allow := strings.Join(methods, ", ")
		if strings.Contains(allow, "GET") {
			allow += ", HEAD"
		}
		s.mux.HandleFunc(path, func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Allow", allow)
			writeError(w, &Error{Status: http.StatusMethodNotAllowed, Code: CodeMethod,
				Message: fmt.Sprintf("method %s not allowed on %s; use %s", r.Method, path, allow)})
		})
	}
	s.mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, &Error{Status: http.StatusNotFound, Code: CodeNotFound,
			Message: fmt.Sprintf("no endpoint %s %s", r.Method, r.URL.Path)})
	})
}

type ctxKey int

const localConnKey ctxKey = iota

// withLocalConn marks a connection as arriving over a Unix socket, whose
// file mode is the access control, so that no token is needed.
func withLocalConn(ctx context.Context) context.Context {
	return context.WithValue(ctx, localConnKey, true)
}

// ServeHTTP authenticates, logs and routes one request.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	rec := &recorder{ResponseWriter: w, status: http.StatusOK}
	defer func() {
		s.log.LogAttrs(r.Context(), levelFor(rec.status), "request",
			slog.String("method", r.Method), slog.String("path", r.URL.Path),
			slog.Int("status", rec.status), slog.Int64("bytes", rec.bytes),
			slog.Duration("duration", time.Since(start)))
	}()
	if !s.authorized(r) {
		rec.Header().Set("WWW-Authenticate", `Bearer realm="warmpool"`)
		writeError(rec, &Error{Status: http.StatusUnauthorized, Code: CodeUnauthorized,
			Message: "missing or wrong bearer token"})
		return
	}
	s.mux.ServeHTTP(rec, r)
}

func levelFor(status int) slog.Level {
	switch {
	case status >= 500:
		return slog.LevelWarn
	case status >= 400:
		return slog.LevelInfo
	}
	return slog.LevelDebug
}

func (s *Server) authorized(r *http.Request) bool {
	if s.opts.Token == "" || r.URL.Path == "/healthz" {
		return true
	}
	if local, _ := r.Context().Value(localConnKey).(bool); local {
		return true
	}
	const prefix = "Bearer "
	h := r.Header.Get("Authorization")
	if len(h) < len(prefix) || !strings.EqualFold(h[:len(prefix)], prefix) {
		return false
	}
	return subtle.ConstantTimeCompare([]byte(h[len(prefix):]), []byte(s.opts.Token)) == 1
}

// recorder remembers the status for the request log and keeps Flush and
// deadlines reachable through http.ResponseController.
type recorder struct {
	http.ResponseWriter
	status      int
	wroteHeader bool
	bytes       int64
}

func (r *recorder) WriteHeader(code int) {
	if !r.wroteHeader {
		r.status, r.wroteHeader = code, true
	}
	r.ResponseWriter.WriteHeader(code)
}

func (r *recorder) Write(b []byte) (int, error) {
	r.wroteHeader = true
	n, err := r.ResponseWriter.Write(b)
	r.bytes += int64(n)
	return n, err
}

func (r *recorder) Unwrap() http.ResponseWriter { return r.ResponseWriter }

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v) // the client went away; nothing left to tell it
}

func writeError(w http.ResponseWriter, e *Error) {
	if e.Status == http.StatusServiceUnavailable || e.RetryAfter > 0 {
		secs := int((e.RetryAfter + time.Second - 1) / time.Second)
		if secs < 1 {
			secs = 1
		}
		w.Header().Set("Retry-After", strconv.Itoa(secs))
	}
	writeJSON(w, e.Status, e)
}

// ErrorFor maps a backend error to the error the client sees; see Backend.
func ErrorFor(err error) *Error {
	var apiErr *Error
	if errors.As(err, &apiErr) {
		return apiErr
	}
	e := &Error{Message: err.Error()}
	switch {
	case errors.Is(err, vm.ErrNotFound):
		e.Status, e.Code = http.StatusNotFound, CodeNotFound
	case errors.Is(err, vm.ErrInvalid):
		e.Status, e.Code = http.StatusBadRequest, CodeInvalidArgument
	case errors.Is(err, vm.ErrInvalidState):
		e.Status, e.Code = http.StatusConflict, CodeConflict
	case errors.Is(err, vm.ErrExhausted):
		e.Status, e.Code = http.StatusConflict, CodeExhausted
	case errors.Is(err, vm.ErrUnsupported):
		e.Status, e.Code = http.StatusNotImplemented, CodeUnsupported
	case errors.Is(err, ErrNothingReady):
		e.Status, e.Code, e.RetryAfter = http.StatusServiceUnavailable, CodeNothingReady, time.Second
		var hint interface{ RetryAfter() time.Duration }
		if errors.As(err, &hint) && hint.RetryAfter() > 0 {
			e.RetryAfter = hint.RetryAfter()
		}
	case errors.Is(err, ErrShuttingDown):
		e.Status, e.Code = http.StatusServiceUnavailable, CodeUnavailable
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		// Past a backend, a context error means the client gave up or the
		// daemon is stopping; neither is the backend's bug.
		e.Status, e.Code = http.StatusServiceUnavailable, CodeUnavailable
	default:
		e.Status, e.Code = http.StatusInternalServerError, CodeInternal
	}
	return e
}

func (s *Server) fail(w http.ResponseWriter, r *http.Request, err error) {
	e := ErrorFor(err)
	if e.Status >= 500 {
		s.log.Warn("request failed", "method", r.Method, "path", r.URL.Path, "err", err)
	}
	writeError(w, e)
}

// decode reads r's JSON body into v; it writes the error and returns false
// when the body is unusable.
func (s *Server) decode(w http.ResponseWriter, r *http.Request, v any, optional bool) bool {
	if ct := r.Header.Get("Content-Type"); ct != "" {
		mt, _, err := mime.ParseMediaType(ct)
		if err != nil || (mt != "application/json" && !strings.HasSuffix(mt, "+json")) {
			writeError(w, &Error{Status: http.StatusUnsupportedMediaType, Code: CodeUnsupportedType,
				Message: fmt.Sprintf("content type %q not supported; send application/json", ct)})
			return false
		}
	}
	if r.ContentLength > s.opts.MaxBodyBytes {
		writeError(w, tooLarge(s.opts.MaxBodyBytes))
		return false
	}
	body := http.MaxBytesReader(w, r.Body, s.opts.MaxBodyBytes+1)
	if err := DecodeRequest(body, s.opts.MaxBodyBytes, v, optional); err != nil {
		writeError(w, ErrorFor(err))
		return false
	}
	return true
}

// pathName returns the validated path value key, or writes a 400.
func pathName(w http.ResponseWriter, r *http.Request, key, field string) (string, bool) {
	v := r.PathValue(key)
	if e := validateName(field, v); e != nil {
		writeError(w, e)
		return "", false
	}
	return v, true
}

// noDeadline lifts the server's write timeout (and, for good measure, the
// read deadline, which net/http clears itself once the body is read) for a
// request that may legitimately take long: long-poll, streams.
func noDeadline(w http.ResponseWriter) {
	rc := http.NewResponseController(w)
	// Writers that do not support deadlines have none to lift.
	_ = rc.SetReadDeadline(time.Time{})
	_ = rc.SetWriteDeadline(time.Time{})
}

func (s *Server) healthz(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
}

func (s *Server) status(w http.ResponseWriter, r *http.Request) {
	st, err := s.opts.Backend.Status(r.Context())
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, st)
}

func (s *Server) listTemplates(w http.ResponseWriter, r *http.Request) {
	ts, err := s.opts.Backend.Templates(r.Context())
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, nonNil(ts))
}

func (s *Server) buildTemplate(w http.ResponseWriter, r *http.Request) {
	var req TemplateRequest
	if !s.decode(w, r, &req, false) {
		return
	}
	noDeadline(w)
	if !acceptsNDJSON(r) {
		t, err := s.opts.Backend.BuildTemplate(r.Context(), req, func(string) {})
		if err != nil {
			s.fail(w, r, err)
			return
		}
		writeJSON(w, http.StatusCreated, t)
		return
	}
	fw := newFrameWriter(w, http.StatusCreated)
	t, err := s.opts.Backend.BuildTemplate(r.Context(), req, func(step string) {
		fw.write(TemplateFrame{Progress: step})
	})
	fw.close() // progress after return is dropped, per the Backend contract
	if err != nil {
		if !fw.started() {
			s.fail(w, r, err)
			return
		}
		fw.final(TemplateFrame{Error: ErrorFor(err)})
		return
	}
	fw.final(TemplateFrame{Template: &t})
}

func acceptsNDJSON(r *http.Request) bool {
	for _, a := range strings.Split(r.Header.Get("Accept"), ",") {
		if mt, _, err := mime.ParseMediaType(strings.TrimSpace(a)); err == nil && mt == "application/x-ndjson" {
			return true
		}
	}
	return false
}

func (s *Server) listPools(w http.ResponseWriter, r *http.Request) {
	ps, err := s.opts.Backend.Pools(r.Context())
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, nonNil(ps))
}

func (s *Server) getPool(w http.ResponseWriter, r *http.Request) {
	name, ok := pathName(w, r, "name", "pool")
	if !ok {
		return
	}
	ps, err := s.opts.Backend.Pools(r.Context())
	if err != nil {
		s.fail(w, r, err)
		return
	}
	for _, p := range ps {
		if p.Name == name {
			writeJSON(w, http.StatusOK, p)
			return
		}
	}
	s.fail(w, r, fmt.Errorf("pool %s: %w", name, vm.ErrNotFound))
}

func (s *Server) setPool(w http.ResponseWriter, r *http.Request) {
	name, ok := pathName(w, r, "name", "pool")
	if !ok {
		return
	}
	var req PoolRequest
	if !s.decode(w, r, &req, false) {
		return
	}
	p, err := s.opts.Backend.SetPool(r.Context(), name, req)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, p)
}

func (s *Server) deletePool(w http.ResponseWriter, r *http.Request) {
	name, ok := pathName(w, r, "name", "pool")
	if !ok {
		return
	}
	if err := s.opts.Backend.DeletePool(r.Context(), name); err != nil {
		s.fail(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) acquire(w http.ResponseWriter, r *http.Request) {
	name, ok := pathName(w, r, "name", "pool")
	if !ok {
		return
	}
	wait := DefaultWait
	if v := r.URL.Query().Get("wait"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			writeError(w, invalid(fmt.Sprintf("invalid wait %q: want a duration such as \"2s\"", truncate(v, 40))))
			return
		}
		wait = d
	}
	var req AcquireRequest
	if !s.decode(w, r, &req, true) {
		return
	}
	req.Wait = wait
	if err := req.Validate(); err != nil {
		writeError(w, invalid(err.Error()))
		return
	}
	noDeadline(w)
	lease, err := s.opts.Backend.Acquire(r.Context(), name, req)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	w.Header().Set("Location", "/v1/leases/"+lease.ID)
	writeJSON(w, http.StatusCreated, lease)
}

func (s *Server) listLeases(w http.ResponseWriter, r *http.Request) {
	ls, err := s.opts.Backend.Leases(r.Context())
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, nonNil(ls))
}

func (s *Server) release(w http.ResponseWriter, r *http.Request) {
	id, ok := pathName(w, r, "id", "lease")
	if !ok {
		return
	}
	if err := s.opts.Backend.Release(r.Context(), id); err != nil {
		s.fail(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) setLeaseTTL(w http.ResponseWriter, r *http.Request) {
	id, ok := pathName(w, r, "id", "lease")
	if !ok {
		return
	}
	var req LeaseTTLRequest
	if !s.decode(w, r, &req, false) {
		return
	}
	if err := req.Validate(); err != nil {
		writeError(w, invalid(err.Error()))
		return
	}
	l, err := s.opts.Backend.SetLeaseTTL(r.Context(), id, req)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, l)
}

func (s *Server) exec(w http.ResponseWriter, r *http.Request) {
	id, ok := pathName(w, r, "id", "lease")
	if !ok {
		return
	}
	var req ExecRequest
	if !s.decode(w, r, &req, false) {
		return
	}
	noDeadline(w)
	fw := newFrameWriter(w, http.StatusOK)
	code, err := s.opts.Backend.Exec(r.Context(), id, req,
		streamWriter{fw, "stdout"}, streamWriter{fw, "stderr"})
	fw.close()
	if err = cutShort(r.Context(), err); err != nil {
		if !fw.started() {
			s.fail(w, r, err)
			return
		}
		fw.final(ExecFrame{Error: ErrorFor(err)})
		return
	}
	fw.final(ExecFrame{ExitCode: &code})
}

// cutShort is the outcome of an exec that ran on ctx. Once ctx has ended
// (the daemon's shutdown cancels the execs it stopped waiting for), the
// exec was cut short whatever it returned: the process the cancel killed
// may report its exit before the cancel itself comes back. The error then
// says why (ctx's cause) rather than only "context canceled".
func cutShort(ctx context.Context, err error) error {
	if ctx.Err() == nil {
		return err
	}
	if err == nil {
		err = ctx.Err()
	}
	if cause := context.Cause(ctx); cause != nil && !errors.Is(err, cause) {
		err = fmt.Errorf("%w: %w", cause, err)
	}
	return err
}

// frameWriter writes newline-delimited JSON frames, flushing each, and sends
// the status line only with the first frame so that a failure before any
// output can still be a plain HTTP error.
type frameWriter struct {
	mu      sync.Mutex
	w       http.ResponseWriter
	rc      *http.ResponseController
	status  int
	begun   bool
	closed  bool
	failErr error
}

func newFrameWriter(w http.ResponseWriter, status int) *frameWriter {
	return &frameWriter{w: w, rc: http.NewResponseController(w), status: status}
}

func (f *frameWriter) write(v any) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return errors.New("stream closed")
	}
	return f.writeLocked(v)
}

func (f *frameWriter) writeLocked(v any) error {
	if f.failErr != nil {
		return f.failErr
	}
	if !f.begun {
		f.begun = true
		f.w.Header().Set("Content-Type", "application/x-ndjson")
		f.w.Header().Set("X-Content-Type-Options", "nosniff")
		f.w.WriteHeader(f.status)
	}
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	if _, err := f.w.Write(append(b, '\n')); err != nil {
		f.failErr = err
		return err
	}
	if err := f.rc.Flush(); err != nil {
		f.failErr = err
	}
	return f.failErr
}

// close stops writes from the backend's writers.
func (f *frameWriter) close() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.closed = true
}

func (f *frameWriter) started() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.begun
}

// final writes the last frame after close.
func (f *frameWriter) final(v any) {
	f.mu.Lock()
	defer f.mu.Unlock()
	_ = f.writeLocked(v) // a client that left cannot be told
}

type streamWriter struct {
	f      *frameWriter
	stream string
}

func (s streamWriter) Write(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	// Copy: the frame is marshalled now, but callers may reuse p after.
	if err := s.f.write(ExecFrame{Stream: s.stream, Data: p}); err != nil {
		return 0, fmt.Errorf("write %s to client: %w", s.stream, err)
	}
	return len(p), nil
}

func (s *Server) listMachines(w http.ResponseWriter, r *http.Request) {
	ms, err := s.opts.Backend.Machines(r.Context())
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, nonNil(ms))
}

func (s *Server) getMachine(w http.ResponseWriter, r *http.Request) {
	name, ok := pathName(w, r, "name", "machine")
	if !ok {
		return
	}
	ms, err := s.opts.Backend.Machines(r.Context())
	if err != nil {
		s.fail(w, r, err)
		return
	}
	for _, m := range ms {
		if m.Name == name {
			writeJSON(w, http.StatusOK, m)
			return
		}
	}
	s.fail(w, r, fmt.Errorf("machine %s: %w", name, vm.ErrNotFound))
}

func (s *Server) putMachine(w http.ResponseWriter, r *http.Request) {
	name, ok := pathName(w, r, "name", "machine")
	if !ok {
		return
	}
	var req MachineRequest
	if !s.decode(w, r, &req, false) {
		return
	}
	m, err := s.opts.Backend.PutMachine(r.Context(), name, req)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, m)
}

func (s *Server) ensureMachine(w http.ResponseWriter, r *http.Request) {
	name, ok := pathName(w, r, "name", "machine")
	if !ok {
		return
	}
	// A missing body, like "{}", keeps the recorded spec.
	var req MachineEnsureRequest
	if !s.decode(w, r, &req, true) {
		return
	}
	noDeadline(w)
	m, err := s.opts.Backend.EnsureMachine(r.Context(), name, req)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, m)
}

func (s *Server) stopMachine(w http.ResponseWriter, r *http.Request) {
	name, ok := pathName(w, r, "name", "machine")
	if !ok {
		return
	}
	var req StopRequest
	if !s.decode(w, r, &req, true) {
		return
	}
	if v := r.URL.Query().Get("force"); v != "" {
		force, err := strconv.ParseBool(v)
		if err != nil {
			writeError(w, invalid(fmt.Sprintf("invalid force %q: want true or false", truncate(v, 40))))
			return
		}
		req.Force = req.Force || force
	}
	noDeadline(w)
	if err := s.opts.Backend.StopMachine(r.Context(), name, req.Force); err != nil {
		s.fail(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) holdMachine(w http.ResponseWriter, r *http.Request) {
	name, ok := pathName(w, r, "name", "machine")
	if !ok {
		return
	}
	var req HoldRequest
	if !s.decode(w, r, &req, true) {
		return
	}
	h, err := s.opts.Backend.HoldMachine(r.Context(), name, req)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusCreated, h)
}

func (s *Server) releaseHold(w http.ResponseWriter, r *http.Request) {
	name, ok := pathName(w, r, "name", "machine")
	if !ok {
		return
	}
	id, ok := pathName(w, r, "id", "hold")
	if !ok {
		return
	}
	if err := s.opts.Backend.ReleaseHold(r.Context(), name, id); err != nil {
		s.fail(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// events streams events as server-sent events: one "data:" line holding one
// JSON event per message. ?subject= keeps events about one subject, ?kind=
// those whose kind starts with the given prefix.
func (s *Server) events(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	subject, kind := q.Get("subject"), q.Get("kind")
	if subject != "" {
		if e := validateName("subject", subject); e != nil {
			writeError(w, e)
			return
		}
	}
	if len(kind) > vm.MaxNameLen {
		writeError(w, invalid("invalid kind: longer than 63 characters"))
		return
	}
	rc := http.NewResponseController(w)
	sub := s.opts.Backend.Subscribe(func(e events.Event) bool {
		return (subject == "" || e.Subject == subject) && strings.HasPrefix(e.Kind, kind)
	})
	defer sub.Close()
	noDeadline(w)
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	h.Set("X-Accel-Buffering", "no")
	w.WriteHeader(http.StatusOK)
	// An opening comment tells the client the subscription is in place, so
	// it can rely on seeing every event published after it read this line.
	if _, err := io.WriteString(w, ": subscribed\n\n"); err != nil {
		return
	}
	if rc.Flush() != nil {
		return
	}
	heartbeat := time.NewTicker(s.opts.EventHeartbeat)
	defer heartbeat.Stop()
	for {
		var chunk []byte
		select {
		case <-r.Context().Done():
			return
		case <-s.draining:
			return
		case <-heartbeat.C:
			chunk = []byte(": keepalive\n\n")
		case e, ok := <-sub.C:
			if !ok {
				return
			}
			b, err := json.Marshal(e)
			if err != nil {
				s.log.Warn("event not encodable", "kind", e.Kind, "subject", e.Subject, "err", err)
				continue
			}
			chunk = append(append([]byte("data: "), b...), "\n\n"...)
		}
		if _, err := w.Write(chunk); err != nil {
			return
		}
		if rc.Flush() != nil {
			return
		}
	}
}

// nonNil makes an empty list encode as [] rather than null.
func nonNil[T any](s []T) []T {
	if s == nil {
		return []T{}
	}
	return s
}
