// Package providertest is the conformance suite every vm.Provider passes.
// A provider runs it from its own tests:
//
//	func TestConformance(t *testing.T) {
//		providertest.Run(t, func(t *testing.T) (vm.Provider, providertest.Fixture) {
//			return qemu.New(...), providertest.Fixture{Spec: spec, AgentPing: ping}
//		})
//	}
//
// The suite boots at most three VMs cold (one of them is cancelled early,
// one is only ballooned and destroyed without waiting for its guest) and
// restores a handful from one snapshot, so it stays quick for real
// hypervisors; a provider with vm.CapRootDisk boots one more, on the
// fixture's root disk, and restores three clones of it. Subtests that need
// an optional capability skip without it.
//
// The VM most subtests share is snapshotted as a template, so it is created
// with Spec.NoBalloon, as templates are; the balloon is tested on a VM of
// its own.
package providertest

import (
	"context"
	"errors"
	"net"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/warmpool/warmpool/vm"
)

// Fixture is what a provider's test hands to the suite.
type Fixture struct {
	// Spec is a valid spec that boots on this provider (kernel, initrd and
	// whatever else it needs). Required.
	Spec vm.Spec
	// AgentPing, when set, checks that a guest agent answers on conn; the
	// suite calls it on a fresh connection to every VM it resumes, so a
	// provider with CapAgent proves its channel works before and after a
	// restore. Nil means only DialAgent itself is checked.
	AgentPing func(ctx context.Context, conn net.Conn) error
	// Timeout bounds each provider call; zero means two minutes, enough for
	// a cold boot under software emulation on a busy machine.
	Timeout time.Duration
	// StopGrace is passed to Stop; zero means five seconds.
	StopGrace time.Duration
	// ConcurrentRestores is how many VMs are restored at once; zero means 3.
	ConcurrentRestores int
	// Kill ends a VM's hypervisor process from outside the provider, as a
	// crash would. Nil sends SIGKILL to VM.PID; a provider whose VMs have
	// no PID must set it for the exit-event case to run.
	Kill func(ctx context.Context, v vm.VM) error
	// ExitTimeout bounds how long an exit may take to be reported; zero
	// means ten seconds (a process killed on a loaded machine takes a
	// while to be torn down).
	ExitTimeout time.Duration
	// Disk is what the RootDisk case needs; required when the provider
	// has vm.CapRootDisk.
	Disk *DiskFixture
}

// Run runs the conformance suite against the provider newProvider returns.
// The provider must start with no VMs of its own.
func Run(t *testing.T, newProvider func(t *testing.T) (vm.Provider, Fixture)) {
	t.Helper()
	p, fx := newProvider(t)
	if fx.Timeout <= 0 {
		fx.Timeout = 2 * time.Minute
	}
	if fx.StopGrace <= 0 {
		fx.StopGrace = 5 * time.Second
	}
	if fx.ConcurrentRestores <= 0 {
		fx.ConcurrentRestores = 3
	}
	if fx.ExitTimeout <= 0 {
		fx.ExitTimeout = 10 * time.Second
	}
	s := &suite{p: p, fx: fx, ids: make(map[string]bool), snapDir: t.TempDir()}
	if err := fx.Spec.Validate(); err != nil {
		t.Fatalf("Fixture.Spec is not valid: %v", err)
	}
	s.baseline = s.listIDs(t)
	t.Cleanup(func() { s.cleanup(t) })

	t.Run("Capabilities", s.testCapabilities)
	t.Run("UnknownID", s.testUnknownID)
	t.Run("BadSpecRejected", s.testBadSpec)
	t.Run("CancelledContext", s.testCancelledCreate)
	t.Run("CreateInspectList", s.testCreate)
	t.Run("PauseResumeIdempotent", s.testPauseResume)
	t.Run("Agent", s.testAgent)
	t.Run("Balloon", s.testBalloon)
	t.Run("SnapshotOfRunningRejected", s.testSnapshotRunning)
	t.Run("SnapshotRestore", s.testSnapshotRestore)
	t.Run("ConcurrentRestores", s.testConcurrentRestores)
	t.Run("RootDisk", s.testRootDisk)
	t.Run("ExitEvents", s.testExitEvents)
	t.Run("RestoreCancelled", s.testRestoreCancelled)
	t.Run("RestoreCancelledAtAnyPoint", s.testRestoreCancelledAnywhere)
	t.Run("StopWithGrace", s.testStop)
	t.Run("Destroy", s.testDestroy)
	t.Run("CreateCancelledMidway", s.testCreateCancelledMidway)
	t.Run("NoVMLeft", s.testNoneLeft)
}

