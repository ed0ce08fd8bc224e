package main

import (
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/warmpool/warmpool/bench"
	"github.com/warmpool/warmpool/daemon"
)

func init() { extraCommands = append(extraCommands, newBenchCommand) }

// newBenchCommand builds `warmpool bench`: it measures cold boot, restore,
// warm acquire, bursts, memory per warm VM, machine ensure and the pool's own
// overhead in one run and prints them side by side.
func newBenchCommand() *cobra.Command {
	var (
		opts     bench.Options
		svgPath  string
		check    bool
		progress bool
		debug    bool
		// fakeLatency is OP=DURATION, parsed into opts.FakeLatency.
		fakeLatency map[string]string
	)
	cmd := &cobra.Command{
		Use:   "bench",
		Short: "Measure cold boot, restore, warm acquire, burst, memory and ensure side by side",
		Long: `bench runs every scenario against one provider on this machine and reports
p50/p90/p99 with sample counts, each as a ratio to its baseline in the same run,
and checks the targets. Everything it starts is removed when it ends, also on
Ctrl-C. --quick takes few samples (under two minutes with real VMs).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			// -o is the root's persistent flag, checked there.
			output := "table"
			if f := cmd.Flag("output"); f != nil {
				output = f.Value.String()
			}
			// Ctrl-C cancels the run, which then removes what it started.
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			if progress || isTerminal(cmd.ErrOrStderr()) {
				opts.Progress = cmd.ErrOrStderr()
			}
			if len(fakeLatency) > 0 {
				opts.FakeLatency = map[string]time.Duration{}
				for name, value := range fakeLatency {
					if err := daemon.CheckFakeLatency(name); err != nil {
						return usagef("--fake-latency %s=%s: %w", name, value, err)
					}
					d, err := time.ParseDuration(value)
					if err != nil {
						return usagef("--fake-latency %s=%s: %w", name, value, err)
					}
					opts.FakeLatency[name] = d
				}
			}
			if debug {
				opts.Logger = slog.New(slog.NewTextHandler(cmd.ErrOrStderr(), &slog.HandlerOptions{Level: slog.LevelDebug}))
			}
			opts.GuestAgent = embeddedAgent()
			rep, err := bench.Run(ctx, opts)
			if err != nil {
				return err
			}
			if svgPath != "" {
				if err := writeFileAtomic(svgPath, rep.WriteSVG); err != nil {
					return err
				}
			}
			out := cmd.OutOrStdout()
			if output == "json" {
				err = rep.WriteJSON(out)
			} else {
				err = rep.WriteTable(out)
			}
			if err != nil {
				return err
			}
			if missed := rep.Missed(); check && len(missed) > 0 {
				names := make([]string, len(missed))
				for i, t := range missed {
					names[i] = t.Description
				}
				return fmt.Errorf("bench: %d target(s) missed: %s", len(missed), strings.Join(names, "; "))
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&opts.Provider, "provider", "qemu", "provider to measure: qemu or fake")
	f.BoolVar(&opts.Quick, "quick", false, "few samples; finishes in under two minutes with real VMs")
	f.BoolVar(&debug, "debug", false, "log what the provider, pools and machines do on stderr")
	f.BoolVar(&progress, "progress", false, "print each step on stderr even when it is not a terminal")
	f.StringVar(&svgPath, "svg", "", "also write a latency chart (SVG) to this file")
	f.BoolVar(&check, "check", false, "exit non-zero when a target is missed")
	f.StringVar(&opts.StateDir, "bench-dir", "", "directory for the run's temporary VMs and template (default: system temp dir)")
	f.StringVar(&opts.ImageDir, "image", "", "guest image `DIR` made by warmpool image build --out (default: build or reuse the cached one)")
	f.StringVar(&opts.CacheDir, "image-cache", "", "guest image cache directory (default: user cache dir)")
	f.StringVar(&opts.Accel, "accel", "auto", "QEMU accelerator: auto, kvm or tcg")
	f.StringToStringVar(&fakeLatency, "fake-latency", nil, "with --provider fake: `OP=DURATION` delays that fake operation (e.g. resume=30ms), to see --check fail")
	f.Lookup("fake-latency").DefValue = "" // not "[]" in --help
	f.IntVar(&opts.Samples, "samples", 0, "measured runs per latency scenario (default 20, --quick 6)")
	f.IntVar(&opts.ColdSamples, "cold-samples", 0, "measured cold boots (default 5, --quick 2)")
	f.IntVar(&opts.WarmupRuns, "warmup", 0, "unrecorded runs before each latency scenario (default 1)")
	f.IntVar(&opts.BurstConcurrency, "burst", 0, "concurrent acquirers in the burst scenario (default 16)")
	f.IntVar(&opts.BurstDepth, "burst-depth", 0, "pool depth in the burst scenario (default 4)")
	f.IntVar(&opts.MemoryVMs, "memory-vms", 0, "warm VMs whose memory is measured (default 8, --quick 3)")
	f.IntVar(&opts.MemoryMiB, "mem", 0, "guest memory of every VM in MiB (default 256)")
	return cmd
}

// writeFileAtomic writes through a temporary file so that a failed run never
// leaves a half-written chart where a README points.
func writeFileAtomic(path string, write func(io.Writer) error) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), ".bench-*.tmp")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	defer os.Remove(tmp.Name())
	if err := write(tmp); err != nil {
		tmp.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Chmod(tmp.Name(), 0o644); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}
