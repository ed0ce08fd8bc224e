package daemon

import (
	"errors"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/warmpool/warmpool/api"
	"github.com/warmpool/warmpool/provider/fake"
	"github.com/warmpool/warmpool/store"
	"github.com/warmpool/warmpool/vm"
)

// noBalloonFake is the fake provider without its balloon capability; its
// type still has the Ballooner methods.
type noBalloonFake struct{ *fake.Provider }

func (p noBalloonFake) Capabilities() vm.Capabilities {
	caps := p.Provider.Capabilities()
	delete(caps, vm.CapBalloon)
	return caps
}

// The wrapper implements every optional interface; what it offers is what
// its inner provider advertises, also when a caller asks the wrapper
// directly.
func TestWrapperOffersOnlyWhatItsProviderAdvertises(t *testing.T) {
	p := &ownedProvider{inner: noBalloonFake{fake.New(fake.Options{})}, log: slog.New(slog.DiscardHandler)}
	if _, ok := vm.As[vm.Ballooner](p, vm.CapBalloon); ok {
		t.Error("vm.As gave a Ballooner through the wrapper of a provider without the balloon capability")
	}
	if _, ok := vm.As[vm.Snapshotter](p, vm.CapSnapshot); !ok {
		t.Error("vm.As refused the Snapshotter of a provider that advertises snapshots")
	}
	if err := p.SetBalloon(t.Context(), "no-such-vm", 128); !errors.Is(err, vm.ErrUnsupported) {
		t.Errorf("SetBalloon through the wrapper = %v, want vm.ErrUnsupported", err)
	}
}

// recordWrites collects the store's committed writes while a test runs.
type recordWrites struct {
	mu   sync.Mutex
	muts []store.Mutation
}

func (w *recordWrites) add(m store.Mutation) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.muts = append(w.muts, m)
}

// mark is where the writes so far end.
func (w *recordWrites) mark() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.muts)
}

// of returns the writes to key in bucket since mark.
func (w *recordWrites) of(mark int, bucket, key string) []store.Mutation {
	w.mu.Lock()
	defer w.mu.Unlock()
	var out []store.Mutation
	for _, m := range w.muts[mark:] {
		if m.Bucket == bucket && m.Key == key {
			out = append(out, m)
		}
	}
	return out
}

// A release deletes the lease and its VM's record exactly once each, in
// one transaction, and writes neither again; so does an expiry.
func TestReleaseDeletesTheVMRecordOnceWithTheLease(t *testing.T) {
	r := startFake(t, t.TempDir(), newFakeProvider(), "")
	setupPool(t, r.client, 2, 3)
	var w recordWrites
	r.d.st.Observe(w.add)
	defer r.d.st.Observe(nil)

	check := func(mark int, l api.Lease) {
		t.Helper()
		vmWrites, leaseWrites := w.of(mark, "vms", l.VMID), w.of(mark, "leases", l.ID)
		var vmDeletes, leaseDeletes []store.Mutation
		for _, m := range vmWrites {
			if m.Delete {
				vmDeletes = append(vmDeletes, m)
			}
		}
		for _, m := range leaseWrites {
			if m.Delete {
				leaseDeletes = append(leaseDeletes, m)
			}
		}
		if len(vmDeletes) != 1 || len(leaseDeletes) != 1 {
			t.Fatalf("lease %s: VM record deleted %d times, lease record %d times; want once each (VM writes %v, lease writes %v)",
				l.ID, len(vmDeletes), len(leaseDeletes), vmWrites, leaseWrites)
		}
		if vmDeletes[0].Tx != leaseDeletes[0].Tx {
			t.Errorf("lease %s: VM record and lease deleted in transactions %d and %d, want one", l.ID, vmDeletes[0].Tx, leaseDeletes[0].Tx)
		}
		if last := vmWrites[len(vmWrites)-1]; !last.Delete {
			t.Errorf("lease %s: VM record written after its delete: %v", l.ID, vmWrites)
		}
		// From the acquire on, the lease's commit marks the VM leased and
		// nothing else writes its record until the release deletes it.
		if puts := len(vmWrites) - 1; puts != 1 {
			t.Errorf("lease %s: VM record written %d times from acquire to release, want 1: %v", l.ID, puts, vmWrites)
		}
		// An acquire commits once: the lease and its VM's leased role.
		var leasePuts []store.Mutation
		for _, m := range leaseWrites {
			if !m.Delete {
				leasePuts = append(leasePuts, m)
			}
		}
		if len(leasePuts) != 1 || len(vmWrites) < 2 || vmWrites[0].Tx != leasePuts[0].Tx {
			t.Errorf("lease %s: lease written %v and its VM %v, want both once in one transaction", l.ID, leasePuts, vmWrites)
		}
	}

	mark := w.mark()
	l, err := r.client.Acquire(ctxT(t), "py", 5*time.Second, api.AcquireRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.client.Release(ctxT(t), l.ID); err != nil {
		t.Fatal(err)
	}
	if err := r.client.Release(ctxT(t), l.ID); err != nil {
		t.Fatalf("second release: %v", err)
	}
	check(mark, l)

	waitReady(t, r.client, "py", 1)
	mark = w.mark()
	exp, err := r.client.Acquire(ctxT(t), "py", 5*time.Second, api.AcquireRequest{TTL: api.Duration(time.Millisecond)})
	if err != nil {
		t.Fatal(err)
	}
	// The store tells observers after the commit, so a lease list may be
	// empty a moment before the delete is observed.
	waitFor(t, "the lease to expire", func() bool {
		for _, m := range w.of(mark, "leases", exp.ID) {
			if m.Delete {
				return true
			}
		}
		return false
	})
	if ls, err := r.client.Leases(ctxT(t)); err != nil || len(ls) != 0 {
		t.Fatalf("leases after expiry = %v, %v; want none", ls, err)
	}
	check(mark, exp)
}
