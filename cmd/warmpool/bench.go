package main

import (
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/warmpool/warmpool/bench"
	"github.com/warmpool/warmpool/daemon"
	"github.com/warmpool/warmpool/internal/atomicfile"
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
		// tracePath is builtin, none or a file; traceOut where to write it.
		tracePath, traceOut string
	)
	cmd := &cobra.Command{
		Use:   "bench",
		Short: "Measure cold boot, restore, warm acquire, burst, memory and ensure side by side",
		Long: `bench runs every scenario against one provider on this machine and reports
p50/p90/p99 with sample counts, each as a ratio to its baseline in the same run,
and checks the targets. Everything it starts is removed when it ends, also on
Ctrl-C. --quick takes few samples (under two minutes with real VMs).

--trace replays acquire arrivals (builtin: a generated day of diurnal base
rate plus Poisson bursts, seed 17; or a file written by --trace-out) against
a pool of fixed depth --trace-max, one of fixed depth --trace-min and an
adaptive one between them, at --trace-speed trace seconds per second
(default: 2 with qemu; with fake, the speed at which the pool's restores
take 0.25 s of trace time, 20 to 100). --density N
keeps N warm VMs in one pool and measures their memory and the warm acquire
at that depth against depth 2; it is not part of the default run.
--scenarios picks steps: ` + strings.Join(bench.StepNames, ", ") + `.`,
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
			var err error
			if opts.ImageDir, err = imageRef(opts.ImageDir); err != nil {
				return err
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
			if tracePath == "none" {
				tracePath = ""
			}
			if tracePath != "" {
				tr, err := bench.ReadTrace(tracePath)
				if err != nil {
					return usagef("--trace %s: %w", tracePath, err)
				}
				opts.Trace = &tr
			}
			if traceOut != "" {
				if opts.Trace == nil {
					return usagef("--trace-out needs a trace (--trace builtin or FILE)")
				}
				if err := atomicfile.Write(traceOut, 0o644, opts.Trace.WriteJSON, nil); err != nil {
					return err
				}
			}
			opts.GuestAgent = embeddedAgent()
			rep, err := bench.Run(ctx, opts)
			if err != nil {
				return err
			}
			if svgPath != "" {
				if err := atomicfile.Write(svgPath, 0o644, rep.WriteSVG, nil); err != nil {
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
	f.StringVar(&opts.ImageDir, "image", "", "image `NAME` (image build --name) or guest image directory to measure (default: build or reuse the cached busybox image)")
	f.StringVar(&opts.CacheDir, "image-cache", "", "guest image cache directory (default: user cache dir)")
	f.StringVar(&opts.Accel, "accel", "auto", "QEMU accelerator: auto, kvm or tcg")
	f.StringVar(&opts.NetworkCIDR, "network-cidr", "", "run the network scenarios with this network.cidr (root; a range free on this host, a /27 is enough); empty skips them")
	f.StringToStringVar(&fakeLatency, "fake-latency", nil, "with --provider fake: `OP=DURATION` delays that fake operation (e.g. resume=30ms), to see --check fail")
	f.Lookup("fake-latency").DefValue = "" // not "[]" in --help
	f.IntVar(&opts.Samples, "samples", 0, "measured runs per latency scenario (default 20, --quick 6)")
	f.IntVar(&opts.ColdSamples, "cold-samples", 0, "measured cold boots (default 5, --quick 2)")
	f.IntVar(&opts.WarmupRuns, "warmup", 0, "unrecorded runs before each latency scenario (default 1)")
	f.IntVar(&opts.BurstConcurrency, "burst", 0, "concurrent acquirers in the burst scenario (default 16)")
	f.IntVar(&opts.BurstDepth, "burst-depth", 0, "pool depth in the burst scenario (default 4)")
	f.IntVar(&opts.MemoryVMs, "memory-vms", 0, "warm VMs whose memory is measured (default 8, --quick 3)")
	f.IntVar(&opts.MemoryMiB, "mem", 0, "guest memory of every VM in MiB (default 256)")
	f.StringVar(&tracePath, "trace", "", "replay acquire arrivals: builtin or a `FILE` from --trace-out (default: none)")
	f.StringVar(&traceOut, "trace-out", "", "write the trace replayed to `FILE` (JSON), to replay it later with --trace FILE")
	f.Float64Var(&opts.TraceSpeed, "trace-speed", 0, "trace seconds per second of replay (default: qemu 2; fake: restores take 0.25 s of trace, 20..100)")
	f.IntVar(&opts.TraceMin, "trace-min", 0, "min of the trace's pools: the depth of the small fixed pool (default 1)")
	f.IntVar(&opts.TraceMax, "trace-max", 0, "max of the trace's pools: the depth of the large fixed pool (default 8)")
	f.IntVar(&opts.Density, "density", 0, "also keep `N` warm VMs in one pool and measure memory and acquire at that depth")
	f.IntVar(&opts.DensitySamples, "density-samples", 0, "measured acquires at each depth of the density scenario (default 20, --quick 10)")
	f.IntVar(&opts.TBSizeMiB, "tb-size", 0, "QEMU TCG translation cache per VM in MiB (default: the provider's 32; -1: QEMU's own)")
	f.IntVar(&opts.Parallelism, "parallelism", 0, "restores at once (limits.parallelism; default the daemon's 2)")
	f.StringSliceVar(&opts.Scenarios, "scenarios", nil, "run only these steps, comma-separated (default: all but density, trace only with a trace)")
	return cmd
}
