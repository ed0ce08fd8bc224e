package firecracker

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/warmpool/warmpool/agent"
	"github.com/warmpool/warmpool/vm"
)

// TestSuspendKeepsTheDataDiskAndRestoresOnce suspends a machine with a data
// disk and checks what a user of a suspended machine relies on: the VM
// cannot run again, exactly one VM comes back, on the very same disk file,
// and only once the suspended one is gone.
func TestSuspendKeepsTheDataDiskAndRestoresOnce(t *testing.T) {
	e := newEnv(t, nil)
	ctx := testCtx(t)
	if !e.p.Capabilities().Has(vm.CapSuspend) {
		t.Error("the provider does not advertise CapSuspend, so machines would never suspend")
	}
	disk := filepath.Join(t.TempDir(), "data.img")
	if err := os.WriteFile(disk, []byte("machine data"), 0o644); err != nil {
		t.Fatal(err)
	}
	spec := e.spec
	spec.DataDisk = disk
	v, err := e.p.Create(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(t.TempDir(), "suspend")
	if _, err := e.p.Suspend(ctx, v.ID, dir); !errors.Is(err, vm.ErrInvalidState) {
		t.Errorf("Suspend of a running VM = %v, want ErrInvalidState", err)
	}
	if err := e.p.Pause(ctx, v.ID); err != nil {
		t.Fatal(err)
	}
	snap, err := e.p.Suspend(ctx, v.ID, dir)
	if err != nil {
		t.Fatal(err)
	}
	if !snap.SingleUse || snap.Dir != dir {
		t.Errorf("suspend snapshot %+v, want single-use in %s", snap, dir)
	}
	if _, err := os.Stat(filepath.Join(dir, snapDiskName)); err == nil {
		t.Errorf("suspend copied the data disk; it must stay where it is")
	}
	if err := e.p.Resume(ctx, v.ID); !errors.Is(err, vm.ErrInvalidState) {
		t.Errorf("Resume of a suspended VM = %v, want ErrInvalidState", err)
	}
	if _, err := e.p.Snapshot(ctx, v.ID, t.TempDir()); !errors.Is(err, vm.ErrInvalidState) {
		t.Errorf("Snapshot of a suspended VM = %v, want ErrInvalidState", err)
	}
	if _, err := e.p.Suspend(ctx, v.ID, t.TempDir()); !errors.Is(err, vm.ErrInvalidState) {
		t.Errorf("second Suspend = %v, want ErrInvalidState", err)
	}
	if _, err := e.p.Restore(ctx, snap); !errors.Is(err, vm.ErrInvalidState) {
		t.Errorf("Restore while the suspended VM runs = %v, want ErrInvalidState", err)
	}
	if err := e.p.Stop(ctx, v.ID, time.Second); err != nil {
		t.Fatal(err)
	}
	wantStatus(t, e.p, v.ID, vm.StatusStopped)
	if err := e.p.Destroy(ctx, v.ID); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(disk); err != nil || string(b) != "machine data" {
		t.Fatalf("data disk after destroying the suspended VM: %q, %v", b, err)
	}

	// A restore that fails after claiming the snapshot gives the claim back.
	t.Setenv("FAKE_FIRECRACKER_VERSION", "1.17.0")
	if _, err := e.p.Restore(ctx, snap); err == nil {
		t.Fatal("restore under another Firecracker version succeeded")
	}
	os.Unsetenv("FAKE_FIRECRACKER_VERSION")
	if vms, _ := e.p.List(ctx); len(vms) != 0 {
		t.Errorf("a failed restore left VMs behind: %+v", vms)
	}

	r, err := e.p.Restore(ctx, snap)
	if err != nil {
		t.Fatalf("restore after a failed attempt: %v", err)
	}
	if r.Status != vm.StatusPaused || r.Spec.DataDisk != disk {
		t.Errorf("restored %+v, want paused on data disk %s", r, disk)
	}
	if cfg := vmConfig(t, e.p, r.ID); !strings.Contains(cfg, disk) {
		t.Errorf("Firecracker's drive of the restored VM does not point at %s: %s", disk, cfg)
	}
	if err := e.p.Resume(ctx, r.ID); err != nil {
		t.Fatal(err)
	}
	if err := agent.WaitReady(ctx, e.p, r.ID); err != nil {
		t.Errorf("agent of the restored VM: %v", err)
	}
	if _, err := e.p.Restore(ctx, snap); !errors.Is(err, vm.ErrInvalidState) || !strings.Contains(err.Error(), r.ID) {
		t.Errorf("second Restore = %v, want ErrInvalidState naming %s", err, r.ID)
	}
	if _, err := os.Stat(filepath.Join(dir, snapMemName)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the restored snapshot's memory file is still there: %v", err)
	}
	if err := e.p.Destroy(ctx, r.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(disk); err != nil {
		t.Errorf("destroying the restored VM removed the machine's disk: %v", err)
	}
}
