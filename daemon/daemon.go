// Package daemon is warmpool's long-running process: it reads the
// configuration, opens the durable state, picks a provider, reconciles the
// VMs an earlier run left with what the state says, runs the pools and the
// machine manager, and serves the HTTP API until its context ends.
package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/warmpool/warmpool/agent"
	"github.com/warmpool/warmpool/api"
	"github.com/warmpool/warmpool/events"
	"github.com/warmpool/warmpool/guest"
	"github.com/warmpool/warmpool/internal/paths"
	"github.com/warmpool/warmpool/lease"
	"github.com/warmpool/warmpool/lifecycle"
	"github.com/warmpool/warmpool/network"
	"github.com/warmpool/warmpool/pool"
	"github.com/warmpool/warmpool/store"
	"github.com/warmpool/warmpool/vm"
)

// Options are the flags of `warmpool serve`. Set flags override the
// configuration file.
type Options struct {
	ConfigFile string
	StateDir   string
	Listen     string
	Provider   string
	Accel      string
	TokenFile  string
	// E2BListen and E2BKeyFile override e2b.listen and e2b.key_file.
	E2BListen  string
	E2BKeyFile string
	// StopAll makes shutdown destroy leased VMs and stop machines too;
	// without it they keep running for the next start to adopt.
	StopAll        bool
	FirecrackerBin string
	JailerBin      string
	Logger         *slog.Logger
	// Alongside runs next to the daemon while it serves (the Kubernetes
	// node agent of `serve --kubernetes`), driving it through its
	// api.Backend. It must return when ctx ends; an error it returns
	// before that shuts the daemon down as SIGTERM would.
	Alongside func(ctx context.Context, b api.Backend) error
	// GuestAgent is the prebuilt static guest agent that templates built on
	// first use put in the default image (the one the warmpool binary
	// embeds); nil compiles it from this module's source.
	GuestAgent []byte

	// The fields below are for programs that run the daemon in-process
	// (Open): `warmpool bench` measures through them what `warmpool serve`
	// does.

	// Image is the guest image directory (the configuration's image).
	Image string
	// ImageCacheDir is where the image built on first use is cached;
	// empty means the user's guest image cache.
	ImageCacheDir string
	// FakeLatency delays operations of the fake provider by name
	// ("create", "restore", "resume", ...). Provider "fake" only.
	FakeLatency map[string]time.Duration
	// NetworkCIDR, when set, overrides network.cidr.
	NetworkCIDR string
	// WarmExec, when set, overrides warm_exec.
	WarmExec []string
	// Adaptive replaces the configuration's adaptive section (bench runs a
	// trace on a compressed clock).
	Adaptive *pool.AdaptiveConfig
	// Parallelism replaces limits.parallelism when set.
	Parallelism int
	// MemoryMiB replaces limits.memory_mib when set (bench's density row
	// keeps more warm VMs than the host could lease).
	MemoryMiB int
	// TBSizeMiB bounds QEMU's TCG translation cache per VM (the QEMU
	// provider's default when 0, QEMU's own when negative).
	TBSizeMiB int

	// noListen leaves the API unserved (Open).
	noListen bool
	// provider replaces the one named by Provider (tests share one fake
	// provider across daemon restarts this way).
	provider vm.Provider
	// notRoot has a daemon run by root behave as one that is not, where
	// privileges matter (networking).
	notRoot bool
	// ready, when set, receives the daemon once it serves.
	ready func(*Daemon)
	// machineClock replaces the wall clock of the machines' idle, hold
	// and health timers (tests step through them with a manual clock).
	machineClock lifecycle.Clock
}

