package main

import (
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/warmpool/warmpool/api"
	"github.com/warmpool/warmpool/events"
)

func newTemplateCommand(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "template", Short: "Build and list templates (snapshots warm VMs are restored from)"}
	var req api.TemplateRequest
	build := &cobra.Command{
		Use:   "build NAME",
		Short: "Cold boot the guest image, wait for its agent and snapshot it as template NAME",
		Args:  args("NAME"),
		RunE: func(cmd *cobra.Command, a []string) error {
			req.Name = a[0]
			var err error
			if req.Image, err = imageRef(req.Image); err != nil {
				return err
			}
			return g.withClient(func(c *api.Client) error {
				p := newProgress(cmd.ErrOrStderr())
				stop := p.spinWhile("building template " + req.Name)
				t, err := c.BuildTemplate(cmd.Context(), req, func(step string) { p.spin(step) })
				stop()
				if err != nil {
					return wrapf(err, "build template %s", req.Name)
				}
				return printTemplates(cmd.OutOrStdout(), g, []api.Template{t}, true)
			})
		},
	}
	build.Flags().StringVar(&req.Image, "image", "", "image name (image build --name) or guest image directory (default: the daemon's image)")
	build.Flags().IntVar(&req.DiskMiB, "disk", 0, "writable disk over the image's root filesystem in MiB: what the template and each clone may write (default 1024; images with a root filesystem only)")
	build.Flags().IntVar(&req.VCPUs, "vcpus", 0, "vCPUs (default: the daemon's)")
	build.Flags().IntVar(&req.MemoryMiB, "mem", 0, "memory in MiB (default: the daemon's)")
	ls := &cobra.Command{
		Use:     "ls",
		Aliases: []string{"list"},
		Short:   "List templates",
		Args:    args(),
		RunE: func(cmd *cobra.Command, _ []string) error {
			return g.withClient(func(c *api.Client) error {
				ts, err := c.Templates(cmd.Context())
				if err != nil {
					return wrapf(err, "list templates")
				}
				return printTemplates(cmd.OutOrStdout(), g, ts, false)
			})
		},
	}
	cmd.AddCommand(build, ls)
	return cmd
}

func printTemplates(w io.Writer, g *globals, ts []api.Template, single bool) error {
	if g.json() {
		if single {
			return printJSON(w, ts[0])
		}
		return printJSON(w, ts)
	}
	t := newTable(w, "NAME", "VCPUS", "MEMORY", "DISK", "GENERATION", "SHARED", "CREATED", "IMAGE")
	for _, tm := range ts {
		disk := "-"
		if tm.DiskMiB > 0 {
			disk = fmt.Sprintf("%dMiB", tm.DiskMiB)
		}
		t.row(tm.Name, tm.VCPUs, fmt.Sprintf("%dMiB", tm.MemoryMiB), disk, tm.Generation, tm.SharedMemory, age(tm.CreatedAt), templateImage(tm))
	}
	return t.flush()
}

// templateImage is what the IMAGE column says of a template's image: its
// name and what it was built from ("py (debian:bookworm)"), or the source
// alone when it has no name (the default busybox image, a directory).
func templateImage(tm api.Template) string {
	src := tm.ImageSource
	if src == "" {
		src = tm.Image
	}
	if tm.ImageName == "" {
		return src
	}
	if src == "" {
		return tm.ImageName
	}
	return tm.ImageName + " (" + src + ")"
}

