package pool

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/warmpool/warmpool/provider/fake"
	"github.com/warmpool/warmpool/vm"
)

// ledger records what became of every VM the pool restored: the pool's own
// hooks say which it created and destroyed, the acquirers which they got.
type ledger struct {
	t         *testing.T
	mu        sync.Mutex
	created   map[string]bool
	destroyed map[string]bool
	leased    map[string]bool
}

func newLedger(t *testing.T) *ledger {
	return &ledger{t: t, created: map[string]bool{}, destroyed: map[string]bool{}, leased: map[string]bool{}}
}

func (l *ledger) hooks(c *Config) {
	c.OnVMCreated = func(_ string, v vm.VM) {
		l.mu.Lock()
		defer l.mu.Unlock()
		l.created[v.ID] = true
	}
	c.OnVMDestroyed = func(_ string, id string) {
		l.mu.Lock()
		defer l.mu.Unlock()
		if l.leased[id] {
			l.t.Errorf("the pool destroyed %s, which it had handed out", id)
		}
		if l.destroyed[id] {
			l.t.Errorf("the pool destroyed %s twice", id)
		}
		l.destroyed[id] = true
	}
}

func (l *ledger) lease(ls *Lease) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.leased[ls.VM.ID] {
		l.t.Errorf("VM %s handed out twice", ls.VM.ID)
	}
	if l.destroyed[ls.VM.ID] {
		l.t.Errorf("VM %s handed out after the pool destroyed it", ls.VM.ID)
	}
	l.leased[ls.VM.ID] = true
}

// check asserts that every VM the pool created is exactly one of: handed
// out (and still listed by the provider), ready in the pool (listed and
// counted as ready), or destroyed by the pool (no longer listed).
func (l *ledger) check(prov vm.Provider, ready int) {
	l.t.Helper()
	l.mu.Lock()
	defer l.mu.Unlock()
	listed := map[string]vm.VM{}
	vms, err := prov.List(context.Background())
	if err != nil {
		l.t.Fatal(err)
	}
	for _, v := range vms {
		listed[v.ID] = v
	}
	inPool := 0
	for id := range l.created {
		_, alive := listed[id]
		switch {
		case l.leased[id]:
			if !alive {
				l.t.Errorf("leased VM %s is gone", id)
			}
		case l.destroyed[id]:
			if alive {
				l.t.Errorf("VM %s reported destroyed is still listed", id)
			}
		case alive:
			inPool++
			if listed[id].Status != vm.StatusPaused {
				l.t.Errorf("VM %s, neither leased nor destroyed, is %s, want paused in the pool", id, listed[id].Status)
			}
		default:
			l.t.Errorf("VM %s vanished without the pool destroying it", id)
		}
	}
	if inPool != ready {
		l.t.Errorf("%d created VMs are neither leased nor destroyed, but the pool counts %d ready: lost or double-counted VMs", inPool, ready)
	}
	for id := range listed {
		if !l.created[id] {
			l.t.Errorf("provider lists %s, which the pool never reported", id)
		}
	}
}

// quiesce waits until nothing is restoring or being destroyed, or for 20s;
// check then reports whatever is still out of place.
func quiesce(t *testing.T, p *Pool, prov vm.Provider, l *ledger, names ...string) int {
	t.Helper()
	ready := 0
	settled := func() bool {
		ready = 0
		for _, name := range names {
			s := status(t, p, name)
			if s.Restoring != 0 {
				return false
			}
			ready += s.Ready
		}
		vms, err := prov.List(context.Background())
		if err != nil {
			return false
		}
		l.mu.Lock()
		defer l.mu.Unlock()
		alive := 0
		for _, v := range vms {
			if !l.leased[v.ID] {
				alive++
			}
		}
		return alive == ready // background destroys have finished
	}
	for deadline := time.Now().Add(20 * time.Second); !settled() && time.Now().Before(deadline); {
		time.Sleep(2 * time.Millisecond)
	}
	return ready
}

