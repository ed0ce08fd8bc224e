package lifecycle

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/warmpool/warmpool/events"
	"github.com/warmpool/warmpool/vm"
)

func states(evs []events.Event, subject string) []string {
	var out []string
	for _, e := range evs {
		if e.Kind == "machine.state" && e.Subject == subject {
			out = append(out, e.Detail["to"].(string))
		}
	}
	return out
}

func TestEnsureFromNothing(t *testing.T) {
	h := newHarness(t, nil)
	m := h.ensure(baseSpec("dev"))
	v, ok := h.p.vm(m.VMID)
	if !ok || v.Status != vm.StatusRunning {
		t.Fatalf("ensure returned vm %q which the provider has as %+v", m.VMID, v)
	}
	if v.Spec.VCPUs != 1 || v.Spec.MemoryMiB != 256 || v.Spec.Labels[LabelMachine] != "dev" {
		t.Errorf("vm created with spec %+v", v.Spec)
	}
	want := []string{"creating", "created", "starting", "running"}
	if got := states(h.drain(), "dev"); !slices.Equal(got, want) {
		t.Errorf("state events %v, want %v", got, want)
	}
	h.mu.Lock()
	last := h.changes[len(h.changes)-1]
	h.mu.Unlock()
	if last.State != Running || last.VMID != m.VMID || last.Desired != DesiredRunning {
		t.Errorf("last persisted record %+v, want running %s", last, m.VMID)
	}
	if _, err := h.mgr.Get("nope"); !errors.Is(err, vm.ErrNotFound) {
		t.Errorf("Get(unknown) = %v, want ErrNotFound", err)
	}
	if _, err := h.mgr.Ensure(context.Background(), MachineSpec{Name: "bad", VCPUs: 0, MemoryMiB: 256}); !errors.Is(err, vm.ErrInvalid) {
		t.Errorf("Ensure(bad spec) = %v, want ErrInvalid", err)
	}
}

func TestSecondEnsureReturnsAtOnce(t *testing.T) {
	h := newHarness(t, nil)
	first := h.ensure(baseSpec("dev"))
	h.drain()
	second := h.ensure(baseSpec("dev"))
	if second.VMID != first.VMID {
		t.Errorf("second ensure moved the machine from %s to %s", first.VMID, second.VMID)
	}
	if creates, _, _ := h.p.counts(); creates != 1 {
		t.Errorf("%d creates, want 1", creates)
	}
	if got := states(h.drain(), "dev"); len(got) != 0 {
		t.Errorf("second ensure caused transitions %v", got)
	}
}

func TestConcurrentEnsuresShareOneCreate(t *testing.T) {
	h := newHarness(t, nil)
	gate := make(chan struct{})
	h.p.createGate = gate
	const n = 8
	var wg sync.WaitGroup
	ids := make([]string, n)
	errs := make([]error, n)
	for i := range n {
		wg.Go(func() {
			m, err := h.mgr.Ensure(context.Background(), baseSpec("dev"))
			ids[i], errs[i] = m.VMID, err
		})
	}
	h.waitState("dev", Creating)
	time.Sleep(20 * time.Millisecond) // let the other ensures queue up
	close(gate)
	wg.Wait()
	for i := range n {
		if errs[i] != nil || ids[i] != ids[0] {
			t.Errorf("ensure %d: vm %q, err %v; want %q", i, ids[i], errs[i], ids[0])
		}
	}
	if creates, _, _ := h.p.counts(); creates != 1 {
		t.Errorf("%d creates for %d concurrent ensures, want 1", creates, n)
	}
}

func TestDriftRecreatesAndNamesField(t *testing.T) {
	cases := map[string]func(*MachineSpec){
		"vcpus":         func(s *MachineSpec) { s.VCPUs = 2 },
		"memory_mib":    func(s *MachineSpec) { s.MemoryMiB = 512 },
		"kernel":        func(s *MachineSpec) { s.KernelDigest = "sha256:new" },
		"cmdline":       func(s *MachineSpec) { s.Cmdline = "console=ttyS0 quiet" },
		"data_disk_mib": func(s *MachineSpec) { s.DataDiskMiB = 32 },
	}
	for field, mutate := range cases {
		t.Run(field, func(t *testing.T) {
			h := newHarness(t, nil)
			spec := baseSpec("dev")
			old := h.ensure(spec)
			mutate(&spec)
			h.drain()
			m := h.ensure(spec)
			if m.VMID == old.VMID {
				t.Fatalf("changing %s kept vm %s", field, m.VMID)
			}
			if _, alive := h.p.vm(old.VMID); alive {
				t.Errorf("old vm %s still exists after recreate", old.VMID)
			}
			if m.Spec != spec {
				t.Errorf("machine spec %+v, want %+v", m.Spec, spec)
			}
			evs := h.drain()
			var drift []events.Event
			for _, e := range evs {
				if e.Kind == "machine.drift" {
					drift = append(drift, e)
				}
			}
			if len(drift) != 1 || !slices.Equal(drift[0].Detail["fields"].([]string), []string{field}) {
				t.Errorf("drift events %v, want one naming [%s]", drift, field)
			}
			want := []string{"stopping", "stopped", "creating", "created", "starting", "running"}
			if got := states(evs, "dev"); !slices.Equal(got, want) {
				t.Errorf("transitions %v, want %v", got, want)
			}
			// The same spec again is no drift.
			h.ensure(spec)
			if creates, _, _ := h.p.counts(); creates != 2 {
				t.Errorf("%d creates, want 2", creates)
			}
		})
	}
}