func newPoolCommand(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "pool", Short: "Set, list and remove warm pools"}
	var (
		req    api.PoolRequest
		maxAge time.Duration
	)
	set := &cobra.Command{
		Use:               "set NAME --template T [--min N] [--max N] [--max-age D] [--adaptive] [--network none|isolated|egress] [--egress-allow CIDR[:PORT],...]",
		ValidArgsFunction: completeNames(g, poolNames),
		Short:             "Create or change pool NAME; the change persists",
		Args:              args("NAME"),
		RunE: func(cmd *cobra.Command, a []string) error {
			if req.Template == "" {
				return usagef("%s needs --template (see %s --help)", subPath(cmd), cmd.CommandPath())
			}
			if !cmd.Flags().Changed("max") {
				if req.Adaptive {
					return usagef("%s --adaptive needs --max, the most VMs the pool may grow to", subPath(cmd))
				}
				req.Max = max(req.Min, 1)
			}
			req.MaxAge = api.Duration(maxAge)
			return g.withClient(func(c *api.Client) error {
				p, err := c.SetPool(cmd.Context(), a[0], req)
				if err != nil {
					return wrapf(err, "set pool %s", a[0])
				}
				return printPools(cmd.OutOrStdout(), g, []api.Pool{p}, true)
			})
		},
	}
	set.Flags().StringVar(&req.Template, "template", "", "template the pool's VMs are restored from (required)")
	set.Flags().IntVar(&req.Min, "min", 1, "VMs kept ready")
	set.Flags().IntVar(&req.Max, "max", 0, "most VMs kept ready (default: --min)")
	set.Flags().DurationVar(&maxAge, "max-age", 0, "replace ready VMs older than this (0: never)")
	set.Flags().BoolVar(&req.Adaptive, "adaptive", false, "size the pool from its demand between --min and --max (needs --max)")
	set.Flags().StringVar(&req.Network, "network", "", "network policy: none, isolated or egress (default: isolated when the daemon has network.cidr, else none)")
	set.Flags().StringSliceVar(&req.EgressAllow, "egress-allow", nil, "with --network egress, the only destinations allowed: CIDR[:PORT], comma-separated or repeated")
	_ = set.RegisterFlagCompletionFunc("template", func(cmd *cobra.Command, _ []string, s string) ([]string, cobra.ShellCompDirective) {
		return completeNames(g, templateNames)(cmd, nil, s)
	})
	ls := &cobra.Command{
		Use:     "ls",
		Aliases: []string{"list"},
		Short:   "List pools with their depth and counters",
		Args:    args(),
		RunE: func(cmd *cobra.Command, _ []string) error {
			return g.withClient(func(c *api.Client) error {
				ps, err := c.Pools(cmd.Context())
				if err != nil {
					return wrapf(err, "list pools")
				}
				return printPools(cmd.OutOrStdout(), g, ps, false)
			})
		},
	}
	rm := &cobra.Command{
		Use:               "rm NAME",
		ValidArgsFunction: completeNames(g, poolNames),
		Aliases:           []string{"delete"},
		Short:             "Remove pool NAME and destroy its ready VMs (leases stay)",
		Args:              args("NAME"),
		RunE: func(cmd *cobra.Command, a []string) error {
			return g.withClient(func(c *api.Client) error {
				if err := c.DeletePool(cmd.Context(), a[0]); err != nil {
					return wrapf(err, "remove pool %s", a[0])
				}
				return nil
			})
		},
	}
	cmd.AddCommand(set, ls, rm)
	return cmd
}

func printPools(w io.Writer, g *globals, ps []api.Pool, single bool) error {
	if g.json() {
		if single {
			return printJSON(w, ps[0])
		}
		return printJSON(w, ps)
	}
	// LAST-ERROR comes last: it is the one long, free-form column.
	t := newTable(w, "NAME", "TEMPLATE", "NETWORK", "READY", "TARGET", "RESTORING", "LEASED", "MIN", "MAX", "MAX-AGE", "RATE", "TARGET-REASON", "GEN", "ACQUIRED", "HITS", "WAITS", "TIMEOUTS", "EVICTED", "LAST-ERROR")
	for _, p := range ps {
		maxAge := "-"
		if p.MaxAge > 0 {
			maxAge = p.MaxAge.String()
		}
		lastErr := "-"
		if p.LastError != nil {
			lastErr = *p.LastError
		}
		// A fixed pool's target is its min; only an adaptive one has a
		// rate and a reason.
		rate, reason := "-", "-"
		if p.Adaptive {
			rate = fmt.Sprintf("%.2f/s", p.Rate)
			reason = "adaptive"
			if p.TargetReason != nil {
				reason = *p.TargetReason
				if p.TargetChanged != nil {
					reason += " " + age(*p.TargetChanged) + " ago"
				}
			}
		}
		c := p.Counters
		netw := p.Network
		if len(p.EgressAllow) > 0 {
			netw += "(" + strings.Join(p.EgressAllow, ",") + ")"
		}
		t.row(p.Name, p.Template, orDash(&netw), p.Ready, p.Target, p.Restoring, p.Leased, p.Min, p.Max, maxAge, rate, reason, p.Generation,
			c.Acquired, c.Hits, c.Waits, c.Timeouts, c.Evicted, lastErr)
	}
	return t.flush()
}

