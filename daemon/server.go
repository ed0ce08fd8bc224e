package daemon

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/warmpool/warmpool/api"
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
	return srv, nil
}

func (s *server) serve() error {
	err := s.http.Serve(s.ln)
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return fmt.Errorf("serve on %s: %w", s.ln.Addr(), err)
}

// shutdown stops accepting, ends event streams and waits up to wait for
// in-flight requests. Requests still running then are cancelled (an exec's
// guest process is killed), given up to cancelWait to return, and their
// connections closed. It returns an error when requests had to be cut short.
func (s *server) shutdown(wait, cancelWait time.Duration) error {
	s.api.Drain()
	defer s.cancelRequests()
	if err := shutdownWithin(s.http, wait); err == nil {
		return nil
	}
	s.cancelRequests()
	// Shutdown again: it returns once the cancelled handlers have returned.
	if err := shutdownWithin(s.http, cancelWait); err != nil {
		s.http.Close()
		return fmt.Errorf("requests in flight outlived limits.shutdown_wait (%s) and did not return within %s of being cancelled; closed their connections", wait, cancelWait)
	}
	return fmt.Errorf("requests in flight outlived limits.shutdown_wait (%s); cancelled them", wait)
}

func shutdownWithin(s *http.Server, d time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	return s.Shutdown(ctx)
}
