package daemon

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"

	"github.com/warmpool/warmpool/api"
)

// server is the daemon's HTTP side: the listener is opened during start so
// that a client can connect as soon as Run's caller sees the socket.
type server struct {
	ln   net.Listener
	api  *api.Server
	http *http.Server
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
	return &server{ln: ln, api: s, http: api.NewHTTPServer(s)}, nil
}

func (s *server) serve() error {
	err := s.http.Serve(s.ln)
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return fmt.Errorf("serve on %s: %w", s.ln.Addr(), err)
}

// shutdown stops accepting, ends event streams and waits for in-flight
// requests until ctx ends, then closes what is left.
func (s *server) shutdown(ctx context.Context) error {
	s.api.Drain()
	err := s.http.Shutdown(ctx)
	if err != nil {
		s.http.Close()
	}
	return err
}
