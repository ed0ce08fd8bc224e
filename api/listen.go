package api

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// ParseListenAddr splits "unix:PATH" or "tcp:HOST:PORT" into a network and
// an address. A bare absolute path means a Unix socket.
func ParseListenAddr(addr string) (network, address string, err error) {
	switch {
	case strings.HasPrefix(addr, "unix:"):
		network, address = "unix", strings.TrimPrefix(addr, "unix:")
		if !filepath.IsAbs(address) {
			return "", "", fmt.Errorf("listen address %q: unix socket path must be absolute", addr)
		}
	case strings.HasPrefix(addr, "tcp:"):
		network, address = "tcp", strings.TrimPrefix(addr, "tcp:")
		if _, _, err := net.SplitHostPort(address); err != nil {
			return "", "", fmt.Errorf("listen address %q: want tcp:HOST:PORT: %w", addr, err)
		}
	case filepath.IsAbs(addr):
		network, address = "unix", addr
	default:
		return "", "", fmt.Errorf("listen address %q: want unix:PATH or tcp:HOST:PORT", addr)
	}
	return network, address, nil
}

// Listen opens the listener for "unix:PATH" or "tcp:HOST:PORT". A Unix
// socket gets mode 0600 in a directory created 0700 when missing; a socket
// file left by a dead daemon is removed, but one that still answers is an
// error, and so is any other kind of file at PATH.
func Listen(addr string) (net.Listener, error) {
	network, address, err := ParseListenAddr(addr)
	if err != nil {
		return nil, err
	}
	if network == "tcp" {
		ln, err := net.Listen("tcp", address)
		if err != nil {
			return nil, fmt.Errorf("listen on %s: %w", addr, err)
		}
		return ln, nil
	}
	if err := os.MkdirAll(filepath.Dir(address), 0o700); err != nil {
		return nil, fmt.Errorf("create socket directory for %s: %w", address, err)
	}
	if err := removeStaleSocket(address); err != nil {
		return nil, err
	}
	ln, err := net.Listen("unix", address)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", address, err)
	}
	// The socket is briefly subject to the umask; the 0700 directory the
	// daemon keeps it in covers that window.
	if err := os.Chmod(address, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("restrict socket %s to its owner: %w", address, err)
	}
	return ln, nil
}

func removeStaleSocket(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("inspect socket %s: %w", path, err)
	}
	if fi.Mode().Type() != fs.ModeSocket {
		return fmt.Errorf("listen on %s: a %s that is not a socket is in the way", path, fi.Mode().Type())
	}
	conn, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		conn.Close()
		return fmt.Errorf("listen on %s: another daemon is answering there", path)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove stale socket %s: %w", path, err)
	}
	return nil
}

// Timeouts of the HTTP server. Handlers that legitimately run long (acquire
// with a wait, exec, template build, event streams) lift the write timeout
// for their response.
const (
	ReadHeaderTimeout = 10 * time.Second
	ReadTimeout       = time.Minute
	WriteTimeout      = 2 * time.Minute
	IdleTimeout       = 2 * time.Minute
	// ShutdownTimeout bounds how long Serve waits for in-flight requests.
	ShutdownTimeout = 30 * time.Second
)

// NewHTTPServer wraps s in an http.Server with warmpool's timeouts and marks
// connections that arrive over a Unix socket as local (no token needed).
func NewHTTPServer(s *Server) *http.Server {
	return &http.Server{
		Handler:           s,
		ReadHeaderTimeout: ReadHeaderTimeout,
		ReadTimeout:       ReadTimeout,
		WriteTimeout:      WriteTimeout,
		IdleTimeout:       IdleTimeout,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			if _, ok := c.(*net.UnixConn); ok {
				return withLocalConn(ctx)
			}
			return ctx
		},
	}
}

// Serve serves the API on ln until ctx ends, then stops accepting, ends
// event streams, and waits up to ShutdownTimeout for in-flight requests.
// It refuses a TCP listener when opts has no token.
func Serve(ctx context.Context, ln net.Listener, opts ServerOptions) error {
	if _, isUnix := ln.Addr().(*net.UnixAddr); !isUnix && opts.Token == "" {
		ln.Close()
		return fmt.Errorf("serve on %s: a TCP listener requires a bearer token", ln.Addr())
	}
	s := NewServer(opts)
	srv := NewHTTPServer(s)
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return fmt.Errorf("serve on %s: %w", ln.Addr(), err)
	case <-ctx.Done():
	}
	s.Drain()
	shutdownCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), ShutdownTimeout)
	defer cancel()
	if err := srv.Shutdown(shutdownCtx); err != nil {
		srv.Close()
		return fmt.Errorf("shut down server on %s: %w", ln.Addr(), err)
	}
	if err := <-errc; err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("serve on %s: %w", ln.Addr(), err)
	}
	return nil
}
