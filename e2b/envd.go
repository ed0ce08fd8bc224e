package e2b

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	"connectrpc.com/connect"

	"github.com/warmpool/warmpool/api"
	"github.com/warmpool/warmpool/vm"
)

type sandboxKey struct{}

func sandboxFrom(ctx context.Context) string {
	id, _ := ctx.Value(sandboxKey{}).(string)
	return id
}

// serveEnvd serves one request to sandbox id's envd. /health needs no
// token (the SDK probes it to tell a killed sandbox from a network
// failure); everything else needs the sandbox's access token.
func (s *Server) serveEnvd(w http.ResponseWriter, r *http.Request, id string) {
	if port := r.Header.Get("E2b-Sandbox-Port"); port != "" && port != EnvdPort {
		writeAPIError(w, http.StatusBadGateway, fmt.Sprintf("port %s of sandbox %s: warmpool serves only envd (port %s) of a sandbox", port, id, EnvdPort))
		return
	}
	if r.URL.Path == "/health" {
		s.health(w, r, id)
		return
	}
	if !validAccessToken(s.opts.TokenSecret, id, r.Header.Get("X-Access-Token")) {
		writeAPIError(w, http.StatusUnauthorized, fmt.Sprintf("sandbox %s: missing or wrong X-Access-Token (the envdAccessToken its create answered)", id))
		return
	}
	s.envd.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), sandboxKey{}, id)))
}

