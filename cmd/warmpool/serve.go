package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/warmpool/warmpool/daemon"
)

func newServeCommand(g *globals) *cobra.Command {
	var (
		opts     daemon.Options
		logLevel string
		logJSON  bool
		kf       kubeFlags
	)
	cmd := &cobra.Command{
		Use:   "serve [--config FILE] [--state DIR] [--listen unix:PATH|tcp:HOST:PORT] [--provider qemu|firecracker|fake] [--e2b tcp:HOST:PORT] [--kubernetes --node NAME [--kubeconfig FILE]]",
		Short: "Run the daemon: warm pools, machines and the HTTP API",
		Long: `serve runs the warmpool daemon in the foreground. It listens on
warmpool.sock in the state directory (mode 0600) unless --listen says
otherwise; a TCP listener requires --token-file. On SIGTERM or Ctrl-C it stops
accepting, lets in-flight requests finish for limits.shutdown_wait (30s) and
cancels the rest (killing an exec's process in the guest), destroys warm VMs
and keeps leased VMs and machines running for the next start to adopt (unless
--stop-all). With --e2b it also serves E2B's sandbox API, for the official
E2B SDKs, on that address (see "warmpool e2b key create").

With --kubernetes it is also the node agent of --node: it builds the
templates and keeps the pools of the WarmPools that select the node, reports
their ready counts, renews the node's heartbeat Lease, and carries out the
VMClaims bound to the node (see warmpool controller).`,
		Args: args(),
		RunE: func(cmd *cobra.Command, _ []string) error {
			var err error
			if opts.Logger, err = newLogger(cmd, logLevel, logJSON); err != nil {
				return err
			}
			if opts.Alongside, err = kf.alongside(cmd, opts.Logger); err != nil {
				return err
			}
			opts.StateDir = g.stateDir
			opts.TokenFile = g.tokenFile
			opts.GuestAgent = embeddedAgent()
			if err := daemon.Run(cmd.Context(), opts); err != nil {
				return fmt.Errorf("serve: %w", err)
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&opts.ConfigFile, "config", "", "YAML configuration file (pools, templates, machines, limits)")
	f.StringVar(&opts.Listen, "listen", "", "unix:PATH or tcp:HOST:PORT (default: unix socket in the state directory)")
	f.StringVar(&opts.Provider, "provider", "", "VM provider: qemu, firecracker or fake (default: the config's, else qemu)")
	f.StringVar(&opts.Accel, "accel", "", "QEMU accelerator: auto, kvm or tcg (default auto)")
	f.StringVar(&opts.E2BListen, "e2b", "", "also serve the E2B API (REST and envd, for the official E2B SDKs) on tcp:HOST:PORT")
	f.StringVar(&opts.E2BKeyFile, "e2b-key-file", "", "E2B API keys, one per line (default: e2b-keys in the state directory)")
	f.BoolVar(&opts.StopAll, "stop-all", false, "on shutdown also destroy leased VMs and stop machines")
	f.StringVar(&opts.FirecrackerBin, "firecracker-bin", "", "path of the firecracker binary")
	f.StringVar(&opts.JailerBin, "jailer-bin", "", "path of the jailer binary")
	f.StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	f.BoolVar(&logJSON, "log-json", false, "log as JSON lines")
	kf.register(cmd)
	_ = cmd.RegisterFlagCompletionFunc("provider", fixedCompletion("qemu", "firecracker", "fake"))
	_ = cmd.RegisterFlagCompletionFunc("accel", fixedCompletion("auto", "kvm", "tcg"))
	return cmd
}
