package daemon

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/warmpool/warmpool/vm"
)

// TestDeadWarmVMIsReplacedWithoutAnAcquire: a warm VM whose process dies is
// evicted and replaced as soon as the provider reports the exit, with no
// acquire and no health check (its interval is an hour here).
func TestDeadWarmVMIsReplacedWithoutAnAcquire(t *testing.T) {
	r := startFake(t, t.TempDir(), newFakeProvider(), "intervals: {health: 1h}\n")
	setupPool(t, r.client, 2, 2)
	ctx := ctxT(t)
	warm := warmVMs(t, r)
	if len(warm) != 2 {
		t.Fatalf("warm VMs %v, want 2", warm)
	}
	victim := warm[0]
	if err := r.prov.Kill(victim); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		_, err := r.prov.Inspect(ctx, victim)
		p, perr := r.client.Pool(ctx, "py")
		if errors.Is(err, vm.ErrNotFound) && perr == nil && p.Ready == 2 && p.Counters.Evicted == 1 {
			if p.Counters.Acquired != 0 {
				t.Errorf("pool counted %d acquires; the test made none", p.Counters.Acquired)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("20s after killing warm VM %s: inspect %v, pool %+v (%v); want it destroyed, 1 eviction and 2 ready", victim, err, p, perr)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if now := warmVMs(t, r); len(now) != 2 || now[0] == victim || now[1] == victim {
		t.Errorf("warm VMs after the kill %v, want 2 without %s", now, victim)
	}
}

// warmVMs are the provider's VMs restored from a snapshot that still run.
func warmVMs(t *testing.T, r *running) []string {
	t.Helper()
	vms, err := r.prov.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, v := range vms {
		if v.Snapshot != "" && v.Status != vm.StatusStopped {
			ids = append(ids, v.ID)
		}
	}
	return ids
}
