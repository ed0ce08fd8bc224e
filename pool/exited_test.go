package pool

import (
	"context"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/warmpool/warmpool/events"
	"github.com/warmpool/warmpool/provider/fake"
	"github.com/warmpool/warmpool/vm"
)

// alwaysValid makes Validate pass for dead VMs too, so that only VMExited
// can keep one from being handed out.
func alwaysValid(context.Context, vm.VM) error { return nil }

// restoreGate blocks every Restore of the fake provider while closed.
type restoreGate struct {
	mu   sync.Mutex
	open chan struct{} // nil: restores pass
}

func (g *restoreGate) hook(ctx context.Context, op fake.Op, _ string) error {
	if op != fake.OpRestore {
		return nil
	}
	g.mu.Lock()
	ch := g.open
	g.mu.Unlock()
	if ch == nil {
		return nil
	}
	select {
	case <-ch:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (g *restoreGate) close() {
	g.mu.Lock()
	g.open = make(chan struct{})
	g.mu.Unlock()
}

func (g *restoreGate) release() {
	g.mu.Lock()
	if g.open != nil {
		close(g.open)
		g.open = nil
	}
	g.mu.Unlock()
}

func nextEviction(t *testing.T, sub *events.Subscription) events.Event {
	t.Helper()
	select {
	case e := <-sub.C:
		return e
	case <-time.After(20 * time.Second):
		t.Fatal("no eviction event")
		return events.Event{}
	}
}

func TestVMExitedEvictsAReadyVMAtOnceAndRefills(t *testing.T) {
	var gate restoreGate
	reg := prometheus.NewRegistry()
	bus := events.NewBus()
	sub := bus.Subscribe(16, func(e events.Event) bool { return e.Kind == EventEvicted })
	defer sub.Close()
	p, prov := newTestPool(t, fake.Options{Hook: gate.hook}, func(c *Config) {
		c.Validate = alwaysValid
		c.Registry = reg
		c.Events = bus
	})
	snap := prov.AddSnapshot(testSpec)
	if err := p.Register(stack("web", snap, 3, 3)); err != nil {
		t.Fatal(err)
	}
	waitReady(t, p, "web", 3)
	gate.close() // the replacement must not hide the eviction
	victim := listIDs(t, prov)[1]
	if err := prov.Kill(victim); err != nil {
		t.Fatal(err)
	}
	p.VMExited(victim)

	if s := status(t, p, "web"); s.Ready != 2 || s.Counters.Evicted != 1 {
		t.Errorf("right after VMExited: ready %d, evicted %d; want 2 and 1", s.Ready, s.Counters.Evicted)
	}
	if e := nextEviction(t, sub); e.Subject != "web" || e.Detail["vm"] != victim || e.Detail["reason"] != ReasonExited {
		t.Errorf("eviction event %+v, want %s evicted as %s", e, victim, ReasonExited)
	}
	if got := metricValue(t, reg, "warmpool_pool_evictions_total", map[string]string{"pool": "web", "reason": ReasonExited}); got != 1 {
		t.Errorf("exited evictions metric = %v, want 1", got)
	}
	waitFor(t, "the dead VM to be destroyed", func() bool { return !slices.Contains(listIDs(t, prov), victim) })
	waitFor(t, "a replacement restore to start", func() bool { return status(t, p, "web").Restoring == 1 })
	gate.release()
	waitReady(t, p, "web", 3)
	for range 3 {
		if l := acquire(t, p, "web"); l.VM.ID == victim {
			t.Fatalf("acquire handed out the VM that exited")
		}
	}
	p.VMExited(victim) // a second report, for a VM gone already
	if s := status(t, p, "web"); s.Counters.Evicted != 1 {
		t.Errorf("evicted %d after a repeated report, want 1", s.Counters.Evicted)
	}
}

func TestVMExitedIgnoresVMsThePoolDoesNotOwn(t *testing.T) {
	p, prov := newTestPool(t, fake.Options{}, func(c *Config) { c.Validate = alwaysValid })
	snap := prov.AddSnapshot(testSpec)
	if err := p.Register(stack("web", snap, 2, 2)); err != nil {
		t.Fatal(err)
	}
	waitReady(t, p, "web", 2)
	l := acquire(t, p, "web")
	waitReady(t, p, "web", 2)
	p.VMExited(l.VM.ID)
	p.VMExited("no-such-vm")
	if s := status(t, p, "web"); s.Ready != 2 || s.Counters.Evicted != 0 {
		t.Errorf("after exits of VMs the pool does not own: %+v", s)
	}
	if !slices.Contains(listIDs(t, prov), l.VM.ID) {
		t.Errorf("the pool destroyed leased VM %s", l.VM.ID)
	}
}

// heldValidate blocks the first Validate call made while armed, reporting
// the VM, until release is closed; the call then passes.
type heldValidate struct {
	armed   atomic.Bool
	held    chan string
	release chan struct{}
}

func newHeldValidate(armed bool) *heldValidate {
	h := &heldValidate{held: make(chan string, 1), release: make(chan struct{})}
	h.armed.Store(armed)
	return h
}

func (h *heldValidate) validate(ctx context.Context, v vm.VM) error {
	if !h.armed.CompareAndSwap(true, false) {
		return nil
	}
	h.held <- v.ID
	select {
	case <-h.release:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func TestVMExitedDuringRestoreOrHealthCheckIsEvictedWhenItEnds(t *testing.T) {
	for _, during := range []string{"restore", "health check"} {
		t.Run(during, func(t *testing.T) {
			h := newHeldValidate(during == "restore")
			bus := events.NewBus()
			sub := bus.Subscribe(16, func(e events.Event) bool { return e.Kind == EventEvicted })
			defer sub.Close()
			p, prov := newTestPool(t, fake.Options{}, func(c *Config) {
				c.Validate = h.validate
				c.Events = bus
				if during == "health check" {
					c.HealthInterval = 5 * time.Millisecond
				}
			})
			snap := prov.AddSnapshot(testSpec)
			if err := p.Register(stack("web", snap, 1, 1)); err != nil {
				t.Fatal(err)
			}
			if during == "health check" {
				waitReady(t, p, "web", 1)
				h.armed.Store(true)
			}
			victim := <-h.held
			if err := prov.Kill(victim); err != nil {
				t.Fatal(err)
			}
			p.VMExited(victim)
			close(h.release) // Validate passes: only the exit report can evict it
			if e := nextEviction(t, sub); e.Detail["vm"] != victim || e.Detail["reason"] != ReasonExited {
				t.Errorf("eviction event %+v, want %s evicted as %s", e, victim, ReasonExited)
			}
			waitFor(t, "the dead VM destroyed and replaced", func() bool {
				return !slices.Contains(listIDs(t, prov), victim) && status(t, p, "web").Ready == 1
			})
			if l := acquire(t, p, "web"); l.VM.ID == victim {
				t.Fatalf("acquire handed out the VM that exited")
			}
		})
	}
}

func TestVMExitedDuringHandOutTriesTheNextVM(t *testing.T) {
	var victim atomic.Value
	var p *Pool
	p, prov := newTestPool(t, fake.Options{}, func(c *Config) {
		c.Validate = alwaysValid
		c.Handoff = func(_ context.Context, v vm.VM, _ Identity) error {
			if victim.CompareAndSwap(nil, v.ID) {
				p.VMExited(v.ID) // the VM dies while it is handed off
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
	if l.VM.ID == victim.Load() {
		t.Fatalf("acquire handed out the VM that exited during its hand-off")
	}
	waitFor(t, "the dead VM destroyed", func() bool { return !slices.Contains(listIDs(t, prov), victim.Load().(string)) })
	if s := status(t, p, "web"); s.Counters.Evicted != 1 || s.Counters.Acquired != 1 {
		t.Errorf("counters %+v, want 1 eviction and 1 acquire", s.Counters)
	}
}
