package daemon

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/warmpool/warmpool/api"
	"github.com/warmpool/warmpool/internal/paths"
	"github.com/warmpool/warmpool/lifecycle"
	"github.com/warmpool/warmpool/provider/fake"
	"github.com/warmpool/warmpool/store"
	"github.com/warmpool/warmpool/vm"
)

// running is a daemon started in-process on the fake provider.
type running struct {
	d    *Daemon
	dir  string
	prov *fake.Provider
	// clock drives the machines' idle, hold and health timers when the
	// test started the daemon on a manual clock; nil otherwise.
	clock  *lifecycle.ManualClock
	client *api.Client
	cancel context.CancelFunc
	done   chan error
}

func testLogger(t testing.TB) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

// startFake runs a daemon on dir with prov until the test ends (or stop).
func startFake(t testing.TB, dir string, prov *fake.Provider, cfg string) *running {
	t.Helper()
	return startWrapped(t, dir, prov, prov, cfg)
}

// startWrapped is startFake with the daemon using served, a provider built
// around prov (for example one that advertises more capabilities).
func startWrapped(t testing.TB, dir string, prov *fake.Provider, served vm.Provider, cfg string) *running {
	t.Helper()
	return startWrappedOn(t, dir, prov, served, cfg, nil)
}

// startWrappedOn is startWrapped with the machines' timers on clock (nil:
// the wall clock).
func startWrappedOn(t testing.TB, dir string, prov *fake.Provider, served vm.Provider, cfg string, clock *lifecycle.ManualClock) *running {
	t.Helper()
	return startWrappedWith(t, dir, prov, served, cfg, func(o *Options) {
		if clock != nil {
			o.machineClock = clock
		}
	})
}