// Daemon is one running warmpool daemon. It implements api.Backend.
type Daemon struct {
	cfg      Config
	stateDir string
	log      *slog.Logger
	st       *store.Store
	prov     *ownedProvider
	// provCloser lets go of the provider's connections to its VMs at
	// shutdown (QEMU serves one QMP client at a time, so the next daemon
	// could not reach them otherwise). Nil when the provider was passed in.
	provCloser io.Closer
	bus        *events.Bus
	reg        *prometheus.Registry
	pools      *pool.Pool
	mach       *machines
	started    time.Time
	stopAll    bool
	closing    atomic.Bool

	// vms writes every VM record; leases every lease record.
	vms    *vmRecords
	leases *lease.Registry
	// net binds network slots to VMs.
	net *netSlots

	// stopPoolExits ends the pools' subscription to the provider's exits.
	stopPoolExits func()

	// buildMu lets one template build run at a time.
	buildMu sync.Mutex

	imageMu sync.Mutex
	image   *guest.Image
	// agent is Options.GuestAgent.
	agent []byte

	// handoffer warms restored VMs before they enter a pool and hands them
	// to tenants over the connection it kept.
	handoffer *agent.Handoffer
	// guests are the agent sessions of the VMs tenants work in.
	guests *guestSessions
	// entropy counts what guests report doing with their hand-off's entropy.
	entropy *handoffEntropy

	// repair rebuilds templates the provider can no longer restore.
	repair *templateRepair

	bg sync.WaitGroup
	// srv is the API server serve runs (tests make it fail).
	srv *server
}

// Run starts the daemon described by opts and serves until ctx ends, then
// shuts down gracefully. It returns an error when the daemon could not
// start or could not serve.
func Run(ctx context.Context, opts Options) error {
	// The background work started with ctx (lease expiry, template builds
	// from the config, repairs) must also end when the API server fails.
	ctx, stop := context.WithCancel(ctx)
	defer stop()
	d, srv, err := start(ctx, opts)
	if err != nil {
		return err
	}
	return d.serve(ctx, stop, srv, opts)
}

// resolveConfig merges the config file and the flags.
func resolveConfig(opts Options) (Config, string, error) {
	var cfg Config
	if opts.ConfigFile != "" {
		var err error
		if cfg, err = LoadConfig(opts.ConfigFile); err != nil {
			return Config{}, "", err
		}
	}
	set := func(dst *string, flag string) {
		if flag != "" {
			*dst = flag
		}
	}
	set(&cfg.Listen, opts.Listen)
	set(&cfg.Provider, opts.Provider)
	set(&cfg.Accel, opts.Accel)
	set(&cfg.TokenFile, opts.TokenFile)
	set(&cfg.E2B.Listen, opts.E2BListen)
	set(&cfg.E2B.KeyFile, opts.E2BKeyFile)
	set(&cfg.Firecracker.Binary, opts.FirecrackerBin)
	set(&cfg.Firecracker.Jailer, opts.JailerBin)
	set(&cfg.Image, opts.Image)
	set(&cfg.Network.CIDR, opts.NetworkCIDR)
	if len(opts.WarmExec) > 0 {
		cfg.WarmExec = opts.WarmExec
	}
	cfg.local = localConfig{imageCacheDir: opts.ImageCacheDir, fakeLatency: opts.FakeLatency, tbSizeMiB: opts.TBSizeMiB}
	if opts.MemoryMiB > 0 {
		cfg.Limits.MemoryMiB = opts.MemoryMiB
	}
	if opts.Parallelism > 0 {
		cfg.Limits.Parallelism = opts.Parallelism
	}
	cfg.Provider = or(cfg.Provider, defaultProvider)
	cfg.Accel = or(cfg.Accel, "auto")
	cfg.Intervals.Sweep = or(cfg.Intervals.Sweep, Duration(time.Second))
	cfg.Intervals.Health = or(cfg.Intervals.Health, Duration(30*time.Second))
	cfg.Intervals.LeaseCheck = or(cfg.Intervals.LeaseCheck, Duration(time.Second))
	cfg.Limits.Parallelism = or(cfg.Limits.Parallelism, 2)
	if cfg.Limits.MemoryMiB == 0 {
		cfg.Limits.MemoryMiB = hostMemoryMiB()
	}
	cfg.Limits.ExecTimeout = or(cfg.Limits.ExecTimeout, Duration(10*time.Minute))
	cfg.Limits.ShutdownWait = or(cfg.Limits.ShutdownWait, Duration(30*time.Second))
	if cfg.Network.CIDR != "" && cfg.Network.Warm == 0 {
		cfg.Network.Warm = defaultWarmSlots
		if c, err := network.Capacity(cfg.Network.CIDR, cfg.Network.Slots); err == nil {
			cfg.Network.Warm = min(defaultWarmSlots, c)
		}
	}
	if err := cfg.Validate(); err != nil {
		return Config{}, "", err
	}
	stateDir := opts.StateDir
	if stateDir == "" {
		stateDir = paths.DefaultStateDir()
	}
	abs, err := filepath.Abs(stateDir)
	if err != nil {
		return Config{}, "", fmt.Errorf("state directory %s: %w", stateDir, err)
	}
	cfg.Listen = or(cfg.Listen, "unix:"+paths.Socket(abs))
	if strings.HasPrefix(cfg.Listen, "tcp:") && cfg.TokenFile == "" {
		return Config{}, "", &vm.FieldError{Field: "listen", Value: cfg.Listen, Reason: "a TCP listener requires --token-file"}
	}
	return cfg, abs, nil
}

