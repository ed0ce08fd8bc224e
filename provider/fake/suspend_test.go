package fake_test

import (
	"context"
	"errors"
	"testing"

	"github.com/warmpool/warmpool/provider/fake"
	"github.com/warmpool/warmpool/vm"
)

// TestSuspendRestoresOnceAfterItsVM: a suspend snapshot is restored only
// after its VM is gone, only once, and a failed restore can be retried; the
// suspended VM never runs again; template snapshots still restore many times.
func TestSuspendRestoresOnceAfterItsVM(t *testing.T) {
	ctx := context.Background()
	p := fake.New(fake.Options{})
	if !p.Capabilities().Has(vm.CapSuspend) {
		t.Fatal("fake does not advertise CapSuspend")
	}
	withDisk := spec
	withDisk.DataDisk = "/var/lib/warmpool/machines/dev/data.img"
	v, err := p.Create(ctx, withDisk)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Suspend(ctx, v.ID, t.TempDir()); !errors.Is(err, vm.ErrInvalidState) {
		t.Errorf("suspend of a running VM = %v, want ErrInvalidState", err)
	}
	if err := p.Pause(ctx, v.ID); err != nil {
		t.Fatal(err)
	}
	snap, err := p.Suspend(ctx, v.ID, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if !snap.SingleUse || snap.Spec.DataDisk != withDisk.DataDisk {
		t.Errorf("suspend snapshot %+v, want single-use keeping the data disk", snap)
	}
	if err := p.Resume(ctx, v.ID); !errors.Is(err, vm.ErrInvalidState) {
		t.Errorf("resume of a suspended VM = %v, want ErrInvalidState", err)
	}
	if _, err := p.Restore(ctx, snap); !errors.Is(err, vm.ErrInvalidState) {
		t.Errorf("restore while the suspended VM exists = %v, want ErrInvalidState", err)
	}
	if err := p.Destroy(ctx, v.ID); err != nil {
		t.Fatal(err)
	}
	p.SetFault(fake.OpRestore, fake.Fault{FailNth: p.Calls(fake.OpRestore) + 1})
	if _, err := p.Restore(ctx, snap); !errors.Is(err, fake.ErrInjected) {
		t.Fatalf("restore with an injected fault = %v", err)
	}
	back, err := p.Restore(ctx, snap)
	if err != nil {
		t.Fatalf("restore after a failed one: %v", err)
	}
	if back.Status != vm.StatusPaused || back.Spec.DataDisk != withDisk.DataDisk {
		t.Errorf("restored %+v, want paused with the data disk", back)
	}
	if _, err := p.Restore(ctx, snap); !errors.Is(err, vm.ErrInvalidState) {
		t.Errorf("second restore = %v, want ErrInvalidState", err)
	}
	if err := p.Resume(ctx, back.ID); err != nil {
		t.Errorf("resume restored VM: %v", err)
	}

	tmpl, err := p.Create(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	p.Pause(ctx, tmpl.ID)
	tsnap, err := p.Snapshot(ctx, tmpl.ID, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	for i := range 2 {
		if _, err := p.Restore(ctx, tsnap); err != nil {
			t.Errorf("template restore %d: %v", i, err)
		}
	}
}
