package firecracker

import (
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/warmpool/warmpool/agent"
	"github.com/warmpool/warmpool/provider/firecracker/internal/fakefirecracker"
	"github.com/warmpool/warmpool/vm"
	"github.com/warmpool/warmpool/vm/providertest"
)

// The jailed Firecracker runs as this user, which has no account: it can
// use only what the provider put into its jail for it.
const jailUID, jailGID = 40123, 40124

var fakeJailer = struct {
	once sync.Once
	path string
	err  error
}{}

// newJailedEnv is newEnv with every VM under the fake jailer, which really
// chroots and drops to jailUID:jailGID.
func newJailedEnv(t *testing.T, mods ...func(*JailerOptions)) (*env, string) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("SKIPPING jailer tests: the jailer must run as root to chroot and change user")
	}
	fakeJailer.once.Do(func() {
		dir := filepath.Dir(fakeBinary)
		fakeJailer.path, fakeJailer.err = fakefirecracker.BuildJailer(dir)
	})
	if fakeJailer.err != nil {
		t.Fatal(fakeJailer.err)
	}
	base, err := os.MkdirTemp("", "fcj")
	if err != nil {
		t.Fatal(err)
	}
	// Registered before newEnv's cleanup, so it runs after the VMs are gone.
	t.Cleanup(func() { os.RemoveAll(base) })
	e := newEnv(t, func(o *Options) {
		o.JailerBinary = fakeJailer.path
		o.Jailer = &JailerOptions{UID: jailUID, GID: jailGID, ChrootBase: base}
		for _, mod := range mods {
			mod(o.Jailer)
		}
	})
	return e, base
}

// processIdentity returns the uid and the root directory a process runs
// with, as the kernel sees them.
func processIdentity(t *testing.T, pid int) (uid int, root string) {
	t.Helper()
	status, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(status), "\n") {
		if rest, ok := strings.CutPrefix(line, "Uid:"); ok {
			uid, _ = strconv.Atoi(strings.Fields(rest)[0])
		}
	}
	root, err = os.Readlink("/proc/" + strconv.Itoa(pid) + "/root")
	if err != nil {
		t.Fatal(err)
	}
	return uid, root
}

func sameFile(t *testing.T, a, b string) bool {
	t.Helper()
	sa, err := os.Stat(a)
	if err != nil {
		t.Fatal(err)
	}
	sb, err := os.Stat(b)
	if err != nil {
		t.Fatal(err)
	}
	return os.SameFile(sa, sb)
}