type suite struct {
	p        vm.Provider
	fx       Fixture
	baseline []string

	mu   sync.Mutex
	ids  map[string]bool // every VM the suite saw, for cleanup
	base vm.VM           // the cold-booted VM most subtests share
	snap vm.Snapshot
	// snapDir outlives the subtest that writes the snapshot because later
	// subtests restore from it.
	snapDir string
}

func (s *suite) ctx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), s.fx.Timeout)
	t.Cleanup(cancel)
	return ctx
}

func (s *suite) track(id string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.ids[id] = true
}

func (s *suite) listIDs(t *testing.T) []string {
	t.Helper()
	vms, err := s.p.List(s.ctx(t))
	if err != nil {
		t.Fatalf("List: %v", err)
	}
	ids := make([]string, 0, len(vms))
	for _, v := range vms {
		ids = append(ids, v.ID)
	}
	slices.Sort(ids)
	return ids
}

func (s *suite) listed(t *testing.T, id string) bool {
	t.Helper()
	return slices.Contains(s.listIDs(t), id)
}

// newIDs is what List shows beyond the baseline.
func (s *suite) newIDs(t *testing.T) []string {
	t.Helper()
	var out []string
	for _, id := range s.listIDs(t) {
		if !slices.Contains(s.baseline, id) {
			out = append(out, id)
		}
	}
	return out
}

func (s *suite) cleanup(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), s.fx.Timeout)
	defer cancel()
	vms, err := s.p.List(ctx)
	if err != nil {
		t.Errorf("cleanup: List: %v", err)
		return
	}
	for _, v := range vms {
		if slices.Contains(s.baseline, v.ID) {
			continue
		}
		if err := s.p.Destroy(ctx, v.ID); err != nil && !errors.Is(err, vm.ErrNotFound) {
			t.Errorf("cleanup: Destroy %s: %v", v.ID, err)
		}
	}
}

func (s *suite) needBase(t *testing.T) vm.VM {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.base.ID == "" {
		t.Skip("no VM to work on: CreateInspectList failed or the VM is gone")
	}
	return s.base
}

func (s *suite) snapshotter(t *testing.T) vm.Snapshotter {
	t.Helper()
	sn, ok := vm.As[vm.Snapshotter](s.p, vm.CapSnapshot)
	if !ok {
		t.Skip("provider has no snapshot capability")
	}
	return sn
}

func (s *suite) ping(t *testing.T, id string) {
	t.Helper()
	d, ok := vm.As[vm.AgentDialer](s.p, vm.CapAgent)
	if !ok {
		return
	}
	ctx := s.ctx(t)
	conn, err := d.DialAgent(ctx, id)
	if err != nil {
		t.Fatalf("DialAgent %s: %v", id, err)
	}
	defer conn.Close()
	if s.fx.AgentPing != nil {
		if err := s.fx.AgentPing(ctx, conn); err != nil {
			t.Fatalf("agent of %s does not answer: %v", id, err)
		}
	}
}

func wantStatus(ctx context.Context, t *testing.T, p vm.Provider, id string, want vm.Status) {
	t.Helper()
	got, err := p.Inspect(ctx, id)
	if err != nil {
		t.Fatalf("Inspect %s: %v", id, err)
	}
	if got.Status != want {
		t.Fatalf("Inspect %s: status %q, want %q", id, got.Status, want)
	}
}

