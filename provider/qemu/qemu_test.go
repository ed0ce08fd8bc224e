package qemu_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	osexec "os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/warmpool/warmpool/agent"
	"github.com/warmpool/warmpool/internal/realvm"
	"github.com/warmpool/warmpool/provider/qemu"
	"github.com/warmpool/warmpool/vm"
)

// vmTimeout bounds each real-VM step: boots under TCG on a busy two-core
// machine can take many seconds.
const vmTimeout = 3 * time.Minute

func newProvider(t testing.TB, stateDir string, opts ...func(*qemu.Options)) *qemu.Provider {
	t.Helper()
	o := qemu.Options{StateDir: stateDir}
	for _, f := range opts {
		f(&o)
	}
	p, err := qemu.New(o)
	if err != nil {
		t.Fatalf("qemu.New: %v", err)
	}
	return p
}

func testSpec(t testing.TB) vm.Spec {
	img := realvm.Image(t)
	return vm.Spec{Name: "test", VCPUs: 1, MemoryMiB: 256, Kernel: img.Kernel, Initrd: img.Initrd, Cmdline: img.Cmdline}
}

func ctxT(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), vmTimeout)
	t.Cleanup(cancel)
	return ctx
}

// destroyAll removes every VM the provider knows when the test ends, so a
// failing test leaves no QEMU behind.
func destroyAll(t testing.TB, p *qemu.Provider) {
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		vms, err := p.List(ctx)
		if err != nil {
			t.Errorf("cleanup list: %v", err)
		}
		for _, v := range vms {
			if err := p.Destroy(ctx, v.ID); err != nil {
				t.Errorf("cleanup destroy %s: %v", v.ID, err)
			}
		}
		p.Close()
	})
}

func exec(t testing.TB, ctx context.Context, p vm.AgentDialer, id string, cmd ...string) (string, int) {
	t.Helper()
	c, err := agent.Dial(ctx, p, id)
	if err != nil {
		t.Fatalf("dial agent of %s: %v", id, err)
	}
	defer c.Close()
	var out, errOut bytes.Buffer
	code, err := c.Exec(ctx, agent.ExecRequest{Argv: cmd, Timeout: time.Minute}, &out, &errOut)
	if err != nil {
		t.Fatalf("exec %v in %s: %v (stderr %q)", cmd, id, err, errOut.String())
	}
	return out.String(), code
}

func processGone(t *testing.T, pid int) {
	t.Helper()
	if pid <= 0 {
		t.Fatalf("VM had no pid")
	}
	if _, err := os.Stat("/proc/" + strconv.Itoa(pid)); err == nil {
		b, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
		if !strings.Contains(string(b), ") Z") {
			t.Errorf("qemu pid %d still exists: %s", pid, b)
		}
	}
}

func TestInvalidSpecsStartNothing(t *testing.T) {
	realvm.RequireQEMU(t)
	dir := realvm.StateDir(t)
	p := newProvider(t, dir)
	defer p.Close()
	kernel := filepath.Join(t.TempDir(), "vmlinuz")
	os.WriteFile(kernel, []byte("not a kernel"), 0o644)
	cases := map[string]vm.Spec{
		"vcpus":      {VCPUs: 0, MemoryMiB: 256, Kernel: kernel},
		"memory_mib": {VCPUs: 1, MemoryMiB: 1, Kernel: kernel},
		"kernel":     {VCPUs: 1, MemoryMiB: 256},
		"initrd":     {VCPUs: 1, MemoryMiB: 256, Kernel: kernel, Initrd: "/nonexistent/initrd"},
		"data_disk":  {VCPUs: 1, MemoryMiB: 256, Kernel: kernel, DataDisk: "relative.img"},
		"name":       {Name: "../x", VCPUs: 1, MemoryMiB: 256, Kernel: kernel},
	}
	for field, spec := range cases {
		_, err := p.Create(context.Background(), spec)
		var fe *vm.FieldError
		if !errors.As(err, &fe) || fe.Field != field {
			t.Errorf("Create(%+v) = %v, want a FieldError on %s", spec, err, field)
		}
	}
	entries, _ := os.ReadDir(filepath.Join(dir, "vms"))
	if len(entries) != 0 {
		t.Errorf("invalid specs left %d VM directories", len(entries))
	}
	if _, err := qemu.New(qemu.Options{StateDir: "/tmp/" + strings.Repeat("long", 30)}); !errors.Is(err, vm.ErrInvalid) {
		t.Errorf("New with a state dir too long for sockets = %v, want ErrInvalid", err)
	}
}