func start(ctx context.Context, opts Options) (d *Daemon, srv *server, err error) {
	cfg, stateDir, err := resolveConfig(opts)
	if err != nil {
		return nil, nil, err
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		return nil, nil, fmt.Errorf("create state directory %s: %w", stateDir, err)
	}
	st, err := store.Open(stateDir)
	if err != nil {
		return nil, nil, err
	}
	d = &Daemon{
		cfg:      cfg,
		stateDir: stateDir,
		log:      log,
		st:       st,
		bus:      events.NewBus(),
		reg:      prometheus.NewRegistry(),
		started:  time.Now(),
		stopAll:  opts.StopAll,
		agent:    opts.GuestAgent,
	}
	// The error returns set d to nil: abort the one made here.
	made := d
	defer func() {
		if err != nil {
			made.abort()
		}
	}()
	inner := opts.provider
	if inner == nil {
		if inner, err = newProvider(cfg, stateDir, log); err != nil {
			return nil, nil, err
		}
		d.provCloser, _ = inner.(io.Closer)
	}
	d.repair = newTemplateRepair(ctx)
	d.vms = &vmRecords{st: st, provider: inner.Name(), snapshotOwner: d.snapshotOwner}
	root := os.Geteuid() == 0 && !opts.notRoot
	if d.net, err = newNetSlots(cfg, stateDir, inner, st, log, root); err != nil {
		return nil, nil, err
	}
	d.prov = &ownedProvider{inner: inner, recs: d.vms, log: log, onIncompatible: d.restoreIncompatible,
		net: d.net, machineNetwork: d.machineNetwork}
	if d.leases, err = d.newLeases(); err != nil {
		return nil, nil, err
	}
	d.registerMetrics()
	d.entropy = newHandoffEntropy(d.reg)
	d.handoffer = agent.NewHandoffer(d.prov, d.prov)
	d.guests = newGuestSessions(d)
	// A tenant's first exec otherwise pays for translating process creation
	// under TCG (~190 ms against ~25 ms).
	d.handoffer.WarmExec = []string{"true"}
	if len(cfg.WarmExec) > 0 {
		d.handoffer.WarmExec = cfg.WarmExec
	}
	adaptive := cfg.Adaptive.pool()
	if opts.Adaptive != nil {
		adaptive = *opts.Adaptive
	}
	d.pools, err = pool.New(pool.Config{
		Provider:       d.prov,
		Parallelism:    cfg.Limits.Parallelism,
		SweepInterval:  cfg.Intervals.Sweep.Std(),
		HealthInterval: cfg.Intervals.Health.Std(),
		Validate:       d.handoffer.Validate(d.validateWarm),
		Handoff:        d.handoff,
		Registry:       d.reg,
		Logger:         log.With("component", "pool"),
		Events:         d.bus,
		OnVMCreated:    d.onVMCreated,
		OnVMDestroyed:  d.onVMDestroyed,
		Adaptive:       adaptive,
		// The same limit admits pools (checkPoolMemory) and shares what
		// adaptive pools hold beyond their min.
		MemoryBudgetMiB: cfg.Limits.MemoryMiB,
	})
	if err != nil {
		return nil, nil, fmt.Errorf("start pools: %w", err)
	}
	d.stopPoolExits = d.watchPoolExits()
	if d.mach, err = d.newMachines(opts.machineClock); err != nil {
		return nil, nil, err
	}
	reconcileStart := time.Now()
	if err := d.net.reconcile(ctx); err != nil {
		return nil, nil, fmt.Errorf("reconcile network slots: %w", err)
	}
	warm, err := d.reconcile(ctx)
	if err != nil {
		return nil, nil, fmt.Errorf("reconcile state with provider %s: %w", inner.Name(), err)
	}
	if err := d.mach.restore(ctx); err != nil {
		return nil, nil, fmt.Errorf("restore machines: %w", err)
	}
	if err := d.net.sweep(ctx, d.mach.knows); err != nil {
		return nil, nil, fmt.Errorf("reconcile network slots: %w", err)
	}
	d.removeUnusedTemplateDirs()
	// Warm VMs go back into their pools before the pools learn their
	// minimum: the other way round, each pool would start restoring up to
	// min at once and hold min plus the adopted VMs.
	d.adoptWarm(ctx, warm)
	if err := d.applyConfig(ctx); err != nil {
		return nil, nil, err
	}
	if err := d.checkAccounted(ctx); err != nil {
		return nil, nil, err
	}
	if !opts.noListen {
		if srv, err = d.listen(cfg); err != nil {
			return nil, nil, err
		}
	}
	d.checkTemplates()
	d.bg.Go(func() { d.leases.Run(ctx) })
	log.Info("daemon started", "state", stateDir, "provider", inner.Name(), "listen", cfg.Listen,
		"pools", len(d.pools.Pools()), "leases", d.leaseCount(),
		"reconcile_ms", time.Since(reconcileStart).Milliseconds())
	return d, srv, nil
}

