//go:build linux

package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"runtime/debug"
	"strings"
	"syscall"

	"github.com/warmpool/warmpool/agent/server"
)

// Defaults shared with the providers: the virtio-serial port name QEMU gives
// the agent's channel and the vsock port Firecracker's host side connects to.
const (
	defaultPortName  = "org.warmpool.agent"
	defaultVsockPort = 1024
)

func main() {
	if os.Getpid() == 1 {
		if err := runInit(); err != nil {
			fmt.Fprintf(os.Stderr, "warmpool-agent init: %v\n", err)
		}
		// PID 1 must never exit: the kernel would panic.
		select {}
	}
	fs := flag.NewFlagSet("warmpool-agent", flag.ExitOnError)
	portName := fs.String("port", defaultPortName, "name of the virtio-serial port to serve")
	vsockPort := fs.Uint("vsock-port", defaultVsockPort, "vsock port to listen on when the guest has vsock (0: off)")
	debugLog := fs.Bool("debug", false, "log every request")
	args := os.Args[1:]
	if len(args) > 0 && args[0] == "serve" {
		args = args[1:]
	}
	_ = fs.Parse(args)

	level := slog.LevelInfo
	if *debugLog || strings.Contains(readCmdline(), "warmpool.debug") {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level})).With("component", "agent")

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	opts := server.SystemOptions()
	opts.Agent = "warmpool-agent " + version()
	opts.Logger = log
	opts.State = server.NewState()
	opts.Env = guestEnv()

	if *vsockPort != 0 {
		go serveVsock(ctx, uint32(*vsockPort), opts)
	}
	if err := servePort(ctx, *portName, opts); err != nil && ctx.Err() == nil {
		log.Error("agent stopped", "err", err)
		os.Exit(1)
	}
}

func version() string {
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" {
		return bi.Main.Version
	}
	return "devel"
}

func readCmdline() string {
	b, _ := os.ReadFile("/proc/cmdline")
	return string(b)
}

// guestEnv is the environment commands start with, whatever PID 1 was given.
func guestEnv() []string {
	return []string{
		"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		"HOME=/root",
		"TERM=linux",
		"LANG=C.UTF-8",
	}
}
