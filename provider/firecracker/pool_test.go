package firecracker

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/warmpool/warmpool/agent"
	"github.com/warmpool/warmpool/guest"
	"github.com/warmpool/warmpool/pool"
	"github.com/warmpool/warmpool/template"
	"github.com/warmpool/warmpool/vm"
)

// TestWarmPoolOverFirecracker runs the pool against the provider and the
// fake Firecracker: restored clones wait paused, an acquire hands out a
// running VM whose agent answers, the pool refills, and shutdown leaves no
// VM behind.
func TestWarmPoolOverFirecracker(t *testing.T) {
	e := newEnv(t, nil)
	ctx := testCtx(t)
	tmpl, err := e.p.Create(ctx, e.spec)
	if err != nil {
		t.Fatal(err)
	}
	if err := e.p.Pause(ctx, tmpl.ID); err != nil {
		t.Fatal(err)
	}
	snap, err := e.p.Snapshot(ctx, tmpl.ID, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if err := e.p.Destroy(ctx, tmpl.ID); err != nil {
		t.Fatal(err)
	}
	p, err := pool.New(pool.Config{
		Provider: e.p,
		Handoff: func(ctx context.Context, v vm.VM, _ pool.Identity) error {
			return agent.WaitReady(ctx, e.p, v.ID)
		},
		Parallelism: 2,
	})
	if err != nil {
		t.Fatal(err)
	}
	shutdown := func() {
		sctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := p.Shutdown(sctx); err != nil {
			t.Errorf("pool shutdown: %v", err)
		}
	}
	defer shutdown()
	key := vm.StackKey{Template: "base", VCPUs: e.spec.VCPUs, MemoryMiB: e.spec.MemoryMiB}
	if err := p.Register(pool.StackSpec{Name: "web", Key: key, Snapshot: snap, Min: 2, Max: 2}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "two warm clones", func() bool {
		s, err := p.Status("web")
		return err == nil && s.Ready == 2 && s.Restoring == 0
	})
	for _, v := range mustList(t, e.p) {
		if v.Status != vm.StatusPaused || v.Snapshot != snap.ID {
			t.Errorf("warm VM %s is %s from %q, want paused from %s", v.ID, v.Status, v.Snapshot, snap.ID)
		}
	}
	lease, err := p.Acquire(ctx, "web", pool.Identity{LeaseID: "l-1"})
	if err != nil {
		t.Fatal(err)
	}
	wantStatus(t, e.p, lease.VM.ID, vm.StatusRunning)
	c, err := agent.Dial(ctx, e.p, lease.VM.ID)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Ping(ctx); err != nil {
		t.Errorf("ping leased VM: %v", err)
	}
	c.Close()
	waitFor(t, "the pool to refill", func() bool {
		s, err := p.Status("web")
		return err == nil && s.Ready == 2 && s.Restoring == 0
	})
	if err := e.p.Destroy(ctx, lease.VM.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := e.p.Inspect(ctx, lease.VM.ID); err == nil {
		t.Errorf("released VM %s still exists", lease.VM.ID)
	}
	shutdown()
	if left := mustList(t, e.p); len(left) != 0 {
		t.Errorf("%d VMs left after pool shutdown", len(left))
	}
}

func mustList(t *testing.T, p vm.Provider) []vm.VM {
	t.Helper()
	vms, err := p.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return vms
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// A template built from an image with a root filesystem (template.Build,
// as the daemon builds one) boots under Firecracker with its disks, keeps
// the frozen writable disk in its directory and none of the build's, and
// its clones each get a copy of that disk: the ext4 the builder made.
func TestImageTemplateOverFirecracker(t *testing.T) {
	if _, err := exec.LookPath("mkfs.ext4"); err != nil {
		t.Skip("SKIPPING: needs mkfs.ext4 (e2fsprogs) for the template's writable disk")
	}
	e := newEnv(t, nil)
	ctx := testCtx(t)
	root := e.diskFixture(t).RootDisk
	dir := filepath.Join(t.TempDir(), "tpl")
	img := guest.Image{Kernel: e.kernel, Initrd: e.initrd, Cmdline: DefaultBootArgs, Digest: "fake", Rootfs: &guest.Rootfs{Path: root, File: filepath.Base(root), Format: "ext4"}}
	tm, err := template.Build(ctx, template.BuildOptions{Name: "deb", Provider: e.p, Image: img, VCPUs: 1, MemoryMiB: 256, Dir: dir, DiskMiB: 32})
	if err != nil {
		t.Fatal(err)
	}
	if tm.Snapshot.Meta[metaWritable] == "" {
		t.Fatalf("template snapshot keeps no writable disk: %+v", tm.Snapshot.Meta)
	}
	entries, _ := os.ReadDir(dir)
	var names []string
	for _, en := range entries {
		names = append(names, en.Name())
	}
	if !slices.Contains(names, snapWritableName) || slices.ContainsFunc(names, func(n string) bool { return strings.HasPrefix(n, "build-disk") }) {
		t.Errorf("template directory holds %v, want %s and no build disk", names, snapWritableName)
	}
	if left := mustList(t, e.p); len(left) != 0 {
		t.Errorf("the build VM is still there: %+v", left)
	}
	c, err := e.p.Restore(ctx, tm.Snapshot)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(c.Spec.Cmdline, "warmpool.root=/dev/vda warmpool.rw=/dev/vdb") {
		t.Errorf("clone's command line %q does not name its disks by device", c.Spec.Cmdline)
	}
	f, err := openGuestDrive(c, writableDriveID)
	if err != nil {
		t.Fatal(err)
	}
	magic := make([]byte, 2)
	_, err = f.ReadAt(magic, 1024+56)
	f.Close()
	if err != nil || magic[0] != 0x53 || magic[1] != 0xef {
		t.Errorf("the clone's writable drive has no ext4 superblock (magic %x, %v)", magic, err)
	}
	if err := e.p.Destroy(ctx, c.ID); err != nil {
		t.Fatal(err)
	}
}