// abort releases what a failed start acquired, leaving every VM running for
// the next attempt to reconcile.
func (d *Daemon) abort() {
	if d.repair != nil {
		d.repair.close()
	}
	if d.stopPoolExits != nil {
		d.stopPoolExits()
	}
	if d.pools != nil {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		_ = d.pools.Shutdown(ctx)
		cancel()
	}
	if d.mach != nil {
		d.mach.close()
	}
	if d.net != nil {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		if err := d.net.close(ctx, false); err != nil {
			d.log.Warn("network slots at abort", "err", err)
		}
		cancel()
	}
	d.closeProvider()
	d.bus.Close()
	d.st.Close()
}

// closeProvider drops the provider's connections to its VMs; the VMs keep
// running for the next start.
func (d *Daemon) closeProvider() {
	if d.provCloser == nil {
		return
	}
	if err := d.provCloser.Close(); err != nil {
		d.log.Warn("close provider", "err", err)
	}
}

// serve runs the API until ctx ends, then shuts down: stop accepting, let
// in-flight requests finish for limits.shutdown_wait and cancel the rest,
// destroy the warm VMs, keep leased VMs and machines (or stop them too with
// StopAll).
func (d *Daemon) serve(ctx context.Context, stop context.CancelFunc, srv *server, opts Options) error {
	errc := make(chan error, 1)
	d.srv = srv
	go func() { errc <- srv.serve() }()
	alongside := make(chan error, 1)
	if opts.Alongside != nil {
		go func() { alongside <- opts.Alongside(ctx, d) }()
	}
	if opts.ready != nil {
		opts.ready(d)
	}
	var serveErr error
	select {
	case <-ctx.Done():
	case serveErr = <-errc:
		d.log.Error("API server failed", "err", serveErr)
	case serveErr = <-alongside:
		if serveErr == nil {
			serveErr = errors.New("stopped before the daemon did")
		}
		serveErr = fmt.Errorf("alongside the daemon: %w", serveErr)
		d.log.Error("stopping the daemon", "err", serveErr)
		alongside <- nil
	}
	stop()
	if opts.Alongside != nil {
		// It still drives the daemon until it returns.
		<-alongside
	}
	d.log.Info("shutting down")
	d.closing.Store(true)
	if err := srv.shutdown(d.cfg.Limits.ShutdownWait.Std(), requestCancelWait); err != nil {
		d.log.Warn("in-flight requests cut short", "err", err)
	}
	d.bg.Wait()
	d.repair.close()
	d.shutdown(context.WithoutCancel(ctx))
	return serveErr
}

// Each shutdown step after the wait for requests gets its own time, so that
// a request that used up limits.shutdown_wait cannot leave warm VMs running.
const (
	// requestCancelWait bounds how long cancelled requests take to return
	// (an exec asks the agent to kill its process, with its own 1s limit).
	requestCancelWait = 10 * time.Second
	// shutdownStepWait bounds each of: the pools' shutdown (restores in
	// flight end, warm VMs are destroyed), and with StopAll each lease's
	// release and the machines' stop. Generous for TCG on a loaded host.
	shutdownStepWait = 2 * time.Minute
)