func newAcquireCommand(g *globals) *cobra.Command {
	var (
		wait   time.Duration
		ttl    time.Duration
		owner  string
		quiet  bool
		labels map[string]string
		env    []string
	)
	cmd := &cobra.Command{
		Use:               "acquire POOL [--wait D] [--ttl D] [--label K=V]... [--env K=V]...",
		ValidArgsFunction: completeNames(g, poolNames),
		Short:             "Take a ready VM from POOL and print its lease",
		Long: `acquire takes a ready VM from POOL, waiting up to --wait for one, and prints
the lease. When none is ready in time it exits with 75 (EX_TEMPFAIL).`,
		Args: args("POOL"),
		RunE: func(cmd *cobra.Command, a []string) error {
			return g.withClient(func(c *api.Client) error {
				stop := newProgress(cmd.ErrOrStderr()).spinWhile("acquiring from " + a[0])
				l, err := c.Acquire(cmd.Context(), a[0], wait, api.AcquireRequest{Owner: owner, TTL: api.Duration(ttl), Labels: labels, Env: env})
				stop()
				if err != nil {
					return wrapf(err, "acquire from pool %s", a[0])
				}
				if quiet {
					_, err := fmt.Fprintln(cmd.OutOrStdout(), l.ID)
					return err
				}
				return printLeases(cmd.OutOrStdout(), g, []api.Lease{l}, true)
			})
		},
	}
	cmd.Flags().DurationVar(&wait, "wait", 0, "how long the daemon waits for a ready VM (default: the daemon's, 10s)")
	cmd.Flags().DurationVar(&ttl, "ttl", 0, "destroy the VM after this long (0: until released)")
	cmd.Flags().StringVar(&owner, "owner", "", "label recorded with the lease")
	cmd.Flags().StringToStringVar(&labels, "label", nil, "KEY=VALUE kept and listed with the lease (repeatable)")
	cmd.Flags().StringArrayVar(&env, "env", nil, "KEY=VALUE in the environment of every exec in the lease (repeatable)")
	cmd.Flags().BoolVarP(&quiet, "quiet", "q", false, "print only the lease ID")
	return cmd
}

func printLeases(w io.Writer, g *globals, ls []api.Lease, single bool) error {
	if g.json() {
		if single {
			return printJSON(w, ls[0])
		}
		return printJSON(w, ls)
	}
	t := newTable(w, "LEASE", "POOL", "VM", "ADDRESS", "OWNER", "CREATED", "EXPIRES", "WAIT", "HANDOFF", "TOTAL")
	for _, l := range ls {
		t.row(l.ID, l.Pool, l.VMID, orDash(l.Address), l.Owner, age(l.CreatedAt), timeOrDash(l.ExpiresAt),
			ms(l.Timings.WaitMS), ms(l.Timings.HandoffMS), ms(l.Timings.TotalMS))
	}
	return t.flush()
}

func ms(v int64) string { return fmt.Sprintf("%dms", v) }

func newLeaseCommand(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "lease", Short: "List leases and change their TTL"}
	cmd.AddCommand(&cobra.Command{
		Use:               "ttl LEASE DURATION",
		ValidArgsFunction: completeNames(g, leaseIDs),
		Short:             "Make LEASE expire DURATION from now (0: never)",
		Args:              args("LEASE", "DURATION"),
		RunE: func(cmd *cobra.Command, a []string) error {
			ttl, err := time.ParseDuration(a[1])
			if err != nil {
				return usagef("invalid DURATION %q: want a duration such as 30m", a[1])
			}
			return g.withClient(func(c *api.Client) error {
				l, err := c.SetLeaseTTL(cmd.Context(), a[0], ttl)
				if err != nil {
					return wrapf(err, "set TTL of lease %s", a[0])
				}
				return printLeases(cmd.OutOrStdout(), g, []api.Lease{l}, true)
			})
		},
	})
	cmd.AddCommand(&cobra.Command{
		Use:     "ls",
		Aliases: []string{"list"},
		Short:   "List live leases",
		Args:    args(),
		RunE: func(cmd *cobra.Command, _ []string) error {
			return g.withClient(func(c *api.Client) error {
				ls, err := c.Leases(cmd.Context())
				if err != nil {
					return wrapf(err, "list leases")
				}
				return printLeases(cmd.OutOrStdout(), g, ls, false)
			})
		},
	})
	return cmd
}

