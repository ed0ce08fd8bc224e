package lifecycle

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/warmpool/warmpool/agent"
	"github.com/warmpool/warmpool/events"
	"github.com/warmpool/warmpool/internal/realvm"
	"github.com/warmpool/warmpool/provider/qemu"
	"github.com/warmpool/warmpool/vm"
)

// qemuTimeout bounds each real-VM step: TCG boots on a busy two-core host
// can take many seconds.
const qemuTimeout = 3 * time.Minute

// qemuHarness is a manager on real QEMU VMs with the real guest agent, on
// a fake clock so that health ticks, idle and suspend happen when the test
// says, while boots, pings and stops take real time.
func qemuHarness(t *testing.T) (*harness, *qemu.Provider) {
	t.Helper()
	realvm.Image(t) // skips loudly without QEMU; builds the shared image once
	p, err := qemu.New(qemu.Options{
		StateDir: realvm.StateDir(t),
	})
	if err != nil {
		t.Fatalf("qemu.New: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		vms, _ := p.List(ctx)
		for _, v := range vms {
			if err := p.Destroy(ctx, v.ID); err != nil {
				t.Errorf("cleanup destroy %s: %v", v.ID, err)
			}
		}
		p.Close()
	})
	clock := newFakeClock()
	bus := events.NewBus()
	t.Cleanup(bus.Close)
	h := &harness{t: t, clock: clock, bus: bus, sub: bus.Subscribe(4096, nil), stepTimeout: qemuTimeout}
	h.cfg = Config{
		Provider: p,
		StateDir: t.TempDir(),
		Ping: func(ctx context.Context, v vm.VM) error {
			c, err := agent.Dial(ctx, p, v.ID)
			if err != nil {
				return err
			}
			defer c.Close()
			return c.Ping(ctx)
		},
		Shutdown: func(ctx context.Context, v vm.VM) error {
			c, err := agent.Dial(ctx, p, v.ID)
			if err != nil {
				return err
			}
			defer c.Close()
			return c.Shutdown(ctx)
		},
		GuestMemUsed: func(ctx context.Context, v vm.VM) (int, error) {
			s, err := guestStats(ctx, p, v.ID)
			return int((s.MemTotalKiB - s.MemAvailableKiB) / 1024), err
		},
		Events:         bus,
		Clock:          clock,
		StartTimeout:   qemuTimeout,
		PingTimeout:    10 * time.Second,
		StopTimeout:    30 * time.Second,
		HealthInterval: time.Minute,
		HealthFailures: 2,
		Backoff:        Backoff{Initial: time.Second, Max: time.Minute, MaxAttempts: 3},
		Idle:           IdlePolicy{ShrinkAfter: 10 * time.Minute, SuspendAfter: time.Hour, ReserveMiB: 48},
	}
	h.newManager()
	return h, p
}

func guestStats(ctx context.Context, p *qemu.Provider, id string) (agent.Stats, error) {
	c, err := agent.Dial(ctx, p, id)
	if err != nil {
		return agent.Stats{}, err
	}
	defer c.Close()
	return c.Stats(ctx)
}

func guestSh(t *testing.T, p *qemu.Provider, id, script string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), qemuTimeout)
	defer cancel()
	c, err := agent.Dial(ctx, p, id)
	if err != nil {
		t.Fatalf("dial agent of %s: %v", id, err)
	}
	defer c.Close()
	var out, errOut bytes.Buffer
	code, err := c.Exec(ctx, agent.ExecRequest{Argv: []string{"sh", "-c", script}, Timeout: time.Minute}, &out, &errOut)
	if err != nil || code != 0 {
		t.Fatalf("guest %s: sh -c %q: exit %d, %v, stderr %q", id, script, code, err, errOut.String())
	}
	return strings.TrimSpace(out.String())
}

func qemuSpec(t *testing.T, name string) MachineSpec {
	img := realvm.Image(t)
	return MachineSpec{Name: name, VCPUs: 1, MemoryMiB: 256, Kernel: img.Kernel, Initrd: img.Initrd,
		Cmdline: img.Cmdline, KernelDigest: img.Digest}
}