func TestDataDiskSurvivesRecreate(t *testing.T) {
	h := newHarness(t, nil)
	spec := baseSpec("dev")
	spec.DataDiskMiB = 64
	first := h.ensure(spec)
	disk := filepath.Join(h.cfg.StateDir, "machines", "dev", "data.img")
	v, _ := h.p.vm(first.VMID)
	if v.Spec.DataDisk != disk {
		t.Fatalf("vm data disk %q, want %q", v.Spec.DataDisk, disk)
	}
	fi, err := os.Stat(disk)
	if err != nil || fi.Size() != 64<<20 {
		t.Fatalf("data disk: %v, size %d", err, fi.Size())
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && st.Blocks*512 >= 1<<20 {
		t.Errorf("data disk uses %d bytes on disk, want sparse", st.Blocks*512)
	}
	payload := []byte("precious data written by the guest")
	f, err := os.OpenFile(disk, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(payload, 10<<20); err != nil {
		t.Fatal(err)
	}
	f.Close()

	spec.MemoryMiB = 512
	spec.DataDiskMiB = 128 // growing keeps the data too
	second := h.ensure(spec)
	if second.VMID == first.VMID {
		t.Fatal("memory change did not recreate")
	}
	got := make([]byte, len(payload))
	f, err = os.Open(disk)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.ReadAt(got, 10<<20); err != nil || !bytes.Equal(got, payload) {
		t.Fatalf("data disk after recreate holds %q (%v), want %q", got, err, payload)
	}
	if fi, _ := f.Stat(); fi.Size() != 128<<20 {
		t.Errorf("data disk size %d after growing, want %d", fi.Size(), 128<<20)
	}
	// Shrinking would cut data off: refused before anything is touched.
	spec.DataDiskMiB = 16
	if _, err := h.mgr.Ensure(context.Background(), spec); !errors.Is(err, vm.ErrInvalid) {
		t.Errorf("shrinking the data disk: %v, want ErrInvalid", err)
	}
	if m, _ := h.mgr.Get("dev"); m.VMID != second.VMID || m.State != Running {
		t.Errorf("refused shrink changed the machine: %+v", m)
	}
	// Stopping keeps the disk as well.
	if err := h.mgr.Stop(context.Background(), "dev", false); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(disk); err != nil {
		t.Errorf("data disk gone after stop: %v", err)
	}
}

func TestBackoffThenGiveUpThenEnsureRetries(t *testing.T) {
	h := newHarness(t, func(c *Config) {
		c.Backoff = Backoff{Initial: time.Second, Max: 3 * time.Second, MaxAttempts: 4}
	})
	boom := errors.New("out of memory")
	h.p.createErrs = []error{boom, boom, boom, boom}
	done := make(chan error, 1)
	go func() {
		_, err := h.mgr.Ensure(context.Background(), baseSpec("dev"))
		done <- err
	}()
	// Delays double from Initial and are capped at Max.
	for _, want := range []time.Duration{time.Second, 2 * time.Second, 3 * time.Second} {
		e := h.waitEvent("dev", "machine.recovering", nil)
		if got := time.Duration(e.Detail["delay_ms"].(int64)) * time.Millisecond; got != want {
			t.Fatalf("recovery delay %v, want %v", got, want)
		}
		// Nothing happens before the delay is over.
		h.clock.Advance(want - time.Millisecond)
		time.Sleep(10 * time.Millisecond)
		if m, _ := h.mgr.Get("dev"); m.State != Failed {
			t.Fatalf("state %s before the backoff delay ended, want failed", m.State)
		}
		h.clock.Advance(time.Millisecond)
	}
	e := h.waitEvent("dev", "machine.gave_up", nil)
	if e.Detail["attempts"] != 4 {
		t.Errorf("gave up after %v attempts, want 4", e.Detail["attempts"])
	}
	if err := <-done; !errors.Is(err, ErrGaveUp) {
		t.Fatalf("Ensure = %v, want ErrGaveUp", err)
	}
	m, _ := h.mgr.Get("dev")
	if m.State != Failed || m.Attempts != 4 || m.LastError == nil || !bytes.Contains([]byte(*m.LastError), []byte("out of memory")) {
		t.Fatalf("after giving up: %+v (last error %s)", m, deref(m.LastError))
	}
	// Given up means no more attempts on its own...
	h.clock.Advance(time.Hour)
	time.Sleep(10 * time.Millisecond)
	if creates, _, _ := h.p.counts(); creates != 4 {
		t.Errorf("%d creates after giving up, want 4", creates)
	}
	// ...until someone asks again; success resets the count.
	m = h.ensure(baseSpec("dev"))
	if m.Attempts != 0 || m.LastError != nil {
		t.Errorf("after success: attempts %d, last error %s", m.Attempts, deref(m.LastError))
	}
	h.waitEvent("dev", "machine.recovered", nil)
}

func TestBackoffResetsOnSuccess(t *testing.T) {
	h := newHarness(t, func(c *Config) {
		c.Backoff = Backoff{Initial: time.Second, Max: time.Minute, MaxAttempts: 10}
	})
	boom := errors.New("boom")
	h.p.createErrs = []error{boom, boom}
	go func() { _, _ = h.mgr.Ensure(context.Background(), baseSpec("dev")) }()
	h.waitEvent("dev", "machine.recovering", nil)
	h.clock.Advance(time.Second)
	h.waitEvent("dev", "machine.recovering", nil)
	h.clock.Advance(2 * time.Second)
	m := h.waitState("dev", Running)
	// A later crash starts again from Initial, not from 4s.
	h.p.kill(m.VMID)
	h.clock.Advance(h.cfg.HealthInterval)
	e := h.waitEvent("dev", "machine.recovering", nil)
	if e.Detail["delay_ms"] != int64(1000) {
		t.Errorf("delay after reset %v ms, want 1000", e.Detail["delay_ms"])
	}
}

func TestHealthLoopRecoversKilledVM(t *testing.T) {
	h := newHarness(t, nil)
	old := h.ensure(baseSpec("dev"))
	h.p.kill(old.VMID)
	h.clock.Advance(h.cfg.HealthInterval)
	e := h.waitEvent("dev", "machine.health_failed", nil)
	if e.Detail["process_gone"] != true {
		t.Errorf("health_failed %v, want process_gone", e.Detail)
	}
	h.waitState("dev", Failed)
	r := h.waitEvent("dev", "machine.recovering", nil)
	if r.Detail["delay_ms"] != int64(1000) {
		t.Errorf("recovering %v, want a 1s delay", r.Detail)
	}
	h.clock.Advance(time.Second)
	h.waitEvent("dev", "machine.recovered", nil)
	m := h.waitState("dev", Running)
	if m.VMID == old.VMID {
		t.Errorf("recovered machine still on dead vm %s", m.VMID)
	}
	if _, ok := h.p.vm(old.VMID); ok {
		t.Errorf("dead vm %s not destroyed", old.VMID)
	}
}

func TestHealthLoopNeedsConsecutiveFailures(t *testing.T) {
	h := newHarness(t, nil)
	m := h.ensure(baseSpec("dev"))
	h.p.setAgentDead(m.VMID, true)
	for i := 1; i < h.cfg.HealthFailures; i++ {
		h.clock.Advance(h.cfg.HealthInterval)
		e := h.waitEvent("dev", "machine.ping_failed", nil)
		if e.Detail["failures"] != i {
			t.Fatalf("ping_failed %v, want failures %d", e.Detail, i)
		}
		if got, _ := h.mgr.Get("dev"); got.State != Running {
			t.Fatalf("state %s after %d failed pings, want running", got.State, i)
		}
	}
	h.clock.Advance(h.cfg.HealthInterval)
	h.waitEvent("dev", "machine.health_failed", nil)
	h.waitEvent("dev", "machine.recovering", nil)
	h.clock.Advance(time.Second)
	h.waitEvent("dev", "machine.recovered", nil)
}

func TestMissingVMRecreatedWithoutCountingRetry(t *testing.T) {
	// With one attempt allowed, a counted failure would give up at once.
	h := newHarness(t, func(c *Config) { c.Backoff.MaxAttempts = 1 })
	old := h.ensure(baseSpec("dev"))
	h.p.vanish(old.VMID)
	h.clock.Advance(h.cfg.HealthInterval)
	e := h.waitEvent("dev", "machine.recovering", nil)
	if e.Detail["counted"] != false || e.Detail["delay_ms"] != int64(0) {
		t.Errorf("recovering %v, want immediate and not counted", e.Detail)
	}
	h.waitEvent("dev", "machine.recovered", nil)
	m := h.waitState("dev", Running)
	if m.VMID == old.VMID || m.Attempts != 0 {
		t.Errorf("after vanishing: vm %s attempts %d", m.VMID, m.Attempts)
	}
	for _, e := range h.drain() {
		if e.Kind == "machine.gave_up" {
			t.Errorf("gave up on a vanished vm: %v", e.Detail)
		}
	}
}

func TestHoldsCountAndExpire(t *testing.T) {
	h := newHarness(t, func(c *Config) {
		c.Idle = IdlePolicy{ShrinkAfter: 10 * time.Minute, ReserveMiB: 64}
		c.GuestMemUsed = func(context.Context, vm.VM) (int, error) { return 100, nil }
	})
	h.ensure(baseSpec("dev"))
	ctx := context.Background()
	short, err := h.mgr.Hold(ctx, "dev", "ci-job", 5*time.Minute)
	if err != nil || short.ExpiresAt == nil || short.Owner != "ci-job" {
		t.Fatalf("Hold = %+v, %v", short, err)
	}
	long, err := h.mgr.Hold(ctx, "dev", "docker", 0)
	if err != nil || long.ExpiresAt != nil {
		t.Fatalf("Hold = %+v, %v", long, err)
	}
	if m, _ := h.mgr.Get("dev"); len(m.Holds) != 2 {
		t.Fatalf("holds %v, want 2", m.Holds)
	}
	h.clock.Advance(5 * time.Minute)
	e := h.waitEvent("dev", "machine.hold_expired", nil)
	if e.Detail["hold"] != short.ID {
		t.Errorf("expired %v, want %s", e.Detail["hold"], short.ID)
	}
	// One hold left: no idling however long it stays.
	h.clock.Advance(time.Hour)
	time.Sleep(10 * time.Millisecond)
	if m, _ := h.mgr.Get("dev"); m.State != Running || len(m.Holds) != 1 {
		t.Fatalf("held machine: state %s, holds %v", m.State, m.Holds)
	}
	if err := h.mgr.Unhold("dev", "h-nope"); !errors.Is(err, vm.ErrNotFound) {
		t.Errorf("Unhold(unknown) = %v, want ErrNotFound", err)
	}
	if err := h.mgr.Unhold("dev", long.ID); err != nil {
		t.Fatal(err)
	}
	// The idle clock starts when the last hold goes.
	h.clock.Advance(9 * time.Minute)
	time.Sleep(10 * time.Millisecond)
	if m, _ := h.mgr.Get("dev"); m.State != Running {
		t.Fatalf("state %s 9m after the last unhold, want running", m.State)
	}
	h.clock.Advance(time.Minute)
	h.waitState("dev", Idle)
	if _, err := h.mgr.Hold(ctx, "dev", "x", -time.Second); !errors.Is(err, vm.ErrInvalid) {
		t.Errorf("negative ttl: %v, want ErrInvalid", err)
	}
}

func TestIdleShrinkThenSuspendThenEnsureRestores(t *testing.T) {
	used := 100
	h := newHarness(t, func(c *Config) {
		c.Idle = IdlePolicy{ShrinkAfter: 10 * time.Minute, SuspendAfter: 30 * time.Minute, ReserveMiB: 64}
		c.GuestMemUsed = func(context.Context, vm.VM) (int, error) { return used, nil }
	})
	m := h.ensure(baseSpec("dev"))
	h.p.writeMemory(m.VMID, "counter", "42")

	h.clock.Advance(10*time.Minute - time.Second)
	time.Sleep(10 * time.Millisecond)
	if got, _ := h.mgr.Get("dev"); got.State != Running {
		t.Fatalf("state %s before ShrinkAfter, want running", got.State)
	}
	h.clock.Advance(time.Second)
	idle := h.waitState("dev", Idle)
	if idle.BalloonMiB == nil || *idle.BalloonMiB != used+64 {
		t.Fatalf("idle balloon %v, want guest used %d + reserve 64", idle.BalloonMiB, used)
	}
	e := h.waitEvent("dev", "machine.idle", nil)
	if e.Detail["guest_used_mib"] != used {
		t.Errorf("idle event %v", e.Detail)
	}

	// Activity wakes it: the balloon goes back to the full size.
	h.mgr.Touch("dev")
	woke := h.waitState("dev", Running)
	if woke.BalloonMiB != nil {
		t.Errorf("balloon %d after waking, want full (null)", *woke.BalloonMiB)
	}
	h.p.mu.Lock()
	sets := slices.Clone(h.p.balloonSets)
	h.p.mu.Unlock()
	if !slices.Equal(sets, []int{164, 256}) {
		t.Errorf("balloon targets %v, want [164 256]", sets)
	}

	// A different guest load gives a different idle size: never a constant.
	used = 180
	h.clock.Advance(10 * time.Minute)
	if idle := h.waitState("dev", Idle); *idle.BalloonMiB != 244 {
		t.Errorf("idle balloon %d, want 244", *idle.BalloonMiB)
	}
	h.clock.Advance(20 * time.Minute)
	sus := h.waitState("dev", Suspended)
	if sus.VMID != "" || sus.Snapshot == nil {
		t.Fatalf("suspended machine: vm %q snapshot %v", sus.VMID, sus.Snapshot)
	}
	if _, ok := h.p.vm(m.VMID); ok {
		t.Errorf("suspended machine's vm %s still exists", m.VMID)
	}
	if _, err := os.Stat(sus.Snapshot.Dir); err != nil {
		t.Fatalf("snapshot dir: %v", err)
	}
	// Suspended machines are not health-checked, so time passing does nothing.
	h.clock.Advance(24 * time.Hour)

	back := h.ensure(baseSpec("dev"))
	if got := h.p.readMemory(back.VMID, "counter"); got != "42" {
		t.Errorf("guest memory after suspend+ensure: counter=%q, want 42", got)
	}
	if _, _, restores := h.p.counts(); restores != 1 {
		t.Errorf("%d restores, want 1", restores)
	}
	if creates, _, _ := h.p.counts(); creates != 1 {
		t.Errorf("%d creates, want 1 (resume must not cold boot)", creates)
	}
	if _, err := os.Stat(sus.Snapshot.Dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("used snapshot not removed: %v", err)
	}
	if back.BalloonMiB != nil || back.Snapshot != nil {
		t.Errorf("restored machine: balloon %v snapshot %v", back.BalloonMiB, back.Snapshot)
	}
}

func TestIdleOffByDefault(t *testing.T) {
	h := newHarness(t, nil)
	h.ensure(baseSpec("dev"))
	h.clock.Advance(1000 * time.Hour)
	time.Sleep(10 * time.Millisecond)
	if m, _ := h.mgr.Get("dev"); m.State != Running {
		t.Errorf("state %s with idle policy off, want running", m.State)
	}
}

func TestStopGracefulUsesAgentShutdown(t *testing.T) {
	h := newHarness(t, nil)
	var shutdowns int
	h.cfg.Shutdown = func(_ context.Context, v vm.VM) error {
		shutdowns++
		h.p.kill(v.ID) // the guest powers itself off
		return nil
	}
	h.newManager()
	m := h.ensure(baseSpec("dev"))
	if err := h.mgr.Stop(context.Background(), "dev", false); err != nil {
		t.Fatal(err)
	}
	if got, _ := h.mgr.Get("dev"); got.State != Stopped || got.Desired != DesiredStopped {
		t.Fatalf("after stop: %+v", got)
	}
	if shutdowns != 1 {
		t.Errorf("%d agent shutdowns, want 1", shutdowns)
	}
	// The powered-off VM is destroyed at once: a stopped machine holds none.
	if got, _ := h.mgr.Get("dev"); got.VMID != "" {
		t.Errorf("stopped machine still names vm %s", got.VMID)
	}
	if _, ok := h.p.vm(m.VMID); ok {
		t.Errorf("stopped machine's vm %s still exists", m.VMID)
	}
	for _, e := range h.drain() {
		if e.Kind == "machine.stop_forced" {
			t.Errorf("graceful stop was forced: %v", e.Detail)
		}
	}
	// Stopped machines stay stopped: no health check brings them back.
	h.clock.Advance(time.Hour)
	time.Sleep(10 * time.Millisecond)
	if got, _ := h.mgr.Get("dev"); got.State != Stopped {
		t.Errorf("stopped machine is %s an hour later", got.State)
	}
	// Stop is idempotent; ensure starts it again on a new VM.
	if err := h.mgr.Stop(context.Background(), "dev", false); err != nil {
		t.Errorf("second stop: %v", err)
	}
	again := h.ensure(baseSpec("dev"))
	if again.VMID == m.VMID {
		t.Errorf("restarted on the stopped vm %s", m.VMID)
	}
}

func TestStopForceWhileGracefulStuck(t *testing.T) {
	h := newHarness(t, nil)
	stuck := make(chan struct{})
	entered := make(chan struct{}, 1)
	t.Cleanup(func() { close(stuck) })
	h.cfg.StopTimeout = time.Hour
	h.cfg.Shutdown = func(context.Context, vm.VM) error {
		entered <- struct{}{}
		<-stuck // ignores its context: the worst kind of stuck
		return nil
	}
	h.newManager()
	m := h.ensure(baseSpec("dev"))

	graceful := make(chan error, 1)
	go func() { graceful <- h.mgr.Stop(context.Background(), "dev", false) }()
	<-entered
	h.waitState("dev", Stopping)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := h.mgr.Stop(ctx, "dev", true); err != nil {
		t.Fatalf("forced stop while graceful stuck: %v", err)
	}
	if got, _ := h.mgr.Get("dev"); got.State != Stopped {
		t.Fatalf("state %s after forced stop", got.State)
	}
	if v, ok := h.p.vm(m.VMID); ok {
		t.Errorf("vm %s is %s after forced stop, want destroyed", v.ID, v.Status)
	}
	h.p.mu.Lock()
	stops := slices.Clone(h.p.stops)
	h.p.mu.Unlock()
	if !slices.Contains(stops, 0) {
		t.Errorf("provider stops %v, want one with zero grace", stops)
	}
	select {
	case err := <-graceful:
		if err != nil {
			t.Errorf("the waiting graceful stop returned %v", err)
		}
	case <-ctx.Done():
		t.Fatal("the graceful Stop caller never returned")
	}
	h.waitEvent("dev", "machine.stop_forced", nil)
	// The machine is still usable afterwards.
	h.ensure(baseSpec("dev"))
}

func TestStopDuringStartCancelsIt(t *testing.T) {
	h := newHarness(t, nil)
	h.p.createGate = make(chan struct{}) // never opens
	ensured := make(chan error, 1)
	go func() {
		_, err := h.mgr.Ensure(context.Background(), baseSpec("dev"))
		ensured <- err
	}()
	h.waitState("dev", Creating)
	if err := h.mgr.Stop(context.Background(), "dev", false); err != nil {
		t.Fatal(err)
	}
	if err := <-ensured; !errors.Is(err, ErrStopped) {
		t.Errorf("pending ensure = %v, want ErrStopped", err)
	}
	if m, _ := h.mgr.Get("dev"); m.State != Stopped {
		t.Errorf("state %s, want stopped", m.State)
	}
}

func TestRestoreDerivesStateFromReality(t *testing.T) {
	h := newHarness(t, func(c *Config) { c.StartTimeout = 300 * time.Millisecond })
	ctx := context.Background()
	p := h.p
	mk := func(name string, st vm.Status) vm.VM {
		spec := baseSpec(name)
		p.mu.Lock()
		defer p.mu.Unlock()
		return p.addLocked(vmSpec(spec, "", spec.Fingerprint()), st, map[string]string{})
	}
	alive := mk("alive", vm.StatusRunning)
	crashed := mk("crashed", vm.StatusStopped)
	off := mk("off", vm.StatusStopped)
	orphan := mk("orphan", vm.StatusRunning) // created just before a crash, never recorded
	mute := mk("mute", vm.StatusRunning)
	p.setAgentDead(mute.ID, true)
	snapDir := filepath.Join(h.cfg.SnapshotDir, "asleep")
	if err := os.MkdirAll(snapDir, 0o700); err != nil {
		t.Fatal(err)
	}
	rec := func(name string, st State, id string) Record {
		return Record{Name: name, State: st, Spec: baseSpec(name), VMID: id}
	}
	asleep := rec("asleep", Running, "")
	asleep.Snapshot = &vm.Snapshot{ID: "s", Dir: snapDir}
	recs := []Record{
		rec("alive", Starting, alive.ID),              // transitional record, healthy VM
		rec("missing", Running, "vm-gone"),            // VM vanished while the daemon was away
		rec("crashed", Running, crashed.ID),           // process exited
		rec("off", Stopped, off.ID),                   // stopped on request
		rec("orphan", Creating, ""),                   // VM exists, record has no ID
		rec("mute", Running, mute.ID),                 // alive, agent silent
		asleep,                                        // suspended
		{Name: "bad", Spec: MachineSpec{Name: "bad"}}, // unusable record
	}
	err := h.mgr.Restore(ctx, recs)
	if err == nil || !errors.Is(err, vm.ErrInvalid) {
		t.Errorf("Restore with a bad record = %v, want ErrInvalid for it", err)
	}
	derived := map[string]string{}
	for len(derived) < 7 {
		e := h.waitEvent("", "machine.restored", nil)
		derived[e.Subject] = e.Detail["state"].(string)
	}
	want := map[string]string{
		"alive": "running", "missing": "not_exist", "crashed": "failed", "off": "stopped",
		"orphan": "running", "mute": "created", "asleep": "suspended",
	}
	for name, st := range want {
		if derived[name] != st {
			t.Errorf("%s restored as %q, want %q", name, derived[name], st)
		}
	}
	// Then the machines go where their callers wanted them, on their own.
	if m := h.waitState("alive", Running); m.VMID != alive.ID {
		t.Errorf("alive machine moved to vm %s", m.VMID)
	}
	if m := h.waitState("orphan", Running); m.VMID != orphan.ID {
		t.Errorf("orphan vm not adopted: %s", m.VMID)
	}
	if m := h.waitState("missing", Running); m.Attempts != 0 {
		t.Errorf("recreating a missing vm counted %d attempts", m.Attempts)
	}
	if m := h.waitState("crashed", Running); m.VMID == crashed.ID {
		t.Errorf("crashed machine still on vm %s", m.VMID)
	}
	h.waitState("mute", Failed) // its agent never answered within StartTimeout
	h.clock.Advance(h.cfg.Backoff.Initial)
	if m := h.waitState("mute", Running); m.VMID == mute.ID {
		t.Errorf("mute machine still on vm %s", m.VMID)
	}
	if m, _ := h.mgr.Get("off"); m.State != Stopped || m.Desired != DesiredStopped {
		t.Errorf("off machine: %+v", m)
	}
	if _, ok := p.vm(off.ID); ok {
		t.Errorf("powered-off vm %s of a stopped machine was kept", off.ID)
	}
	if m, _ := h.mgr.Get("asleep"); m.State != Suspended {
		t.Errorf("asleep machine: %s", m.State)
	}
	if _, err := h.mgr.Get("bad"); !errors.Is(err, vm.ErrNotFound) {
		t.Errorf("bad record was restored: %v", err)
	}
	if err := h.mgr.Restore(ctx, []Record{rec("alive", Running, alive.ID)}); err == nil {
		t.Error("restoring a machine twice succeeded")
	}
}

func TestCloseLeavesMachinesRunning(t *testing.T) {
	h := newHarness(t, nil)
	m := h.ensure(baseSpec("dev"))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := h.mgr.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if v, ok := h.p.vm(m.VMID); !ok || v.Status != vm.StatusRunning {
		t.Errorf("vm after Close: %+v", v)
	}
	if _, err := h.mgr.Ensure(ctx, baseSpec("dev")); !errors.Is(err, ErrClosed) {
		t.Errorf("Ensure after Close = %v, want ErrClosed", err)
	}
	// A new manager takes the machine over as it is, from the record the
	// daemon persisted as JSON.
	h.mu.Lock()
	b, err := json.Marshal(h.changes[len(h.changes)-1])
	h.mu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	var rec Record
	if err := json.Unmarshal(b, &rec); err != nil {
		t.Fatal(err)
	}
	h.newManager()
	if err := h.mgr.Restore(ctx, []Record{rec}); err != nil {
		t.Fatal(err)
	}
	if got := h.ensure(baseSpec("dev")); got.VMID != m.VMID {
		t.Errorf("after restart the machine moved from %s to %s", m.VMID, got.VMID)
	}
	if creates, _, _ := h.p.counts(); creates != 1 {
		t.Errorf("%d creates across a restart, want 1", creates)
	}
}

func TestEnsureCallerGivingUpDoesNotAbortTheStart(t *testing.T) {
	h := newHarness(t, nil)
	gate := make(chan struct{})
	h.p.createGate = gate
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		_, err := h.mgr.Ensure(ctx, baseSpec("dev"))
		done <- err
	}()
	h.waitState("dev", Creating)
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled Ensure = %v", err)
	}
	close(gate)
	h.waitState("dev", Running)
}

