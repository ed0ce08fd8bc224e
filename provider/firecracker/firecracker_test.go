package firecracker

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/warmpool/warmpool/agent"
	"github.com/warmpool/warmpool/provider/firecracker/internal/fakefirecracker"
	"github.com/warmpool/warmpool/vm"
	"github.com/warmpool/warmpool/vm/providertest"
)

// fakeBinary is the fake firecracker built once for the package's tests.
var fakeBinary string

func TestMain(m *testing.M) {
	os.Exit(runTests(m))
}

func runTests(m *testing.M) int {
	spec, err := fakefirecracker.SpecPath()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	// The fake processes the provider starts find the description here.
	os.Setenv(fakefirecracker.SpecEnv, spec)
	dir, err := os.MkdirTemp("", "fakefc")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	if fakeBinary, err = fakefirecracker.Build(dir); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return m.Run()
}

type env struct {
	p      *Provider
	opts   Options
	state  string
	kernel string
	initrd string
	spec   vm.Spec
}

// newEnv returns a provider over a fresh state dir that destroys every VM
// it finds there when the test ends.
func newEnv(t *testing.T, mod func(*Options)) *env {
	t.Helper()
	// Short paths: socket paths must fit in 108 bytes.
	root, err := os.MkdirTemp("", "fc")
	if err != nil {
		t.Fatal(err)
	}
	e := &env{state: filepath.Join(root, "state"), kernel: filepath.Join(root, "vmlinux"), initrd: filepath.Join(root, "initrd")}
	// The fake checks only that the kernel is ELF, as Firecracker would.
	if err := os.WriteFile(e.kernel, []byte("\x7fELF fake kernel"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(e.initrd, []byte("fake initramfs"), 0o644); err != nil {
		t.Fatal(err)
	}
	opts := Options{StateDir: e.state, Binary: fakeBinary, StartTimeout: 30 * time.Second}
	if mod != nil {
		mod(&opts)
	}
	e.p, err = New(opts)
	if err != nil {
		t.Fatal(err)
	}
	e.opts = opts
	e.spec = vm.Spec{VCPUs: 1, MemoryMiB: 256, Kernel: e.kernel, Initrd: e.initrd}
	t.Cleanup(func() {
		ctx := context.Background()
		vms, _ := e.p.List(ctx)
		for _, v := range vms {
			if err := e.p.Destroy(ctx, v.ID); err != nil {
				t.Errorf("cleanup: destroy %s: %v", v.ID, err)
			}
		}
		os.RemoveAll(root)
	})
	return e
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func pingAgent(ctx context.Context, conn net.Conn) error {
	c := agent.NewClient(conn)
	defer c.Close()
	return c.Ping(ctx)
}

func wantStatus(t *testing.T, p *Provider, id string, want vm.Status) vm.VM {
	t.Helper()
	v, err := p.Inspect(context.Background(), id)
	if err != nil {
		t.Fatalf("Inspect %s: %v", id, err)
	}
	if v.Status != want {
		t.Fatalf("VM %s is %s, want %s", id, v.Status, want)
	}
	return v
}

func processGone(pid int) bool {
	err := syscall.Kill(pid, 0)
	return errors.Is(err, syscall.ESRCH)
}

func TestConformance(t *testing.T) {
	providertest.Run(t, func(t *testing.T) (vm.Provider, providertest.Fixture) {
		e := newEnv(t, nil)
		return e.p, providertest.Fixture{Spec: e.spec, AgentPing: pingAgent, Timeout: time.Minute, Disk: e.diskFixture(t)}
	})
}

func TestBootAgentPauseResume(t *testing.T) {
	e := newEnv(t, nil)
	ctx := testCtx(t)
	v, err := e.p.Create(ctx, e.spec)
	if err != nil {
		t.Fatal(err)
	}
	if v.Status != vm.StatusRunning || v.PID == 0 {
		t.Fatalf("Create returned %+v, want running with a pid", v)
	}
	if v.Spec.Cmdline != DefaultBootArgs {
		t.Errorf("boot args %q, want %q", v.Spec.Cmdline, DefaultBootArgs)
	}
	if err := agent.WaitReady(ctx, e.p, v.ID); err != nil {
		t.Fatalf("agent of %s: %v", v.ID, err)
	}
	if err := e.p.Pause(ctx, v.ID); err != nil {
		t.Fatal(err)
	}
	wantStatus(t, e.p, v.ID, vm.StatusPaused)
	// A paused guest cannot accept a vsock connection.
	short, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	conn, err := e.p.DialAgent(short, v.ID)
	cancel()
	if err == nil {
		conn.Close()
		t.Error("DialAgent to a paused VM succeeded")
	}
	if err := e.p.Resume(ctx, v.ID); err != nil {
		t.Fatal(err)
	}
	wantStatus(t, e.p, v.ID, vm.StatusRunning)
	if err := agent.WaitReady(ctx, e.p, v.ID); err != nil {
		t.Fatalf("agent after resume: %v", err)
	}
}

func TestStopAndDestroyLeaveNothing(t *testing.T) {
	e := newEnv(t, nil)
	ctx := testCtx(t)
	v, err := e.p.Create(ctx, e.spec)
	if err != nil {
		t.Fatal(err)
	}
	if err := e.p.Stop(ctx, v.ID, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	wantStatus(t, e.p, v.ID, vm.StatusStopped)
	if !processGone(v.PID) {
		t.Errorf("process %d still exists after Stop", v.PID)
	}
	if _, err := os.Stat(v.Dir); err != nil {
		t.Errorf("Stop removed the VM's files: %v", err)
	}
	if err := e.p.Destroy(ctx, v.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(v.Dir); !os.IsNotExist(err) {
		t.Errorf("VM dir %s still exists after Destroy", v.Dir)
	}
	left, _ := os.ReadDir(filepath.Join(e.state, "vms"))
	if len(left) != 0 {
		t.Errorf("state dir still holds %d entries", len(left))
	}
}

func TestStopKillsAGuestThatIgnoresCtrlAltDel(t *testing.T) {
	t.Setenv("FAKE_FIRECRACKER_IGNORE_CTRLALTDEL", "1")
	e := newEnv(t, nil)
	ctx := testCtx(t)
	v, err := e.p.Create(ctx, e.spec)
	if err != nil {
		t.Fatal(err)
	}
	if err := e.p.Stop(ctx, v.ID, 300*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	wantStatus(t, e.p, v.ID, vm.StatusStopped)
	if !processGone(v.PID) {
		t.Errorf("process %d survived Stop", v.PID)
	}
	if err := e.p.Destroy(ctx, v.ID); err != nil {
		t.Fatal(err)
	}
}

func TestSnapshotRestoreClones(t *testing.T) {
	e := newEnv(t, nil)
	ctx := testCtx(t)
	disk := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(disk, []byte("template disk"), 0o644); err != nil {
		t.Fatal(err)
	}
	spec := e.spec
	spec.DataDisk = disk
	tmpl, err := e.p.Create(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(t.TempDir(), "snap")
	if _, err := e.p.Snapshot(ctx, tmpl.ID, dir); !errors.Is(err, vm.ErrInvalidState) {
		t.Errorf("Snapshot of a running VM = %v, want ErrInvalidState", err)
	}
	if err := e.p.Pause(ctx, tmpl.ID); err != nil {
		t.Fatal(err)
	}
	snap, err := e.p.Snapshot(ctx, tmpl.ID, dir)
	if err != nil {
		t.Fatal(err)
	}
	if snap.ProviderVersion != "1.16.1" {
		t.Errorf("snapshot records Firecracker %q, want 1.16.1", snap.ProviderVersion)
	}
	for _, name := range []string{snapStateName, snapMemName, snapDiskName} {
		if _, err := os.Stat(filepath.Join(dir, name)); err != nil {
			t.Errorf("snapshot file: %v", err)
		}
	}
	wantStatus(t, e.p, tmpl.ID, vm.StatusPaused)

	var clones []vm.VM
	for range 2 {
		c, err := e.p.Restore(ctx, snap)
		if err != nil {
			t.Fatal(err)
		}
		if c.Status != vm.StatusPaused || c.Snapshot != snap.ID {
			t.Errorf("restored %+v, want paused from %s", c, snap.ID)
		}
		clones = append(clones, c)
	}
	for _, c := range clones {
		// Each clone writes its own disk, never the template's.
		if c.Spec.DataDisk == disk || !strings.HasPrefix(c.Spec.DataDisk, c.Dir) {
			t.Errorf("clone %s writes %s, want a disk inside %s", c.ID, c.Spec.DataDisk, c.Dir)
		}
		cfg := vmConfig(t, e.p, c.ID)
		if !strings.Contains(cfg, c.Spec.DataDisk) {
			t.Errorf("clone %s: Firecracker's drive does not point at %s: %s", c.ID, c.Spec.DataDisk, cfg)
		}
		if err := e.p.Resume(ctx, c.ID); err != nil {
			t.Fatal(err)
		}
		if err := agent.WaitReady(ctx, e.p, c.ID); err != nil {
			t.Errorf("agent of clone %s: %v", c.ID, err)
		}
	}
	// The template is untouched by its clones.
	if err := e.p.Resume(ctx, tmpl.ID); err != nil {
		t.Fatal(err)
	}
	if err := agent.WaitReady(ctx, e.p, tmpl.ID); err != nil {
		t.Errorf("agent of template after cloning: %v", err)
	}
	if b, _ := os.ReadFile(disk); string(b) != "template disk" {
		t.Errorf("template disk changed: %q", b)
	}
}

// vmConfig returns Firecracker's view of a VM's configuration.
func vmConfig(t *testing.T, p *Provider, id string) string {
	t.Helper()
	in, err := p.load(id)
	if err != nil {
		t.Fatal(err)
	}
	var cfg map[string]any
	if err := in.client().do(context.Background(), "GET", "/vm/config", nil, &cfg); err != nil {
		t.Fatal(err)
	}
	return fmt.Sprint(cfg)
}

func TestRestoreRefusesSnapshotOfAnotherVersion(t *testing.T) {
	e := newEnv(t, nil)
	ctx := testCtx(t)
	v, err := e.p.Create(ctx, e.spec)
	if err != nil {
		t.Fatal(err)
	}
	if err := e.p.Pause(ctx, v.ID); err != nil {
		t.Fatal(err)
	}
	snap, err := e.p.Snapshot(ctx, v.ID, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("FAKE_FIRECRACKER_VERSION", "1.17.0")
	_, err = e.p.Restore(ctx, snap)
	if !errors.Is(err, vm.ErrIncompatible) || !errors.Is(err, vm.ErrInvalidState) || !strings.Contains(err.Error(), "rebuild the template") {
		t.Errorf("Restore under another Firecracker = %v, want ErrIncompatible (and ErrInvalidState) asking for a rebuild", err)
	}
	if vms, _ := e.p.List(ctx); len(vms) != 1 {
		t.Errorf("a refused restore left VMs behind: %d listed", len(vms))
	}
}

// An older Firecracker rejects fields it does not know: the provider must
// send only what the running version understands.
func TestRestoreOnOlderFirecracker(t *testing.T) {
	for _, tc := range []struct {
		version       string
		wantOverrides bool
	}{
		{"1.10.1", false},
		{"1.12.0", true},
		{"1.16.1", true},
	} {
		t.Run(tc.version, func(t *testing.T) {
			t.Setenv("FAKE_FIRECRACKER_VERSION", tc.version)
			// The clone's namespace holds the template's TAP name too: an
			// old Firecracker opens that one.
			nsA, nsB := testNetns(t, "tap0"), testNetns(t, "tap0", "tap1")
			e := newEnv(t, nil)
			ctx := testCtx(t)
			spec := e.spec
			spec.NIC = &vm.NIC{MAC: "02:77:70:00:00:02", Netns: nsA, TAP: "tap0"}
			v, err := e.p.Create(ctx, spec)
			if err != nil {
				t.Fatal(err)
			}
			if err := e.p.Pause(ctx, v.ID); err != nil {
				t.Fatal(err)
			}
			snap, err := e.p.Snapshot(ctx, v.ID, t.TempDir())
			if err != nil {
				t.Fatal(err)
			}
			c, err := e.p.Restore(ctx, snap.WithNIC(nsB, "tap1"))
			if err != nil {
				t.Fatalf("restore on Firecracker %s: %v", tc.version, err)
			}
			cfg := vmConfig(t, e.p, c.ID)
			if got := strings.Contains(cfg, "host_dev_name:tap1"); got != tc.wantOverrides {
				t.Errorf("clone's TAP is its own: %v, want %v (%s)", got, tc.wantOverrides, cfg)
			}
			if err := e.p.Resume(ctx, c.ID); err != nil {
				t.Fatal(err)
			}
			if err := agent.WaitReady(ctx, e.p, c.ID); err != nil {
				t.Errorf("agent of clone: %v", err)
			}
		})
	}
}

func TestBalloon(t *testing.T) {
	e := newEnv(t, nil)
	ctx := testCtx(t)
	v, err := e.p.Create(ctx, e.spec)
	if err != nil {
		t.Fatal(err)
	}
	if err := e.p.SetBalloon(ctx, v.ID, 160); err != nil {
		t.Fatal(err)
	}
	st, err := e.p.BalloonStats(ctx, v.ID)
	if err != nil {
		t.Fatal(err)
	}
	if st.TargetMiB != 160 || st.ActualMiB != 160 || st.TotalMiB != 160 {
		t.Errorf("balloon stats %+v, want target, actual and total 160 MiB", st)
	}
	if err := e.p.SetBalloon(ctx, v.ID, 512); !errors.Is(err, vm.ErrInvalid) {
		t.Errorf("SetBalloon above the VM's memory = %v, want ErrInvalid", err)
	}
}

func TestAPIErrorNamesFaultRequestAndVM(t *testing.T) {
	e := newEnv(t, nil)
	ctx := testCtx(t)
	spec := e.spec
	spec.Initrd = filepath.Join(t.TempDir(), "missing-initrd")
	_, err := e.p.Create(ctx, spec)
	var apiErr *APIError
	if !errors.As(err, &apiErr) {
		t.Fatalf("Create with a missing initrd = %v, want an *APIError", err)
	}
	if apiErr.Method != "PUT" || apiErr.Path != "/boot-source" || !strings.HasPrefix(apiErr.VMID, "fc-") {
		t.Errorf("APIError names %s %s on %q, want PUT /boot-source on the VM", apiErr.Method, apiErr.Path, apiErr.VMID)
	}
	msg := err.Error()
	for _, want := range []string{"initrd", "PUT /boot-source", apiErr.VMID} {
		if !strings.Contains(msg, want) {
			t.Errorf("error %q does not mention %q", msg, want)
		}
	}
	if vms, _ := e.p.List(ctx); len(vms) != 0 {
		t.Errorf("failed Create left %d VMs", len(vms))
	}
}

func TestCreateRejectsCompressedKernel(t *testing.T) {
	e := newEnv(t, nil)
	bz := filepath.Join(t.TempDir(), "vmlinuz")
	os.WriteFile(bz, []byte("MZ\x00\x00 a bzImage"), 0o644)
	spec := e.spec
	spec.Kernel = bz
	_, err := e.p.Create(testCtx(t), spec)
	var fe *vm.FieldError
	if !errors.As(err, &fe) || fe.Field != "kernel" {
		t.Errorf("Create with a bzImage = %v, want a FieldError on kernel", err)
	}
}

func TestAdoptAfterRestart(t *testing.T) {
	e := newEnv(t, nil)
	ctx := testCtx(t)
	v, err := e.p.Create(ctx, e.spec)
	if err != nil {
		t.Fatal(err)
	}
	// A second provider over the same state dir stands for a restarted
	// daemon: the VM kept running and is found, controlled and destroyed.
	again, err := New(Options{StateDir: e.state, Binary: fakeBinary})
	if err != nil {
		t.Fatal(err)
	}
	vms, err := again.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(vms) != 1 || vms[0].ID != v.ID || vms[0].Status != vm.StatusRunning || vms[0].PID != v.PID {
		t.Fatalf("restarted provider lists %+v, want %s running as pid %d", vms, v.ID, v.PID)
	}
	if err := again.Pause(ctx, v.ID); err != nil {
		t.Fatal(err)
	}
	if err := again.Resume(ctx, v.ID); err != nil {
		t.Fatal(err)
	}
	if err := agent.WaitReady(ctx, again, v.ID); err != nil {
		t.Fatal(err)
	}
	if err := again.Destroy(ctx, v.ID); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for !processGone(v.PID) && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if !processGone(v.PID) {
		t.Errorf("process %d survived Destroy by the restarted provider", v.PID)
	}
}