func randomMarker(t *testing.T) string {
	var b [8]byte
	if _, err := rand.Read(b[:]); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b[:])
}

// TestQEMUEnsureDriftDiskAndRecovery: ensure from nothing; a second ensure
// returns at once; a memory change recreates the VM while what the guest
// wrote to its data disk survives; killing QEMU brings the machine back
// without anyone calling Ensure, as soon as the provider reports the exit.
func TestQEMUEnsureDriftDiskAndRecovery(t *testing.T) {
	h, p := qemuHarness(t)
	spec := qemuSpec(t, "box")
	spec.DataDiskMiB = 16

	start := time.Now()
	first := h.ensure(spec)
	t.Logf("cold ensure: %v", time.Since(start))
	start = time.Now()
	if again := h.ensure(spec); again.VMID != first.VMID {
		t.Fatalf("second ensure moved the machine to %s", again.VMID)
	}
	t.Logf("ensure on a running machine: %v", time.Since(start))

	marker := randomMarker(t)
	guestSh(t, p, first.VMID, "printf "+marker+" | dd of=/dev/vda bs=512 seek=2048 conv=notrunc,fsync 2>/dev/null")

	spec.MemoryMiB = 320
	second := h.ensure(spec)
	if second.VMID == first.VMID {
		t.Fatal("memory change did not recreate the VM")
	}
	if e := h.waitEvent("box", "machine.drift", nil); !strings.Contains(strings.Join(e.Detail["fields"].([]string), ","), "memory_mib") {
		t.Errorf("drift event %v does not name memory_mib", e.Detail)
	}
	got := guestSh(t, p, second.VMID, "dd if=/dev/vda bs=512 skip=2048 count=1 2>/dev/null | head -c 16")
	if got != marker {
		t.Fatalf("data disk after recreate holds %q, want %q", got, marker)
	}
	if mem := guestSh(t, p, second.VMID, "grep MemTotal /proc/meminfo"); !strings.Contains(mem, "kB") {
		t.Errorf("meminfo: %q", mem)
	}

	v, err := p.Inspect(context.Background(), second.VMID)
	if err != nil || v.PID <= 0 {
		t.Fatalf("inspect %s: %+v, %v", second.VMID, v, err)
	}
	if err := syscall.Kill(v.PID, syscall.SIGKILL); err != nil {
		t.Fatalf("kill qemu %d: %v", v.PID, err)
	}
	// The clock stands still: no health tick, no backoff.
	h.waitEvent("box", "machine.crashed", nil)
	rec := h.waitEvent("box", "machine.recovering", nil)
	t.Logf("recovering: %v", rec.Detail)
	h.waitEvent("box", "machine.recovered", nil)
	third := h.waitState("box", Running)
	if third.VMID == second.VMID {
		t.Fatalf("recovered machine still on killed vm %s", third.VMID)
	}
	if got := guestSh(t, p, third.VMID, "dd if=/dev/vda bs=512 skip=2048 count=1 2>/dev/null | head -c 16"); got != marker {
		t.Errorf("data disk after recovery holds %q, want %q", got, marker)
	}

	ctx, cancel := context.WithTimeout(context.Background(), qemuTimeout)
	defer cancel()
	if err := h.mgr.Stop(ctx, "box", false); err != nil {
		t.Fatalf("stop: %v", err)
	}
	if _, err := p.Inspect(ctx, third.VMID); !errors.Is(err, vm.ErrNotFound) {
		t.Errorf("stopped machine's vm %s: inspect = %v, want destroyed (ErrNotFound)", third.VMID, err)
	}
	if _, err := os.Stat(filepath.Join(h.cfg.StateDir, "machines", "box", "data.img")); err != nil {
		t.Errorf("data disk after stop: %v", err)
	}
	for _, e := range h.drain() {
		if e.Kind == "machine.stop_forced" {
			t.Errorf("graceful stop through the agent was forced: %v", e.Detail)
		}
	}
}

