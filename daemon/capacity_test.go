package daemon

import (
	"errors"
	"testing"

	"github.com/warmpool/warmpool/api"
	"github.com/warmpool/warmpool/vm"
)

// A pool that, with every other pool at its max, could need more guest
// memory than the host offers is refused, and nothing is recorded.
func TestPoolBeyondHostMemoryIsRefused(t *testing.T) {
	r := startFake(t, t.TempDir(), newFakeProvider(), "limits: {memory_mib: 1024}\n")
	c := r.client
	if _, err := c.BuildTemplate(ctxT(t), api.TemplateRequest{Name: "base", MemoryMiB: 256}, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := c.SetPool(ctxT(t), "a", api.PoolRequest{Template: "base", Min: 0, Max: 2}); err != nil {
		t.Fatalf("pool within the limit: %v", err)
	}
	_, err := c.SetPool(ctxT(t), "b", api.PoolRequest{Template: "base", Min: 0, Max: 3})
	if !errors.Is(err, vm.ErrExhausted) {
		t.Fatalf("pool beyond the limit = %v, want exhausted", err)
	}
	if _, err := c.Pool(ctxT(t), "b"); !errors.Is(err, vm.ErrNotFound) {
		t.Errorf("refused pool was recorded: %v", err)
	}
	// A pool's own old size does not count against its new one.
	if _, err := c.SetPool(ctxT(t), "a", api.PoolRequest{Template: "base", Min: 0, Max: 4}); err != nil {
		t.Errorf("growing the only pool to the limit: %v", err)
	}
	if _, err := c.SetPool(ctxT(t), "a", api.PoolRequest{Template: "base", Min: 0, Max: 5}); !errors.Is(err, vm.ErrExhausted) {
		t.Errorf("growing the only pool past the limit = %v, want exhausted", err)
	}
	if p, err := c.Pool(ctxT(t), "a"); err != nil || p.Max != 4 {
		t.Errorf("after a refused change pool a = %+v, %v; want max 4 kept", p, err)
	}
}

// An adaptive pool is admitted at its min: it grows only within the
// budget at run time, and says so in pool ls.
func TestAdaptivePoolIsAdmittedAtItsMin(t *testing.T) {
	r := startFake(t, t.TempDir(), newFakeProvider(), "limits: {memory_mib: 1024}\n")
	c := r.client
	if _, err := c.BuildTemplate(ctxT(t), api.TemplateRequest{Name: "base", MemoryMiB: 256}, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := c.SetPool(ctxT(t), "fixed", api.PoolRequest{Template: "base", Min: 2, Max: 2}); err != nil {
		t.Fatal(err)
	}
	p, err := c.SetPool(ctxT(t), "ad", api.PoolRequest{Template: "base", Min: 1, Max: 16, Adaptive: true})
	if err != nil {
		t.Fatalf("adaptive pool with max beyond the limit, min within: %v", err)
	}
	if !p.Adaptive || p.Max != 16 {
		t.Errorf("set adaptive pool: %+v", p)
	}
	if _, err := c.SetPool(ctxT(t), "ad", api.PoolRequest{Template: "base", Min: 3, Max: 16, Adaptive: true}); !errors.Is(err, vm.ErrExhausted) {
		t.Errorf("adaptive pool whose min exceeds what the fixed pool leaves = %v, want exhausted", err)
	}
	waitReady(t, c, "ad", 1)
	got, err := c.Pool(ctxT(t), "ad")
	if err != nil {
		t.Fatal(err)
	}
	// Without demand it wants its min, and the budget grants that.
	if got.Target != 1 || got.Allowed != 1 || got.TargetReason == nil || *got.TargetReason != "start" {
		t.Errorf("adaptive pool: target %d allowed %d reason %v; want 1, 1, start", got.Target, got.Allowed, got.TargetReason)
	}
}
