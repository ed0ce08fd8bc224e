// Package e2b speaks E2B's sandbox API on top of warmpool's api.Backend, so
// that the official E2B SDKs (npm and PyPI "e2b") drive warmpool as a
// self-hosted sandbox backend: the REST API (create, get, list, kill,
// timeout, connect) and the in-sandbox daemon "envd" (Connect RPC with JSON
// for processes and the filesystem, plain HTTP for file transfer and health)
// on one listener. A sandbox is a lease, its templateID a pool; everything
// it does goes through the Backend methods the native API uses, and inside
// the sandbox through the same guest agent session (api.GuestBackend).
package e2b

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"sync"
	"time"

	"github.com/warmpool/warmpool/api"
)

// EnvdVersion is the envd version warmpool answers with. The SDK enables
// features by it: 0.4.0 and later send no default user, 0.5.7 and later
// may upload files as application/octet-stream. Later features (file
// metadata, 0.6.2) are refused by the SDK itself with a clear error.
const EnvdVersion = "0.5.7"

// EnvdPort is the port the SDK addresses envd on (E2b-Sandbox-Port).
const EnvdPort = "49983"

// clientID is what E2B calls the node a sandbox runs on.
const clientID = "warmpool"

// DefaultTimeout is a sandbox's lifetime when its create names none, as on
// E2B.
const DefaultTimeout = 5 * time.Minute

// Options configure a Server.
type Options struct {
	// Backend must also be an api.GuestBackend.
	Backend api.Backend
	Keys    *Keys
	// TokenSecret derives each sandbox's envd access token.
	TokenSecret []byte
	Logger      *slog.Logger
	// AcquireWait is how long a create waits for a ready VM; 30s when 0.
	AcquireWait time.Duration
	// FallbackPoolMax is the max of the pool a create makes for a template
	// that no pool serves yet; 2 when 0.
	FallbackPoolMax int
}

// Server serves E2B's REST API and envd on one handler.
type Server struct {
	opts Options
	log  *slog.Logger
	rest *http.ServeMux
	envd http.Handler
	// guests reaches inside a sandbox's VM: processes and files.
	guests api.GuestBackend

	// watchers are the polling watchers (CreateWatcher) of each sandbox.
	watchers watchers

	// fallbackMu serialises the creation of fallback pools.
	fallbackMu sync.Mutex
}

// NewServer returns a server over opts.Backend.
func NewServer(opts Options) (*Server, error) {
	if opts.Backend == nil || opts.Keys == nil || len(opts.TokenSecret) == 0 {
		return nil, errors.New("e2b server: needs a backend, keys and a token secret")
	}
	guests, ok := opts.Backend.(api.GuestBackend)
	if !ok {
		return nil, errors.New("e2b server: the backend has no guest sessions (api.GuestBackend), which envd's processes and files need")
	}
	if opts.AcquireWait <= 0 {
		opts.AcquireWait = 30 * time.Second
	}
	if opts.FallbackPoolMax <= 0 {
		opts.FallbackPoolMax = 2
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Server{opts: opts, log: log, rest: http.NewServeMux(), guests: guests}
	s.restRoutes()
	s.envd = s.envdHandler()
	return s, nil
}

// ServeHTTP routes a request: envd traffic carries E2b-Sandbox-Id (the
// SDK sends it whenever E2B_SANDBOX_URL is set), the rest is the REST API.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if id := r.Header.Get("E2b-Sandbox-Id"); id != "" {
		s.serveEnvd(w, r, id)
		return
	}
	if !s.opts.Keys.Valid(r.Header.Get("X-API-Key")) {
		writeAPIError(w, http.StatusUnauthorized, "Invalid API key: send one of the keys in the daemon's e2b.key_file as X-API-Key (E2B_API_KEY)")
		return
	}
	s.rest.ServeHTTP(w, r)
}

func (s *Server) restRoutes() {
	m := s.rest
	m.HandleFunc("POST /sandboxes", s.create)
	m.HandleFunc("POST /v2/sandboxes", s.create)
	m.HandleFunc("GET /sandboxes", s.list)
	m.HandleFunc("GET /v2/sandboxes", s.list)
	m.HandleFunc("GET /sandboxes/{id}", s.get)
	m.HandleFunc("DELETE /sandboxes/{id}", s.kill)
	m.HandleFunc("POST /sandboxes/{id}/timeout", s.setTimeout)
	m.HandleFunc("POST /sandboxes/{id}/connect", s.connect)
	m.HandleFunc("POST /v2/sandboxes/{id}/connect", s.connect)
	m.HandleFunc("POST /sandboxes/{id}/refreshes", s.refresh)
	m.HandleFunc("POST /sandboxes/{id}/pause", s.unsupported("pause"))
	m.HandleFunc("POST /sandboxes/{id}/resume", s.unsupported("resume"))
	m.HandleFunc("POST /sandboxes/{id}/snapshots", s.unsupported("snapshot"))
	m.HandleFunc("POST /sandboxes/{id}/fork", s.unsupported("fork"))
	m.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeAPIError(w, http.StatusNotFound, fmt.Sprintf("warmpool's E2B API has no endpoint %s %s", r.Method, r.URL.Path))
	})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

func writeAPIError(w http.ResponseWriter, status int, msg string) {
	writeJSON(w, status, apiError{Code: status, Message: msg})
}

// failAPI answers a Backend error with the status E2B would use, so the
// SDK raises the matching error (401 AuthenticationError, 429
// RateLimitError, 503 ServiceBusyError, 404 with code 404, ...).
func (s *Server) failAPI(w http.ResponseWriter, r *http.Request, err error) {
	status := restStatus(err)
	if status >= 500 {
		s.log.Error("e2b request failed", "method", r.Method, "path", r.URL.Path, "err", err)
	}
	writeAPIError(w, status, err.Error())
}

func restStatus(err error) int {
	e := api.ErrorFor(err)
	if e.Code == api.CodeExhausted {
		return http.StatusTooManyRequests
	}
	return e.Status
}

func decodeBody(r *http.Request, v any, optional bool) error {
	dec := json.NewDecoder(http.MaxBytesReader(nil, r.Body, 1<<20))
	if err := dec.Decode(v); err != nil {
		if optional && errors.Is(err, io.EOF) {
			return nil
		}
		return fmt.Errorf("invalid JSON body: %v", err)
	}
	return nil
}

// withoutCancel keeps a cleanup running after the client went away.
func withoutCancel(ctx context.Context, d time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.WithoutCancel(ctx), d)
}
