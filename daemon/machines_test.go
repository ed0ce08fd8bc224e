package daemon

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/warmpool/warmpool/api"
	"github.com/warmpool/warmpool/internal/paths"
	"github.com/warmpool/warmpool/lifecycle"
	"github.com/warmpool/warmpool/provider/fake"
	"github.com/warmpool/warmpool/vm"
)

// diskFake is the fake provider advertising data disks, as QEMU and
// Firecracker do (the fake only records the disk's path).
type diskFake struct{ *fake.Provider }

func (p diskFake) Capabilities() vm.Capabilities {
	caps := p.Provider.Capabilities()
	caps[vm.CapDataDisk] = true
	return caps
}

// startDiskFake runs a daemon on diskFake whose machine timers (idle,
// suspend, holds, health) run on a manual clock, r.clock: a test moves
// time, then waits for the effect, however loaded the machine is.
func startDiskFake(t *testing.T, cfg string) *running {
	t.Helper()
	prov := newFakeProvider()
	return startWrappedOn(t, t.TempDir(), prov, diskFake{prov}, cfg, lifecycle.NewManualClock(time.Now()))
}

// assertStays checks that machine name stays in state want, with holds
// holds, for a moment of real time after the clock moved: long enough for
// the manager to act on a timer that fired, on an idle machine.
func assertStays(t *testing.T, c *api.Client, name, want string, holds int, why string) {
	t.Helper()
	for deadline := time.Now().Add(300 * time.Millisecond); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if m, _ := c.Machine(ctxT(t), name); m.State != want || m.Holds != holds {
			t.Fatalf("%s: machine is %s with %d holds, want %s with %d", why, m.State, m.Holds, want, holds)
		}
	}
}

func balloonString(mib *int) string {
	if mib == nil {
		return "none"
	}
	return fmt.Sprintf("%d MiB", *mib)
}

// waitHolds polls until machine name has want holds.
func waitHolds(t *testing.T, c *api.Client, name string, want int) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	var last api.Machine
	for time.Now().Before(deadline) {
		if last, _ = c.Machine(ctxT(t), name); last.Holds == want {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("machine %s has %d holds, want %d", name, last.Holds, want)
}

// rawEvents follows GET /v1/events?subject=NAME&kind=machine. as a script
// would (curl over the socket), keeping each event as its raw JSON object.
type rawEvents struct {
	mu  sync.Mutex
	evs []map[string]any
}

func followRawEvents(t *testing.T, dir, subject string) *rawEvents {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", paths.Socket(dir))
	}}}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://warmpool/v1/events?kind=machine.&subject="+subject, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := hc.Do(req)
	if err != nil {
		cancel()
		t.Fatalf("GET /v1/events: %v", err)
	}
	if resp.StatusCode != http.StatusOK || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/event-stream") {
		t.Fatalf("GET /v1/events: %s, content type %q", resp.Status, resp.Header.Get("Content-Type"))
	}
	r := &rawEvents{}
	done := make(chan struct{})
	go func() {
		defer close(done)
		sc := bufio.NewScanner(resp.Body)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			data, ok := strings.CutPrefix(sc.Text(), "data:")
			if !ok {
				continue
			}
			var e map[string]any
			if err := json.Unmarshal([]byte(strings.TrimSpace(data)), &e); err != nil {
				t.Errorf("event is not one JSON object: %q: %v", data, err)
				continue
			}
			r.mu.Lock()
			r.evs = append(r.evs, e)
			r.mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		cancel()
		resp.Body.Close()
		<-done
		hc.CloseIdleConnections()
	})
	return r
}

// wait returns the first event of kind whose detail matches, waiting for it.
func (r *rawEvents) wait(t *testing.T, kind string, match func(detail map[string]any) bool) map[string]any {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		r.mu.Lock()
		for _, e := range r.evs {
			d, _ := e["detail"].(map[string]any)
			if e["kind"] == kind && (match == nil || match(d)) {
				r.mu.Unlock()
				return e
			}
		}
		r.mu.Unlock()
		time.Sleep(10 * time.Millisecond)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	t.Fatalf("no %s event; got %v", kind, r.evs)
	return nil
}

func (r *rawEvents) kinds() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for _, e := range r.evs {
		out = append(out, e["kind"].(string))
	}
	return out
}

func toState(want string) func(map[string]any) bool {
	return func(d map[string]any) bool { return d["to"] == want }
}