func (s *suite) testCapabilities(t *testing.T) {
	caps := s.p.Capabilities()
	if caps == nil {
		t.Fatal("Capabilities() is nil; return an empty set instead")
	}
	ctx := s.ctx(t)
	check := func(c vm.Capability, implemented bool, call func() error) {
		switch {
		case caps.Has(c) && !implemented:
			t.Errorf("capability %q advertised but the interface is not implemented", c)
		case !caps.Has(c) && implemented:
			// Implementing the interface without the capability is allowed
			// only if every call says so.
			if err := call(); !errors.Is(err, vm.ErrUnsupported) {
				t.Errorf("capability %q not advertised, but its interface answers %v instead of vm.ErrUnsupported", c, err)
			}
		}
	}
	// The raw assertions here are the point: they check that the
	// capabilities vm.As trusts match the interfaces.
	sn, ok := s.p.(vm.Snapshotter)
	check(vm.CapSnapshot, ok, func() error {
		_, err := sn.Snapshot(ctx, "no-such-vm", t.TempDir())
		return err
	})
	b, ok := s.p.(vm.Ballooner)
	check(vm.CapBalloon, ok, func() error { _, err := b.BalloonStats(ctx, "no-such-vm"); return err })
	d, ok := s.p.(vm.AgentDialer)
	check(vm.CapAgent, ok, func() error {
		c, err := d.DialAgent(ctx, "no-such-vm")
		if c != nil {
			c.Close()
		}
		return err
	})
	su, ok := s.p.(vm.Suspender)
	check(vm.CapSuspend, ok, func() error { _, err := su.Suspend(ctx, "no-such-vm", t.TempDir()); return err })
	bp, ok := s.p.(vm.BootPreparer)
	check(vm.CapPrepareBoot, ok, func() error { _, err := bp.PrepareBoot(ctx, vm.Spec{}); return err })
	if s.p.Name() == "" {
		t.Error("Name() is empty")
	}
	if got := s.p.Info(ctx).Name; got != s.p.Name() {
		t.Errorf("Info().Name = %q, want Name() %q", got, s.p.Name())
	}
}

func (s *suite) testUnknownID(t *testing.T) {
	ctx := s.ctx(t)
	const id = "no-such-vm"
	calls := map[string]func() error{
		"Pause":   func() error { return s.p.Pause(ctx, id) },
		"Resume":  func() error { return s.p.Resume(ctx, id) },
		"Stop":    func() error { return s.p.Stop(ctx, id, time.Second) },
		"Destroy": func() error { return s.p.Destroy(ctx, id) },
		"Inspect": func() error { _, err := s.p.Inspect(ctx, id); return err },
	}
	if sn, ok := vm.As[vm.Snapshotter](s.p, vm.CapSnapshot); ok {
		calls["Snapshot"] = func() error { _, err := sn.Snapshot(ctx, id, t.TempDir()); return err }
	}
	for name, call := range calls {
		if err := call(); !errors.Is(err, vm.ErrNotFound) {
			t.Errorf("%s(%q) = %v, want vm.ErrNotFound", name, id, err)
		}
	}
}

func (s *suite) testBadSpec(t *testing.T) {
	ctx := s.ctx(t)
	bad := map[string]vm.Spec{}
	spec := s.fx.Spec
	spec.VCPUs = 0
	bad["zero vcpus"] = spec
	spec = s.fx.Spec
	spec.MemoryMiB = -1
	bad["negative memory"] = spec
	spec = s.fx.Spec
	spec.Name = "../escape"
	bad["path-like name"] = spec
	if s.p.Capabilities().Has(vm.CapNetwork) {
		spec = s.fx.Spec
		spec.NIC = &vm.NIC{MAC: "not-a-mac", Netns: "/run/netns/none", TAP: "tap0"}
		bad["NIC with a bad MAC"] = spec
		spec = s.fx.Spec
		spec.NIC = &vm.NIC{MAC: "03:00:00:00:00:01", Netns: "/run/netns/none", TAP: "tap0"}
		bad["NIC with a multicast MAC"] = spec
		spec = s.fx.Spec
		spec.NIC = &vm.NIC{MAC: "02:00:00:00:00:01", Netns: "/run/netns/none"}
		bad["NIC with a namespace but no TAP"] = spec
	}
	for what, spec := range bad {
		v, err := s.p.Create(ctx, spec)
		if err == nil {
			s.track(v.ID)
			t.Errorf("Create with %s succeeded (VM %s), want vm.ErrInvalid", what, v.ID)
			continue
		}
		if !errors.Is(err, vm.ErrInvalid) {
			t.Errorf("Create with %s = %v, want vm.ErrInvalid", what, err)
		}
	}
	if sn, ok := vm.As[vm.Snapshotter](s.p, vm.CapSnapshot); ok {
		_, err := sn.Restore(ctx, vm.Snapshot{})
		if !errors.Is(err, vm.ErrInvalid) {
			t.Errorf("Restore of a snapshot without ID = %v, want vm.ErrInvalid", err)
		}
		missing := vm.Snapshot{ID: "no-such-snapshot", Provider: s.p.Name(), Dir: t.TempDir() + "/missing", Spec: s.fx.Spec}
		_, err = sn.Restore(ctx, missing)
		if !errors.Is(err, vm.ErrNotFound) && !errors.Is(err, vm.ErrInvalid) {
			t.Errorf("Restore of a missing snapshot = %v, want vm.ErrNotFound or vm.ErrInvalid", err)
		}
	}
	if left := s.newIDs(t); len(left) > 0 {
		t.Errorf("rejected calls left VMs behind: %v", left)
	}
}