func TestCancelledWaitersNeverLoseOrDoubleDeliverAVM(t *testing.T) {
	l := newLedger(t)
	p, prov := newTestPool(t, fake.Options{RestoreLatency: 100 * time.Microsecond}, func(c *Config) {
		c.Parallelism = 4
		l.hooks(c)
	})
	snap := prov.AddSnapshot(testSpec)
	if err := p.Register(stack("web", snap, 0, 4)); err != nil {
		t.Fatal(err)
	}
	const acquirers, attempts = 16, 250 // 4000 acquires, most of them cancelled
	var wg sync.WaitGroup
	for g := range acquirers {
		wg.Go(func() {
			r := rand.New(rand.NewPCG(uint64(g), 1))
			for range attempts {
				// Deadlines around one restore, and cancellations from
				// outside, so that many waits end just as a VM arrives.
				ctx, cancel := context.WithTimeout(context.Background(), time.Duration(r.IntN(400))*time.Microsecond)
				if r.IntN(4) == 0 {
					time.AfterFunc(time.Duration(r.IntN(300))*time.Microsecond, cancel)
				}
				ls, err := p.Acquire(ctx, "web", testID())
				cancel()
				switch {
				case err == nil:
					l.lease(ls)
				case !errors.Is(err, ErrNothingReady):
					t.Errorf("Acquire: %v", err)
					return
				}
			}
		})
	}
	wg.Wait()
	ready := quiesce(t, p, prov, l, "web")
	l.check(prov, ready)
	l.mu.Lock()
	t.Logf("%d restored, %d handed out, %d destroyed by the pool, %d ready", len(l.created), len(l.leased), len(l.destroyed), ready)
	l.mu.Unlock()
	if s := status(t, p, "web"); int(s.Counters.Acquired) != len(l.leased) {
		t.Errorf("pool counts %d acquired, acquirers got %d", s.Counters.Acquired, len(l.leased))
	}
}

func TestConcurrentAcquireCancelUnregisterShutdownAccountForEveryVM(t *testing.T) {
	for round := range 12 {
		t.Run(fmt.Sprint(round), func(t *testing.T) {
			l := newLedger(t)
			prov := fake.New(fake.Options{RestoreLatency: 100 * time.Microsecond})
			cfg := Config{Provider: prov, Parallelism: 3, SweepInterval: time.Hour, HealthInterval: time.Millisecond,
				BackoffBase: time.Millisecond, BackoffMax: 5 * time.Millisecond}
			l.hooks(&cfg)
			p, err := New(cfg)
			if err != nil {
				t.Fatal(err)
			}
			snap := prov.AddSnapshot(testSpec)
			names := []string{"a", "b", "c"}
			for _, name := range names {
				if err := p.Register(stack(name, snap, 2, 6)); err != nil {
					t.Fatal(err)
				}
			}
			stop := make(chan struct{})
			var wg sync.WaitGroup
			for g := range 12 {
				wg.Go(func() {
					r := rand.New(rand.NewPCG(uint64(round), uint64(g)))
					for {
						select {
						case <-stop:
							return
						default:
						}
						ctx, cancel := context.WithTimeout(context.Background(), time.Duration(r.IntN(500))*time.Microsecond)
						ls, err := p.Acquire(ctx, names[r.IntN(len(names))], testID())
						cancel()
						switch {
						case err == nil:
							l.lease(ls)
						case errors.Is(err, ErrClosed):
							return
						case errors.Is(err, ErrNothingReady), errors.Is(err, vm.ErrNotFound):
						default:
							t.Errorf("Acquire: %v", err)
							return
						}
					}
				})
			}
			// Pools come and go under the acquirers.
			wg.Go(func() {
				r := rand.New(rand.NewPCG(uint64(round), 99))
				for {
					select {
					case <-stop:
						return
					case <-time.After(time.Duration(r.IntN(2000)) * time.Microsecond):
					}
					name := names[r.IntN(len(names))]
					if err := p.Unregister(name); err != nil && !errors.Is(err, vm.ErrNotFound) && !errors.Is(err, ErrClosed) {
						t.Errorf("Unregister: %v", err)
					}
					if err := p.Register(stack(name, snap, 2, 6)); err != nil && !errors.Is(err, ErrClosed) {
						t.Errorf("Register: %v", err)
					}
				}
			})
			time.Sleep(time.Duration(20+5*round) * time.Millisecond)
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			if err := p.Shutdown(ctx); err != nil {
				t.Fatalf("Shutdown: %v", err)
			}
			close(stop)
			wg.Wait()
			// After Shutdown only the handed-out VMs are left.
			l.check(prov, 0)
		})
	}
}