func newReleaseCommand(g *globals) *cobra.Command {
	return &cobra.Command{
		Use: "release LEASE...",
		ValidArgsFunction: func(cmd *cobra.Command, a []string, s string) ([]string, cobra.ShellCompDirective) {
			return completeNames(g, leaseIDs)(cmd, nil, s)
		},
		Short: "Release leases: their VMs are destroyed (releasing twice is fine)",
		Args: func(cmd *cobra.Command, a []string) error {
			if len(a) == 0 {
				return usagef("%s takes at least one LEASE", subPath(cmd))
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, a []string) error {
			return g.withClient(func(c *api.Client) error {
				var errs []error
				for _, id := range a {
					if err := c.Release(cmd.Context(), id); err != nil {
						errs = append(errs, wrapf(err, "release lease %s", id))
					}
				}
				return errors.Join(errs...)
			})
		},
	}
}

func newMachineCommand(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "machine", Short: "Long-lived machines: ensure, list, stop, hold, follow events"}
	var (
		spec                    api.MachineSpec
		idleAfter, suspendAfter time.Duration
	)
	ensure := &cobra.Command{
		Use:               "ensure NAME [--vcpus N] [--mem MIB] [--disk MIB] [--idle-after D] [--suspend-after D] [--network P] [--egress-allow CIDR[:PORT],...]",
		ValidArgsFunction: completeNames(g, machineNames),
		Short:             "Create, start or resume machine NAME and return when its agent answers",
		Long: `Create, start, wake or resume machine NAME and return when its agent answers.

A new machine without flags gets 1 vCPU and 512 MiB. Flags change only the
fields they name; a new vCPU count, memory size, disk size or command line
recreates the machine (its data disk is kept), a new idle policy does not.`,
		Args: args("NAME"),
		RunE: func(cmd *cobra.Command, a []string) error {
			name := a[0]
			return g.withClient(func(c *api.Client) error {
				// Only the flags given go to the daemon, which merges them
				// into the recorded spec: one flag changes one field.
				f := cmd.Flags()
				var req api.MachineEnsureRequest
				if f.Changed("vcpus") {
					req.VCPUs = &spec.VCPUs
				}
				if f.Changed("mem") {
					req.MemoryMiB = &spec.MemoryMiB
				}
				if f.Changed("disk") {
					req.DataDiskMiB = &spec.DataDiskMiB
				}
				if f.Changed("cmdline") {
					req.Cmdline = &spec.Cmdline
				}
				if f.Changed("image") {
					ref, err := imageRef(spec.Image)
					if err != nil {
						return err
					}
					req.Image = &ref
				}
				if f.Changed("idle-after") {
					d := api.Duration(idleAfter)
					req.IdleAfter = &d
				}
				if f.Changed("suspend-after") {
					d := api.Duration(suspendAfter)
					req.SuspendAfter = &d
				}
				if f.Changed("network") {
					req.Network = &spec.Network
				}
				if f.Changed("egress-allow") {
					req.EgressAllow = &spec.EgressAllow
				}
				stop := newProgress(cmd.ErrOrStderr()).spinWhile("ensuring machine " + name)
				m, err := c.EnsureMachine(cmd.Context(), name, req)
				stop()
				if err != nil {
					return wrapf(err, "ensure machine %s", name)
				}
				return printMachines(cmd.OutOrStdout(), g, []api.Machine{m}, true)
			})
		},
	}
	ef := ensure.Flags()
	ef.IntVar(&spec.VCPUs, "vcpus", api.DefaultMachineVCPUs, "vCPUs (recreates the machine when changed)")
	ef.IntVar(&spec.MemoryMiB, "mem", api.DefaultMachineMemoryMiB, "memory in MiB (recreates the machine when changed)")
	ef.IntVar(&spec.DataDiskMiB, "disk", 0, "persistent data disk in MiB (0: none; it can grow, never shrink)")
	ef.StringVar(&spec.Cmdline, "cmdline", "", "extra guest kernel command line")
	ef.StringVar(&spec.Image, "image", "", "image name or guest image directory to boot (recreates the machine when changed; its root filesystem is read-only, writes stay in memory, the data disk lasts)")
	ef.DurationVar(&idleAfter, "idle-after", 0, "shrink the balloon after this long without activity or holds (0s: off; unset: the daemon's default)")
	ef.DurationVar(&suspendAfter, "suspend-after", 0, "suspend to a snapshot after this long without activity or holds (0s: off; unset: the daemon's default)")
	ef.StringVar(&spec.Network, "network", "", "network policy: none, isolated or egress (default: isolated when the daemon has network.cidr, else none); the machine keeps its address")
	ef.StringSliceVar(&spec.EgressAllow, "egress-allow", nil, "with --network egress, the only destinations allowed: CIDR[:PORT], comma-separated or repeated")

	ls := &cobra.Command{
		Use:     "ls",
		Aliases: []string{"list"},
		Short:   "List machines",
		Args:    args(),
		RunE: func(cmd *cobra.Command, _ []string) error {
			return g.withClient(func(c *api.Client) error {
				ms, err := c.Machines(cmd.Context())
				if err != nil {
					return wrapf(err, "list machines")
				}
				return printMachines(cmd.OutOrStdout(), g, ms, false)
			})
		},
	}

	var force bool
	stop := &cobra.Command{
		Use:               "stop NAME [--force]",
		ValidArgsFunction: completeNames(g, machineNames),
		Short:             "Stop machine NAME, gracefully unless --force",
		Args:              args("NAME"),
		RunE: func(cmd *cobra.Command, a []string) error {
			return g.withClient(func(c *api.Client) error {
				done := newProgress(cmd.ErrOrStderr()).spinWhile("stopping machine " + a[0])
				err := c.StopMachine(cmd.Context(), a[0], force)
				done()
				if err != nil {
					return wrapf(err, "stop machine %s", a[0])
				}
				return nil
			})
		},
	}
	stop.Flags().BoolVar(&force, "force", false, "kill the VM without waiting for a graceful power-off")

	var hreq api.HoldRequest
	var ttl time.Duration
	hold := &cobra.Command{
		Use:               "hold NAME [--ttl D]",
		ValidArgsFunction: completeNames(g, machineNames),
		Short:             "Keep machine NAME from idling or suspending; prints the hold",
		Args:              args("NAME"),
		RunE: func(cmd *cobra.Command, a []string) error {
			hreq.TTL = api.Duration(ttl)
			return g.withClient(func(c *api.Client) error {
				h, err := c.HoldMachine(cmd.Context(), a[0], hreq)
				if err != nil {
					return wrapf(err, "hold machine %s", a[0])
				}
				if g.json() {
					return printJSON(cmd.OutOrStdout(), h)
				}
				t := newTable(cmd.OutOrStdout(), "HOLD", "MACHINE", "OWNER", "EXPIRES")
				t.row(h.ID, h.Machine, h.Owner, timeOrDash(h.ExpiresAt))
				return t.flush()
			})
		},
	}
	hold.Flags().DurationVar(&ttl, "ttl", 0, "end the hold after this long (0: until released)")
	hold.Flags().StringVar(&hreq.Owner, "owner", "", "label recorded with the hold")

	unhold := &cobra.Command{
		Use:               "unhold NAME HOLD",
		ValidArgsFunction: completeNames(g, machineNames),
		Short:             "Release a hold on machine NAME",
		Args:              args("NAME", "HOLD"),
		RunE: func(cmd *cobra.Command, a []string) error {
			return g.withClient(func(c *api.Client) error {
				if err := c.ReleaseHold(cmd.Context(), a[0], a[1]); err != nil {
					return wrapf(err, "release hold %s on machine %s", a[1], a[0])
				}
				return nil
			})
		},
	}

	evs := &cobra.Command{
		Use:               "events [NAME]",
		ValidArgsFunction: completeNames(g, machineNames),
		Short:             "Follow machine events (of NAME only, when given) until interrupted",
		Args:              optionalArg("NAME"),
		RunE: func(cmd *cobra.Command, a []string) error {
			filter := api.EventFilter{KindPrefix: "machine."}
			if len(a) == 1 {
				filter.Subject = a[0]
			}
			return followEvents(cmd, g, filter)
		},
	}
	cmd.AddCommand(ensure, ls, stop, hold, unhold, evs,
		newShellCommand(g, "shell NAME", func(s string) string { return "machine:" + s }))
	return cmd
}