func (s *suite) testCancelledCreate(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	v, err := s.p.Create(ctx, s.fx.Spec)
	if err == nil {
		s.track(v.ID)
		t.Fatalf("Create with a cancelled context succeeded (VM %s)", v.ID)
	}
	if !errors.Is(err, context.Canceled) {
		t.Errorf("Create with a cancelled context = %v, want an error wrapping context.Canceled", err)
	}
	if left := s.newIDs(t); len(left) > 0 {
		t.Errorf("cancelled Create left VMs behind: %v", left)
	}
}

// templateSpec is the fixture's spec for a VM that will be snapshotted as a
// template.
func (s *suite) templateSpec() vm.Spec {
	spec := s.fx.Spec
	spec.NoBalloon = true
	return spec
}

func (s *suite) testCreate(t *testing.T) {
	ctx := s.ctx(t)
	spec := s.templateSpec()
	v, err := s.p.Create(ctx, spec)
	if err != nil {
		t.Fatalf("Create(%+v): %v", spec, err)
	}
	s.track(v.ID)
	if err := vm.ValidateName("id", v.ID); err != nil {
		t.Errorf("Create returned an ID that is not a valid name: %v", err)
	}
	if v.Status != vm.StatusRunning {
		t.Errorf("Create returned status %q, want running", v.Status)
	}
	if v.Provider != s.p.Name() {
		t.Errorf("VM provider %q, want %q", v.Provider, s.p.Name())
	}
	if v.Spec.VCPUs != s.fx.Spec.VCPUs || v.Spec.MemoryMiB != s.fx.Spec.MemoryMiB {
		t.Errorf("VM spec %d vCPUs %d MiB, want %d vCPUs %d MiB", v.Spec.VCPUs, v.Spec.MemoryMiB, s.fx.Spec.VCPUs, s.fx.Spec.MemoryMiB)
	}
	got, err := s.p.Inspect(ctx, v.ID)
	if err != nil {
		t.Fatalf("Inspect %s: %v", v.ID, err)
	}
	if got.ID != v.ID || got.Status != vm.StatusRunning {
		t.Errorf("Inspect %s = %+v, want the same running VM", v.ID, got)
	}
	if !s.listed(t, v.ID) {
		t.Errorf("List does not include the new VM %s", v.ID)
	}
	s.mu.Lock()
	s.base = v
	s.mu.Unlock()
}

func (s *suite) testPauseResume(t *testing.T) {
	base := s.needBase(t)
	ctx := s.ctx(t)
	for i := range 2 {
		if err := s.p.Pause(ctx, base.ID); err != nil {
			t.Fatalf("Pause #%d: %v", i+1, err)
		}
	}
	wantStatus(ctx, t, s.p, base.ID, vm.StatusPaused)
	for i := range 2 {
		if err := s.p.Resume(ctx, base.ID); err != nil {
			t.Fatalf("Resume #%d: %v", i+1, err)
		}
	}
	wantStatus(ctx, t, s.p, base.ID, vm.StatusRunning)
	s.ping(t, base.ID)
}

