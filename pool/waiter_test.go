package pool

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/warmpool/warmpool/provider/fake"
	"github.com/warmpool/warmpool/vm"
)

// validations records which VMs Validate saw.
type validations struct {
	mu  sync.Mutex
	ids map[string]int
}

func (v *validations) validate(_ context.Context, m vm.VM) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.ids[m.ID]++
	return nil
}

func (v *validations) count(id string) int {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.ids[id]
}

// A VM restored while an acquirer waits goes to it without Validate (the
// warm-up a ready VM gets): the waiter is served as soon as the restore
// returns. The hand-off still runs.
func TestWaiterGetsItsRestoreWithoutValidate(t *testing.T) {
	seen := &validations{ids: map[string]int{}}
	handedOff := make(chan string, 1)
	p, prov := newTestPool(t, fake.Options{}, func(c *Config) {
		c.Validate = seen.validate
		c.Handoff = func(_ context.Context, v vm.VM, _ Identity) error { handedOff <- v.ID; return nil }
	})
	snap := prov.AddSnapshot(testSpec)
	if err := p.Register(stack("web", snap, 0, 2)); err != nil {
		t.Fatal(err)
	}
	l := acquire(t, p, "web")
	if l.Timings.Wait == 0 {
		t.Fatalf("acquire from an empty pool did not wait: %+v", l.Timings)
	}
	if n := seen.count(l.VM.ID); n != 0 {
		t.Errorf("the waiter's VM %s was validated %d times before its hand-off, want 0", l.VM.ID, n)
	}
	if got := <-handedOff; got != l.VM.ID {
		t.Errorf("handed off %s, leased %s", got, l.VM.ID)
	}
}

// When the acquirer a restore was for has gone by the time it finishes, the
// VM is validated before it enters ready, and the next acquirer hits it.
func TestRestoreForAWaiterThatLeftIsValidatedBeforeReady(t *testing.T) {
	seen := &validations{ids: map[string]int{}}
	waitCtx, leave := context.WithCancel(context.Background())
	left := make(chan error, 1)
	var created sync.Once
	p, prov := newTestPool(t, fake.Options{}, func(c *Config) {
		c.Validate = seen.validate
		// Runs after the restore decided it is for a waiter: the waiter
		// leaves now.
		c.OnVMCreated = func(string, vm.VM) {
			created.Do(func() { leave(); <-left })
		}
	})
	snap := prov.AddSnapshot(testSpec)
	if err := p.Register(stack("web", snap, 0, 1)); err != nil {
		t.Fatal(err)
	}
	go func() {
		_, err := p.Acquire(waitCtx, "web", testID())
		left <- err
		left <- err
	}()
	waitFor(t, "the restore's VM to be validated and ready", func() bool { return status(t, p, "web").Ready == 1 })
	if err := <-left; !errors.Is(err, ErrNothingReady) {
		t.Fatalf("acquirer that left: %v, want ErrNothingReady", err)
	}
	ids := listIDs(t, prov)
	if len(ids) != 1 {
		t.Fatalf("VMs: %v, want the one restore", ids)
	}
	if n := seen.count(ids[0]); n != 1 {
		t.Errorf("VM %s entered ready after %d validations, want 1", ids[0], n)
	}
	l := acquire(t, p, "web")
	if l.VM.ID != ids[0] || l.Timings.Wait != 0 {
		t.Errorf("next acquire got %s after waiting %v, want a hit on %s", l.VM.ID, l.Timings.Wait, ids[0])
	}
}

// A VM restored for a waiter keeps its restore slot until its hand-off is
// done: with one slot, the next waiter's restore starts only then, so
// waiters are served in turn rather than all slowed down together.
func TestWaiterRestoreHoldsItsSlotThroughTheHandoff(t *testing.T) {
	entered := make(chan string, 4)
	unblock := make(chan struct{})
	p, prov := newTestPool(t, fake.Options{}, func(c *Config) {
		c.Parallelism = 1
		c.Handoff = func(_ context.Context, v vm.VM, _ Identity) error {
			entered <- v.ID
			<-unblock
			return nil
		}
	})
	snap := prov.AddSnapshot(testSpec)
	if err := p.Register(stack("web", snap, 0, 4)); err != nil {
		t.Fatal(err)
	}
	leases := make(chan *Lease, 2)
	for range 2 {
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			l, err := p.Acquire(ctx, "web", testID())
			if err != nil {
				t.Errorf("Acquire: %v", err)
			}
			leases <- l
		}()
	}
	first := <-entered
	waitFor(t, "both acquirers to wait", func() bool { return status(t, p, "web").Waiting == 1 })
	time.Sleep(50 * time.Millisecond) // room for a restore that should not start
	if n := prov.Calls(fake.OpRestore); n != 1 {
		t.Errorf("%d restores during the first waiter's hand-off, want 1 (its slot is still taken)", n)
	}
	close(unblock)
	second := <-entered
	<-leases
	<-leases
	if first == second {
		t.Errorf("both waiters got %s", first)
	}
	if n := prov.Calls(fake.OpRestore); n != 2 {
		t.Errorf("%d restores for two waiters, want 2", n)
	}
}
