package template_test

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/warmpool/warmpool/agent"
	"github.com/warmpool/warmpool/guest"
	"github.com/warmpool/warmpool/provider/qemu"
	"github.com/warmpool/warmpool/template"
)

// TestBuildWithQEMU builds a real template: the guest image cold-booted under
// QEMU, snapshotted, then restored into a VM whose agent runs commands.
func TestBuildWithQEMU(t *testing.T) {
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		t.Skip("SKIPPING real-VM template test: qemu-system-x86_64 not installed (make deps)")
	}
	for _, tool := range []string{"apt-get", "dpkg-deb", "go"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("SKIPPING real-VM template test: %s not found, cannot build the guest image", tool)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	img, err := guest.Build(ctx, guest.BuildOptions{})
	if err != nil {
		t.Fatal(err)
	}
	// Socket paths must fit in 108 bytes, which t.TempDir may not.
	state, err := os.MkdirTemp("", "wp-tmpl-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(state) })
	p, err := qemu.New(qemu.Options{StateDir: state, Accel: "tcg"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		vms, _ := p.List(context.Background())
		for _, v := range vms {
			p.Destroy(context.Background(), v.ID)
		}
		p.Close()
	})

	dir := filepath.Join(state, "templates", "base")
	tm, err := template.Build(ctx, template.BuildOptions{Name: "base", Provider: p, Image: img, VCPUs: 1, MemoryMiB: 256, Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("template built: boot to agent-ready %s, provider %s", tm.BootTime.Round(time.Millisecond), tm.ProviderVersion)
	if tm.ImageDigest != img.Digest || tm.Snapshot.Dir != dir {
		t.Errorf("template = %+v", tm)
	}
	if vms, _ := p.List(ctx); len(vms) != 0 {
		t.Errorf("build VM not destroyed: %+v", vms)
	}

	start := time.Now()
	clone, err := p.Restore(ctx, tm.Snapshot)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Resume(ctx, clone.ID); err != nil {
		t.Fatal(err)
	}
	c, err := agent.Dial(ctx, p, clone.ID)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	t.Logf("restore to agent connected: %s", time.Since(start).Round(time.Millisecond))
	var out bytes.Buffer
	code, err := c.Exec(ctx, agent.ExecRequest{Argv: []string{"sh", "-c", "cat /proc/uptime; exit 4"}}, &out, nil)
	if err != nil || code != 4 || !strings.Contains(out.String(), ".") {
		t.Errorf("exec in restored VM = %d %q %v", code, out.String(), err)
	}
	c.Close()
	if err := p.Destroy(ctx, clone.ID); err != nil {
		t.Fatal(err)
	}
	if b, _ := exec.Command("pgrep", "-f", state).Output(); len(b) != 0 {
		t.Errorf("qemu processes left for %s: %s", state, b)
	}
}
