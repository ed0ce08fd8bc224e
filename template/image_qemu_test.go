package template_test

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/warmpool/warmpool/agent"
	"github.com/warmpool/warmpool/guest"
	"github.com/warmpool/warmpool/provider/qemu"
	"github.com/warmpool/warmpool/rootfs"
	"github.com/warmpool/warmpool/template"
	"github.com/warmpool/warmpool/vm"
)

// TestImageTemplateWithQEMU builds a template from a Debian image with a
// root filesystem disk and checks what two clones see of their disks: the
// template's writes, not each other's, and nothing left after Destroy.
func TestImageTemplateWithQEMU(t *testing.T) {
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		t.Skip("SKIPPING real-VM template test: qemu-system-x86_64 not installed (make deps)")
	}
	if _, err := exec.LookPath("debootstrap"); err != nil {
		t.Skip("SKIPPING: debootstrap not installed (scripts/deps.sh installs it)")
	}
	if _, err := rootfs.HostDebianMirror("/"); err != nil {
		t.Skip(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	base, err := guest.Build(ctx, guest.BuildOptions{})
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	img, err := rootfs.Build(ctx, rootfs.Options{
		Source:   rootfs.Source{Kind: rootfs.KindDebian, Arg: "bookworm"},
		Packages: []string{"python3"},
		Base:     base,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("image debian:bookworm+python3: %s, %d MiB", time.Since(start).Round(time.Millisecond), img.Rootfs.SizeBytes>>20)
	state, err := os.MkdirTemp("", "wp-timg-")
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
	dir := filepath.Join(state, "templates", "deb")
	tm, err := template.Build(ctx, template.BuildOptions{Name: "deb", Provider: p, Image: img, VCPUs: 1, MemoryMiB: 256, Dir: dir, DiskMiB: 64})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("template built: boot to agent-ready %s", tm.BootTime.Round(time.Millisecond))
	if _, err := os.Stat(filepath.Join(dir, "build-disk.raw")); err == nil {
		t.Errorf("the build VM's writable disk is still in %s", dir)
	}

	type clone struct {
		v vm.VM
		c *agent.Client
	}
	run := func(c clone, script string) (string, int) {
		t.Helper()
		var out, errb bytes.Buffer
		code, err := c.c.Exec(ctx, agent.ExecRequest{Argv: []string{"sh", "-c", script}}, &out, &errb)
		if err != nil {
			t.Fatalf("exec %q in %s: %v", script, c.v.ID, err)
		}
		return out.String() + errb.String(), code
	}
	var clones []clone
	for range 2 {
		v, err := p.Restore(ctx, tm.Snapshot)
		if err != nil {
			t.Fatal(err)
		}
		if err := p.Resume(ctx, v.ID); err != nil {
			t.Fatal(err)
		}
		c, err := agent.Dial(ctx, p, v.ID)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		clones = append(clones, clone{v, c})
	}
	// What a first write to the overlay costs a fresh clone against a
	// second one (under TCG each QEMU process translates the guest's
	// ext4 and overlayfs code on first use).
	for i := range 2 {
		start := time.Now()
		if out, code := run(clones[1], "echo x > /etc/wp-probe && mv /etc/wp-probe /etc/wp-probe2"); code != 0 {
			t.Fatalf("write to the overlay: %d %q", code, out)
		}
		t.Logf("exec writing to the overlay, clone 2, run %d: %s", i+1, time.Since(start).Round(time.Millisecond))
	}
	if out, code := run(clones[0], "python3 -c 'print(6*7)'"); code != 0 || out != "42\n" {
		t.Errorf("python3 in clone: %d %q", code, out)
	}
	if out, code := run(clones[0], "head -c 4194304 /dev/urandom > /root/big && sync && ls -l /root/big"); code != 0 {
		t.Fatalf("write 4 MiB in clone 1: %d %q", code, out)
	}
	if out, code := run(clones[1], "ls /root/big"); code == 0 {
		t.Errorf("clone 2 sees clone 1's file: %q", out)
	}
	disk := clones[0].v.Spec.WritableDisk
	st0 := statBlocks(t, disk)
	st1 := statBlocks(t, clones[1].v.Spec.WritableDisk)
	t.Logf("clone disk bytes on host: after 4 MiB written %d, untouched %d", st0, st1)
	if st0 < 4<<20 || st1 > 1<<20 {
		t.Errorf("clone layers take %d bytes (4 MiB written) and %d (nothing written)", st0, st1)
	}
	if out, code := run(clones[1], "head -c 100M /dev/zero > /root/fill; echo $?; df -k /"); !strings.Contains(out, "No space left") {
		t.Errorf("filling clone 2's 64 MiB disk: %d %q", code, out)
	}
	if out, code := run(clones[1], "rm /root/fill && echo ok"); code != 0 || out != "ok\n" {
		t.Errorf("clone 2 after a full disk: %d %q", code, out)
	}
	// A machine boots the same image: read-only root, writes in memory,
	// its data disk beside them.
	data := filepath.Join(state, "data.raw")
	if err := os.WriteFile(data, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(data, 64<<20); err != nil {
		t.Fatal(err)
	}
	mv, err := p.Create(ctx, vm.Spec{Name: "machine", VCPUs: 1, MemoryMiB: 256, Kernel: img.Kernel, Initrd: img.Initrd,
		Cmdline: img.Cmdline + " " + template.RootCmdline("tmpfs"), RootDisk: img.Rootfs.Path, DataDisk: data})
	if err != nil {
		t.Fatal(err)
	}
	if err := agent.WaitReady(ctx, p, mv.ID); err != nil {
		t.Fatal(err)
	}
	mc, err := agent.Dial(ctx, p, mv.ID)
	if err != nil {
		t.Fatal(err)
	}
	machine := clone{mv, mc}
	if out, code := run(machine, "python3 -c 'print(6*7)' && touch /root/x && grep -c ' / overlay ' /proc/mounts && ls /sys/block | wc -l"); code != 0 || out != "42\n1\n2\n" {
		t.Errorf("machine from the image: %d %q, want python3, a writable overlay root and two disks (image, data; the writes are on tmpfs)", code, out)
	}
	mc.Close()
	if err := p.Destroy(ctx, mv.ID); err != nil {
		t.Fatal(err)
	}
	for _, c := range clones {
		c.c.Close()
		if err := p.Destroy(ctx, c.v.ID); err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(c.v.Dir); !os.IsNotExist(err) {
			t.Errorf("clone %s dir left: %v", c.v.ID, err)
		}
	}
}

func statBlocks(t *testing.T, path string) int64 {
	t.Helper()
	out, err := exec.Command("du", "-B1", path).Output()
	if err != nil {
		t.Fatalf("du %s: %v", path, err)
	}
	n, err := strconv.ParseInt(strings.Fields(string(out))[0], 10, 64)
	if err != nil {
		t.Fatalf("du %s: %q", path, out)
	}
	return n
}
