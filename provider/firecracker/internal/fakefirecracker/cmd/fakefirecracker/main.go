// Command fakefirecracker pretends to be the firecracker binary: it takes
// Firecracker's command line, serves its API on --api-sock checking every
// request against Firecracker's API description, and serves the warmpool
// guest agent on the vsock socket. Tests build it and hand it to the
// provider as its Firecracker binary.
//
// Environment: WARMPOOL_FIRECRACKER_SPEC (the API description),
// FAKE_FIRECRACKER_VERSION (play another release),
// FAKE_FIRECRACKER_IGNORE_CTRLALTDEL=1 (a guest that never shuts down).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/warmpool/warmpool/agent/proto"
	"github.com/warmpool/warmpool/agent/server"
	"github.com/warmpool/warmpool/provider/firecracker/internal/fakefirecracker"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "fakefirecracker:", err)
		os.Exit(1)
	}
}

func run() error {
	fs := flag.NewFlagSet("firecracker", flag.ContinueOnError)
	apiSock := fs.String("api-sock", "/run/firecracker.socket", "API socket path")
	id := fs.String("id", "anonymous-instance", "microVM id")
	showVersion := fs.Bool("version", false, "print the version and exit")
	// Accepted and ignored, as the provider or an operator may pass them.
	fs.String("level", "", "")
	fs.String("log-path", "", "")
	fs.Bool("no-seccomp", false, "")
	fs.Bool("boot-timer", false, "")
	fs.String("start-time-us", "", "")
	fs.String("start-time-cpu-us", "", "")
	fs.String("parent-cpu-time-us", "", "")
	if err := fs.Parse(os.Args[1:]); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("found argument '%s' which wasn't expected, or isn't valid in this context", fs.Arg(0))
	}
	// Firecracker's argument parser refuses a repeated argument; the
	// jailer passes --id itself, so a caller must not pass it again.
	seen := map[string]bool{}
	for _, a := range os.Args[1:] {
		name, _, _ := strings.Cut(strings.TrimPrefix(a, "--"), "=")
		if !strings.HasPrefix(a, "--") || fs.Lookup(name) == nil {
			continue
		}
		if seen[name] {
			return fmt.Errorf("arguments parsing error: the argument '%s' was provided more than once", name)
		}
		seen[name] = true
	}
	specPath, err := fakefirecracker.SpecPath()
	if err != nil {
		return err
	}
	spec, err := fakefirecracker.LoadSpec(specPath)
	if err != nil {
		return err
	}
	version := os.Getenv("FAKE_FIRECRACKER_VERSION")
	if version == "" {
		version = spec.Version
	}
	if *showVersion {
		fmt.Printf("Firecracker v%s\n", version)
		return nil
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, nil)).With("id", *id)

	var srv *fakefirecracker.Server
	agentState := server.NewState()
	srv = fakefirecracker.New(fakefirecracker.Options{
		ID:               *id,
		Spec:             spec,
		Version:          version,
		IgnoreCtrlAltDel: os.Getenv("FAKE_FIRECRACKER_IGNORE_CTRLALTDEL") == "1",
		Logger:           log,
		Agent: func(ctx context.Context, conn io.ReadWriteCloser) error {
			return server.Serve(ctx, conn, server.Options{
				Agent:  "fakefirecracker-agent",
				State:  agentState,
				Logger: log,
				Stats:  jailSafeStats,
				PowerOff: func() error {
					go srv.Close()
					return nil
				},
			})
		},
	})

	// Firecracker refuses to start when the socket path is taken.
	ln, err := net.Listen("unix", *apiSock)
	if err != nil {
		return fmt.Errorf("failed to open the API socket: %w", err)
	}
	httpSrv := &http.Server{Handler: srv}
	go func() {
		if err := httpSrv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("API server", "err", err)
		}
	}()
	log.Info("fake firecracker running", "api_sock", *apiSock, "version", version)

	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	select {
	case <-srv.Done():
		log.Info("guest powered off")
	case sig := <-sigs:
		log.Info("signal", "signal", sig)
		srv.Close()
	}
	httpSrv.Close()
	return nil
}

// jailSafeStats reads the host's /proc like the real agent reads the
// guest's; inside the jailer's chroot there is no /proc, so it reports a
// small fixed guest instead of failing every stats call.
func jailSafeStats() (proto.Stats, error) {
	if st, err := server.ReadProcStats(); err == nil {
		return st, nil
	}
	return proto.Stats{MemTotalKiB: 256 << 10, MemFreeKiB: 200 << 10, MemAvailableKiB: 220 << 10,
		UptimeMillis: time.Since(started).Milliseconds(), Procs: 1, UnixNano: time.Now().UnixNano()}, nil
}

var started = time.Now()