// health answers 204 for a running sandbox and, as E2B's proxy does for
// one that is gone, 502.
func (s *Server) health(w http.ResponseWriter, r *http.Request, id string) {
	if _, err := s.lease(r.Context(), id); err != nil {
		if errors.Is(err, vm.ErrNotFound) {
			writeAPIError(w, http.StatusBadGateway, fmt.Sprintf("sandbox %s is not running", id))
			return
		}
		s.failAPI(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// jsonCodec is Connect's "json" codec over encoding/json and the wire
// types of this package: no generated protobuf code.
type jsonCodec struct{}

func (jsonCodec) Name() string { return "json" }

func (jsonCodec) Marshal(v any) ([]byte, error) { return json.Marshal(v) }

func (jsonCodec) Unmarshal(b []byte, v any) error {
	if len(bytes.TrimSpace(b)) == 0 {
		return nil
	}
	return json.Unmarshal(b, v)
}

func (s *Server) envdHandler() http.Handler {
	mux := http.NewServeMux()
	opt := connect.WithCodec(jsonCodec{})
	unary := func(path string, h http.Handler) { mux.Handle(path, h) }
	unary("/process.Process/Start", connect.NewServerStreamHandler("/process.Process/Start", s.startProcess, opt))
	unary("/process.Process/Connect", connect.NewServerStreamHandler("/process.Process/Connect", s.connectProcess, opt))
	unary("/process.Process/List", connect.NewUnaryHandler("/process.Process/List", s.listProcesses, opt))
	unary("/process.Process/SendSignal", connect.NewUnaryHandler("/process.Process/SendSignal", s.sendSignal, opt))
	unary("/process.Process/SendInput", connect.NewUnaryHandler("/process.Process/SendInput", s.sendInput, opt))
	unary("/process.Process/StreamInput", connect.NewClientStreamHandler("/process.Process/StreamInput", s.streamInput, opt))
	unary("/process.Process/CloseStdin", connect.NewUnaryHandler("/process.Process/CloseStdin", s.closeStdin, opt))
	unary("/process.Process/Update", connect.NewUnaryHandler("/process.Process/Update", s.update, opt))
	unary("/filesystem.Filesystem/Stat", connect.NewUnaryHandler("/filesystem.Filesystem/Stat", s.stat, opt))
	unary("/filesystem.Filesystem/ListDir", connect.NewUnaryHandler("/filesystem.Filesystem/ListDir", s.listDir, opt))
	unary("/filesystem.Filesystem/MakeDir", connect.NewUnaryHandler("/filesystem.Filesystem/MakeDir", s.makeDir, opt))
	unary("/filesystem.Filesystem/Move", connect.NewUnaryHandler("/filesystem.Filesystem/Move", s.move, opt))
	unary("/filesystem.Filesystem/Remove", connect.NewUnaryHandler("/filesystem.Filesystem/Remove", s.remove, opt))
	unary("/filesystem.Filesystem/WatchDir", connect.NewServerStreamHandler("/filesystem.Filesystem/WatchDir", s.watchDir, opt))
	unary("/filesystem.Filesystem/CreateWatcher", connect.NewUnaryHandler("/filesystem.Filesystem/CreateWatcher", s.createWatcher, opt))
	unary("/filesystem.Filesystem/GetWatcherEvents", connect.NewUnaryHandler("/filesystem.Filesystem/GetWatcherEvents", s.getWatcherEvents, opt))
	unary("/filesystem.Filesystem/RemoveWatcher", connect.NewUnaryHandler("/filesystem.Filesystem/RemoveWatcher", s.removeWatcher, opt))
	mux.HandleFunc("GET /files", s.readFile)
	mux.HandleFunc("POST /files", s.writeFile)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeAPIError(w, http.StatusNotFound, fmt.Sprintf("warmpool's envd has no endpoint %s %s", r.Method, r.URL.Path))
	})
	return mux
}

// rpcError maps a Backend error to the Connect code the SDK turns into
// its own error: a sandbox that is gone is Unavailable (the SDK says it is
// not running any more), a missing file NotFound.
func rpcError(err error) error {
	var ce *connect.Error
	if errors.As(err, &ce) {
		return err
	}
	code := connect.CodeInternal
	switch e := api.ErrorFor(err); e.Status {
	case http.StatusNotFound:
		code = connect.CodeNotFound
	case http.StatusBadRequest:
		code = connect.CodeInvalidArgument
	case http.StatusConflict:
		code = connect.CodeFailedPrecondition
	case http.StatusNotImplemented:
		code = connect.CodeUnimplemented
	case http.StatusServiceUnavailable:
		code = connect.CodeUnavailable
	}
	if errors.Is(err, context.DeadlineExceeded) {
		code = connect.CodeDeadlineExceeded
	}
	return connect.NewError(code, err)
}

// requestUser is the user an envd request runs as: the SDK sends it as
// "Authorization: Basic base64(USER:)" (a command's or file operation's
// user option) and, for file transfers, as ?username=. Empty means the
// image's default user.
func requestUser(r interface{ Header() http.Header }, query string) (string, error) {
	if query != "" {
		return query, nil
	}
	h := r.Header().Get("Authorization")
	if h == "" {
		return "", nil
	}
	enc, ok := strings.CutPrefix(h, "Basic ")
	if !ok {
		return "", connect.NewError(connect.CodeInvalidArgument, errors.New("authorization: want Basic base64(USER:)"))
	}
	b, err := base64.StdEncoding.DecodeString(enc)
	if err != nil {
		return "", connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("authorization: %v", err))
	}
	user, _, _ := strings.Cut(string(b), ":")
	return user, nil
}

type headers http.Header

func (h headers) Header() http.Header { return http.Header(h) }

// keepaliveInterval reads the SDK's Keepalive-Ping-Interval (seconds).
func keepaliveInterval(h http.Header) time.Duration {
	n, err := strconv.Atoi(h.Get("Keepalive-Ping-Interval"))
	if err != nil || n <= 0 {
		return 0
	}
	return time.Duration(n) * time.Second
}

func envList(m map[string]string) []string {
	out := make([]string, 0, len(m))
	for k, v := range m {
		out = append(out, k+"="+v)
	}
	return out
}

func selectorString(sel processSelector) string {
	switch {
	case sel.PID != nil:
		return "pid " + strconv.FormatUint(uint64(*sel.PID), 10)
	case sel.Tag != nil:
		return "tag " + strconv.Quote(*sel.Tag)
	}
	return "no process"
}