func TestLifecycleLeavesNothing(t *testing.T) {
	spec := testSpec(t)
	dir := realvm.StateDir(t)
	ramDir := t.TempDir()
	p := newProvider(t, dir, func(o *qemu.Options) { o.RAMDir = ramDir })
	destroyAll(t, p)
	ctx := ctxT(t)

	v, err := p.Create(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	if v.Status != vm.StatusRunning || v.PID == 0 {
		t.Fatalf("created VM %+v, want running with a pid", v)
	}
	if err := agent.WaitReady(ctx, p, v.ID); err != nil {
		t.Fatalf("agent of %s never answered: %v", v.ID, err)
	}
	for _, step := range []struct {
		do   func(context.Context, string) error
		want vm.Status
	}{{p.Pause, vm.StatusPaused}, {p.Pause, vm.StatusPaused}, {p.Resume, vm.StatusRunning}, {p.Resume, vm.StatusRunning}} {
		if err := step.do(ctx, v.ID); err != nil {
			t.Fatal(err)
		}
		got, err := p.Inspect(ctx, v.ID)
		if err != nil || got.Status != step.want {
			t.Fatalf("Inspect = %+v, %v; want %s", got, err, step.want)
		}
	}
	if out, code := exec(t, ctx, p, v.ID, "sh", "-c", "echo hi; exit 3"); out != "hi\n" || code != 3 {
		t.Errorf("exec = %q, %d; want \"hi\\n\", 3", out, code)
	}

	if err := p.Stop(ctx, v.ID, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	processGone(t, v.PID)
	got, err := p.Inspect(ctx, v.ID)
	if err != nil || got.Status != vm.StatusStopped {
		t.Fatalf("after Stop: Inspect = %+v, %v; want stopped", got, err)
	}
	if err := p.Resume(ctx, v.ID); !errors.Is(err, vm.ErrInvalidState) {
		t.Errorf("Resume of a stopped VM = %v, want ErrInvalidState", err)
	}
	if err := p.Destroy(ctx, v.ID); err != nil {
		t.Fatal(err)
	}
	if err := p.Destroy(ctx, v.ID); !errors.Is(err, vm.ErrNotFound) {
		t.Errorf("second Destroy = %v, want ErrNotFound", err)
	}
	if _, err := p.Inspect(ctx, v.ID); !errors.Is(err, vm.ErrNotFound) {
		t.Errorf("Inspect after Destroy = %v, want ErrNotFound", err)
	}
	assertEmpty(t, filepath.Join(dir, "vms"))
	assertEmpty(t, ramDir)
}

func assertEmpty(t *testing.T, dir string) {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		t.Errorf("left behind in %s: %s", dir, e.Name())
	}
}

// A run directory outside the state directory holds the VMs' directories;
// a clone disk without its VM's directory (the run directory was on tmpfs
// and the host rebooted) is removed when a provider starts; Close removes
// the run directory it owns once no VM is left in it.
func TestRunDirAndOrphanCloneDisks(t *testing.T) {
	if _, err := osexec.LookPath("qemu-system-x86_64"); err != nil {
		t.Skip("SKIPPING: qemu-system-x86_64 is not installed (make deps installs it)")
	}
	state := t.TempDir()
	run := filepath.Join(t.TempDir(), "warmpool-host", "vms")
	disks := filepath.Join(state, "disks")
	if err := os.MkdirAll(filepath.Join(run, "livevm000001"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(disks, 0o700); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"orphan000001.qcow2", "livevm000001.qcow2", "notes.txt"} {
		if err := os.WriteFile(filepath.Join(disks, f), []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	p := newProvider(t, state, func(o *qemu.Options) { o.RunDir = run })
	for f, want := range map[string]bool{"orphan000001.qcow2": false, "livevm000001.qcow2": true, "notes.txt": true} {
		if _, err := os.Stat(filepath.Join(disks, f)); (err == nil) != want {
			t.Errorf("disks/%s exists: %v, want %v", f, err == nil, want)
		}
	}
	if _, err := os.Stat(filepath.Join(state, "vms")); err == nil {
		t.Errorf("state/vms made although the VMs' directories are in %s", run)
	}
	p.Close()
	if _, err := os.Stat(run); err != nil {
		t.Errorf("Close removed the run directory while a VM's directory is in it: %v", err)
	}
	if err := os.Remove(filepath.Join(run, "livevm000001")); err != nil {
		t.Fatal(err)
	}
	newProvider(t, state, func(o *qemu.Options) { o.RunDir = run }).Close()
	if _, err := os.Stat(filepath.Dir(run)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the empty run directory outlives Close: %v", err)
	}
	if _, err := os.Stat(filepath.Join(disks, "livevm000001.qcow2")); err == nil {
		t.Errorf("the clone disk of a VM whose directory is gone was kept")
	}
	shm, err := os.MkdirTemp("/dev/shm", "wp-state-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(shm)
	if got := qemu.DefaultRunDir(shm); got != "" {
		t.Errorf("DefaultRunDir of a state directory on tmpfs: %q, want its own vms/", got)
	}
	if a, b := qemu.DefaultRunDir("/var/lib/a"), qemu.DefaultRunDir("/var/lib/b"); a == b || !strings.HasPrefix(a, "/dev/shm/warmpool-") {
		t.Errorf("DefaultRunDir: %q and %q, want two directories on /dev/shm", a, b)
	}
}