func (s *suite) testAgent(t *testing.T) {
	base := s.needBase(t)
	if _, ok := vm.As[vm.AgentDialer](s.p, vm.CapAgent); !ok {
		t.Skip("provider has no agent capability")
	}
	// Two rounds: every dial must give a fresh, working connection.
	s.ping(t, base.ID)
	s.ping(t, base.ID)
}

func (s *suite) testBalloon(t *testing.T) {
	base := s.needBase(t)
	b, ok := vm.As[vm.Ballooner](s.p, vm.CapBalloon)
	if !ok {
		t.Skip("provider has no balloon capability")
	}
	ctx := s.ctx(t)
	half := base.Spec.MemoryMiB / 2
	// The shared VM was created without a balloon: asking for one must say
	// so, not pretend.
	if err := b.SetBalloon(ctx, base.ID, half); !errors.Is(err, vm.ErrUnsupported) {
		t.Errorf("SetBalloon on a VM created with NoBalloon = %v, want vm.ErrUnsupported", err)
	}
	if _, err := b.BalloonStats(ctx, base.ID); !errors.Is(err, vm.ErrUnsupported) {
		t.Errorf("BalloonStats on a VM created with NoBalloon = %v, want vm.ErrUnsupported", err)
	}

	spec := s.fx.Spec
	spec.NoBalloon = false
	v, err := s.p.Create(ctx, spec)
	if err != nil {
		t.Fatalf("Create a VM with a balloon: %v", err)
	}
	s.track(v.ID)
	defer func() {
		if err := s.p.Destroy(ctx, v.ID); err != nil {
			t.Errorf("Destroy ballooned VM %s: %v", v.ID, err)
		}
	}()
	if err := b.SetBalloon(ctx, v.ID, half); err != nil {
		t.Fatalf("SetBalloon %d MiB: %v", half, err)
	}
	st, err := b.BalloonStats(ctx, v.ID)
	if err != nil {
		t.Fatalf("BalloonStats: %v", err)
	}
	if st.TargetMiB != half {
		t.Errorf("balloon target %d MiB after SetBalloon(%d)", st.TargetMiB, half)
	}
	for _, bad := range []int{-1, v.Spec.MemoryMiB + 1} {
		if err := b.SetBalloon(ctx, v.ID, bad); !errors.Is(err, vm.ErrInvalid) {
			t.Errorf("SetBalloon(%d) = %v, want vm.ErrInvalid", bad, err)
		}
	}
	if err := b.SetBalloon(ctx, v.ID, v.Spec.MemoryMiB); err != nil {
		t.Fatalf("SetBalloon back to %d MiB: %v", v.Spec.MemoryMiB, err)
	}
}

func (s *suite) testSnapshotRunning(t *testing.T) {
	base := s.needBase(t)
	sn := s.snapshotter(t)
	ctx := s.ctx(t)
	wantStatus(ctx, t, s.p, base.ID, vm.StatusRunning)
	_, err := sn.Snapshot(ctx, base.ID, t.TempDir())
	if !errors.Is(err, vm.ErrInvalidState) {
		t.Errorf("Snapshot of a running VM = %v, want vm.ErrInvalidState", err)
	}
	wantStatus(ctx, t, s.p, base.ID, vm.StatusRunning)
}

