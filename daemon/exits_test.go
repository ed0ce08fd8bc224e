package daemon

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/warmpool/warmpool/events"
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

// TestMachineCrashIsNoticedWithoutAnEnsure: the daemon's machine manager
// hears of its VM's death through the provider wrapper: machine.crashed
// (which no health check publishes) comes with nobody calling ensure, and
// the machine runs again on a new VM. An ensure right after a second kill
// answers only from a new VM.
func TestMachineCrashIsNoticedWithoutAnEnsure(t *testing.T) {
	r := startFake(t, t.TempDir(), newFakeProvider(), "")
	sub := r.d.bus.Subscribe(1024, func(e events.Event) bool { return e.Subject == "box" })
	defer sub.Close()
	first := ensure2(t, r, "box")
	if err := r.prov.Kill(first.VMID); err != nil {
		t.Fatal(err)
	}
	timeout := time.After(20 * time.Second)
	for crashed, recovered := false, false; !crashed || !recovered; {
		select {
		case e := <-sub.C:
			switch e.Kind {
			case "machine.crashed":
				crashed = e.Detail["vm_id"] == first.VMID
			case "machine.recovered":
				recovered = crashed
			case "machine.health_failed":
				t.Fatalf("the health check noticed the kill first: %v", e.Detail)
			}
		case <-timeout:
			t.Fatalf("no machine.crashed and machine.recovered for %s within 20s of killing its vm %s", "box", first.VMID)
		}
	}
	second, err := r.client.Machine(ctxT(t), "box")
	if err != nil || second.State != "running" || second.VMID == first.VMID {
		t.Fatalf("after the crash: %+v, %v; want running on a new vm", second, err)
	}
	if err := r.prov.Kill(second.VMID); err != nil {
		t.Fatal(err)
	}
	if third := ensure2(t, r, "box"); third.VMID == second.VMID || third.State != "running" {
		t.Errorf("ensure right after killing vm %s answered %s on vm %s", second.VMID, third.State, third.VMID)
	}
}
