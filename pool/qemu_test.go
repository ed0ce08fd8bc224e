package pool_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/warmpool/warmpool/agent"
	"github.com/warmpool/warmpool/internal/realvm"
	"github.com/warmpool/warmpool/pool"
	"github.com/warmpool/warmpool/provider/qemu"
	"github.com/warmpool/warmpool/template"
	"github.com/warmpool/warmpool/vm"
)

// TestWarmPoolOfRealVMs fills a pool of 2 from a real template under QEMU,
// hands one VM out (resume, hand-off of the tenant's identity), runs a
// command in it, releases it, and shuts the pool down: afterwards no QEMU
// process, VM directory or RAM file of the pool's may remain.
func TestWarmPoolOfRealVMs(t *testing.T) {
	img := realvm.Image(t)
	stateDir := realvm.StateDir(t)
	ramDir := t.TempDir() // so the test sees its own RAM files, and only those
	prov, err := qemu.New(qemu.Options{StateDir: stateDir, Accel: "auto", RAMDir: ramDir})
	if err != nil {
		t.Fatal(err)
	}
	defer prov.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	tmpl, err := template.Build(ctx, template.BuildOptions{
		Name: "pooltest", Provider: prov, Image: img, VCPUs: 1, MemoryMiB: 256,
		Dir: filepath.Join(stateDir, "templates", "pooltest"),
	})
	if err != nil {
		t.Fatal(err)
	}

	handoffer := agent.NewHandoffer(prov, prov)
	defer handoffer.Close()
	p, err := pool.New(pool.Config{
		Provider:    prov,
		Parallelism: 2,
		Validate: handoffer.Validate(func(ctx context.Context, v vm.VM) error {
			_, err := prov.Inspect(ctx, v.ID)
			return err
		}),
		Handoff: func(ctx context.Context, v vm.VM, id pool.Identity) error {
			entropy := make([]byte, 32)
			rand.Read(entropy)
			_, err := handoffer.Handoff(ctx, v, agent.HandoffRequest{Entropy: entropy, Time: time.Now(), Hostname: id.LeaseID})
			return err
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	shutdownDone := false
	shutdown := func() {
		if shutdownDone {
			return
		}
		shutdownDone = true
		sctx, scancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer scancel()
		if err := p.Shutdown(sctx); err != nil {
			t.Errorf("pool shutdown: %v", err)
		}
	}
	defer shutdown()

	if err := p.Register(pool.StackSpec{Name: "web", Key: tmpl.StackKey(), Snapshot: tmpl.Snapshot, Min: 2, Max: 2}); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 3*time.Minute, "2 warm VMs", func() bool {
		s, err := p.Status("web")
		return err == nil && s.Ready == 2 && s.Restoring == 0
	})

	lease, err := p.Acquire(ctx, "web", pool.Identity{LeaseID: "tenant-1"})
	if err != nil {
		t.Fatal(err)
	}
	c, err := agent.Dial(ctx, prov, lease.VM.ID)
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	code, err := c.Exec(ctx, agent.ExecRequest{Argv: []string{"sh", "-c", "hostname; exit 5"}}, &out, &out)
	c.Close()
	if err != nil || code != 5 || strings.TrimSpace(out.String()) != lease.ID {
		t.Errorf("exec in leased VM = %d %q, %v; want exit 5 and the handed-off hostname", code, out.String(), err)
	}
	if err := prov.Destroy(ctx, lease.VM.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := prov.Inspect(ctx, lease.VM.ID); err == nil {
		t.Errorf("released VM %s still exists", lease.VM.ID)
	}

	shutdown()
	if vms, err := prov.List(ctx); err != nil || len(vms) != 0 {
		t.Errorf("after shutdown the provider lists %d VMs (%v), want none", len(vms), err)
	}
	if entries, _ := os.ReadDir(ramDir); len(entries) != 0 {
		t.Errorf("after shutdown %d RAM files remain", len(entries))
	}
	if entries, _ := os.ReadDir(filepath.Join(stateDir, "vms")); len(entries) != 0 {
		t.Errorf("after shutdown %d VM directories remain", len(entries))
	}
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, f := range procs {
		if b, err := os.ReadFile(f); err == nil && bytes.Contains(b, []byte("qemu-system")) && bytes.Contains(b, []byte(stateDir)) {
			t.Errorf("QEMU process still running after shutdown: %s", strings.ReplaceAll(string(b), "\x00", " "))
		}
	}
}

func waitUntil(t *testing.T, limit time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", limit, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