func (s *suite) testSnapshotRestore(t *testing.T) {
	base := s.needBase(t)
	sn := s.snapshotter(t)
	ctx := s.ctx(t)
	if err := s.p.Pause(ctx, base.ID); err != nil {
		t.Fatalf("Pause: %v", err)
	}
	snap, err := sn.Snapshot(ctx, base.ID, s.snapDir)
	if err != nil {
		t.Fatalf("Snapshot of paused %s: %v", base.ID, err)
	}
	if snap.ID == "" || snap.Provider != s.p.Name() {
		t.Errorf("snapshot has ID %q provider %q, want an ID and %q", snap.ID, snap.Provider, s.p.Name())
	}
	wantStatus(ctx, t, s.p, base.ID, vm.StatusPaused)
	s.mu.Lock()
	s.snap = snap
	s.mu.Unlock()

	v, err := sn.Restore(ctx, snap)
	if err != nil {
		t.Fatalf("Restore from %s: %v", snap.ID, err)
	}
	s.track(v.ID)
	if v.ID == base.ID {
		t.Fatalf("restored VM reuses the template's ID %s", v.ID)
	}
	if v.Status != vm.StatusPaused {
		t.Errorf("Restore returned status %q, want paused", v.Status)
	}
	if v.Snapshot != snap.ID {
		t.Errorf("restored VM names snapshot %q, want %q", v.Snapshot, snap.ID)
	}
	if v.Spec.VCPUs != base.Spec.VCPUs || v.Spec.MemoryMiB != base.Spec.MemoryMiB {
		t.Errorf("restored VM has %d vCPUs %d MiB, template had %d and %d", v.Spec.VCPUs, v.Spec.MemoryMiB, base.Spec.VCPUs, base.Spec.MemoryMiB)
	}
	wantStatus(ctx, t, s.p, v.ID, vm.StatusPaused)
	if b, ok := vm.As[vm.Ballooner](s.p, vm.CapBalloon); ok {
		// A clone has its template's devices: no balloon either.
		if err := b.SetBalloon(ctx, v.ID, v.Spec.MemoryMiB/2); !errors.Is(err, vm.ErrUnsupported) {
			t.Errorf("SetBalloon on a clone of a NoBalloon template = %v, want vm.ErrUnsupported", err)
		}
	}
	if err := s.p.Resume(ctx, v.ID); err != nil {
		t.Fatalf("Resume restored %s: %v", v.ID, err)
	}
	wantStatus(ctx, t, s.p, v.ID, vm.StatusRunning)
	s.ping(t, v.ID)
	if err := s.p.Destroy(ctx, v.ID); err != nil {
		t.Fatalf("Destroy restored %s: %v", v.ID, err)
	}
	// The template must survive its clones.
	if err := s.p.Resume(ctx, base.ID); err != nil {
		t.Fatalf("Resume template %s after snapshot: %v", base.ID, err)
	}
	s.ping(t, base.ID)
}

func (s *suite) needSnapshot(t *testing.T) (vm.Snapshotter, vm.Snapshot) {
	t.Helper()
	sn := s.snapshotter(t)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.snap.ID == "" {
		t.Skip("no snapshot: SnapshotRestore failed")
	}
	return sn, s.snap
}

func (s *suite) testConcurrentRestores(t *testing.T) {
	sn, snap := s.needSnapshot(t)
	ctx := s.ctx(t)
	n := s.fx.ConcurrentRestores
	vms := make([]vm.VM, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			vms[i], errs[i] = sn.Restore(ctx, snap)
			if errs[i] == nil {
				s.track(vms[i].ID)
			}
		})
	}
	wg.Wait()
	seen := map[string]bool{}
	for i := range n {
		if errs[i] != nil {
			t.Errorf("concurrent Restore #%d: %v", i, errs[i])
			continue
		}
		if seen[vms[i].ID] {
			t.Errorf("two concurrent restores returned the same ID %s", vms[i].ID)
		}
		seen[vms[i].ID] = true
		if vms[i].Status != vm.StatusPaused {
			t.Errorf("restored %s has status %q, want paused", vms[i].ID, vms[i].Status)
		}
	}
	ids := s.listIDs(t)
	for id := range seen {
		if !slices.Contains(ids, id) {
			t.Errorf("restored %s missing from List", id)
		}
	}
	for id := range seen {
		if err := s.p.Destroy(ctx, id); err != nil {
			t.Errorf("Destroy %s: %v", id, err)
		}
	}
}

