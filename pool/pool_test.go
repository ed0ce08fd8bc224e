package pool

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/warmpool/warmpool/events"
	"github.com/warmpool/warmpool/provider/fake"
	"github.com/warmpool/warmpool/vm"
)

var testSpec = vm.Spec{VCPUs: 1, MemoryMiB: 256}

// newTestPool starts a pool over a fake provider whose sweep and health
// intervals are an hour, so a test that passes cannot be relying on them.
func newTestPool(t *testing.T, opts fake.Options, configure func(*Config)) (*Pool, *fake.Provider) {
	t.Helper()
	prov := fake.New(opts)
	cfg := Config{
		Provider:       prov,
		Parallelism:    4,
		SweepInterval:  time.Hour,
		HealthInterval: time.Hour,
		BackoffBase:    5 * time.Millisecond,
		BackoffMax:     100 * time.Millisecond,
	}
	if configure != nil {
		configure(&cfg)
	}
	p, err := New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		if err := p.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
	})
	return p, prov
}

func stack(name string, snap vm.Snapshot, min, max int) StackSpec {
	return StackSpec{
		Name:     name,
		Key:      vm.StackKey{Template: "tpl", VCPUs: snap.Spec.VCPUs, MemoryMiB: snap.Spec.MemoryMiB},
		Snapshot: snap,
		Min:      min,
		Max:      max,
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func status(t *testing.T, p *Pool, name string) Status {
	t.Helper()
	s, err := p.Status(name)
	if err != nil {
		t.Fatalf("Status(%q): %v", name, err)
	}
	return s
}

func waitReady(t *testing.T, p *Pool, name string, n int) {
	t.Helper()
	waitFor(t, fmt.Sprintf("pool %s to have %d ready and nothing restoring", name, n), func() bool {
		s := status(t, p, name)
		return s.Ready == n && s.Restoring == 0
	})
}

func listIDs(t *testing.T, prov vm.Provider) []string {
	t.Helper()
	vms, err := prov.List(context.Background())
	if err != nil {
		t.Fatalf("List: %v", err)
	}
	var ids []string
	for _, v := range vms {
		ids = append(ids, v.ID)
	}
	return ids
}

var leaseSeq atomic.Uint64

// testID is a fresh identity, as the daemon's lease registry would make.
func testID() Identity {
	return Identity{LeaseID: fmt.Sprintf("l-%d", leaseSeq.Add(1))}
}

// release destroys a handed-out VM the way its owner does: through the
// provider, since the pool no longer knows it.
func release(t *testing.T, prov vm.Provider, l *Lease) {
	t.Helper()
	if err := prov.Destroy(context.Background(), l.VM.ID); err != nil {
		t.Errorf("destroy leased VM %s: %v", l.VM.ID, err)
	}
}

func acquire(t *testing.T, p *Pool, name string) *Lease {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	l, err := p.Acquire(ctx, name, testID())
	if err != nil {
		t.Fatalf("Acquire(%q): %v", name, err)
	}
	return l
}

func TestStackSpecValidateNamesTheField(t *testing.T) {
	good := StackSpec{Name: "py", Key: vm.StackKey{Template: "py", VCPUs: 1, MemoryMiB: 256}, Snapshot: vm.Snapshot{ID: "s1"}, Min: 1, Max: 2}
	if err := good.Validate(); err != nil {
		t.Fatalf("valid spec rejected: %v", err)
	}
	cases := []struct {
		field string
		edit  func(*StackSpec)
	}{
		{"min", func(s *StackSpec) { s.Min, s.Max = 3, 2 }},
		{"min", func(s *StackSpec) { s.Min = -1 }},
		{"max", func(s *StackSpec) { s.Min, s.Max = 0, 0 }},
		{"max", func(s *StackSpec) { s.Max = -2 }},
		{"name", func(s *StackSpec) { s.Name = "" }},
		{"name", func(s *StackSpec) { s.Name = "a/b" }},
		{"name", func(s *StackSpec) { s.Name = ".." }},
		{"template", func(s *StackSpec) { s.Key.Template = "../x" }},
		{"vcpus", func(s *StackSpec) { s.Key.VCPUs = 0 }},
		{"memory_mib", func(s *StackSpec) { s.Key.MemoryMiB = -1 }},
		{"snapshot", func(s *StackSpec) { s.Snapshot.ID = "" }},
		{"max_age", func(s *StackSpec) { s.MaxAge = -time.Second }},
	}
	for _, c := range cases {
		s := good
		c.edit(&s)
		err := s.Validate()
		var fe *vm.FieldError
		if !errors.As(err, &fe) || fe.Field != c.field || !errors.Is(err, vm.ErrInvalid) {
			t.Errorf("Validate(%+v) = %v, want a FieldError on %q", s, err, c.field)
		}
	}
	// Register rejects the same specs before touching anything.
	p, prov := newTestPool(t, fake.Options{}, nil)
	bad := good
	bad.Name = "a/b"
	if err := p.Register(bad); !errors.Is(err, vm.ErrInvalid) || !strings.Contains(err.Error(), "name") {
		t.Errorf("Register(bad name) = %v", err)
	}
	if n := prov.Calls(fake.OpRestore); n != 0 {
		t.Errorf("%d restores after a rejected Register", n)
	}
}

func TestNewRejectsProviderWithoutSnapshots(t *testing.T) {
	type lifecycleOnly struct{ vm.Provider }
	_, err := New(Config{Provider: lifecycleOnly{fake.New(fake.Options{})}})
	if !errors.Is(err, vm.ErrUnsupported) {
		t.Errorf("New with a provider that cannot restore = %v, want vm.ErrUnsupported", err)
	}
	if _, err := New(Config{}); !errors.Is(err, vm.ErrInvalid) {
		t.Errorf("New without provider = %v, want vm.ErrInvalid", err)
	}
}

func TestRegisterFillsToMinAndNoFurther(t *testing.T) {
	p, prov := newTestPool(t, fake.Options{RestoreLatency: time.Millisecond}, nil)
	snap := prov.AddSnapshot(testSpec)
	if err := p.Register(stack("web", snap, 3, 5)); err != nil {
		t.Fatal(err)
	}
	waitReady(t, p, "web", 3)
	time.Sleep(20 * time.Millisecond) // give an over-eager refiller the chance to show
	if got := len(listIDs(t, prov)); got != 3 {
		t.Errorf("provider holds %d VMs for a pool with min 3", got)
	}
	for _, v := range mustList(t, prov) {
		if v.Status != vm.StatusPaused || v.Snapshot != snap.ID {
			t.Errorf("warm VM %s is %s from %q, want paused from %s", v.ID, v.Status, v.Snapshot, snap.ID)
		}
	}
}

func mustList(t *testing.T, prov vm.Provider) []vm.VM {
	t.Helper()
	vms, err := prov.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return vms
}

func TestAcquireHitHandsOverARunningVMAndRefills(t *testing.T) {
	p, prov := newTestPool(t, fake.Options{}, nil)
	snap := prov.AddSnapshot(testSpec)
	if err := p.Register(stack("web", snap, 2, 2)); err != nil {
		t.Fatal(err)
	}
	waitReady(t, p, "web", 2)
	l := acquire(t, p, "web")
	if l.Pool != "web" || l.ID == "" || l.VM.Status != vm.StatusRunning {
		t.Errorf("lease %+v", l)
	}
	if err := vm.ValidateName("lease", l.ID); err != nil {
		t.Errorf("lease ID is not a valid name: %v", err)
	}
	got, err := prov.Inspect(context.Background(), l.VM.ID)
	if err != nil || got.Status != vm.StatusRunning {
		t.Errorf("leased VM in provider: %+v, %v", got, err)
	}
	if l.Timings.Wait != 0 || l.Timings.Total <= 0 || l.Timings.Handoff > l.Timings.Total {
		t.Errorf("hit timings %+v", l.Timings)
	}
	waitReady(t, p, "web", 2) // refilled without any sweep
	s := status(t, p, "web")
	if s.Counters.Acquired != 1 || s.Counters.Hits != 1 || s.Counters.Waits != 0 {
		t.Errorf("counters %+v", s.Counters)
	}
}

func TestAcquireHandsOffTheCallersIdentity(t *testing.T) {
	handedOff := make(chan Identity, 1)
	p, prov := newTestPool(t, fake.Options{}, func(c *Config) {
		c.Handoff = func(_ context.Context, _ vm.VM, id Identity) error {
			handedOff <- id
			return nil
		}
	})
	snap := prov.AddSnapshot(testSpec)
	if err := p.Register(stack("web", snap, 1, 1)); err != nil {
		t.Fatal(err)
	}
	waitReady(t, p, "web", 1)
	for _, bad := range []string{"", "a/b", "-x"} {
		_, err := p.Acquire(context.Background(), "web", Identity{LeaseID: bad})
		var fe *vm.FieldError
		if !errors.As(err, &fe) || fe.Field != "lease_id" {
			t.Errorf("Acquire with lease ID %q = %v, want a lease_id field error", bad, err)
		}
	}
	if s := status(t, p, "web"); s.Ready != 1 || s.Counters.Acquired != 0 {
		t.Errorf("after rejected acquires: %+v, want the VM still ready", s)
	}
	want := Identity{LeaseID: "l-0123abcd"}
	l, err := p.Acquire(context.Background(), "web", want)
	if err != nil {
		t.Fatal(err)
	}
	if got := <-handedOff; got != want {
		t.Errorf("hand-off got %+v, want %+v", got, want)
	}
	if l.ID != want.LeaseID {
		t.Errorf("lease ID %q, want the caller's %q", l.ID, want.LeaseID)
	}
}

func TestAcquireOnEmptyBucketNeverWaitsForSweep(t *testing.T) {
	// Sweep and health intervals are an hour: only the acquire's own wake-up
	// can make these complete.
	p, prov := newTestPool(t, fake.Options{RestoreLatency: 10 * time.Millisecond}, nil)
	snap := prov.AddSnapshot(testSpec)
	if err := p.Register(stack("lazy", snap, 0, 2)); err != nil {
		t.Fatal(err)
	}
	settle := func() { time.Sleep(50 * time.Millisecond) } // let earlier wake-ups be consumed
	settle()
	l := acquire(t, p, "lazy")
	if l.Timings.Wait <= 0 {
		t.Errorf("acquire on an empty bucket reports no wait: %+v", l.Timings)
	}
	// A floor of 1 with three acquires in a row: the second and third find
	// the bucket just emptied and must wake the refiller themselves.
	if err := p.Register(stack("floor", snap, 1, 1)); err != nil {
		t.Fatal(err)
	}
	waitReady(t, p, "floor", 1)
	for range 3 {
		settle()
		acquire(t, p, "floor")
	}
	s := status(t, p, "lazy")
	if s.Counters.Waits != 1 || s.Counters.Hits != 0 {
		t.Errorf("lazy counters %+v, want one wait", s.Counters)
	}
	// With min 0 the pool keeps nothing once the waiter is served.
	time.Sleep(30 * time.Millisecond)
	if s := status(t, p, "lazy"); s.Ready != 0 || s.Restoring != 0 {
		t.Errorf("min-0 pool holds %d ready, %d restoring", s.Ready, s.Restoring)
	}
}

func TestAcquireTimesOutWithTypedError(t *testing.T) {
	reg := prometheus.NewRegistry()
	p, prov := newTestPool(t, fake.Options{Faults: map[fake.Op]fake.Fault{fake.OpRestore: {Hang: true}}}, func(c *Config) { c.Registry = reg })
	snap := prov.AddSnapshot(testSpec)
	if err := p.Register(stack("stuck", snap, 1, 1)); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	_, err := p.Acquire(ctx, "stuck", testID())
	if !errors.Is(err, ErrNothingReady) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Acquire = %v, want ErrNothingReady wrapping DeadlineExceeded", err)
	}
	var nr *NothingReadyError
	if !errors.As(err, &nr) || nr.Pool != "stuck" || nr.RetryAfter <= 0 || nr.Waited <= 0 {
		t.Errorf("error details %+v", nr)
	}
	if s := status(t, p, "stuck"); s.Counters.Timeouts != 1 || s.Counters.Acquired != 0 {
		t.Errorf("counters %+v", s.Counters)
	}
	if v := metricValue(t, reg, "warmpool_pool_acquires_total", map[string]string{"pool": "stuck", "outcome": "timeout"}); v != 1 {
		t.Errorf("timeout metric = %v", v)
	}
}

func TestUnknownPool(t *testing.T) {
	p, _ := newTestPool(t, fake.Options{}, nil)
	if _, err := p.Acquire(context.Background(), "nope", testID()); !errors.Is(err, vm.ErrNotFound) {
		t.Errorf("Acquire = %v", err)
	}
	if err := p.Unregister("nope"); !errors.Is(err, vm.ErrNotFound) {
		t.Errorf("Unregister = %v", err)
	}
	if _, err := p.Status("nope"); !errors.Is(err, vm.ErrNotFound) {
		t.Errorf("Status = %v", err)
	}
}

func TestConcurrentAcquirersNeverShareAVM(t *testing.T) {
	p, prov := newTestPool(t, fake.Options{RestoreLatency: time.Millisecond}, nil)
	snap := prov.AddSnapshot(testSpec)
	if err := p.Register(stack("busy", snap, 4, 8)); err != nil {
		t.Fatal(err)
	}
	waitReady(t, p, "busy", 4)
	var (
		mu     sync.Mutex
		leases []*Lease
		wg     sync.WaitGroup
	)
	for range 32 {
		wg.Go(func() {
			for range 4 {
				ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				l, err := p.Acquire(ctx, "busy", testID())
				cancel()
				if err != nil {
					t.Errorf("Acquire: %v", err)
					return
				}
				mu.Lock()
				leases = append(leases, l)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	seen := map[string]bool{}
	for _, l := range leases {
		if seen[l.VM.ID] {
			t.Errorf("VM %s handed out twice", l.VM.ID)
		}
		seen[l.VM.ID] = true
		release(t, prov, l)
	}
	s := status(t, p, "busy")
	if s.Counters.Acquired != 128 || s.Counters.Hits+s.Counters.Waits != 128 {
		t.Errorf("counters %+v", s.Counters)
	}
}

func TestUnhealthyEntryFoundOnAcquireIsReplaced(t *testing.T) {
	p, prov := newTestPool(t, fake.Options{}, nil)
	snap := prov.AddSnapshot(testSpec)
	if err := p.Register(stack("web", snap, 2, 2)); err != nil {
		t.Fatal(err)
	}
	waitReady(t, p, "web", 2)
	dead := listIDs(t, prov)
	for _, id := range dead {
		if err := prov.Kill(id); err != nil {
			t.Fatal(err)
		}
	}
	l := acquire(t, p, "web")
	if slices.Contains(dead, l.VM.ID) {
		t.Fatalf("acquire handed out dead VM %s", l.VM.ID)
	}
	waitFor(t, "dead VMs to be destroyed", func() bool {
		ids := listIDs(t, prov)
		return !slices.Contains(ids, dead[0]) && !slices.Contains(ids, dead[1])
	})
	s := status(t, p, "web")
	if s.Counters.ValidationFailures != 2 || s.Counters.Evicted != 2 {
		t.Errorf("counters %+v, want 2 validation failures and 2 evictions", s.Counters)
	}
}

func TestHandoffFailureDestroysVMAndTriesNext(t *testing.T) {
	var calls atomic.Int32
	var failed atomic.Value
	p, prov := newTestPool(t, fake.Options{}, func(c *Config) {
		c.Handoff = func(ctx context.Context, v vm.VM, _ Identity) error {
			if calls.Add(1) == 1 {
				failed.Store(v.ID)
				return errors.New("agent did not answer")
			}
			return nil
		}
	})
	snap := prov.AddSnapshot(testSpec)
	if err := p.Register(stack("web", snap, 2, 2)); err != nil {
		t.Fatal(err)
	}
	waitReady(t, p, "web", 2)
	l := acquire(t, p, "web")
	bad := failed.Load().(string)
	if l.VM.ID == bad {
		t.Fatalf("lease got the VM whose handoff failed")
	}
	waitFor(t, "failed VM destroyed", func() bool { return !slices.Contains(listIDs(t, prov), bad) })
}

func TestHealthCheckReplacesDeadEntries(t *testing.T) {
	bus := events.NewBus()
	sub := bus.Subscribe(64, func(e events.Event) bool { return e.Kind == EventEvicted })
	defer sub.Close()
	p, prov := newTestPool(t, fake.Options{}, func(c *Config) {
		c.HealthInterval = 10 * time.Millisecond
		c.Events = bus
	})
	snap := prov.AddSnapshot(testSpec)
	if err := p.Register(stack("web", snap, 3, 3)); err != nil {
		t.Fatal(err)
	}
	waitReady(t, p, "web", 3)
	victim := listIDs(t, prov)[1]
	if err := prov.Kill(victim); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "dead VM replaced", func() bool {
		return !slices.Contains(listIDs(t, prov), victim) && status(t, p, "web").Ready == 3
	})
	select {
	case e := <-sub.C:
		if e.Subject != "web" || e.Detail["vm"] != victim || e.Detail["reason"] != ReasonUnhealthy {
			t.Errorf("eviction event %+v", e)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no eviction event")
	}
	if s := status(t, p, "web"); s.Counters.ValidationFailures < 1 || s.Counters.Acquired != 0 {
		t.Errorf("counters %+v", s.Counters)
	}
}

func TestMaxAgeReplacesEntriesWithoutDroppingBelowFloor(t *testing.T) {
	var (
		p        *Pool
		mu       sync.Mutex
		minReady = 1 << 30
		aged     int
	)
	p, prov := newTestPool(t, fake.Options{RestoreLatency: 5 * time.Millisecond}, func(c *Config) {
		c.OnVMDestroyed = func(pool, id string) {
			s, err := p.Status(pool)
			if err != nil {
				return
			}
			mu.Lock()
			minReady = min(minReady, s.Ready)
			aged++
			mu.Unlock()
		}
	})
	snap := prov.AddSnapshot(testSpec)
	spec := stack("fresh", snap, 2, 2)
	spec.MaxAge = 40 * time.Millisecond
	if err := p.Register(spec); err != nil {
		t.Fatal(err)
	}
	first := func() []string { waitReady(t, p, "fresh", 2); return listIDs(t, prov) }()
	waitFor(t, "six age evictions", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return aged >= 6
	})
	mu.Lock()
	if minReady < 2 {
		t.Errorf("bucket dropped to %d ready while replacing aged entries; min is 2", minReady)
	}
	mu.Unlock()
	ids := listIDs(t, prov)
	for _, id := range first {
		if slices.Contains(ids, id) {
			t.Errorf("entry %s outlived max_age several times over", id)
		}
	}
	if s := status(t, p, "fresh"); s.Counters.Evicted < 6 {
		t.Errorf("counters %+v", s.Counters)
	}
}

func TestReRegisterDrainsOldGeneration(t *testing.T) {
	bus := events.NewBus()
	sub := bus.Subscribe(16, func(e events.Event) bool { return e.Kind == EventGeneration })
	defer sub.Close()
	p, prov := newTestPool(t, fake.Options{RestoreLatency: 5 * time.Millisecond}, func(c *Config) { c.Events = bus })
	v1, v2 := prov.AddSnapshot(testSpec), prov.AddSnapshot(testSpec)
	if err := p.Register(stack("web", v1, 3, 4)); err != nil {
		t.Fatal(err)
	}
	waitReady(t, p, "web", 3)
	// Acquirers wait while the new generation is restored...
	prov.SetLatency(fake.OpRestore, 30*time.Millisecond)
	if err := p.Register(stack("web", v2, 3, 4)); err != nil {
		t.Fatal(err)
	}
	if s := status(t, p, "web"); s.Generation != 2 {
		t.Errorf("generation %d after a new snapshot, want 2", s.Generation)
	}
	// ...and re-registering the same snapshot is not a new generation.
	if err := p.Register(stack("web", v2, 3, 4)); err != nil {
		t.Fatal(err)
	}
	var leases []*Lease
	for range 4 {
		leases = append(leases, acquire(t, p, "web"))
	}
	for _, l := range leases {
		if l.VM.Snapshot != v2.ID {
			t.Errorf("lease %s got a VM of the old generation (%s)", l.ID, l.VM.Snapshot)
		}
	}
	waitFor(t, "old generation destroyed", func() bool {
		for _, v := range mustList(t, prov) {
			if v.Snapshot == v1.ID {
				return false
			}
		}
		return true
	})
	if s := status(t, p, "web"); s.Generation != 2 || s.Counters.Evicted < 3 {
		t.Errorf("status %+v", s)
	}
	select {
	case e := <-sub.C:
		if e.Detail["generation"] != uint64(2) || e.Detail["snapshot"] != v2.ID {
			t.Errorf("generation event %+v", e)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no generation event")
	}
}

func TestReRegisterDuringRestoreDiscardsOldGenerationVMs(t *testing.T) {
	p, prov := newTestPool(t, fake.Options{RestoreLatency: 50 * time.Millisecond}, nil)
	v1, v2 := prov.AddSnapshot(testSpec), prov.AddSnapshot(testSpec)
	if err := p.Register(stack("web", v1, 4, 4)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "restores in flight", func() bool { return status(t, p, "web").Restoring > 0 })
	if err := p.Register(stack("web", v2, 4, 4)); err != nil {
		t.Fatal(err)
	}
	waitReady(t, p, "web", 4)
	for _, v := range mustList(t, prov) {
		if v.Snapshot != v2.ID {
			waitFor(t, "old-generation VM "+v.ID+" destroyed", func() bool { return !slices.Contains(listIDs(t, prov), v.ID) })
		}
	}
	for range 4 {
		if l := acquire(t, p, "web"); l.VM.Snapshot != v2.ID {
			t.Errorf("handed out %s from %s", l.VM.ID, l.VM.Snapshot)
		}
	}
}

func TestRegisterSmallerMaxTrimsBucket(t *testing.T) {
	p, prov := newTestPool(t, fake.Options{}, nil)
	snap := prov.AddSnapshot(testSpec)
	if err := p.Register(stack("web", snap, 4, 4)); err != nil {
		t.Fatal(err)
	}
	waitReady(t, p, "web", 4)
	if err := p.Register(stack("web", snap, 1, 2)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "trimmed to 2", func() bool { return len(listIDs(t, prov)) == 2 })
	if s := status(t, p, "web"); s.Ready != 2 || s.Generation != 1 || s.Counters.Evicted != 2 {
		t.Errorf("status %+v", s)
	}
}

func TestFailingStackDoesNotStarveHealthyStack(t *testing.T) {
	for _, mode := range []string{"fail", "hang"} {
		t.Run(mode, func(t *testing.T) {
			p, prov := newTestPool(t, fake.Options{RestoreLatency: 2 * time.Millisecond}, func(c *Config) {
				c.Parallelism = 2
			})
			bad, good := prov.AddSnapshot(testSpec), prov.AddSnapshot(testSpec)
			var badAttempts atomic.Int32
			prov.SetHook(func(ctx context.Context, op fake.Op, target string) error {
				if op != fake.OpRestore || target != bad.ID {
					return nil
				}
				badAttempts.Add(1)
				if mode == "hang" {
					<-ctx.Done()
					return ctx.Err()
				}
				return errors.New("corrupt snapshot")
			})
			// The broken stack is registered first, so it is first in line.
			if err := p.Register(stack("broken", bad, 4, 4)); err != nil {
				t.Fatal(err)
			}
			if mode == "hang" {
				// Alone, it may take every slot, and those restores hang.
				waitFor(t, "the broken stack to hold every slot", func() bool { return badAttempts.Load() == 2 })
			}
			if err := p.Register(stack("healthy", good, 3, 3)); err != nil {
				t.Fatal(err)
			}
			waitReady(t, p, "healthy", 3)
			for range 10 {
				acquire(t, p, "healthy")
			}
			waitReady(t, p, "healthy", 3)
			if s := status(t, p, "broken"); s.Ready != 0 {
				t.Errorf("broken stack has %d ready", s.Ready)
			}
			if mode == "hang" {
				// Its slots beyond its share went to the healthy stack
				// instead of waiting out the restore timeout, and it got
				// no more.
				if n := badAttempts.Load(); n != 2 {
					t.Errorf("%d hanging restores in flight for the broken stack, want the 2 it took alone", n)
				}
			} else if n := badAttempts.Load(); n < 2 {
				t.Errorf("broken stack was tried %d times; it must keep trying", n)
			}
		})
	}
}

func TestFailingStackBacksOffAndRecovers(t *testing.T) {
	bus := events.NewBus()
	sub := bus.Subscribe(1024, func(e events.Event) bool { return e.Kind == EventRefillErr })
	defer sub.Close()
	p, prov := newTestPool(t, fake.Options{}, func(c *Config) {
		c.Events = bus
		c.BackoffBase = 20 * time.Millisecond
		c.BackoffMax = 80 * time.Millisecond
	})
	prov.SetFault(fake.OpRestore, fake.Fault{FailFraction: 1})
	snap := prov.AddSnapshot(testSpec)
	if err := p.Register(stack("flaky", snap, 2, 2)); err != nil {
		t.Fatal(err)
	}
	var evs []events.Event
	waitFor(t, "three refill errors", func() bool {
		for {
			select {
			case e := <-sub.C:
				evs = append(evs, e)
			default:
				return len(evs) >= 3
			}
		}
	})
	// Back-off: a failure that arrives while the bucket is backing off must
	// wait longer, so successive errors report growing (jittered) delays
	// until the cap.
	for _, e := range evs {
		if ms, _ := e.Detail["retry_in_ms"].(int64); ms < 10 || ms > 80 {
			t.Errorf("retry_in_ms = %v outside [base/2, max]", e.Detail["retry_in_ms"])
		}
	}
	time.Sleep(200 * time.Millisecond)
	if n := prov.Calls(fake.OpRestore); n > 60 {
		t.Errorf("%d restore attempts in ~0.2s: the failing stack is not backing off", n)
	}
	prov.SetFault(fake.OpRestore, fake.Fault{})
	waitReady(t, p, "flaky", 2)
	acquire(t, p, "flaky")
}

func TestShutdownDuringInflightRestoresLeavesNoVMs(t *testing.T) {
	prov := fake.New(fake.Options{})
	snap := prov.AddSnapshot(testSpec)
	hang := prov.AddSnapshot(testSpec)
	stubborn := prov.AddSnapshot(testSpec)
	prov.SetHook(func(ctx context.Context, op fake.Op, target string) error {
		if op != fake.OpRestore {
			return nil
		}
		switch target {
		case hang.ID: // until cancelled
			<-ctx.Done()
			return ctx.Err()
		case stubborn.ID: // finishes even though cancelled, as a real restore may
			time.Sleep(100 * time.Millisecond)
		default:
			select {
			case <-time.After(100 * time.Millisecond):
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		return nil
	})
	p, err := New(Config{Provider: prov, Parallelism: 6, SweepInterval: time.Hour, HealthInterval: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Register(stack("slow", snap, 8, 8)); err != nil {
		t.Fatal(err)
	}
	if err := p.Register(stack("hung", hang, 2, 2)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "some ready and some restoring", func() bool {
		s := status(t, p, "slow")
		return s.Ready > 0 && s.Restoring > 0
	})
	if err := p.Register(stack("stubborn", stubborn, 2, 2)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "stubborn restores in flight", func() bool { return status(t, p, "stubborn").Restoring > 0 })
	waitCtx, cancelWait := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancelWait()
	waiterErr := make(chan error, 1)
	go func() { _, err := p.Acquire(waitCtx, "hung", testID()); waiterErr <- err }()

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := p.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	if ids := listIDs(t, prov); len(ids) != 0 {
		t.Errorf("provider still lists %v after Shutdown", ids)
	}
	if err := <-waiterErr; !errors.Is(err, ErrClosed) {
		t.Errorf("waiting acquirer got %v, want ErrClosed", err)
	}
	if _, err := p.Acquire(context.Background(), "slow", testID()); !errors.Is(err, ErrClosed) {
		t.Errorf("Acquire after Shutdown = %v", err)
	}
	if err := p.Register(stack("late", snap, 1, 1)); !errors.Is(err, ErrClosed) {
		t.Errorf("Register after Shutdown = %v", err)
	}
	if err := p.Shutdown(ctx); err != nil {
		t.Errorf("second Shutdown: %v", err)
	}
}

func TestShutdownLeavesLeasedVMsAlone(t *testing.T) {
	prov := fake.New(fake.Options{})
	snap := prov.AddSnapshot(testSpec)
	p, err := New(Config{Provider: prov, SweepInterval: time.Hour, HealthInterval: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Register(stack("web", snap, 2, 2)); err != nil {
		t.Fatal(err)
	}
	waitReady(t, p, "web", 2)
	l := acquire(t, p, "web")
	if err := p.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	if ids := listIDs(t, prov); !slices.Equal(ids, []string{l.VM.ID}) {
		t.Errorf("after Shutdown the provider lists %v, want only the leased %s", ids, l.VM.ID)
	}
}

// Acquires take no pool lock on a hit, so Shutdown racing them must still
// leave exactly the leased VMs: none destroyed under a lease, none leaked.
func TestShutdownRacingAcquiresLeavesExactlyTheLeasedVMs(t *testing.T) {
	prov := fake.New(fake.Options{})
	snap := prov.AddSnapshot(testSpec)
	p, err := New(Config{Provider: prov, SweepInterval: time.Hour, HealthInterval: time.Hour,
		// A slow hand-off keeps acquires in flight while Shutdown runs.
		Handoff: func(context.Context, vm.VM, Identity) error { time.Sleep(100 * time.Microsecond); return nil },
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"a", "b"} {
		if err := p.Register(stack(name, snap, 64, 64)); err != nil {
			t.Fatal(err)
		}
		waitReady(t, p, name, 64)
	}
	var (
		mu      sync.Mutex
		leased  = map[string]bool{}
		wg      sync.WaitGroup
		started = make(chan struct{})
		once    sync.Once
	)
	for g := range 16 {
		wg.Go(func() {
			name := []string{"a", "b"}[g%2]
			for {
				ctx, cancel := context.WithTimeout(context.Background(), time.Second)
				l, err := p.Acquire(ctx, name, testID())
				cancel()
				if err != nil {
					if !errors.Is(err, ErrClosed) && !errors.Is(err, ErrNothingReady) {
						t.Errorf("Acquire: %v", err)
					}
					return
				}
				mu.Lock()
				leased[l.VM.ID] = true
				mu.Unlock()
				once.Do(func() { close(started) })
			}
		})
	}
	<-started
	if err := p.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	ids := listIDs(t, prov)
	for _, id := range ids {
		if !leased[id] {
			t.Errorf("after Shutdown the provider still lists %s, which was never leased", id)
		}
	}
	if len(ids) != len(leased) {
		t.Errorf("provider lists %d VMs, %d were leased: a leased VM was destroyed", len(ids), len(leased))
	}
	for id := range leased {
		v, err := prov.Inspect(context.Background(), id)
		if err != nil || v.Status != vm.StatusRunning {
			t.Errorf("leased VM %s after Shutdown: status %q, err %v; want it running", id, v.Status, err)
		}
	}
}

// While an entry past MaxAge waits for its replacement (make before break),
// a fresh entry is handed out before it.
func TestAcquirePrefersFreshEntriesOverExpiredOnes(t *testing.T) {
	const maxAge = 300 * time.Millisecond
	p, prov := newTestPool(t, fake.Options{}, nil)
	snap := prov.AddSnapshot(testSpec)
	if err := p.Register(stack("web", snap, 1, 3)); err != nil {
		t.Fatal(err)
	}
	waitReady(t, p, "web", 1)
	expired := listIDs(t, prov)[0]
	time.Sleep(maxAge + 50*time.Millisecond)
	// The replacement restore hangs, so the expired entry has to stay.
	prov.SetFault(fake.OpRestore, fake.Fault{Hang: true})
	spec := stack("web", snap, 1, 3)
	spec.MaxAge = maxAge
	if err := p.Register(spec); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the replacement restore to start", func() bool { return status(t, p, "web").Restoring == 1 })
	prov.SetFault(fake.OpRestore, fake.Fault{})
	fresh, err := prov.Restore(context.Background(), snap)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Adopt("web", fresh); err != nil {
		t.Fatalf("Adopt: %v", err)
	}
	if l := acquire(t, p, "web"); l.VM.ID != fresh.ID {
		t.Errorf("acquire got %s, want the fresh %s before the expired %s", l.VM.ID, fresh.ID, expired)
	}
}

func TestUnregisterDestroysWarmVMsAndFailsWaiters(t *testing.T) {
	p, prov := newTestPool(t, fake.Options{}, nil)
	snap := prov.AddSnapshot(testSpec)
	hang := prov.AddSnapshot(testSpec)
	prov.SetHook(func(ctx context.Context, op fake.Op, target string) error {
		if op == fake.OpRestore && target == hang.ID {
			<-ctx.Done()
			return ctx.Err()
		}
		return nil
	})
	if err := p.Register(stack("web", snap, 3, 3)); err != nil {
		t.Fatal(err)
	}
	if err := p.Register(stack("hung", hang, 1, 1)); err != nil {
		t.Fatal(err)
	}
	waitReady(t, p, "web", 3)
	// The hung stack's first restore has begun (its VM is half made) by
	// the time web's are gone; on a busy host it may start later.
	waitFor(t, "the hung stack's restore to begin", func() bool { return len(listIDs(t, prov)) >= 4 })
	waiterErr := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		_, err := p.Acquire(ctx, "hung", testID())
		waiterErr <- err
	}()
	if err := p.Unregister("web"); err != nil {
		t.Fatal(err)
	}
	// The hung stack's half-made VMs: one for its min and, once the
	// acquirer waits, one for it.
	if ids := listIDs(t, prov); len(ids) < 1 || len(ids) > 2 {
		t.Errorf("after Unregister the provider lists %v", ids)
	}
	waitFor(t, "acquirer queued", func() bool { return status(t, p, "hung").Counters.Timeouts == 0 && len(p.Pools()) == 1 })
	time.Sleep(10 * time.Millisecond)
	if err := p.Unregister("hung"); err != nil {
		t.Fatal(err)
	}
	if err := <-waiterErr; !errors.Is(err, vm.ErrNotFound) {
		t.Errorf("acquirer waiting on a removed pool got %v, want vm.ErrNotFound", err)
	}
	if len(p.Pools()) != 0 {
		t.Errorf("Pools() = %+v", p.Pools())
	}
}

func TestAdopt(t *testing.T) {
	p, prov := newTestPool(t, fake.Options{}, nil)
	snap, other := prov.AddSnapshot(testSpec), prov.AddSnapshot(testSpec)
	if err := p.Register(stack("web", snap, 0, 2)); err != nil {
		t.Fatal(err)
	}
	restore := func(s vm.Snapshot) vm.VM {
		v, err := prov.Restore(context.Background(), s)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	a, b, c := restore(snap), restore(snap), restore(snap)
	if err := p.Adopt("web", a); err != nil {
		t.Fatalf("Adopt: %v", err)
	}
	if err := p.Adopt("web", a); !errors.Is(err, vm.ErrInvalidState) {
		t.Errorf("adopting the same VM twice = %v", err)
	}
	if err := p.Adopt("web", restore(other)); !errors.Is(err, vm.ErrInvalidState) {
		t.Errorf("adopting a VM of another snapshot = %v", err)
	}
	if err := p.Adopt("nope", b); !errors.Is(err, vm.ErrNotFound) {
		t.Errorf("adopting into an unknown pool = %v", err)
	}
	dead := restore(snap)
	_ = prov.Kill(dead.ID)
	if err := p.Adopt("web", dead); err == nil {
		t.Errorf("adopted a dead VM")
	}
	if err := p.Adopt("web", b); err != nil {
		t.Fatal(err)
	}
	if err := p.Adopt("web", c); !errors.Is(err, vm.ErrExhausted) {
		t.Errorf("adopting beyond max = %v", err)
	}
	if s := status(t, p, "web"); s.Ready != 2 {
		t.Errorf("ready %d after adopting 2", s.Ready)
	}
	l := acquire(t, p, "web")
	if l.VM.ID != a.ID {
		t.Errorf("acquire got %s, want the oldest adopted VM %s", l.VM.ID, a.ID)
	}
}

func TestObserverHooksTrackOwnership(t *testing.T) {
	var mu sync.Mutex
	live := map[string]bool{}
	var p *Pool
	p, prov := newTestPool(t, fake.Options{Seed: 3, Faults: map[fake.Op]fake.Fault{fake.OpRestore: {FailFraction: 0.3}}}, func(c *Config) {
		c.OnVMCreated = func(pool string, v vm.VM) {
			mu.Lock()
			defer mu.Unlock()
			if live[v.ID] {
				t.Errorf("created %s twice", v.ID)
			}
			live[v.ID] = true
		}
		c.OnVMDestroyed = func(pool, id string) {
			mu.Lock()
			defer mu.Unlock()
			if !live[id] {
				t.Errorf("destroyed %s that was never created", id)
			}
			delete(live, id)
		}
	})
	snap := prov.AddSnapshot(testSpec)
	if err := p.Register(stack("web", snap, 3, 3)); err != nil {
		t.Fatal(err)
	}
	// A handed-out VM is its owner's: destroying it through the provider
	// is not the pool's to report, so the hooks keep it alive.
	leased := map[string]bool{}
	for i := range 6 {
		l := acquire(t, p, "web")
		leased[l.VM.ID] = true
		if i > 0 {
			release(t, prov, l)
		}
	}
	if err := p.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if !maps.Equal(live, leased) {
		t.Errorf("hooks report %v alive, want exactly the handed-out VMs %v", live, leased)
	}
}

func TestMetricsExported(t *testing.T) {
	reg := prometheus.NewRegistry()
	p, prov := newTestPool(t, fake.Options{}, func(c *Config) { c.Registry = reg })
	snap := prov.AddSnapshot(testSpec)
	if err := p.Register(stack("web", snap, 2, 3)); err != nil {
		t.Fatal(err)
	}
	waitReady(t, p, "web", 2)
	acquire(t, p, "web")
	waitReady(t, p, "web", 2)
	web := map[string]string{"pool": "web"}
	checks := map[string]float64{
		"warmpool_pool_depth":  2,
		"warmpool_pool_target": 2,
	}
	for name, want := range checks {
		if got := metricValue(t, reg, name, web); got != want {
			t.Errorf("%s = %v, want %v", name, got, want)
		}
	}
	if got := metricValue(t, reg, "warmpool_pool_acquires_total", map[string]string{"pool": "web", "outcome": "hit"}); got != 1 {
		t.Errorf("hits = %v", got)
	}
	if got := metricValue(t, reg, "warmpool_pool_acquire_duration_seconds", web); got != 1 {
		t.Errorf("acquire latency observations = %v", got)
	}
	if got := metricValue(t, reg, "warmpool_pool_restore_duration_seconds", web); got != 3 {
		t.Errorf("restore duration observations = %v, want 3", got)
	}
	// A second pool on the same registry is a configuration error.
	if _, err := New(Config{Provider: prov, Registry: reg}); err == nil {
		t.Error("second pool registered the same metrics")
	}
	if err := p.Unregister("web"); err != nil {
		t.Fatal(err)
	}
	if got := metricValue(t, reg, "warmpool_pool_depth", web); got != -1 {
		t.Errorf("depth of an unregistered pool still exported")
	}
}

// metricValue returns a counter's or gauge's value, a histogram's sample
// count, or -1 when no series matches.
func metricValue(t *testing.T, reg *prometheus.Registry, name string, labels map[string]string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	series:
		for _, m := range mf.GetMetric() {
			for _, lp := range m.GetLabel() {
				if want, ok := labels[lp.GetName()]; ok && want != lp.GetValue() {
					continue series
				}
			}
			switch {
			case m.Counter != nil:
				return m.GetCounter().GetValue()
			case m.Gauge != nil:
				return m.GetGauge().GetValue()
			case m.Histogram != nil:
				return float64(m.GetHistogram().GetSampleCount())
			}
		}
	}
	return -1
}

func TestJSONShapes(t *testing.T) {
	data, err := json.Marshal(Status{Name: "web", Template: "py", Min: 1, Max: 2, Generation: 3})
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(data, &m); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"name", "template", "min", "max", "ready", "restoring", "generation", "counters"} {
		if _, ok := m[k]; !ok {
			t.Errorf("pool JSON %s lacks %q", data, k)
		}
	}
	counters := m["counters"].(map[string]any)
	for _, k := range []string{"acquired", "hits", "waits", "timeouts", "evicted", "validation_failures"} {
		if _, ok := counters[k]; !ok {
			t.Errorf("counters JSON lacks %q", k)
		}
	}
	tm := Timings{Wait: 1500 * time.Microsecond, Handoff: 2 * time.Millisecond, Total: 4 * time.Millisecond}
	data, _ = json.Marshal(tm)
	if string(data) != `{"wait_ms":1.5,"handoff_ms":2,"total_ms":4}` {
		t.Errorf("timings JSON %s", data)
	}
	var back Timings
	if err := json.Unmarshal(data, &back); err != nil || back != tm {
		t.Errorf("timings round trip %+v, %v", back, err)
	}
}
