package guest_test

import (
	"context"
	"crypto/rand"
	"log/slog"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/warmpool/warmpool/agent"
	"github.com/warmpool/warmpool/provider/qemu"
	"github.com/warmpool/warmpool/vm"
)

// Two VMs restored from one template, prepared for a fast hand-off while
// they wait in a pool (agent.Handoffer) and then handed off as the daemon
// does, must not produce the same bytes from /dev/urandom, and each must
// carry its own tenant's hostname.
func TestPreparedClonesDivergeAfterHandoff(t *testing.T) {
	requireQEMU(t)
	img := builtImage(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	p, err := qemu.New(qemu.Options{StateDir: shortTempDir(t), Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	destroy := func(id string) {
		t.Cleanup(func() {
			if err := p.Destroy(context.Background(), id); err != nil {
				t.Errorf("destroy %s: %v", id, err)
			}
		})
	}
	tmpl, err := p.Create(ctx, vm.Spec{Name: "tmpl", VCPUs: 1, MemoryMiB: 256, Kernel: img.Kernel, Initrd: img.Initrd, Cmdline: img.Cmdline, NoBalloon: true})
	if err != nil {
		t.Fatal(err)
	}
	destroy(tmpl.ID)
	if err := agent.WaitReady(ctx, p, tmpl.ID); err != nil {
		t.Fatal(err)
	}
	if err := p.Pause(ctx, tmpl.ID); err != nil {
		t.Fatal(err)
	}
	snap, err := p.Snapshot(ctx, tmpl.ID, shortTempDir(t))
	if err != nil {
		t.Fatal(err)
	}

	h := agent.NewHandoffer(p, p)
	t.Cleanup(h.Close)
	validate := h.Validate(nil)
	lease := func(hostname string) (urandom string) {
		v, err := p.Restore(ctx, snap)
		if err != nil {
			t.Fatal(err)
		}
		destroy(v.ID)
		if err := validate(ctx, v); err != nil {
			t.Fatal(err)
		}
		if got, err := p.Inspect(ctx, v.ID); err != nil || got.Status != vm.StatusPaused {
			t.Fatalf("prepared VM is %v (%v), want paused", got.Status, err)
		}
		if err := p.Resume(ctx, v.ID); err != nil {
			t.Fatal(err)
		}
		entropy := make([]byte, 32)
		if _, err := rand.Read(entropy); err != nil {
			t.Fatal(err)
		}
		timings, err := h.Handoff(ctx, v, agent.HandoffRequest{Entropy: entropy, Time: time.Now(), Hostname: hostname})
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("%s handed off in %v (prepared: %v): %+v", v.ID, timings.Total(), timings.Prepared, timings.Result)
		if r := timings.Result; !r.Reported || r.EntropyBytes != len(entropy) || !r.Reseeded || r.NotReseeded != "" {
			t.Errorf("hand-off of %s: the guest reports %+v, want %d bytes, reseeded", v.ID, r, len(entropy))
		}
		if !timings.Prepared {
			t.Errorf("hand-off of %s dialed afresh instead of using the prepared connection", v.ID)
		}
		c, err := agent.Dial(ctx, p, v.ID)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if out, _ := run(t, c, "hostname"); strings.TrimSpace(out) != hostname {
			t.Errorf("hostname after hand-off = %q, want %q", out, hostname)
		}
		out, code := run(t, c, "sh", "-c", "head -c 32 /dev/urandom | od -An -tx1")
		if code != 0 || len(strings.Fields(out)) != 32 {
			t.Fatalf("read /dev/urandom: %d %q", code, out)
		}
		return strings.Join(strings.Fields(out), "")
	}
	a := lease("tenant-a")
	b := lease("tenant-b")
	if a == b {
		t.Errorf("two prepared clones of one template read the same bytes from /dev/urandom after hand-off: %s", a)
	}
}

// shortTempDir is a temporary directory with a short path: socket paths
// under it must stay under 108 bytes, which t.TempDir may not.
func shortTempDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "wp-ho-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}
