package lease

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/warmpool/warmpool/store"
	"github.com/warmpool/warmpool/vm"
)

// world is a registry over a real store, whose DestroyVM removes the VM
// record with the lease the way the daemon's VM owner does.
type world struct {
	dir       string
	st        *store.Store
	r         *Registry
	now       atomic.Pointer[time.Time]
	destroyed sync.Map // vm ID -> *atomic.Int32
	failNext  atomic.Bool
	released  chan releaseNote
}

type releaseNote struct {
	id      string
	expired bool
}

var t0 = time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)

func newWorld(t *testing.T, dir string) *world {
	t.Helper()
	if dir == "" {
		dir = t.TempDir()
	}
	st, err := store.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	w := &world{dir: dir, st: st, released: make(chan releaseNote, 100)}
	w.now.Store(&t0)
	w.r, err = New(Config{
		Store: st,
		DestroyVM: func(ctx context.Context, vmID string, forget func(*store.Tx) error) error {
			if w.failNext.Swap(false) {
				return errors.New("injected destroy failure")
			}
			n, _ := w.destroyed.LoadOrStore(vmID, new(atomic.Int32))
			n.(*atomic.Int32).Add(1)
			return st.Update(func(tx *store.Tx) error {
				if err := store.VMs.Delete(tx, vmID); err != nil {
					return err
				}
				return forget(tx)
			})
		},
		OnRelease: func(l store.Lease, expired bool) { w.released <- releaseNote{l.ID, expired} },
		Now:       func() time.Time { return *w.now.Load() },
		Interval:  10 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	return w
}

func (w *world) setNow(t time.Time) { w.now.Store(&t) }

func (w *world) destroys(vmID string) int {
	n, ok := w.destroyed.Load(vmID)
	if !ok {
		return 0
	}
	return int(n.(*atomic.Int32).Load())
}

// add records a VM leased to id and the lease itself.
func (w *world) add(t *testing.T, id, vmID string, ttl time.Duration) store.Lease {
	t.Helper()
	if err := store.Put(w.st, store.VMs, store.VM{ID: vmID, Role: store.RoleLeased, Lease: id}); err != nil {
		t.Fatal(err)
	}
	l := store.Lease{ID: id, Pool: "p", VMID: vmID, CreatedAt: t0, TTL: ttl}
	if ttl > 0 {
		exp := t0.Add(ttl)
		l.ExpiresAt = &exp
	}
	if err := w.r.Add(l, nil); err != nil {
		t.Fatalf("Add(%s): %v", id, err)
	}
	return l
}

func (w *world) leaseIDs(t *testing.T) []string {
	t.Helper()
	ls, err := w.r.List()
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, l := range ls {
		out = append(out, l.ID)
	}
	return out
}

func TestAcquireAndRelease(t *testing.T) {
	w := newWorld(t, "")
	w.add(t, "l-a", "vm-a", 0)
	w.add(t, "l-b", "vm-b", 0)
	if got, err := w.r.Get("l-a"); err != nil || got.VMID != "vm-a" {
		t.Fatalf("Get(l-a) = %+v, %v", got, err)
	}
	if n, err := w.r.Count(); err != nil || n != 2 {
		t.Fatalf("Count = %d, %v; want 2", n, err)
	}
	released, err := w.r.Release(t.Context(), "l-a")
	if err != nil || !released {
		t.Fatalf("Release(l-a) = %t, %v", released, err)
	}
	if w.destroys("vm-a") != 1 || w.destroys("vm-b") != 0 {
		t.Errorf("destroys: vm-a %d, vm-b %d; want 1, 0", w.destroys("vm-a"), w.destroys("vm-b"))
	}
	if _, err := w.r.Get("l-a"); !errors.Is(err, vm.ErrNotFound) {
		t.Errorf("Get after release = %v, want ErrNotFound", err)
	}
	if _, err := store.Get(w.st, store.VMs, "vm-a"); !errors.Is(err, vm.ErrNotFound) {
		t.Errorf("VM record after release: %v, want gone", err)
	}
	if got := w.leaseIDs(t); len(got) != 1 || got[0] != "l-b" {
		t.Errorf("leases after release = %v, want [l-b]", got)
	}
	if note := <-w.released; note != (releaseNote{"l-a", false}) {
		t.Errorf("OnRelease heard %+v", note)
	}
}

func TestAddRefusesALeaseWithoutIDOrVM(t *testing.T) {
	w := newWorld(t, "")
	for _, l := range []store.Lease{{VMID: "vm"}, {ID: "l-x"}, {ID: "no/slash", VMID: "vm"}} {
		if err := w.r.Add(l, nil); !errors.Is(err, vm.ErrInvalid) {
			t.Errorf("Add(%+v) = %v, want ErrInvalid", l, err)
		}
	}
	if ids := w.leaseIDs(t); len(ids) != 0 {
		t.Errorf("refused leases were recorded: %v", ids)
	}
}

func TestReleaseIsIdempotent(t *testing.T) {
	w := newWorld(t, "")
	w.add(t, "l-a", "vm-a", 0)
	for i := range 3 {
		released, err := w.r.Release(t.Context(), "l-a")
		if err != nil || released != (i == 0) {
			t.Fatalf("release %d = %t, %v; want %t, nil", i, released, err, i == 0)
		}
	}
	if released, err := w.r.Release(t.Context(), "l-never"); err != nil || released {
		t.Errorf("Release of an unknown lease = %t, %v; want false, nil", released, err)
	}
	if n := w.destroys("vm-a"); n != 1 {
		t.Errorf("VM destroyed %d times, want 1", n)
	}
}

// Concurrent releases of one lease destroy its VM once; every caller
// returns without error and exactly one reports the release.
func TestConcurrentReleasesDestroyOnce(t *testing.T) {
	w := newWorld(t, "")
	for round := range 50 {
		id, vmID := "l-"+string(rune('a'+round%26))+time.Duration(round).String(), "vm-"+time.Duration(round).String()
		w.add(t, id, vmID, 0)
		var wg sync.WaitGroup
		var reported atomic.Int32
		for range 8 {
			wg.Go(func() {
				released, err := w.r.Release(t.Context(), id)
				if err != nil {
					t.Errorf("Release(%s): %v", id, err)
				}
				if released {
					reported.Add(1)
				}
			})
		}
		wg.Wait()
		if n := w.destroys(vmID); n != 1 {
			t.Fatalf("round %d: VM destroyed %d times, want 1", round, n)
		}
		if reported.Load() != 1 {
			t.Fatalf("round %d: %d callers reported the release, want 1", round, reported.Load())
		}
	}
}

func TestFailedDestroyKeepsTheLease(t *testing.T) {
	w := newWorld(t, "")
	w.add(t, "l-a", "vm-a", 0)
	w.failNext.Store(true)
	if _, err := w.r.Release(t.Context(), "l-a"); err == nil {
		t.Fatal("Release with a failing destroy returned nil")
	}
	if _, err := w.r.Get("l-a"); err != nil {
		t.Fatalf("lease gone after a failed destroy: %v", err)
	}
	if released, err := w.r.Release(t.Context(), "l-a"); err != nil || !released {
		t.Fatalf("second Release = %t, %v; want released", released, err)
	}
}

func TestTTLExpiryFollowsTheClock(t *testing.T) {
	w := newWorld(t, "")
	w.add(t, "l-short", "vm-short", time.Minute)
	w.add(t, "l-long", "vm-long", time.Hour)
	w.add(t, "l-forever", "vm-forever", 0)

	w.setNow(t0.Add(59 * time.Second))
	if got := w.r.Expire(t.Context()); len(got) != 0 {
		t.Fatalf("expired before its TTL: %v", got)
	}
	w.setNow(t0.Add(time.Minute))
	got := w.r.Expire(t.Context())
	if len(got) != 1 || got[0].ID != "l-short" {
		t.Fatalf("Expire at the deadline = %v, want l-short", got)
	}
	if note := <-w.released; note != (releaseNote{"l-short", true}) {
		t.Errorf("OnRelease heard %+v, want l-short expired", note)
	}
	if w.destroys("vm-short") != 1 {
		t.Error("expired lease's VM was not destroyed")
	}
	w.setNow(t0.Add(100 * 24 * time.Hour))
	if got := w.r.Expire(t.Context()); len(got) != 1 || got[0].ID != "l-long" {
		t.Fatalf("Expire much later = %v, want l-long", got)
	}
	if ids := w.leaseIDs(t); len(ids) != 1 || ids[0] != "l-forever" {
		t.Errorf("leases left = %v, want the one without TTL", ids)
	}
}

func TestRunExpiresOnItsOwn(t *testing.T) {
	w := newWorld(t, "")
	w.add(t, "l-a", "vm-a", time.Minute)
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan struct{})
	go func() { w.r.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()
	w.setNow(t0.Add(time.Hour))
	select {
	case note := <-w.released:
		if note != (releaseNote{"l-a", true}) {
			t.Errorf("heard %+v", note)
		}
	case <-time.After(time.Minute):
		t.Fatal("Run never expired the lease")
	}
}

// A registry over a reopened store serves the leases an earlier one added.
func TestLeasesSurviveARestart(t *testing.T) {
	dir := t.TempDir()
	w := newWorld(t, dir)
	w.add(t, "l-a", "vm-a", 0)
	w.add(t, "l-b", "vm-b", time.Minute)
	w.st.Close()

	w2 := newWorld(t, dir)
	if ids := w2.leaseIDs(t); len(ids) != 2 {
		t.Fatalf("after restart leases = %v, want both", ids)
	}
	w2.setNow(t0.Add(time.Hour))
	if got := w2.r.Expire(t.Context()); len(got) != 1 || got[0].ID != "l-b" {
		t.Errorf("restarted registry expired %v, want l-b", got)
	}
	if released, err := w2.r.Release(t.Context(), "l-a"); err != nil || !released {
		t.Errorf("restarted registry Release(l-a) = %t, %v", released, err)
	}
	if err := w2.r.Drop("l-gone"); err != nil {
		t.Errorf("Drop of an unknown lease: %v", err)
	}
}

func TestSetTTLMovesTheDeadlineFromNow(t *testing.T) {
	w := newWorld(t, "")
	w.add(t, "l-ext", "vm-ext", time.Minute)
	w.add(t, "l-never", "vm-never", time.Minute)

	w.setNow(t0.Add(50 * time.Second))
	got, err := w.r.SetTTL("l-ext", time.Minute)
	if err != nil {
		t.Fatalf("SetTTL: %v", err)
	}
	if want := t0.Add(110 * time.Second); got.ExpiresAt == nil || !got.ExpiresAt.Equal(want) {
		t.Fatalf("SetTTL answered expires_at %v, want %v (a minute from now)", got.ExpiresAt, want)
	}
	if _, err := w.r.SetTTL("l-never", 0); err != nil {
		t.Fatalf("SetTTL 0: %v", err)
	}
	w.setNow(t0.Add(100 * time.Second))
	if got := w.r.Expire(t.Context()); len(got) != 0 {
		t.Fatalf("Expire past the old deadline released %v; the new one is later", got)
	}
	w.setNow(t0.Add(110 * time.Second))
	if got := w.r.Expire(t.Context()); len(got) != 1 || got[0].ID != "l-ext" {
		t.Fatalf("Expire at the new deadline = %v, want l-ext", got)
	}
	w.setNow(t0.Add(100 * 24 * time.Hour))
	if got := w.r.Expire(t.Context()); len(got) != 0 {
		t.Fatalf("a lease whose TTL was cleared expired: %v", got)
	}
	if _, err := w.r.SetTTL("l-gone", time.Minute); !errors.Is(err, vm.ErrNotFound) {
		t.Errorf("SetTTL of an unknown lease = %v, want not found", err)
	}
	if _, err := w.r.SetTTL("l-ext", time.Minute); !errors.Is(err, vm.ErrNotFound) {
		t.Errorf("SetTTL of an expired lease = %v, want not found (and no record written)", err)
	}
	if ids := w.leaseIDs(t); len(ids) != 1 || ids[0] != "l-never" {
		t.Errorf("leases left = %v, want l-never", ids)
	}
}