// waitMachine polls GET /v1/machines/NAME (which is not activity) until the
// machine is in state want.
func waitMachine(t *testing.T, c *api.Client, name, want string) api.Machine {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	var last api.Machine
	for time.Now().Before(deadline) {
		m, err := c.Machine(ctxT(t), name)
		if err == nil && m.State == want {
			return m
		}
		last = m
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("machine %s never became %s; last %+v", name, want, last)
	return last
}

func dur(d time.Duration) *api.Duration {
	v := api.Duration(d)
	return &v
}

// A machine with a data disk idles (balloon shrunk), suspends to a
// single-use snapshot and comes back on the next ensure with its disk, and
// GET /v1/events shows every step as a JSON event.
func TestMachineWithDataDiskIdlesSuspendsAndRestores(t *testing.T) {
	r := startDiskFake(t, "")
	c := r.client
	evs := followRawEvents(t, r.dir, "box")

	spec := api.MachineSpec{VCPUs: 1, MemoryMiB: 512, DataDiskMiB: 64,
		IdleAfter: dur(10 * time.Minute), SuspendAfter: dur(time.Hour)}
	m, err := c.EnsureMachine(ctxT(t), "box", spec.EnsureRequest())
	if err != nil {
		t.Fatalf("ensure: %v", err)
	}
	if m.State != api.MachineRunning || m.VMID == "" || m.IdleAfter.Std() != 10*time.Minute || m.SuspendAfter.Std() != time.Hour {
		t.Fatalf("after ensure: %+v", m)
	}
	disk := filepath.Join(r.dir, "machines", "box", "data.img")
	if v, err := r.prov.Inspect(ctxT(t), m.VMID); err != nil || v.Spec.DataDisk != disk {
		t.Fatalf("machine vm: data disk %q (%v), want %s", v.Spec.DataDisk, err, disk)
	}

	assertStays(t, c, "box", api.MachineRunning, 0, "before idle_after")
	r.clock.Advance(10 * time.Minute)
	// The fake guest uses fakeGuestUsedMiB of its 512: the balloon goes
	// down to that plus the reserve, in the API and in the provider.
	idle := waitMachine(t, c, "box", api.MachineIdle)
	wantBalloon := fakeGuestUsedMiB + defaultIdleReserveMiB
	if idle.BalloonMiB == nil || *idle.BalloonMiB != wantBalloon {
		t.Errorf("idle machine's balloon %s, want %d MiB (guest uses %d + reserve %d) of its %d", balloonString(idle.BalloonMiB), wantBalloon, fakeGuestUsedMiB, defaultIdleReserveMiB, spec.MemoryMiB)
	}
	if b, err := r.prov.BalloonStats(ctxT(t), m.VMID); err != nil || b.TargetMiB != wantBalloon {
		t.Errorf("provider's balloon of the idle VM: target %d MiB (%v), want %d", b.TargetMiB, err, wantBalloon)
	}
	r.clock.Advance(50 * time.Minute)
	sus := waitMachine(t, c, "box", api.MachineSuspended)
	if sus.VMID != "" || sus.BalloonMiB != nil {
		t.Errorf("suspended machine: vm %q balloon %v, want none", sus.VMID, sus.BalloonMiB)
	}
	if _, err := r.prov.Inspect(ctxT(t), m.VMID); !errors.Is(err, vm.ErrNotFound) {
		t.Errorf("suspended machine's vm %s: %v, want destroyed", m.VMID, err)
	}
	if n := r.prov.Calls(fake.OpSuspend); n != 1 {
		t.Errorf("%d provider suspends, want 1 (a data disk needs the single-use snapshot)", n)
	}

	back, err := c.EnsureMachine(ctxT(t), "box", api.MachineEnsureRequest{})
	if err != nil || back.State != api.MachineRunning || back.VMID == "" || back.VMID == m.VMID {
		t.Fatalf("ensure after suspend: %+v, %v", back, err)
	}
	if n := r.prov.Calls(fake.OpRestore); n != 1 {
		t.Errorf("%d restores, want 1", n)
	}
	if n := r.prov.Calls(fake.OpCreate); n != 1 {
		t.Errorf("%d creates, want 1 (resume must not cold boot)", n)
	}
	if v, err := r.prov.Inspect(ctxT(t), back.VMID); err != nil || v.Spec.DataDisk != disk {
		t.Errorf("restored vm: data disk %q (%v), want %s", v.Spec.DataDisk, err, disk)
	}
	if _, err := os.Stat(disk); err != nil {
		t.Errorf("data disk: %v", err)
	}

	// Every step is a JSON event {time, kind, subject, detail}.
	shrink := evs.wait(t, "machine.idle", nil)
	for _, key := range []string{"time", "kind", "subject", "detail"} {
		if _, ok := shrink[key]; !ok {
			t.Errorf("event lacks %q: %v", key, shrink)
		}
	}
	if d := shrink["detail"].(map[string]any); d["balloon_mib"] != float64(wantBalloon) || d["guest_used_mib"] != float64(fakeGuestUsedMiB) || d["reserve_mib"] != float64(defaultIdleReserveMiB) {
		t.Errorf("shrink event detail %v, want balloon %d = guest used %d + reserve %d", d, wantBalloon, fakeGuestUsedMiB, defaultIdleReserveMiB)
	}
	evs.wait(t, "machine.state", toState(api.MachineIdle))
	suspended := evs.wait(t, "machine.suspended", nil)
	if d := suspended["detail"].(map[string]any); d["vm_id"] != m.VMID || d["snapshot_dir"] == "" {
		t.Errorf("suspend event detail %v", d)
	}
	evs.wait(t, "machine.state", toState(api.MachineSuspended))
	if d := evs.wait(t, "machine.resumed", nil)["detail"].(map[string]any); d["vm_id"] != back.VMID {
		t.Errorf("resume event detail %v, want vm %s", d, back.VMID)
	}
	evs.wait(t, "machine.state", func(d map[string]any) bool {
		return d["from"] == api.MachineStarting && d["to"] == api.MachineRunning && d["vm_id"] == back.VMID
	})
	for _, k := range evs.kinds() {
		if !strings.HasPrefix(k, "machine.") {
			t.Errorf("event %s passed the kind=machine. filter", k)
		}
	}

	// Turning suspend off is no drift: the same VM keeps running.
	spec.SuspendAfter = dur(0)
	spec.IdleAfter = dur(time.Hour)
	same, err := c.EnsureMachine(ctxT(t), "box", spec.EnsureRequest())
	if err != nil || same.VMID != back.VMID || same.SuspendAfter != 0 {
		t.Errorf("ensure with a new idle policy: %+v, %v; want vm %s kept and suspend off", same, err, back.VMID)
	}
	for _, k := range evs.kinds() {
		if k == "machine.drift" {
			t.Error("an idle policy change was reported as drift")
		}
	}

	// A graceful stop goes through the agent, whose power-off stops the VM
	// well before the stop timeout; the VM is then destroyed and the disk kept.
	stopStart := time.Now()
	if err := c.StopMachine(ctxT(t), "box", false); err != nil {
		t.Fatal(err)
	}
	if waited := time.Since(stopStart); waited > 20*time.Second {
		t.Errorf("graceful stop took %v: the guest's power-off was not noticed", waited)
	}
	if _, err := r.prov.Inspect(ctxT(t), back.VMID); !errors.Is(err, vm.ErrNotFound) {
		t.Errorf("stopped machine's vm: %v, want destroyed", err)
	}
	if st, _ := c.Machine(ctxT(t), "box"); st.State != api.MachineStopped || st.VMID != "" {
		t.Errorf("after stop: %+v", st)
	}
	if _, err := os.Stat(disk); err != nil {
		t.Errorf("data disk after stop: %v", err)
	}
	r.stop(t)
	assertAccounted(t, r.dir, r.prov)
}

// Holds keep a machine awake; releasing the last one (or its TTL running
// out) starts the idle clock.
func TestMachineHoldsBlockIdling(t *testing.T) {
	r := startDiskFake(t, "")
	c := r.client
	idleAfter := 10 * time.Minute
	spec := api.MachineSpec{VCPUs: 1, MemoryMiB: 256, IdleAfter: dur(idleAfter)}
	if _, err := c.PutMachine(ctxT(t), "box", spec); err != nil {
		t.Fatal(err)
	}
	// Recorded but never started: nothing to hold yet.
	if _, err := c.HoldMachine(ctxT(t), "box", api.HoldRequest{}); !errors.Is(err, vm.ErrInvalidState) || !strings.Contains(err.Error(), "ensure") {
		t.Errorf("hold of a never-started machine: %v, want a conflict saying to ensure it", err)
	}
	if _, err := c.HoldMachine(ctxT(t), "nope", api.HoldRequest{}); !errors.Is(err, vm.ErrNotFound) {
		t.Errorf("hold of an unknown machine: %v, want not found", err)
	}
	if _, err := c.EnsureMachine(ctxT(t), "box", api.MachineEnsureRequest{}); err != nil {
		t.Fatal(err)
	}
	h1, err := c.HoldMachine(ctxT(t), "box", api.HoldRequest{Owner: "ide"})
	if err != nil {
		t.Fatal(err)
	}
	h2, err := c.HoldMachine(ctxT(t), "box", api.HoldRequest{Owner: "build", TTL: api.Duration(24 * time.Hour)})
	if err != nil || h2.ExpiresAt == nil || h2.Owner != "build" || h2.Machine != "box" {
		t.Fatalf("hold with ttl: %+v, %v", h2, err)
	}
	if m, _ := c.Machine(ctxT(t), "box"); m.Holds != 2 {
		t.Errorf("holds %d, want 2", m.Holds)
	}
	r.clock.Advance(4 * idleAfter)
	assertStays(t, c, "box", api.MachineRunning, 2, "held machine "+(4*idleAfter).String()+" after its last activity")
	if err := c.ReleaseHold(ctxT(t), "box", h1.ID); err != nil {
		t.Fatal(err)
	}
	r.clock.Advance(4 * idleAfter)
	assertStays(t, c, "box", api.MachineRunning, 1, "machine with one hold left")
	if err := c.ReleaseHold(ctxT(t), "box", h2.ID); err != nil {
		t.Fatal(err)
	}
	// The idle clock starts at the last release, not at the last call.
	r.clock.Advance(idleAfter - time.Second)
	assertStays(t, c, "box", api.MachineRunning, 0, "a second before idle_after from the last release")
	r.clock.Advance(time.Second)
	waitMachine(t, c, "box", api.MachineIdle)

	// A hold wakes an idle machine; when its TTL runs out the machine idles again.
	if _, err := c.HoldMachine(ctxT(t), "box", api.HoldRequest{TTL: api.Duration(5 * time.Minute)}); err != nil {
		t.Fatal(err)
	}
	if m := waitMachine(t, c, "box", api.MachineRunning); m.BalloonMiB != nil {
		t.Errorf("woken machine's balloon %d, want full (null)", *m.BalloonMiB)
	}
	r.clock.Advance(5 * time.Minute)
	waitHolds(t, c, "box", 0)
	r.clock.Advance(idleAfter)
	if m := waitMachine(t, c, "box", api.MachineIdle); m.Holds != 0 {
		t.Errorf("idle again with %d holds, want the expired one gone", m.Holds)
	}
}

// A bare ensure of a machine nobody described gives it the default shape;
// config machines may leave their shape out, and PUT changes the idle policy
// of a running machine at once, without a recreate.
func TestMachineDefaultsAndPutIdle(t *testing.T) {
	r := startDiskFake(t, "machine_defaults: {idle_after: 1h, idle_reserve_mib: 32}\nmachines:\n  cfg: {data_disk_mib: 16, suspend_after: 2h}\n")
	c := r.client
	m, err := c.EnsureMachine(ctxT(t), "bare", api.MachineEnsureRequest{})
	if err != nil {
		t.Fatalf("bare ensure: %v", err)
	}
	if m.State != api.MachineRunning || m.Spec.VCPUs != api.DefaultMachineVCPUs || m.Spec.MemoryMiB != api.DefaultMachineMemoryMiB || m.Spec.DataDiskMiB != 0 {
		t.Errorf("bare ensure: %+v", m)
	}
	if m.IdleAfter.Std() != time.Hour || m.SuspendAfter != 0 {
		t.Errorf("bare machine's idle policy %s/%s, want the daemon's default 1h/0s", m.IdleAfter, m.SuspendAfter)
	}
	cfg, err := c.EnsureMachine(ctxT(t), "cfg", api.MachineEnsureRequest{})
	if err != nil {
		t.Fatalf("ensure config machine: %v", err)
	}
	if cfg.Spec.VCPUs != 1 || cfg.Spec.MemoryMiB != 512 || cfg.Spec.DataDiskMiB != 16 || cfg.IdleAfter.Std() != time.Hour || cfg.SuspendAfter.Std() != 2*time.Hour {
		t.Errorf("config machine: %+v", cfg)
	}

	evs := followRawEvents(t, r.dir, "bare")
	spec := m.Spec
	spec.IdleAfter = dur(10 * time.Minute)
	put, err := c.PutMachine(ctxT(t), "bare", spec)
	if err != nil || put.IdleAfter.Std() != 10*time.Minute || put.VMID != m.VMID {
		t.Fatalf("put idle policy: %+v, %v", put, err)
	}
	if e := evs.wait(t, "machine.idle_policy", nil); e["detail"].(map[string]any)["reserve_mib"] != float64(32) {
		t.Errorf("idle policy event %v, want the configured reserve", e)
	}
	r.clock.Advance(10 * time.Minute)
	idle := waitMachine(t, c, "bare", api.MachineIdle)
	if idle.VMID != m.VMID {
		t.Errorf("machine moved from vm %s to %s on an idle policy change", m.VMID, idle.VMID)
	}
	if n := r.prov.Calls(fake.OpCreate); n != 2 {
		t.Errorf("%d creates for two machines, want 2", n)
	}
}