// TestQEMUIdleShrinkAndSuspendKeepMemory: an idle machine's balloon shrinks
// to what the guest uses plus the reserve (the guest sees less memory); a
// longer idle suspends it to a snapshot, and the next Ensure restores it
// with a value written to guest memory before still there, and what it
// wrote to its data disk too (flushed, or still in its page cache).
func TestQEMUIdleShrinkAndSuspendKeepMemory(t *testing.T) {
	h, p := qemuHarness(t)
	spec := qemuSpec(t, "sleeper")
	spec.DataDiskMiB = 16
	start := time.Now()
	m := h.ensure(spec)
	cold := time.Since(start)
	marker := randomMarker(t)
	// The root file system is the initramfs: a file there lives in RAM only.
	guestSh(t, p, m.VMID, "echo "+marker+" > /marker")
	flushed, cached := randomMarker(t), randomMarker(t)
	guestSh(t, p, m.VMID, "printf "+flushed+" | dd of=/dev/vda bs=512 seek=2048 conv=notrunc,fsync 2>/dev/null")
	guestSh(t, p, m.VMID, "printf "+cached+" | dd of=/dev/vda bs=512 seek=4096 conv=notrunc 2>/dev/null")
	ctx, cancel := context.WithTimeout(context.Background(), qemuTimeout)
	defer cancel()
	before, err := guestStats(ctx, p, m.VMID)
	if err != nil {
		t.Fatal(err)
	}

	h.clock.Advance(h.cfg.Idle.ShrinkAfter)
	idle := h.waitState("sleeper", Idle)
	if idle.BalloonMiB == nil {
		t.Fatalf("idle machine has no balloon, want one below %d MiB", spec.MemoryMiB)
	}
	if *idle.BalloonMiB >= spec.MemoryMiB {
		t.Fatalf("idle balloon %d MiB, want below %d MiB", *idle.BalloonMiB, spec.MemoryMiB)
	}
	target := *idle.BalloonMiB
	var after agent.Stats
	deadline := time.Now().Add(time.Minute)
	for {
		after, err = guestStats(ctx, p, m.VMID)
		if err != nil {
			t.Fatal(err)
		}
		if after.MemTotalKiB/1024 <= uint64(target)+16 || time.Now().After(deadline) {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	t.Logf("balloon target %d MiB; guest MemTotal %d -> %d MiB", target, before.MemTotalKiB/1024, after.MemTotalKiB/1024)
	if after.MemTotalKiB/1024 > uint64(target)+16 {
		t.Errorf("guest still sees %d MiB after the balloon shrank to %d", after.MemTotalKiB/1024, target)
	}

	h.clock.Advance(h.cfg.Idle.SuspendAfter - h.cfg.Idle.ShrinkAfter)
	sus := h.waitState("sleeper", Suspended)
	if _, err := p.Inspect(ctx, m.VMID); err == nil {
		if v, _ := p.Inspect(ctx, m.VMID); v.Status != vm.StatusStopped {
			t.Errorf("suspended machine's vm %s is %s", m.VMID, v.Status)
		}
	}
	if sus.Snapshot == nil {
		t.Fatal("suspended machine has no snapshot")
	}

	start = time.Now()
	back := h.ensure(spec)
	resume := time.Since(start)
	t.Logf("ensure cold %v, from suspended %v", cold, resume)
	if got := guestSh(t, p, back.VMID, "cat /marker"); got != marker {
		t.Fatalf("guest memory after suspend+ensure: /marker = %q, want %q", got, marker)
	}
	if got := guestSh(t, p, back.VMID, "dd if=/dev/vda bs=512 skip=2048 count=1 2>/dev/null | head -c 16"); got != flushed {
		t.Errorf("data disk after suspend+ensure holds %q at the flushed write, want %q", got, flushed)
	}
	if got := guestSh(t, p, back.VMID, "dd if=/dev/vda bs=512 skip=4096 count=1 2>/dev/null | head -c 16"); got != cached {
		t.Errorf("data disk after suspend+ensure holds %q at the unflushed write, want %q", got, cached)
	}
	deadline = time.Now().Add(time.Minute)
	for {
		s, err := guestStats(ctx, p, back.VMID)
		if err != nil {
			t.Fatal(err)
		}
		if s.MemTotalKiB/1024 > uint64(target)+16 {
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("restored guest still ballooned: MemTotal %d MiB", s.MemTotalKiB/1024)
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
}
