package providertest

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/warmpool/warmpool/vm"
)

// DiskFixture lets the suite boot an image's root filesystem disk with a
// writable disk under it (vm.CapRootDisk).
type DiskFixture struct {
	// RootDisk is a read-only root filesystem image. Required.
	RootDisk string
	// Cmdline is added to Fixture.Spec's command line for a VM booting
	// RootDisk with a writable disk (the guest's own switch into it).
	Cmdline string
	// NewWritableDisk makes an empty writable disk at path, as a template
	// builder would. Required.
	NewWritableDisk func(ctx context.Context, path string) error
	// Write makes the running guest of v write data to its writable root,
	// replacing what an earlier Write left; Read returns what the last
	// Write left there ("" when nothing was written). Both go through the
	// guest (or what stands for it), not through the host's view of the
	// VM's files, so they show which file the hypervisor really writes.
	Write func(ctx context.Context, p vm.Provider, v vm.VM, data string) error
	Read  func(ctx context.Context, p vm.Provider, v vm.VM) (string, error)
	// Reopen returns a second provider over the same state, as a
	// restarted daemon makes (CapAdopt). Nil skips the restart checks.
	Reopen func(t *testing.T) vm.Provider
}

// testRootDisk boots a VM on the fixture's root disk and a fresh writable
// disk, writes to its root, snapshots it and restores clones: each clone
// starts with what the template wrote, and what one clone writes is seen by
// neither the template nor another clone, not even by a clone restored after
// the template VM and its writable disk are gone. A destroyed clone's disk
// goes with it, also when a restarted provider destroys a clone whose
// process was killed.
func (s *suite) testRootDisk(t *testing.T) {
	fx := s.fx.Disk
	if !s.p.Capabilities().Has(vm.CapRootDisk) {
		t.Skip("provider has no root-disk capability")
	}
	if fx == nil {
		t.Fatal("provider has the root-disk capability but the fixture has no Disk to test it with")
	}
	sn := s.snapshotter(t)
	ctx := s.ctx(t)
	dir := t.TempDir()
	writable := filepath.Join(dir, "template-rw.img")
	if err := fx.NewWritableDisk(ctx, writable); err != nil {
		t.Fatalf("NewWritableDisk: %v", err)
	}
	spec := s.templateSpec()
	spec.RootDisk, spec.WritableDisk = fx.RootDisk, writable
	if fx.Cmdline != "" {
		spec.Cmdline += " " + fx.Cmdline
	}
	tmpl, err := s.p.Create(ctx, spec)
	if err != nil {
		t.Fatalf("Create with a root and a writable disk: %v", err)
	}
	s.track(tmpl.ID)
	s.ping(t, tmpl.ID)
	if err := fx.Write(ctx, s.p, tmpl, "template"); err != nil {
		t.Fatalf("write in the template VM: %v", err)
	}
	if err := s.p.Pause(ctx, tmpl.ID); err != nil {
		t.Fatalf("Pause: %v", err)
	}
	snap, err := sn.Snapshot(ctx, tmpl.ID, filepath.Join(dir, "snap"))
	if err != nil {
		t.Fatalf("Snapshot of a VM with a writable disk: %v", err)
	}

	restore := func(name string) vm.VM {
		t.Helper()
		v, err := sn.Restore(ctx, snap)
		if err != nil {
			t.Fatalf("Restore %s: %v", name, err)
		}
		s.track(v.ID)
		if err := s.p.Resume(ctx, v.ID); err != nil {
			t.Fatalf("Resume %s: %v", name, err)
		}
		s.ping(t, v.ID)
		return v
	}
	read := func(name string, v vm.VM, want string) {
		t.Helper()
		got, err := fx.Read(ctx, s.p, v)
		if err != nil {
			t.Fatalf("read in %s: %v", name, err)
		}
		if got != want {
			t.Errorf("%s reads %q from its root, want %q", name, got, want)
		}
	}
	a, b := restore("clone A"), restore("clone B")
	read("clone A", a, "template")
	read("clone B", b, "template")
	if err := fx.Write(ctx, s.p, a, "clone A"); err != nil {
		t.Fatalf("write in clone A: %v", err)
	}
	read("clone A", a, "clone A")
	read("clone B", b, "template")
	if err := s.p.Resume(ctx, tmpl.ID); err != nil {
		t.Fatalf("Resume the template VM: %v", err)
	}
	read("the template VM", tmpl, "template")

	// A template builder destroys its build VM and removes its disk once
	// the snapshot is written: the snapshot must not need either.
	if err := s.p.Destroy(ctx, tmpl.ID); err != nil {
		t.Fatalf("Destroy the template VM: %v", err)
	}
	if err := os.Remove(writable); err != nil {
		t.Fatal(err)
	}
	c := restore("clone C, restored after the template VM is gone")
	read("clone C", c, "template")

	disk := map[string]string{}  // VM ID: its writable disk
	owner := map[string]string{} // writable disk: its VM's name
	for name, v := range map[string]vm.VM{"clone A": a, "clone B": b, "clone C": c} {
		got, err := s.p.Inspect(ctx, v.ID)
		if err != nil {
			t.Fatalf("Inspect %s: %v", name, err)
		}
		if got.Spec.RootDisk != fx.RootDisk {
			t.Errorf("%s has root disk %q, want the shared %q", name, got.Spec.RootDisk, fx.RootDisk)
		}
		d := got.Spec.WritableDisk
		if d == "" || d == writable {
			t.Fatalf("%s has writable disk %q, want a private one", name, d)
		}
		if other, ok := owner[d]; ok {
			t.Fatalf("%s and %s share writable disk %s", name, other, d)
		}
		owner[d], disk[v.ID] = name, d
	}
	gone := func(name string, v vm.VM) {
		t.Helper()
		if _, err := os.Stat(disk[v.ID]); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s's writable disk %s is still there after Destroy (%v)", name, disk[v.ID], err)
		}
		if v.Dir != "" {
			if _, err := os.Stat(v.Dir); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("%s's directory %s is still there after Destroy (%v)", name, v.Dir, err)
			}
		}
	}
	if err := s.p.Destroy(ctx, a.ID); err != nil {
		t.Fatalf("Destroy clone A: %v", err)
	}
	gone("clone A", a)
	read("clone B, after clone A was destroyed", b, "template")

	if fx.Reopen == nil || !s.p.Capabilities().Has(vm.CapAdopt) {
		for _, v := range []vm.VM{b, c} {
			if err := s.p.Destroy(ctx, v.ID); err != nil {
				t.Errorf("Destroy %s: %v", v.ID, err)
			}
		}
		gone("clone B", b)
		gone("clone C", c)
		return
	}
	// A restarted provider finds the clones, one of them with its process
	// killed as a crash would, and its Destroy removes their disks too.
	if err := s.kill(ctx, c); err != nil {
		t.Fatalf("kill clone C's process: %v", err)
	}
	p2 := fx.Reopen(t)
	vms, err := p2.List(ctx)
	if err != nil {
		t.Fatalf("List after restart: %v", err)
	}
	var ids []string
	for _, v := range vms {
		ids = append(ids, v.ID)
	}
	for name, v := range map[string]vm.VM{"clone B": b, "clone C (killed)": c} {
		if !slices.Contains(ids, v.ID) {
			t.Errorf("restarted provider does not list %s (%s): %v", name, v.ID, ids)
		}
	}
	for _, v := range []vm.VM{b, c} {
		if err := p2.Destroy(ctx, v.ID); err != nil {
			t.Errorf("restarted provider: Destroy %s: %v", v.ID, err)
		}
	}
	gone("clone B", b)
	gone("clone C", c)
}
