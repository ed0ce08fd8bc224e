package qemu_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/warmpool/warmpool/agent"
	"github.com/warmpool/warmpool/internal/realvm"
	"github.com/warmpool/warmpool/provider/qemu"
	"github.com/warmpool/warmpool/vm"
)

// bootTemplate cold-boots a VM, waits for its agent, runs setup in it, then
// pauses and snapshots it into a new directory.
func bootTemplate(t testing.TB, ctx context.Context, p *qemu.Provider, spec vm.Spec, setup ...string) (vm.VM, vm.Snapshot) {
	t.Helper()
	v, err := p.Create(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	if err := agent.WaitReady(ctx, p, v.ID); err != nil {
		t.Fatalf("agent of %s never answered: %v", v.ID, err)
	}
	if len(setup) > 0 {
		if out, code := exec(t, ctx, p, v.ID, setup...); code != 0 {
			t.Fatalf("setup %v: exit %d, %q", setup, code, out)
		}
	}
	if _, err := p.Snapshot(ctx, v.ID, t.TempDir()); !errors.Is(err, vm.ErrInvalidState) {
		t.Errorf("Snapshot of a running VM = %v, want ErrInvalidState", err)
	}
	if err := p.Pause(ctx, v.ID); err != nil {
		t.Fatal(err)
	}
	snap, err := p.Snapshot(ctx, v.ID, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	return v, snap
}

func TestSnapshotRestoreKeepsGuestMemory(t *testing.T) {
	for _, mode := range []string{qemu.SnapshotShared, qemu.SnapshotCopy} {
		t.Run(mode, func(t *testing.T) {
			spec := testSpec(t)
			p := newProvider(t, realvm.StateDir(t), func(o *qemu.Options) { o.SnapshotMode = mode })
			destroyAll(t, p)
			ctx := ctxT(t)
			// /run is a tmpfs in the guest: the value lives only in guest RAM.
			tmpl, snap := bootTemplate(t, ctx, p, spec, "sh", "-c", "mkdir -p /run/t && echo remembered-42 > /run/t/value")
			if snap.SharedMemory != (mode == qemu.SnapshotShared) {
				t.Errorf("snapshot SharedMemory = %v in mode %s", snap.SharedMemory, mode)
			}
			if st, _ := p.Inspect(ctx, tmpl.ID); st.Status != vm.StatusPaused {
				t.Errorf("template after Snapshot is %s, want paused", st.Status)
			}
			// The template may go on; its changes must not reach clones.
			if err := p.Resume(ctx, tmpl.ID); err != nil {
				t.Fatalf("resume template after snapshot: %v", err)
			}
			if _, code := exec(t, ctx, p, tmpl.ID, "sh", "-c", "echo changed > /run/t/value"); code != 0 {
				t.Fatal("template exec failed")
			}

			for i := range 2 {
				clone, err := p.Restore(ctx, snap)
				if err != nil {
					t.Fatal(err)
				}
				if clone.Status != vm.StatusPaused || clone.Snapshot != snap.ID {
					t.Errorf("restored VM %+v, want paused from %s", clone, snap.ID)
				}
				if err := p.Resume(ctx, clone.ID); err != nil {
					t.Fatal(err)
				}
				if err := agent.WaitReady(ctx, p, clone.ID); err != nil {
					t.Fatalf("clone %d agent: %v", i, err)
				}
				out, _ := exec(t, ctx, p, clone.ID, "cat", "/run/t/value")
				if out != "remembered-42\n" {
					t.Errorf("clone %d reads %q, want the value written before the snapshot", i, out)
				}
				// A clone's writes stay its own.
				exec(t, ctx, p, clone.ID, "sh", "-c", "echo clone > /run/t/value")
			}
			if err := p.Destroy(ctx, tmpl.ID); err != nil {
				t.Fatal(err)
			}
			// Clones keep working without their template VM.
			clone, err := p.Restore(ctx, snap)
			if err != nil {
				t.Fatalf("restore after the template VM is gone: %v", err)
			}
			p.Resume(ctx, clone.ID)
			if out, _ := exec(t, ctx, p, clone.ID, "cat", "/run/t/value"); out != "remembered-42\n" {
				t.Errorf("late clone reads %q", out)
			}
		})
	}
}

func TestRestoreRejectsForeignSnapshots(t *testing.T) {
	realvm.RequireQEMU(t)
	p := newProvider(t, realvm.StateDir(t))
	defer p.Close()
	dir := t.TempDir()
	good := vm.Snapshot{ID: "s", Provider: "qemu", Dir: dir, ProviderVersion: p.Version(),
		Spec: vm.Spec{VCPUs: 1, MemoryMiB: 256}, Meta: map[string]string{"state": "state", "config": "{}"}}
	os.WriteFile(filepath.Join(dir, "state"), nil, 0o644)
	for name, mutate := range map[string]func(*vm.Snapshot){
		"firecracker": func(s *vm.Snapshot) { s.Provider = "firecracker" },
		"old qemu":    func(s *vm.Snapshot) { s.ProviderVersion = "1.0.0" },
		"escape":      func(s *vm.Snapshot) { s.Meta = map[string]string{"state": "../../etc/passwd", "config": "{}"} },
		"no state":    func(s *vm.Snapshot) { s.Meta = map[string]string{"state": "missing", "config": "{}"} },
	} {
		s := good
		mutate(&s)
		if _, err := p.Restore(context.Background(), s); err == nil {
			t.Errorf("%s: Restore accepted %+v", name, s)
		}
	}
	entries, _ := os.ReadDir(filepath.Join(p.StateDir(), "vms"))
	if len(entries) != 0 {
		t.Errorf("rejected restores left %d VM directories", len(entries))
	}
}

func TestBalloonInflateDeflate(t *testing.T) {
	spec := testSpec(t)
	p := newProvider(t, realvm.StateDir(t), func(o *qemu.Options) { o.StatsPollInterval = time.Second })
	destroyAll(t, p)
	ctx := ctxT(t)
	v, err := p.Create(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	if err := agent.WaitReady(ctx, p, v.ID); err != nil {
		t.Fatal(err)
	}
	waitStats := func(what string, ok func(vm.BalloonStats) bool) vm.BalloonStats {
		t.Helper()
		var st vm.BalloonStats
		for ctx.Err() == nil {
			st, err = p.BalloonStats(ctx, v.ID)
			if err != nil {
				t.Fatal(err)
			}
			if ok(st) {
				return st
			}
			time.Sleep(200 * time.Millisecond)
		}
		t.Fatalf("balloon never %s: last %+v", what, st)
		return st
	}
	before := waitStats("reported guest stats", func(s vm.BalloonStats) bool { return s.TotalMiB > 0 && s.ActualMiB == 256 })
	if err := p.SetBalloon(ctx, v.ID, 128); err != nil {
		t.Fatal(err)
	}
	inflated := waitStats("inflated", func(s vm.BalloonStats) bool {
		return s.ActualMiB == 128 && s.TotalMiB <= before.TotalMiB-100
	})
	if inflated.TargetMiB != 128 {
		t.Errorf("target = %d, want 128", inflated.TargetMiB)
	}
	if err := p.SetBalloon(ctx, v.ID, 256); err != nil {
		t.Fatal(err)
	}
	waitStats("deflated", func(s vm.BalloonStats) bool { return s.ActualMiB == 256 && s.TotalMiB >= before.TotalMiB-4 })
	if err := p.SetBalloon(ctx, v.ID, 512); !errors.Is(err, vm.ErrInvalid) {
		t.Errorf("balloon above the VM's memory = %v, want ErrInvalid", err)
	}
}

func TestListAdoptsVMsOfAnEarlierProcess(t *testing.T) {
	spec := testSpec(t)
	dir := realvm.StateDir(t)
	first := newProvider(t, dir)
	destroyAll(t, first)
	ctx := ctxT(t)
	running, err := first.Create(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	dead, err := first.Create(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	if err := agent.WaitReady(ctx, first, running.ID); err != nil {
		t.Fatal(err)
	}
	// The daemon goes away; one of its VMs dies while nobody watches.
	first.Close()
	if p, err := os.FindProcess(dead.PID); err == nil {
		p.Kill()
	}

	second := newProvider(t, dir)
	destroyAll(t, second)
	var vms []vm.VM
	for ctx.Err() == nil { // the killed process may take a moment to go
		vms, err = second.List(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(vms) == 2 && statusOf(vms, dead.ID) == vm.StatusStopped {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if got := statusOf(vms, running.ID); got != vm.StatusRunning {
		t.Errorf("adopted running VM has status %q, want running (list %+v)", got, vms)
	}
	if got := statusOf(vms, dead.ID); got != vm.StatusStopped {
		t.Errorf("VM killed behind our back has status %q, want stopped", got)
	}
	if err := agent.WaitReady(ctx, second, running.ID); err != nil {
		t.Errorf("agent of adopted VM: %v", err)
	}
	if err := second.Pause(ctx, running.ID); err != nil {
		t.Errorf("pause adopted VM: %v", err)
	}
	for _, v := range vms {
		if err := second.Destroy(ctx, v.ID); err != nil {
			t.Fatalf("destroy %s: %v", v.ID, err)
		}
	}
	processGone(t, running.PID)
	assertEmpty(t, filepath.Join(dir, "vms"))
	if vms, _ := second.List(ctx); len(vms) != 0 {
		t.Errorf("List after destroying everything = %+v", vms)
	}
}

func statusOf(vms []vm.VM, id string) vm.Status {
	for _, v := range vms {
		if v.ID == id {
			return v.Status
		}
	}
	return ""
}