func printMachines(w io.Writer, g *globals, ms []api.Machine, single bool) error {
	if g.json() {
		if single {
			return printJSON(w, ms[0])
		}
		return printJSON(w, ms)
	}
	t := newTable(w, "NAME", "STATE", "SINCE", "VCPUS", "MEMORY", "BALLOON", "DISK", "HOLDS", "ADDRESS", "LAST-ERROR")
	for _, m := range ms {
		balloon := "-"
		if m.BalloonMiB != nil {
			balloon = fmt.Sprintf("%dMiB", *m.BalloonMiB)
		}
		disk := "-"
		if m.Spec.DataDiskMiB > 0 {
			disk = fmt.Sprintf("%dMiB", m.Spec.DataDiskMiB)
		}
		t.row(m.Name, m.State, age(m.Since), m.Spec.VCPUs, fmt.Sprintf("%dMiB", m.Spec.MemoryMiB), balloon, disk, m.Holds, orDash(m.Address), orDash(m.LastError))
	}
	return t.flush()
}

func newEventsCommand(g *globals) *cobra.Command {
	var filter api.EventFilter
	cmd := &cobra.Command{
		Use:   "events [--subject NAME] [--kind PREFIX]",
		Short: "Follow every event (pools, leases, machines) until interrupted",
		Args:  args(),
		RunE: func(cmd *cobra.Command, _ []string) error {
			return followEvents(cmd, g, filter)
		},
	}
	cmd.Flags().StringVar(&filter.Subject, "subject", "", "only events about this pool, lease or machine")
	cmd.Flags().StringVar(&filter.KindPrefix, "kind", "", "only events whose kind starts with this (e.g. pool.)")
	return cmd
}