func TestJailedLifecycle(t *testing.T) {
	e, base := newJailedEnv(t)
	ctx := testCtx(t)
	// On the jail's file system, so the provider can link it in and the
	// guest's writes reach it.
	disk := filepath.Join(filepath.Dir(e.state), "disk.img")
	if err := os.WriteFile(disk, []byte("template disk"), 0o600); err != nil {
		t.Fatal(err)
	}
	spec := e.spec
	spec.DataDisk = disk
	tmpl, err := e.p.Create(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	jail := filepath.Join(base, "firecracker", tmpl.ID, "root")
	uid, root := processIdentity(t, tmpl.PID)
	if uid != jailUID || root != jail {
		t.Errorf("firecracker runs as uid %d in root %s, want uid %d in %s", uid, root, jailUID, jail)
	}
	for _, name := range []string{"firecracker", apiSocketName, vsockSocketName, "vmlinux", "initrd", cloneDiskName} {
		if _, err := os.Lstat(filepath.Join(jail, name)); err != nil {
			t.Errorf("jail of %s: %v", tmpl.ID, err)
		}
	}
	if !sameFile(t, disk, filepath.Join(jail, cloneDiskName)) {
		t.Errorf("the jailed VM does not write %s itself", disk)
	}
	if err := agent.WaitReady(ctx, e.p, tmpl.ID); err != nil {
		t.Fatalf("agent of %s: %v", tmpl.ID, err)
	}

	if err := e.p.SetBalloon(ctx, tmpl.ID, 200); err != nil {
		t.Fatal(err)
	}
	if st, err := e.p.BalloonStats(ctx, tmpl.ID); err != nil || st.TargetMiB != 200 {
		t.Errorf("balloon stats %+v, %v; want a 200 MiB target", st, err)
	}

	if err := e.p.Pause(ctx, tmpl.ID); err != nil {
		t.Fatal(err)
	}
	wantStatus(t, e.p, tmpl.ID, vm.StatusPaused)
	snapDir := filepath.Join(t.TempDir(), "snap")
	snap, err := e.p.Snapshot(ctx, tmpl.ID, snapDir)
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{snapStateName, snapMemName, snapDiskName} {
		if _, err := os.Stat(filepath.Join(snapDir, name)); err != nil {
			t.Errorf("snapshot file: %v", err)
		}
	}
	if left, _ := filepath.Glob(filepath.Join(jail, "snapshot.*")); len(left) > 0 {
		t.Errorf("snapshot files left in the template's jail: %v", left)
	}

	clone, err := e.p.Restore(ctx, snap)
	if err != nil {
		t.Fatal(err)
	}
	cloneJail := filepath.Join(base, "firecracker", clone.ID, "root")
	if uid, root := processIdentity(t, clone.PID); uid != jailUID || root != cloneJail {
		t.Errorf("clone runs as uid %d in root %s, want uid %d in %s", uid, root, jailUID, cloneJail)
	}
	// The clone maps the snapshot's memory file itself, so clones share it.
	if !sameFile(t, filepath.Join(snapDir, snapMemName), filepath.Join(cloneJail, "snapshot."+snapMemName)) {
		t.Error("the clone's memory file is a copy, not the snapshot's")
	}
	if sameFile(t, disk, filepath.Join(cloneJail, cloneDiskName)) {
		t.Error("the clone writes the template's disk")
	}
	if err := e.p.Resume(ctx, clone.ID); err != nil {
		t.Fatal(err)
	}
	if err := agent.WaitReady(ctx, e.p, clone.ID); err != nil {
		t.Errorf("agent of clone %s: %v", clone.ID, err)
	}
	if err := e.p.Resume(ctx, tmpl.ID); err != nil {
		t.Fatal(err)
	}
	if err := agent.WaitReady(ctx, e.p, tmpl.ID); err != nil {
		t.Errorf("agent of template after cloning: %v", err)
	}

	// The template stops gracefully, the clone is destroyed running.
	if err := e.p.Stop(ctx, tmpl.ID, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	wantStatus(t, e.p, tmpl.ID, vm.StatusStopped)
	for _, v := range []vm.VM{tmpl, clone} {
		if err := e.p.Destroy(ctx, v.ID); err != nil {
			t.Fatal(err)
		}
		if !processGone(v.PID) {
			t.Errorf("process %d of %s survived Destroy", v.PID, v.ID)
		}
	}
	if left, _ := os.ReadDir(filepath.Join(base, "firecracker")); len(left) != 0 {
		t.Errorf("jails left behind: %v", left)
	}
	if left, _ := os.ReadDir(filepath.Join(e.state, "vms")); len(left) != 0 {
		t.Errorf("VM directories left behind: %v", left)
	}
	if b, err := os.ReadFile(disk); err != nil || string(b) != "template disk" {
		t.Errorf("the template's disk after Destroy: %q, %v", b, err)
	}
}

// The jailer passes --id to Firecracker itself; Firecracker refuses an
// argument given twice, so the provider must not pass it again.
func TestJailedFirecrackerGetsItsIDOnce(t *testing.T) {
	e, _ := newJailedEnv(t)
	ctx := testCtx(t)
	v, err := e.p.Create(ctx, e.spec)
	if err != nil {
		t.Fatal(err)
	}
	cmdline, err := os.ReadFile("/proc/" + strconv.Itoa(v.PID) + "/cmdline")
	if err != nil {
		t.Fatal(err)
	}
	args := strings.Split(strings.TrimRight(string(cmdline), "\x00"), "\x00")
	if n := strings.Count(strings.Join(args, " "), "--id"); n != 1 {
		t.Errorf("firecracker command line %q has --id %d times", args, n)
	}
	// A restarted provider still recognises the jailed process as the VM's.
	p2, err := New(e.p.opts)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := p2.Inspect(ctx, v.ID); err != nil || got.Status != vm.StatusRunning || got.PID != v.PID {
		t.Errorf("after restart Inspect = %+v, %v; want running with pid %d", got, err, v.PID)
	}
	if err := p2.Destroy(ctx, v.ID); err != nil {
		t.Fatal(err)
	}
	// This test process, not p2, is the parent that reaps the process.
	deadline := time.Now().Add(10 * time.Second)
	for !processGone(v.PID) && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if !processGone(v.PID) {
		t.Errorf("process %d survived Destroy by a restarted provider", v.PID)
	}
}

func TestJailedConformance(t *testing.T) {
	providertest.Run(t, func(t *testing.T) (vm.Provider, providertest.Fixture) {
		e, _ := newJailedEnv(t)
		return e.p, providertest.Fixture{Spec: e.spec, AgentPing: pingAgent, Timeout: time.Minute, Disk: e.diskFixture(t)}
	})
}

// A jail cannot be set up without a chroot base, and a jailer binary needs
// its options.
func TestJailerOptionsAreChecked(t *testing.T) {
	state := t.TempDir()
	if _, err := New(Options{StateDir: state, Binary: fakeBinary, JailerBinary: "/bin/true"}); err == nil {
		t.Error("New accepted a jailer binary without jailer options")
	}
	if _, err := New(Options{StateDir: state, Binary: fakeBinary, JailerBinary: "/bin/true", Jailer: &JailerOptions{UID: 1, GID: 1}}); err == nil {
		t.Error("New accepted jailer options without a chroot base")
	}
}

// A suspended jailed machine comes back, once, in a new jail on the very
// same disk file.
func TestJailedSuspendRestoresOnTheSameDisk(t *testing.T) {
	e, base := newJailedEnv(t)
	ctx := testCtx(t)
	disk := filepath.Join(filepath.Dir(e.state), "machine.img")
	if err := os.WriteFile(disk, []byte("machine data"), 0o600); err != nil {
		t.Fatal(err)
	}
	spec := e.spec
	spec.DataDisk = disk
	v, err := e.p.Create(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	if err := e.p.Pause(ctx, v.ID); err != nil {
		t.Fatal(err)
	}
	snap, err := e.p.Suspend(ctx, v.ID, filepath.Join(t.TempDir(), "suspend"))
	if err != nil {
		t.Fatal(err)
	}
	if err := e.p.Destroy(ctx, v.ID); err != nil {
		t.Fatal(err)
	}
	// A restore that fails (another Firecracker release) leaves no jail
	// and can be retried.
	t.Setenv("FAKE_FIRECRACKER_VERSION", "1.17.0")
	if _, err := e.p.Restore(ctx, snap); !errors.Is(err, vm.ErrIncompatible) {
		t.Fatalf("restore under another Firecracker release = %v, want ErrIncompatible", err)
	}
	os.Unsetenv("FAKE_FIRECRACKER_VERSION")
	if left, _ := os.ReadDir(filepath.Join(base, "firecracker")); len(left) != 0 {
		t.Errorf("a failed restore left jails behind: %v", left)
	}
	r, err := e.p.Restore(ctx, snap)
	if err != nil {
		t.Fatal(err)
	}
	if !sameFile(t, disk, filepath.Join(base, "firecracker", r.ID, "root", cloneDiskName)) {
		t.Errorf("the restored VM does not write the machine's disk %s", disk)
	}
	if err := e.p.Resume(ctx, r.ID); err != nil {
		t.Fatal(err)
	}
	if err := agent.WaitReady(ctx, e.p, r.ID); err != nil {
		t.Errorf("agent of the restored VM: %v", err)
	}
	if _, err := e.p.Restore(ctx, snap); !errors.Is(err, vm.ErrInvalidState) {
		t.Errorf("second Restore = %v, want ErrInvalidState", err)
	}
	if err := e.p.Destroy(ctx, r.ID); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(disk); err != nil || string(b) != "machine data" {
		t.Errorf("the machine's disk after Destroy: %q, %v", b, err)
	}
}

// The jailer creates a cgroup per VM and leaves its removal to its caller:
// Destroy removes it, also when a restarted provider destroys the VM.
func TestJailerCgroupsRemovedOnDestroy(t *testing.T) {
	cgroupRoot := t.TempDir()
	mounts := filepath.Join(t.TempDir(), "mounts")
	if err := os.WriteFile(mounts, []byte("proc /proc proc rw 0 0\ncgroup2 "+cgroupRoot+" cgroup2 rw,nosuid 0 0\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Setenv("FAKEJAILER_MOUNTS", mounts)
	e, _ := newJailedEnv(t, func(j *JailerOptions) {
		j.ExtraArgs = []string{"--cgroup", "cpu.max=50000 100000", "--parent-cgroup=warmpool/vms"}
	})
	e.p.mountsFile = mounts
	ctx := testCtx(t)
	v, err := e.p.Create(ctx, e.spec)
	if err != nil {
		t.Fatal(err)
	}
	cgroup := filepath.Join(cgroupRoot, "warmpool", "vms", v.ID)
	if _, err := os.Stat(cgroup); err != nil {
		t.Fatalf("the jailer made no cgroup for %s: %v", v.ID, err)
	}
	restarted, err := New(e.p.opts)
	if err != nil {
		t.Fatal(err)
	}
	restarted.mountsFile = "/nonexistent" // it must use what the VM's record says
	if err := restarted.Destroy(ctx, v.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(cgroup); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("cgroup %s of destroyed VM %s: %v, want it removed", cgroup, v.ID, err)
	}
	if _, err := os.Stat(filepath.Dir(cgroup)); err != nil {
		t.Errorf("the shared parent cgroup was removed too: %v", err)
	}
}
