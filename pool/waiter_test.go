package pool

import (
	"context"
	"errors"
	"sync"
	"testing"

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