// startWrappedWith is startWrapped with options mod changes.
func startWrappedWith(t testing.TB, dir string, prov *fake.Provider, served vm.Provider, cfg string, mod func(*Options)) *running {
	t.Helper()
	opts := Options{StateDir: dir, Provider: "fake", Logger: testLogger(t), provider: served}
	mod(&opts)
	clock, _ := opts.machineClock.(*lifecycle.ManualClock)
	if cfg != "" {
		opts.ConfigFile = filepath.Join(dir, "config.yaml")
		if err := os.WriteFile(opts.ConfigFile, []byte(cfg), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &running{dir: dir, prov: prov, clock: clock, cancel: cancel, done: make(chan error, 1)}
	ready := make(chan struct{})
	opts.ready = func(d *Daemon) { r.d = d; close(ready) }
	go func() { r.done <- Run(ctx, opts) }()
	select {
	case <-ready:
	case err := <-r.done:
		cancel()
		t.Fatalf("daemon did not start: %v", err)
	case <-time.After(30 * time.Second):
		cancel()
		t.Fatal("daemon did not start within 30s")
	}
	r.client = api.NewClient(paths.Socket(dir), "")
	t.Cleanup(func() { r.stop(t) })
	return r
}

func (r *running) stop(t testing.TB) {
	t.Helper()
	if r.cancel == nil {
		return
	}
	r.cancel()
	r.cancel = nil
	r.client.Close()
	select {
	case err := <-r.done:
		if err != nil {
			t.Errorf("daemon stopped with error: %v", err)
		}
	case <-time.After(time.Minute):
		t.Error("daemon did not stop within a minute")
	}
}

func ctxT(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// waitReady waits until pool has want ready VMs.
func waitReady(t testing.TB, c *api.Client, pool string, want int) api.Pool {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	var last api.Pool
	for time.Now().Before(deadline) {
		p, err := c.Pool(ctxT(t), pool)
		if err == nil && p.Ready >= want {
			return p
		}
		last = p
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("pool %s never had %d ready VMs; last %+v", pool, want, last)
	return last
}

// assertAccounted checks that the provider runs exactly the VMs the store
// lists. The daemon must be stopped (the store is locked while it runs).
func assertAccounted(t *testing.T, dir string, prov vm.Provider) {
	t.Helper()
	st, err := store.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	recs, err := store.List(st, store.VMs)
	if err != nil {
		t.Fatal(err)
	}
	live, err := prov.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var a, b []string
	for _, r := range recs {
		a = append(a, r.ID)
	}
	for _, v := range live {
		b = append(b, v.ID)
	}
	slices.Sort(a)
	slices.Sort(b)
	if !slices.Equal(a, b) {
		t.Errorf("store lists VMs %v, provider runs %v", a, b)
	}
}

func setupPool(t testing.TB, c *api.Client, min, max int) {
	t.Helper()
	if _, err := c.BuildTemplate(ctxT(t), api.TemplateRequest{Name: "base"}, nil); err != nil {
		t.Fatalf("build template: %v", err)
	}
	if _, err := c.SetPool(ctxT(t), "py", api.PoolRequest{Template: "base", Min: min, Max: max}); err != nil {
		t.Fatalf("set pool: %v", err)
	}
	waitReady(t, c, "py", min)
}

func TestAcquireExecRelease(t *testing.T) {
	r := startFake(t, t.TempDir(), newFakeProvider(), "")
	c := r.client
	setupPool(t, c, 2, 3)

	lease, err := c.Acquire(ctxT(t), "py", 5*time.Second, api.AcquireRequest{Owner: "ci"})
	if err != nil {
		t.Fatalf("acquire: %v", err)
	}
	if lease.Pool != "py" || lease.VMID == "" || lease.ExpiresAt != nil {
		t.Errorf("lease = %+v", lease)
	}
	var stdout, stderr bytes.Buffer
	code, err := c.Exec(ctxT(t), lease.ID, api.ExecRequest{Argv: []string{"sh", "-c", "echo out; echo err >&2; exit 3"}}, &stdout, &stderr)
	if err != nil || code != 3 || stdout.String() != "out\n" || stderr.String() != "err\n" {
		t.Errorf("exec = %d, %v, stdout %q, stderr %q; want 3, out, err", code, err, stdout.String(), stderr.String())
	}
	stderr.Reset()
	code, err = c.Exec(ctxT(t), lease.ID, api.ExecRequest{Argv: []string{"/no/such/command"}}, nil, &stderr)
	if err != nil || code != 127 {
		t.Errorf("exec of a missing command = %d, %v (stderr %q), want 127", code, err, stderr.String())
	}

	leases, _ := c.Leases(ctxT(t))
	if len(leases) != 1 || leases[0].ID != lease.ID || leases[0].Owner != "ci" {
		t.Errorf("leases = %+v", leases)
	}
	if err := c.Release(ctxT(t), lease.ID); err != nil {
		t.Fatalf("release: %v", err)
	}
	if err := c.Release(ctxT(t), lease.ID); err != nil {
		t.Errorf("second release: %v, want nil (idempotent)", err)
	}
	if _, err := r.prov.Inspect(ctxT(t), lease.VMID); !errors.Is(err, vm.ErrNotFound) {
		t.Errorf("released VM still exists: %v", err)
	}
	if _, err := c.Exec(ctxT(t), lease.ID, api.ExecRequest{Argv: []string{"true"}}, nil, nil); !errors.Is(err, vm.ErrNotFound) {
		t.Errorf("exec after release = %v, want not found", err)
	}
	waitReady(t, c, "py", 2)

	metrics, err := c.Metrics(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	// The one acquire's hand-off gave its guest 32 bytes of entropy, and
	// the guest reported them added and its CRNG reseeded.
	for _, m := range []string{"warmpool_leases_active 0", "warmpool_uptime_seconds", "warmpool_build_info{",
		"\nwarmpool_handoff_entropy_bytes_total 32\n", "\nwarmpool_handoffs_total{entropy=\"reseeded\"} 1\n"} {
		if !strings.Contains(metrics, m) {
			t.Errorf("metrics lack %q", m)
		}
	}
	st, err := c.Status(ctxT(t))
	if err != nil || st.Provider != "fake" || st.Pools != 1 || st.Templates != 1 {
		t.Errorf("status = %+v, %v", st, err)
	}
	r.stop(t)
	// Shutdown destroys warm VMs; no lease was live.
	if live, _ := r.prov.List(context.Background()); len(live) != 0 {
		t.Errorf("VMs left after shutdown: %+v", live)
	}
	assertAccounted(t, r.dir, r.prov)
}

func TestAcquireUnknownPoolAndNothingReady(t *testing.T) {
	r := startFake(t, t.TempDir(), newFakeProvider(), "")
	c := r.client
	if _, err := c.Acquire(ctxT(t), "nope", time.Second, api.AcquireRequest{}); !errors.Is(err, vm.ErrNotFound) {
		t.Errorf("acquire from unknown pool = %v, want not found", err)
	}
	if _, err := c.SetPool(ctxT(t), "py", api.PoolRequest{Template: "missing", Max: 1}); !errors.Is(err, vm.ErrNotFound) {
		t.Errorf("pool of unknown template = %v, want not found", err)
	}
	setupPool(t, c, 0, 1)
	r.prov.SetLatency(fake.OpRestore, time.Hour)
	start := time.Now()
	_, err := c.Acquire(ctxT(t), "py", 200*time.Millisecond, api.AcquireRequest{})
	if !errors.Is(err, api.ErrNothingReady) {
		t.Errorf("acquire with nothing ready = %v, want nothing ready", err)
	}
	if time.Since(start) > 20*time.Second {
		t.Errorf("acquire waited %v for a 200ms wait", time.Since(start))
	}
}

func TestLeaseTTLExpires(t *testing.T) {
	r := startFake(t, t.TempDir(), newFakeProvider(), "")
	c := r.client
	setupPool(t, c, 1, 2)
	lease, err := c.Acquire(ctxT(t), "py", 5*time.Second, api.AcquireRequest{TTL: api.Duration(300 * time.Millisecond)})
	if err != nil {
		t.Fatal(err)
	}
	if lease.ExpiresAt == nil {
		t.Fatalf("lease with TTL has no expires_at: %+v", lease)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		leases, err := c.Leases(ctxT(t))
		if err != nil {
			t.Fatal(err)
		}
		if len(leases) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("lease %s still live long after its TTL", lease.ID)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if _, err := r.prov.Inspect(ctxT(t), lease.VMID); !errors.Is(err, vm.ErrNotFound) {
		t.Errorf("expired lease's VM still exists: %v", err)
	}
	if err := c.Release(ctxT(t), lease.ID); err != nil {
		t.Errorf("release of an expired lease = %v, want nil", err)
	}
}

func TestRestartKeepsLeasesAndReconciles(t *testing.T) {
	dir := t.TempDir()
	prov := newFakeProvider()
	r := startFake(t, dir, prov, "")
	setupPool(t, r.client, 1, 3)
	// A slow resume gives the hand-off a time the lease must still report
	// after the restart.
	prov.SetLatency(fake.OpResume, 20*time.Millisecond)
	lease, err := r.client.Acquire(ctxT(t), "py", 5*time.Second, api.AcquireRequest{Owner: "keep"})
	prov.SetLatency(fake.OpResume, 0)
	if err != nil {
		t.Fatal(err)
	}
	if lease.Timings.HandoffMS < 20 || lease.Timings.TotalMS < lease.Timings.HandoffMS {
		t.Errorf("timings of an acquire with a 20ms resume: %+v", lease.Timings)
	}
	r.stop(t)

	// What a crash can leave behind, besides the lease: a warm VM of the
	// current template, a VM no record names, a record of a VM that is
	// gone, and a VM whose purpose was never recorded.
	st, err := store.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	tpl, err := store.Get(st, store.Templates, "base")
	if err != nil {
		t.Fatal(err)
	}
	warm, err := prov.Restore(ctxT(t), tpl.Snapshot)
	if err != nil {
		t.Fatal(err)
	}
	orphan, err := prov.Restore(ctxT(t), tpl.Snapshot)
	if err != nil {
		t.Fatal(err)
	}
	unrecorded, err := prov.Create(ctxT(t), vm.Spec{VCPUs: 1, MemoryMiB: 128})
	if err != nil {
		t.Fatal(err)
	}
	err = st.Update(func(tx *store.Tx) error {
		for _, v := range []store.VM{
			{ID: warm.ID, Role: store.RoleWarm, Pool: "py", Template: "base", Generation: tpl.Generation, SnapshotDir: tpl.Snapshot.Dir},
			{ID: "gone-vm", Role: store.RoleWarm, Pool: "py"},
			{ID: unrecorded.ID, Role: store.RoleNew},
		} {
			if err := store.VMs.Put(tx, v); err != nil {
				return err
			}
		}
		return nil
	})
	st.Close()
	if err != nil {
		t.Fatal(err)
	}

	r = startFake(t, dir, prov, "")
	c := r.client
	leases, err := c.Leases(ctxT(t))
	if err != nil || len(leases) != 1 || leases[0].ID != lease.ID || leases[0].Owner != "keep" {
		t.Fatalf("leases after restart = %+v, %v; want %s", leases, err, lease.ID)
	}
	if got := leases[0].Timings; got.HandoffMS != lease.Timings.HandoffMS || got.WaitMS != lease.Timings.WaitMS || got.TotalMS == 0 {
		t.Errorf("lease timings after restart = %+v, want those of its acquire %+v", got, lease.Timings)
	}
	var out bytes.Buffer
	if code, err := c.Exec(ctxT(t), lease.ID, api.ExecRequest{Argv: []string{"echo", "still here"}}, &out, nil); err != nil || code != 0 || out.String() != "still here\n" {
		t.Errorf("exec in kept lease = %d, %v, %q", code, err, out.String())
	}
	if _, err := prov.Inspect(ctxT(t), warm.ID); err != nil {
		t.Errorf("warm VM of the current template was not adopted: %v", err)
	}
	for _, id := range []string{orphan.ID, unrecorded.ID} {
		if _, err := prov.Inspect(ctxT(t), id); !errors.Is(err, vm.ErrNotFound) {
			t.Errorf("VM %s that the state does not account for survived the restart: %v", id, err)
		}
	}
	waitReady(t, c, "py", 1)
	// The adopted VM makes up the pool's minimum: nothing more is restored.
	for range 20 {
		if p, err := c.Pool(ctxT(t), "py"); err != nil || p.Ready+p.Restoring > 1 {
			t.Fatalf("pool after restart = %+v, %v; want the adopted VM alone (min 1)", p, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	// The adopted VM is handed out like any other.
	l2, err := c.Acquire(ctxT(t), "py", 5*time.Second, api.AcquireRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Release(ctxT(t), l2.ID); err != nil {
		t.Fatal(err)
	}
	r.stop(t)
	assertAccounted(t, dir, prov)
	if _, err := prov.Inspect(context.Background(), lease.VMID); err != nil {
		t.Errorf("leased VM did not survive a graceful stop: %v", err)
	}

	// A lease released after a restart (the pool never saw it) destroys
	// its VM too.
	r = startFake(t, dir, prov, "")
	if err := r.client.Release(ctxT(t), lease.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := prov.Inspect(ctxT(t), lease.VMID); !errors.Is(err, vm.ErrNotFound) {
		t.Errorf("released adopted lease's VM still exists: %v", err)
	}
	r.stop(t)
	assertAccounted(t, dir, prov)
}

func TestStopAllDestroysLeases(t *testing.T) {
	dir := t.TempDir()
	prov := newFakeProvider()
	r := startFake(t, dir, prov, "")
	setupPool(t, r.client, 1, 1)
	if _, err := r.client.Acquire(ctxT(t), "py", 5*time.Second, api.AcquireRequest{}); err != nil {
		t.Fatal(err)
	}
	r.stop(t)
	if live, _ := prov.List(context.Background()); len(live) != 1 {
		t.Fatalf("after a plain stop want the leased VM only, got %+v", live)
	}
	// --stop-all
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	ready := make(chan struct{})
	go func() {
		done <- Run(ctx, Options{StateDir: dir, StopAll: true, Logger: testLogger(t), provider: prov, ready: func(*Daemon) { close(ready) }})
	}()
	select {
	case <-ready:
	case err := <-done:
		t.Fatal(err)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if live, _ := prov.List(context.Background()); len(live) != 0 {
		t.Errorf("VMs left after a stop-all shutdown: %+v", live)
	}
	assertAccounted(t, dir, prov)
}

func TestConfigPoolsAndTemplates(t *testing.T) {
	r := startFake(t, t.TempDir(), newFakeProvider(), `
templates:
  base: {vcpus: 1, memory_mib: 128}
pools:
  py: {template: base, min: 1, max: 2}
intervals:
  lease_check: 100ms
`)
	waitReady(t, r.client, "py", 1)
	// A pool changed through the API keeps the change across restarts.
	if _, err := r.client.SetPool(ctxT(t), "py", api.PoolRequest{Template: "base", Min: 2, Max: 2}); err != nil {
		t.Fatal(err)
	}
	r.stop(t)
	r = startFake(t, r.dir, r.prov, "")
	p := waitReady(t, r.client, "py", 2)
	if p.Min != 2 {
		t.Errorf("pool after restart = %+v, want min 2 from the API", p)
	}
}