func TestStopSuspendedDiscardsSnapshotKeepsDisk(t *testing.T) {
	h := newHarness(t, func(c *Config) { c.Idle.SuspendAfter = time.Hour })
	h.p.caps[vm.CapSuspend] = true
	spec := baseSpec("dev")
	spec.DataDiskMiB = 8
	h.ensure(spec)
	h.clock.Advance(time.Hour)
	sus := h.waitState("dev", Suspended)
	if err := h.mgr.Stop(context.Background(), "dev", false); err != nil {
		t.Fatal(err)
	}
	m, _ := h.mgr.Get("dev")
	if m.State != Stopped || m.Snapshot != nil {
		t.Errorf("after stop: state %s snapshot %v", m.State, m.Snapshot)
	}
	if _, err := os.Stat(sus.Snapshot.Dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("snapshot of a stopped machine kept: %v", err)
	}
	if _, err := os.Stat(filepath.Join(h.cfg.StateDir, "machines", "dev", "data.img")); err != nil {
		t.Errorf("data disk: %v", err)
	}
	// Ensure boots it cold.
	h.ensure(spec)
	if creates, _, restores := h.p.counts(); creates != 2 || restores != 0 {
		t.Errorf("creates %d restores %d, want 2 and 0", creates, restores)
	}
}

