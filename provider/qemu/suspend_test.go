package qemu_test

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/warmpool/warmpool/agent"
	"github.com/warmpool/warmpool/internal/realvm"
	"github.com/warmpool/warmpool/provider/qemu"
	"github.com/warmpool/warmpool/vm"
)

// TestSuspendKeepsMemoryAndDataDisk: a VM with a data disk, which a
// template snapshot refuses, is suspended and restored in its place twice
// (the RAM file linked on one file system, copied across two), keeping what
// the guest had in memory and what it wrote to the disk, flushed or not. A
// suspended VM cannot run again, a snapshot cannot be restored while its VM
// runs nor twice, and a failed restore can be retried.
func TestSuspendKeepsMemoryAndDataDisk(t *testing.T) {
	spec := testSpec(t)
	p := newProvider(t, realvm.StateDir(t))
	destroyAll(t, p)
	ctx := ctxT(t)
	disk := filepath.Join(t.TempDir(), "data.img")
	if err := os.WriteFile(disk, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(disk, 16<<20); err != nil {
		t.Fatal(err)
	}
	spec.DataDisk = disk

	v, err := p.Create(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	if err := agent.WaitReady(ctx, p, v.ID); err != nil {
		t.Fatal(err)
	}
	// The root file system is the initramfs: /marker lives in guest RAM
	// only. The first disk write is flushed by the guest; the second stays
	// in the guest's page cache, so only the restored memory keeps it.
	sh(t, p, v.ID, "echo in-ram-1 > /marker")
	sh(t, p, v.ID, "printf on-disk-flushed | dd of=/dev/vda bs=512 seek=2048 conv=notrunc,fsync 2>/dev/null")
	sh(t, p, v.ID, "printf in-page-cache | dd of=/dev/vda bs=512 seek=4096 conv=notrunc 2>/dev/null")

	if err := p.Pause(ctx, v.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Snapshot(ctx, v.ID, t.TempDir()); !errors.Is(err, vm.ErrUnsupported) {
		t.Errorf("template snapshot of a VM with a data disk = %v, want ErrUnsupported", err)
	}
	// /dev/shm is where the RAM file lives (the state dir is not tmpfs
	// here), so this suspend links it; the second one copies.
	shmDir, err := os.MkdirTemp("/dev/shm", "wp-suspend-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(shmDir) })
	start := time.Now()
	snap, err := p.Suspend(ctx, v.ID, shmDir)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("suspend with RAM linked: %v", time.Since(start))
	if !snap.SingleUse {
		t.Error("suspend snapshot not marked single-use")
	}
	if err := p.Resume(ctx, v.ID); !errors.Is(err, vm.ErrInvalidState) {
		t.Errorf("resume of a suspended VM = %v, want ErrInvalidState", err)
	}
	if _, err := p.Restore(ctx, snap); !errors.Is(err, vm.ErrInvalidState) {
		t.Errorf("restore while the suspended VM runs = %v, want ErrInvalidState", err)
	}
	if got := readAt(t, disk, 2048*512, len("on-disk-flushed")); got != "on-disk-flushed" {
		t.Errorf("data disk file after suspend holds %q at the flushed write", got)
	}
	if err := p.Destroy(ctx, v.ID); err != nil {
		t.Fatal(err)
	}

	// A restore that fails (here: an unreadable state stream) gives the
	// snapshot back untouched.
	state := filepath.Join(snap.Dir, "state")
	if err := os.Rename(state, state+".bak"); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(state, []byte("not a migration stream"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Restore(ctx, snap); err == nil {
		t.Fatal("restore from a garbage stream succeeded")
	}
	if err := os.Rename(state+".bak", state); err != nil {
		t.Fatal(err)
	}

	back := restoreAndCheck(t, p, snap, "in-ram-1")
	if _, err := p.Restore(ctx, snap); !errors.Is(err, vm.ErrInvalidState) {
		t.Errorf("second restore of a suspend snapshot = %v, want ErrInvalidState", err)
	}
	if _, err := os.Stat(filepath.Join(snap.Dir, "memory")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("restored snapshot still holds its memory file: %v", err)
	}

	// Again, from the restored VM, into a disk-backed directory.
	sh(t, p, back.ID, "echo in-ram-2 > /marker")
	if err := p.Pause(ctx, back.ID); err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	snap2, err := p.Suspend(ctx, back.ID, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("suspend with RAM copied to disk: %v", time.Since(start))
	if err := p.Destroy(ctx, back.ID); err != nil {
		t.Fatal(err)
	}
	last := restoreAndCheck(t, p, snap2, "in-ram-2")
	if err := p.Destroy(ctx, last.ID); err != nil {
		t.Fatal(err)
	}
	leftovers, _ := filepath.Glob("/dev/shm/warmpool-*.ram")
	for _, f := range leftovers {
		for _, id := range []string{v.ID, back.ID, last.ID} {
			if strings.Contains(f, id) {
				t.Errorf("RAM file %s left after its VM was destroyed", f)
			}
		}
	}
}

// restoreAndCheck restores snap, resumes it and checks the guest's memory
// marker and both disk writes.
func restoreAndCheck(t *testing.T, p *qemu.Provider, snap vm.Snapshot, marker string) vm.VM {
	t.Helper()
	ctx := ctxT(t)
	start := time.Now()
	v, err := p.Restore(ctx, snap)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("restore from suspend: %v", time.Since(start))
	if v.Status != vm.StatusPaused || v.Spec.DataDisk != snap.Spec.DataDisk {
		t.Errorf("restored VM %+v, want paused with data disk %s", v, snap.Spec.DataDisk)
	}
	if err := p.Resume(ctx, v.ID); err != nil {
		t.Fatal(err)
	}
	if err := agent.WaitReady(ctx, p, v.ID); err != nil {
		t.Fatal(err)
	}
	if got := sh(t, p, v.ID, "cat /marker"); got != marker {
		t.Errorf("guest memory after restore: /marker = %q, want %q", got, marker)
	}
	if got := sh(t, p, v.ID, "dd if=/dev/vda bs=512 skip=2048 count=1 2>/dev/null | head -c 15"); got != "on-disk-flushed" {
		t.Errorf("flushed disk write after restore reads %q", got)
	}
	if got := sh(t, p, v.ID, "dd if=/dev/vda bs=512 skip=4096 count=1 2>/dev/null | head -c 13"); got != "in-page-cache" {
		t.Errorf("unflushed disk write after restore reads %q", got)
	}
	return v
}

func sh(t *testing.T, p *qemu.Provider, id, script string) string {
	t.Helper()
	out, code := exec(t, ctxT(t), p, id, "sh", "-c", script)
	if code != 0 {
		t.Fatalf("guest %s: sh -c %q: exit %d, %q", id, script, code, out)
	}
	return strings.TrimSpace(out)
}

func readAt(t *testing.T, path string, off int64, n int) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, n)
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	return string(bytes.TrimRight(b, "\x00"))
}
