package firecracker

import (
	"context"
	"testing"
	"time"

	"github.com/warmpool/warmpool/agent"
	"github.com/warmpool/warmpool/pool"
	"github.com/warmpool/warmpool/vm"
)

// TestWarmPoolOverFirecracker runs the pool against the provider and the
// fake Firecracker: restored clones wait paused, an acquire hands out a
// running VM whose agent answers, the pool refills, and shutdown leaves no
// VM behind.
func TestWarmPoolOverFirecracker(t *testing.T) {
	e := newEnv(t, nil)
	ctx := testCtx(t)
	tmpl, err := e.p.Create(ctx, e.spec)
	if err != nil {
		t.Fatal(err)
	}
	if err := e.p.Pause(ctx, tmpl.ID); err != nil {
		t.Fatal(err)
	}
	snap, err := e.p.Snapshot(ctx, tmpl.ID, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if err := e.p.Destroy(ctx, tmpl.ID); err != nil {
		t.Fatal(err)
	}
	p, err := pool.New(pool.Config{
		Provider: e.p,
		Handoff: func(ctx context.Context, v vm.VM, _ pool.Identity) error {
			return agent.WaitReady(ctx, e.p, v.ID)
		},
		Parallelism: 2,
	})
	if err != nil {
		t.Fatal(err)
	}
	shutdown := func() {
		sctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := p.Shutdown(sctx); err != nil {
			t.Errorf("pool shutdown: %v", err)
		}
	}
	defer shutdown()
	key := vm.StackKey{Template: "base", VCPUs: e.spec.VCPUs, MemoryMiB: e.spec.MemoryMiB}
	if err := p.Register(pool.StackSpec{Name: "web", Key: key, Snapshot: snap, Min: 2, Max: 2}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "two warm clones", func() bool {
		s, err := p.Status("web")
		return err == nil && s.Ready == 2 && s.Restoring == 0
	})
	for _, v := range mustList(t, e.p) {
		if v.Status != vm.StatusPaused || v.Snapshot != snap.ID {
			t.Errorf("warm VM %s is %s from %q, want paused from %s", v.ID, v.Status, v.Snapshot, snap.ID)
		}
	}
	lease, err := p.Acquire(ctx, "web", pool.Identity{LeaseID: "l-1"})
	if err != nil {
		t.Fatal(err)
	}
	wantStatus(t, e.p, lease.VM.ID, vm.StatusRunning)
	c, err := agent.Dial(ctx, e.p, lease.VM.ID)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Ping(ctx); err != nil {
		t.Errorf("ping leased VM: %v", err)
	}
	c.Close()
	waitFor(t, "the pool to refill", func() bool {
		s, err := p.Status("web")
		return err == nil && s.Ready == 2 && s.Restoring == 0
	})
	if err := e.p.Destroy(ctx, lease.VM.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := e.p.Inspect(ctx, lease.VM.ID); err == nil {
		t.Errorf("released VM %s still exists", lease.VM.ID)
	}
	shutdown()
	if left := mustList(t, e.p); len(left) != 0 {
		t.Errorf("%d VMs left after pool shutdown", len(left))
	}
}

func mustList(t *testing.T, p vm.Provider) []vm.VM {
	t.Helper()
	vms, err := p.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return vms
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
