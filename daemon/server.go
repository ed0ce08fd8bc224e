package daemon

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/warmpool/warmpool/api"
	"github.com/warmpool/warmpool/e2b"
)

// server is the daemon's HTTP side: the listener is opened during start so
// that a client can connect as soon as Run's caller sees the socket.
type server struct {
	ln   net.Listener
	api  *api.Server
	http *http.Server
	// cancelRequests ends the context of every request, in flight or not
	// yet read: http.Server.Shutdown only waits for handlers, it never
	// tells them to stop.
	cancelRequests func()
	// e2bLn and e2bHTTP serve the E2B API when e2b.listen is set.
	e2bLn   net.Listener
	e2bHTTP *http.Server
}

func (d *Daemon) listen(cfg Config) (*server, error) {
	var token string
	if cfg.TokenFile != "" {
		b, err := os.ReadFile(cfg.TokenFile)
		if err != nil {
			return nil, fmt.Errorf("read token file: %w", err)
		}
		token = strings.TrimSpace(string(b))
		if token == "" {
			return nil, fmt.Errorf("token file %s is empty", cfg.TokenFile)
		}
	}
	ln, err := api.Listen(cfg.Listen)
	if err != nil {
		return nil, err
	}
	if _, isUnix := ln.Addr().(*net.UnixAddr); !isUnix && token == "" {
		ln.Close()
		return nil, fmt.Errorf("listen on %s: a TCP listener requires a bearer token (token_file)", cfg.Listen)
	}
	s := api.NewServer(api.ServerOptions{
		Backend:  d,
		Gatherer: d.reg,
		Token:    token,
		Logger:   d.log.With("component", "api"),
	})
	reqCtx, cancel := context.WithCancelCause(context.Background())
	srv := &server{ln: ln, api: s, http: api.NewHTTPServer(s), cancelRequests: func() { cancel(api.ErrShuttingDown) }}
	srv.http.BaseContext = func(net.Listener) context.Context { return reqCtx }
	if cfg.E2B.Listen != "" {
		if err := d.listenE2B(cfg.E2B, srv, reqCtx); err != nil {
			ln.Close()
			return nil, err
		}
	}
	return srv, nil
}

// E2BKeyFileName is the E2B key file in the state directory, used when
// e2b.key_file names none.
const E2BKeyFileName = "e2b-keys"

// listenE2B opens the E2B API's listener: the REST API and every
// sandbox's envd on one port, over the daemon's own Backend.
func (d *Daemon) listenE2B(cfg E2BConfig, srv *server, reqCtx context.Context) error {
	keyFile := cfg.KeyFile
	if keyFile == "" {
		keyFile = filepath.Join(d.stateDir, E2BKeyFileName)
	}
	keys, err := e2b.LoadKeys(keyFile)
	if err != nil {
		return err
	}
	secret, err := e2b.LoadTokenSecret(filepath.Join(d.stateDir, "e2b-token-secret"))
	if err != nil {
		return err
	}
	h, err := e2b.NewServer(e2b.Options{Backend: d, Keys: keys, TokenSecret: secret, Logger: d.log.With("component", "e2b")})
	if err != nil {
		return err
	}
	ln, err := api.Listen(cfg.Listen)
	if err != nil {
		return fmt.Errorf("e2b.listen: %w", err)
	}
	srv.e2bLn = ln
	// No read or write timeout: envd streams a command's output for as
	// long as it runs.
	srv.e2bHTTP = &http.Server{
		Handler:           h,
		ReadHeaderTimeout: api.ReadHeaderTimeout,
		IdleTimeout:       api.IdleTimeout,
		MaxHeaderBytes:    64 << 10,
		BaseContext:       func(net.Listener) context.Context { return reqCtx },
	}
	d.log.Info("serving the E2B API", "listen", ln.Addr().String())
	return nil
}

func (s *server) serve() error {
	errc := make(chan error, 1)
	if s.e2bHTTP != nil {
		go func() { errc <- serveOn(s.e2bHTTP, s.e2bLn) }()
	}
	go func() { errc <- serveOn(s.http, s.ln) }()
	// The first server to end decides; the other ends at shutdown.
	return <-errc
}

func serveOn(h *http.Server, ln net.Listener) error {
	err := h.Serve(ln)
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return fmt.Errorf("serve on %s: %w", ln.Addr(), err)
}

// shutdown stops accepting, ends event streams and waits up to wait for
// in-flight requests. Requests still running then are cancelled (an exec's
// guest process is killed), given up to cancelWait to return, and their
// connections closed. It returns an error when requests had to be cut short.
func (s *server) shutdown(wait, cancelWait time.Duration) error {
	s.api.Drain()
	defer s.cancelRequests()
	if err := s.shutdownWithin(wait); err == nil {
		return nil
	}
	s.cancelRequests()
	// Shutdown again: it returns once the cancelled handlers have returned.
	if err := s.shutdownWithin(cancelWait); err != nil {
		s.http.Close()
		if s.e2bHTTP != nil {
			s.e2bHTTP.Close()
		}
		return fmt.Errorf("requests in flight outlived limits.shutdown_wait (%s) and did not return within %s of being cancelled; closed their connections", wait, cancelWait)
	}
	return fmt.Errorf("requests in flight outlived limits.shutdown_wait (%s); cancelled them", wait)
}

// shutdownWithin shuts the API and the E2B API down together.
func (s *server) shutdownWithin(d time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	e2bErr := make(chan error, 1)
	if s.e2bHTTP != nil {
		go func() { e2bErr <- s.e2bHTTP.Shutdown(ctx) }()
	} else {
		e2bErr <- nil
	}
	err := s.http.Shutdown(ctx)
	return errors.Join(err, <-e2bErr)
}