func TestIdleWithoutBalloonOrSnapshotCapabilities(t *testing.T) {
	h := newHarness(t, func(c *Config) {
		c.Idle = IdlePolicy{ShrinkAfter: time.Minute, SuspendAfter: time.Hour, ReserveMiB: 64}
	})
	h.p.caps = vm.Capabilities{}
	h.ensure(baseSpec("dev"))
	h.clock.Advance(time.Minute)
	idle := h.waitState("dev", Idle)
	if idle.BalloonMiB != nil {
		t.Errorf("balloon %d on a provider without balloon", *idle.BalloonMiB)
	}
	e := h.waitEvent("dev", "machine.idle", nil)
	if e.Detail["reason"] == nil {
		t.Errorf("idle event %v does not say why the balloon stayed", e.Detail)
	}
	h.clock.Advance(2 * time.Hour)
	time.Sleep(10 * time.Millisecond)
	if m, _ := h.mgr.Get("dev"); m.State != Idle {
		t.Errorf("state %s without snapshot capability, want idle", m.State)
	}
	if _, snaps, _ := h.p.counts(); snaps != 0 {
		t.Errorf("%d snapshots on a provider without snapshots", snaps)
	}
	// An ensure wakes it.
	h.ensure(baseSpec("dev"))
}

func TestIdleShrinkNeedsToKnowGuestUse(t *testing.T) {
	// No agent stats and a balloon without guest statistics: the manager
	// must not guess a size.
	h := newHarness(t, func(c *Config) { c.Idle = IdlePolicy{ShrinkAfter: time.Minute, ReserveMiB: 64} })
	h.ensure(baseSpec("dev"))
	h.clock.Advance(time.Minute)
	e := h.waitEvent("dev", "machine.idle_failed", nil)
	if e.Detail["step"] != "shrink" {
		t.Errorf("idle_failed %v", e.Detail)
	}
	if m, _ := h.mgr.Get("dev"); m.State != Running || m.BalloonMiB != nil {
		t.Errorf("after a failed shrink: state %s balloon %v", m.State, m.BalloonMiB)
	}
	h.p.mu.Lock()
	defer h.p.mu.Unlock()
	if len(h.p.balloonSets) != 0 {
		t.Errorf("balloon set to %v without knowing guest use", h.p.balloonSets)
	}
}

