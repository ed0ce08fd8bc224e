package fake_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/warmpool/warmpool/provider/fake"
	"github.com/warmpool/warmpool/vm"
	"github.com/warmpool/warmpool/vm/providertest"
)

var spec = vm.Spec{Name: "t", VCPUs: 1, MemoryMiB: 256}

// echoAgent answers every line with "pong".
func echoAgent(c net.Conn) {
	defer c.Close()
	r := bufio.NewReader(c)
	for {
		if _, err := r.ReadString('\n'); err != nil {
			return
		}
		if _, err := c.Write([]byte("pong\n")); err != nil {
			return
		}
	}
}

func ping(ctx context.Context, c net.Conn) error {
	if d, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(d)
	}
	if _, err := c.Write([]byte("ping\n")); err != nil {
		return err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err
	}
	if line != "pong\n" {
		return fmt.Errorf("agent answered %q", line)
	}
	return nil
}

func TestConformance(t *testing.T) {
	providertest.Run(t, func(t *testing.T) (vm.Provider, providertest.Fixture) {
		p := fake.New(fake.Options{AgentHandler: echoAgent, RestoreLatency: time.Millisecond})
		return p, providertest.Fixture{Spec: spec, AgentPing: ping, Timeout: 10 * time.Second, Kill: killer(p)}
	})
}

func TestConformanceWithoutAgent(t *testing.T) {
	providertest.Run(t, func(t *testing.T) (vm.Provider, providertest.Fixture) {
		p := fake.New(fake.Options{CreateLatency: 100 * time.Millisecond})
		return p, providertest.Fixture{Spec: spec, Kill: killer(p)}
	})
}

// killer is the fake's crash for the conformance suite's exit-event case.
func killer(p *fake.Provider) func(context.Context, vm.VM) error {
	return func(_ context.Context, v vm.VM) error { return p.Kill(v.ID) }
}

func TestFailNthFailsExactlyThatCall(t *testing.T) {
	p := fake.New(fake.Options{Faults: map[fake.Op]fake.Fault{fake.OpRestore: {FailNth: 2}}})
	snap := p.AddSnapshot(spec)
	ctx := context.Background()
	for i := 1; i <= 3; i++ {
		_, err := p.Restore(ctx, snap)
		if (i == 2) != errors.Is(err, fake.ErrInjected) {
			t.Errorf("restore #%d: err = %v", i, err)
		}
	}
	vms, _ := p.List(ctx)
	if len(vms) != 2 {
		t.Errorf("%d VMs listed after 2 successful restores and 1 failed one", len(vms))
	}
}

func TestFailFractionIsReproducible(t *testing.T) {
	run := func() []bool {
		p := fake.New(fake.Options{Seed: 7, Faults: map[fake.Op]fake.Fault{fake.OpCreate: {FailFraction: 0.5}}})
		var out []bool
		for range 40 {
			v, err := p.Create(context.Background(), spec)
			out = append(out, err == nil)
			if err == nil {
				_ = p.Destroy(context.Background(), v.ID)
			}
		}
		return out
	}
	a, b := run(), run()
	fails := 0
	for i := range a {
		if a[i] != b[i] {
			t.Fatalf("same seed, different outcome at call %d", i)
		}
		if !a[i] {
			fails++
		}
	}
	if fails == 0 || fails == len(a) {
		t.Errorf("%d of %d calls failed with FailFraction 0.5", fails, len(a))
	}
}

func TestCustomFaultError(t *testing.T) {
	boom := errors.New("boom")
	p := fake.New(fake.Options{})
	p.SetFault(fake.OpCreate, fake.Fault{FailFraction: 1, Err: boom})
	if _, err := p.Create(context.Background(), spec); !errors.Is(err, boom) {
		t.Fatalf("Create = %v, want boom", err)
	}
	p.SetFault(fake.OpCreate, fake.Fault{})
	if _, err := p.Create(context.Background(), spec); err != nil {
		t.Fatalf("Create after clearing the fault: %v", err)
	}
}

func TestHangUntilContextEndsAndLeavesNothing(t *testing.T) {
	p := fake.New(fake.Options{Faults: map[fake.Op]fake.Fault{fake.OpRestore: {Hang: true}}})
	snap := p.AddSnapshot(spec)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { _, err := p.Restore(ctx, snap); done <- err }()
	// While hanging, the half-made VM is listed, as a starting process would be.
	waitFor(t, func() bool {
		vms, _ := p.List(context.Background())
		return len(vms) == 1 && vms[0].Status == vm.StatusCreating
	})
	select {
	case err := <-done:
		t.Fatalf("hanging restore returned %v before cancel", err)
	default:
	}
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("hanging restore = %v, want context.Canceled", err)
	}
	if vms, _ := p.List(context.Background()); len(vms) != 0 {
		t.Fatalf("cancelled restore left %v", vms)
	}
}