// followEvents prints events as they come: one JSON object per line with
// -o json, else one aligned-enough line each (a table cannot be aligned
// before its rows are known, and events never end).
func followEvents(cmd *cobra.Command, g *globals, filter api.EventFilter) error {
	return g.withClient(func(c *api.Client) error {
		w := cmd.OutOrStdout()
		err := c.Events(cmd.Context(), filter, nil, func(e events.Event) error {
			if g.json() {
				return printCompactJSON(w, e)
			}
			_, err := fmt.Fprintf(w, "%s  %-20s %-20s %s\n", e.Time.Local().Format("15:04:05.000"), e.Kind, e.Subject, formatDetail(e.Detail))
			return err
		})
		if err != nil {
			return wrapf(err, "follow events")
		}
		return nil
	})
}

func formatDetail(d map[string]any) string {
	if len(d) == 0 {
		return ""
	}
	keys := make([]string, 0, len(d))
	for k := range d {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	parts := make([]string, 0, len(keys))
	for _, k := range keys {
		parts = append(parts, fmt.Sprintf("%s=%v", k, d[k]))
	}
	return strings.Join(parts, " ")
}

func newStatusCommand(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "status",
		Short: "Show the daemon's provider, state directory and counts",
		Args:  args(),
		RunE: func(cmd *cobra.Command, _ []string) error {
			return g.withClient(func(c *api.Client) error {
				st, err := c.Status(cmd.Context())
				if err != nil {
					return wrapf(err, "status")
				}
				if g.json() {
					return printJSON(cmd.OutOrStdout(), st)
				}
				return keyValues(cmd.OutOrStdout(),
					"version", st.Version,
					"provider", st.Provider,
					"accel", st.Accel,
					"capabilities", strings.Join(st.Capabilities, ", "),
					"state dir", st.StateDir,
					"up since", fmt.Sprintf("%s (%s)", st.StartedAt.Local().Format(time.RFC3339), age(st.StartedAt)),
					"templates", st.Templates,
					"pools", st.Pools,
					"leases", st.Leases,
					"machines", st.Machines,
					"vms", st.VMs,
					"network", st.Network,
				)
			})
		},
	}
}

// imageRef passes an image name through and makes a directory path
// (anything with a '/') absolute, as the daemon wants it.
func imageRef(ref string) (string, error) {
	if ref == "" || !strings.ContainsRune(ref, '/') {
		return ref, nil
	}
	abs, err := filepath.Abs(ref)
	if err != nil {
		return "", fmt.Errorf("image %s: %w", ref, err)
	}
	return abs, nil
}