// shutdown stops the pools (destroying warm VMs) and, with StopAll, leased
// VMs and machines, each step within shutdownStepWait of its own, then
// closes the provider, the event bus and the state.
func (d *Daemon) shutdown(ctx context.Context) {
	step := func(what string, f func(context.Context) error, args ...any) {
		sctx, cancel := context.WithTimeout(ctx, shutdownStepWait)
		defer cancel()
		if err := f(sctx); err != nil {
			d.log.Warn(what, append(args, "err", err)...)
		}
	}
	d.stopPoolExits()
	step("pool shutdown", d.pools.Shutdown)
	d.handoffer.Close()
	if d.stopAll {
		leases, err := d.leases.List()
		if err != nil {
			d.log.Warn("list leases to release at shutdown", "err", err)
		}
		for _, l := range leases {
			step("release lease at shutdown", func(ctx context.Context) error { return d.Release(ctx, l.ID) }, "lease", l.ID)
		}
		step("stop machines at shutdown", func(ctx context.Context) error { d.mach.stopAll(ctx); return nil })
		step("destroy the VMs left at shutdown", d.destroyLeftovers)
	}
	d.guests.closeAll()
	d.mach.close()
	step("network slots at shutdown", func(ctx context.Context) error { return d.net.close(ctx, d.stopAll) })
	d.closeProvider()
	d.bus.Close()
	if err := d.st.Close(); err != nil {
		d.log.Warn("close state", "err", err)
	}
	d.log.Info("daemon stopped")
}

// applyConfig records the configuration file's templates, pools and
// machines that the state does not have yet, and registers every pool.
func (d *Daemon) applyConfig(ctx context.Context) error {
	// Every new machine's image first: a bad one anywhere records none.
	for _, name := range sortedKeys(d.cfg.Machines) {
		if _, recorded, err := d.mach.get(name); err != nil || recorded {
			continue
		}
		if err := d.checkMachineImage(ctx, name, d.cfg.Machines[name].Image); err != nil {
			return fmt.Errorf("config: %w", err)
		}
	}
	for _, name := range sortedKeys(d.cfg.Machines) {
		_, recorded, err := d.mach.get(name)
		if err != nil {
			return fmt.Errorf("config machine %s: %w", name, err)
		}
		if recorded {
			continue
		}
		if _, err := d.PutMachine(ctx, name, d.cfg.Machines[name].spec()); err != nil {
			return fmt.Errorf("config machine %s: %w", name, err)
		}
	}
	recorded, err := store.List(d.st, store.Pools)
	if err != nil {
		return err
	}
	have := map[string]bool{}
	for _, p := range recorded {
		have[p.Name] = true
	}
	for _, name := range sortedKeys(d.cfg.Pools) {
		if have[name] {
			continue
		}
		pc := d.cfg.Pools[name]
		rec := store.Pool{Name: name, Template: pc.Template, Min: pc.Min, Max: pc.Max, MaxAge: pc.MaxAge.Std(), Adaptive: pc.Adaptive, UpdatedAt: time.Now()}
		if err := store.Put(d.st, store.Pools, rec); err != nil {
			return err
		}
	}
	if err := d.registerPools(); err != nil {
		return err
	}
	var missing []string
	for _, name := range sortedKeys(d.cfg.Templates) {
		if _, ok := d.template(name); !ok {
			missing = append(missing, name)
		}
	}
	if len(missing) > 0 {
		// Template builds take seconds to minutes; the API is up meanwhile
		// and pools of these templates start filling when they are built.
		d.bg.Add(1)
		go func() {
			defer d.bg.Done()
			for _, name := range missing {
				tc := d.cfg.Templates[name]
				req := templateRequest(name, tc)
				if _, err := d.BuildTemplate(ctx, req, func(step string) {
					d.log.Info("building template", "template", name, "step", step)
				}); err != nil {
					if ctx.Err() != nil {
						return
					}
					d.log.Error("build template from config", "template", name, "err", err)
				}
			}
		}()
	}
	return nil
}

// checkOpen refuses new work once shutdown has begun.
func (d *Daemon) checkOpen() error {
	if d.closing.Load() {
		return api.ErrShuttingDown
	}
	return nil
}