func TestLatencyHonoursCancellation(t *testing.T) {
	p := fake.New(fake.Options{CreateLatency: time.Hour})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if _, err := p.Create(ctx, spec); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Create = %v, want DeadlineExceeded", err)
	}
}

func TestHookFailsOneSnapshotOnly(t *testing.T) {
	p := fake.New(fake.Options{})
	good, bad := p.AddSnapshot(spec), p.AddSnapshot(spec)
	p.SetHook(func(ctx context.Context, op fake.Op, target string) error {
		if op == fake.OpRestore && target == bad.ID {
			return errors.New("corrupt snapshot")
		}
		return nil
	})
	if _, err := p.Restore(context.Background(), good); err != nil {
		t.Errorf("restore of good snapshot: %v", err)
	}
	if _, err := p.Restore(context.Background(), bad); err == nil {
		t.Errorf("restore of bad snapshot succeeded")
	}
}

func TestKillMakesVMStoppedAndClosesAgent(t *testing.T) {
	p := fake.New(fake.Options{AgentHandler: echoAgent})
	ctx := context.Background()
	v, err := p.Create(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	conn, err := p.DialAgent(ctx, v.ID)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if err := p.Kill(v.ID); err != nil {
		t.Fatal(err)
	}
	got, _ := p.Inspect(ctx, v.ID)
	if got.Status != vm.StatusStopped {
		t.Errorf("killed VM status %q", got.Status)
	}
	if err := ping(ctx, conn); err == nil {
		t.Errorf("agent still answers on a killed VM")
	}
	if err := p.Resume(ctx, v.ID); !errors.Is(err, vm.ErrInvalidState) {
		t.Errorf("Resume of killed VM = %v", err)
	}
	if err := p.Kill("nope"); !errors.Is(err, vm.ErrNotFound) {
		t.Errorf("Kill unknown = %v", err)
	}
}

func TestConcurrentUse(t *testing.T) {
	p := fake.New(fake.Options{Seed: 1, Faults: map[fake.Op]fake.Fault{fake.OpRestore: {FailFraction: 0.2}}})
	snap := p.AddSnapshot(spec)
	ctx := context.Background()
	var wg sync.WaitGroup
	var mu sync.Mutex
	ids := map[string]bool{}
	for range 16 {
		wg.Go(func() {
			for range 50 {
				v, err := p.Restore(ctx, snap)
				if err != nil {
					continue
				}
				mu.Lock()
				if ids[v.ID] {
					t.Errorf("duplicate ID %s", v.ID)
				}
				ids[v.ID] = true
				mu.Unlock()
				_ = p.Resume(ctx, v.ID)
				_, _ = p.Inspect(ctx, v.ID)
				if err := p.Destroy(ctx, v.ID); err != nil {
					t.Errorf("destroy %s: %v", v.ID, err)
				}
			}
		})
	}
	wg.Wait()
	if got := p.Calls(fake.OpRestore); got != 800 {
		t.Errorf("Calls(restore) = %d, want 800", got)
	}
	if vms, _ := p.List(ctx); len(vms) != 0 {
		t.Errorf("%d VMs left", len(vms))
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 10s")
		}
		time.Sleep(time.Millisecond)
	}
}

// TestRestoreSnapshotOfAnEarlierProvider: a daemon restarted on the fake
// provider restores the templates its previous run snapshotted, from their
// files; a snapshot whose file is gone is not found; new snapshots take
// IDs of their own.
func TestRestoreSnapshotOfAnEarlierProvider(t *testing.T) {
	ctx := context.Background()
	first := fake.New(fake.Options{})
	v, err := first.Create(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	if err := first.Pause(ctx, v.ID); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	snap, err := first.Snapshot(ctx, v.ID, dir)
	if err != nil {
		t.Fatal(err)
	}
	second := fake.New(fake.Options{})
	r, err := second.Restore(ctx, snap)
	if err != nil {
		t.Fatalf("restore in a new provider of a snapshot with its file: %v", err)
	}
	if r.Spec.MemoryMiB != spec.MemoryMiB {
		t.Errorf("restored spec %+v, want the snapshot's %+v", r.Spec, spec)
	}
	if _, err := fake.New(fake.Options{}).Restore(ctx, vm.Snapshot{ID: snap.ID, Dir: t.TempDir()}); !errors.Is(err, vm.ErrNotFound) {
		t.Errorf("restore of a snapshot without its file: %v, want not found", err)
	}
	if err := second.Pause(ctx, r.ID); err != nil && !errors.Is(err, vm.ErrInvalidState) {
		t.Fatal(err)
	}
	next, err := second.Snapshot(ctx, r.ID, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if next.ID == snap.ID {
		t.Errorf("a new snapshot took the loaded one's ID %s", snap.ID)
	}
}