// TestSuspendWithDataDisk: a machine with a data disk suspends through the
// provider's single-use suspend (a template snapshot would refuse the disk)
// and Ensure restores it with its memory; without that capability it is
// never paused for a suspend that cannot work.
func TestSuspendWithDataDisk(t *testing.T) {
	spec := baseSpec("dev")
	spec.DataDiskMiB = 8

	h := newHarness(t, func(c *Config) { c.Idle.SuspendAfter = time.Hour })
	m := h.ensure(spec)
	h.clock.Advance(2 * time.Hour)
	time.Sleep(50 * time.Millisecond)
	if got, _ := h.mgr.Get("dev"); got.State != Running || got.VMID != m.VMID {
		t.Errorf("without CapSuspend: machine %s on %s, want running on %s", got.State, got.VMID, m.VMID)
	}
	for _, e := range h.drain() {
		if e.Kind == "machine.idle_failed" {
			t.Errorf("suspend attempted without a way to keep the disk: %v", e.Detail)
		}
	}

	h = newHarness(t, func(c *Config) { c.Idle.SuspendAfter = time.Hour })
	h.p.caps[vm.CapSuspend] = true
	m = h.ensure(spec)
	h.p.writeMemory(m.VMID, "counter", "7")
	h.clock.Advance(time.Hour)
	sus := h.waitState("dev", Suspended)
	if sus.Snapshot == nil || !sus.Snapshot.SingleUse || sus.Snapshot.Spec.DataDisk == "" {
		t.Fatalf("suspended machine's snapshot %+v, want single-use with the data disk", sus.Snapshot)
	}
	back := h.ensure(spec)
	if got := h.p.readMemory(back.VMID, "counter"); got != "7" {
		t.Errorf("guest memory after suspend+ensure: counter=%q, want 7", got)
	}
	if v, _ := h.p.vm(back.VMID); v.Spec.DataDisk != sus.Snapshot.Spec.DataDisk {
		t.Errorf("restored vm has data disk %q, want %q", v.Spec.DataDisk, sus.Snapshot.Spec.DataDisk)
	}
	h.p.mu.Lock()
	suspends, snapshots := h.p.suspends, h.p.snapshots
	h.p.mu.Unlock()
	if suspends != 1 || snapshots != 0 {
		t.Errorf("%d suspends and %d template snapshots, want 1 and 0", suspends, snapshots)
	}
}