func (s *suite) testRestoreCancelled(t *testing.T) {
	sn, snap := s.needSnapshot(t)
	before := s.newIDs(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if v, err := sn.Restore(ctx, snap); err == nil {
		s.track(v.ID)
		t.Errorf("Restore with a cancelled context succeeded (VM %s)", v.ID)
	} else if !errors.Is(err, context.Canceled) {
		t.Errorf("Restore with a cancelled context = %v, want an error wrapping context.Canceled", err)
	}
	// Cancelled while restoring: whatever the provider got to must be gone.
	ctx, cancel = context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if v, err := sn.Restore(ctx, snap); err == nil {
		s.track(v.ID)
		if err := s.p.Destroy(s.ctx(t), v.ID); err != nil {
			t.Errorf("Destroy %s: %v", v.ID, err)
		}
	}
	if after := s.newIDs(t); !slices.Equal(before, after) {
		t.Errorf("cancelled restores left VMs behind: before %v, after %v", before, after)
	}
}

// testRestoreCancelledAnywhere cancels restores at points spread over a
// whole restore, the last ones just as it completes: a VM the provider has
// made must come back to the caller or be gone, never run on unknown. (A pool
// shutting down cancels its restores at any such point.)
func (s *suite) testRestoreCancelledAnywhere(t *testing.T) {
	sn, snap := s.needSnapshot(t)
	before := s.newIDs(t)
	start := time.Now()
	v, err := sn.Restore(s.ctx(t), snap)
	if err != nil {
		t.Fatalf("Restore: %v", err)
	}
	took := time.Since(start)
	s.track(v.ID)
	if err := s.p.Destroy(s.ctx(t), v.ID); err != nil {
		t.Fatalf("Destroy %s: %v", v.ID, err)
	}
	for _, pct := range []time.Duration{30, 60, 80, 90, 95, 100, 105, 110} {
		ctx, cancel := context.WithTimeout(context.Background(), took*pct/100)
		v, err := sn.Restore(ctx, snap)
		cancel()
		if err == nil {
			s.track(v.ID)
			if err := s.p.Destroy(s.ctx(t), v.ID); err != nil {
				t.Errorf("Destroy %s: %v", v.ID, err)
			}
		}
		if after := s.newIDs(t); !slices.Equal(before, after) {
			t.Fatalf("a restore cancelled after %d%% of %v (%v) left VMs behind: before %v, after %v", pct, took, err, before, after)
		}
	}
}

func (s *suite) testStop(t *testing.T) {
	base := s.needBase(t)
	ctx := s.ctx(t)
	if err := s.p.Stop(ctx, base.ID, s.fx.StopGrace); err != nil {
		t.Fatalf("Stop %s with %v grace: %v", base.ID, s.fx.StopGrace, err)
	}
	wantStatus(ctx, t, s.p, base.ID, vm.StatusStopped)
	if !s.listed(t, base.ID) {
		t.Errorf("stopped VM %s is no longer listed; only Destroy removes it", base.ID)
	}
	if err := s.p.Resume(ctx, base.ID); !errors.Is(err, vm.ErrInvalidState) {
		t.Errorf("Resume of stopped %s = %v, want vm.ErrInvalidState", base.ID, err)
	}
}

func (s *suite) testDestroy(t *testing.T) {
	base := s.needBase(t)
	ctx := s.ctx(t)
	if err := s.p.Destroy(ctx, base.ID); err != nil {
		t.Fatalf("Destroy %s: %v", base.ID, err)
	}
	if s.listed(t, base.ID) {
		t.Errorf("destroyed VM %s is still listed", base.ID)
	}
	if _, err := s.p.Inspect(ctx, base.ID); !errors.Is(err, vm.ErrNotFound) {
		t.Errorf("Inspect of destroyed %s = %v, want vm.ErrNotFound", base.ID, err)
	}
	if err := s.p.Destroy(ctx, base.ID); !errors.Is(err, vm.ErrNotFound) {
		t.Errorf("second Destroy of %s = %v, want vm.ErrNotFound", base.ID, err)
	}
	s.mu.Lock()
	s.base = vm.VM{}
	s.mu.Unlock()
}

func (s *suite) testCreateCancelledMidway(t *testing.T) {
	before := s.newIDs(t)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	v, err := s.p.Create(ctx, s.fx.Spec)
	if err == nil {
		// Fast enough to finish in time; nothing to check but cleanup.
		s.track(v.ID)
		if err := s.p.Destroy(s.ctx(t), v.ID); err != nil {
			t.Errorf("Destroy %s: %v", v.ID, err)
		}
	}
	if after := s.newIDs(t); !slices.Equal(before, after) {
		t.Errorf("Create cancelled after 50ms (%v) left VMs behind: before %v, after %v", err, before, after)
	}
}

func (s *suite) testNoneLeft(t *testing.T) {
	if left := s.newIDs(t); len(left) > 0 {
		t.Errorf("VMs left after the suite destroyed everything it made: %v", left)
	}
}
