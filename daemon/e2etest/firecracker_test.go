package e2etest

import (
	"bytes"
	"compress/gzip"
	"debug/elf"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/warmpool/warmpool/guest"
	"github.com/warmpool/warmpool/network"
	"github.com/warmpool/warmpool/provider/firecracker/firecrackertest"
	"github.com/warmpool/warmpool/vm"
)

// fakeBzImage writes a stand-in for a distribution kernel: bytes that are
// not ELF followed by a gzip stream of an ELF executable (the fake
// firecracker binary itself), which is how a bzImage carries its vmlinux.
func fakeBzImage(t *testing.T, elfPath, out string) {
	t.Helper()
	exe, err := os.ReadFile(elfPath)
	if err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	b.WriteString("MZ not a real setup header, only something that is not ELF\x00")
	zw, _ := gzip.NewWriterLevel(&b, gzip.BestSpeed)
	zw.Write(exe)
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(out, b.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
}

// firecrackerImage writes a guest image directory whose kernel is a bzImage
// and whose command line is the QEMU one plus a parameter of its own.
func firecrackerImage(t *testing.T, fakeBin string) string {
	t.Helper()
	dir := t.TempDir()
	fakeBzImage(t, fakeBin, filepath.Join(dir, "vmlinuz"))
	if err := os.WriteFile(filepath.Join(dir, "initrd.img"), []byte("fake initramfs"), 0o644); err != nil {
		t.Fatal(err)
	}
	manifest, _ := json.Marshal(guest.Image{Cmdline: guest.DefaultCmdline + " tsc_early_khz=2000000 warmpool.debug", Digest: "firecracker-e2e"})
	if err := os.WriteFile(filepath.Join(dir, "image.json"), manifest, 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

// firecrackerProcesses returns the VM IDs of state's firecracker processes
// (the --id argument of each process whose command line names state).
func firecrackerProcesses(state string) []string {
	var ids []string
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || !bytes.Contains(b, []byte(state)) {
			continue
		}
		args := strings.Split(string(b), "\x00")
		if len(args) == 0 || filepath.Base(args[0]) != "firecracker" {
			continue
		}
		if i := slices.Index(args, "--id"); i >= 0 && i+1 < len(args) {
			ids = append(ids, args[i+1])
		}
	}
	slices.Sort(ids)
	return ids
}

func killFirecrackers(state string) {
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		args := bytes.Split(b, []byte{0})
		if len(args) > 0 && filepath.Base(string(args[0])) == "firecracker" && bytes.Contains(b, []byte(state)) {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

// assertFirecrackersMatchState checks, retrying while a refill may be
// between its process start and its record, that state's firecracker
// processes are exactly the VMs the state lists.
func assertFirecrackersMatchState(t *testing.T, state string) {
	t.Helper()
	var ids, procs []string
	for range 60 {
		ids = storeVMs(t, state)
		slices.Sort(ids)
		if procs = firecrackerProcesses(state); slices.Equal(ids, procs) {
			return
		}
		time.Sleep(500 * time.Millisecond)
	}
	t.Errorf("the state lists VMs %v, firecracker processes run %v", ids, procs)
}

// vmSpec reads the spec the Firecracker provider recorded for a VM.
func vmSpec(t *testing.T, state, id string) vm.Spec {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(state, "vms", id, "vm.json"))
	if err != nil {
		t.Fatalf("record of firecracker VM %s: %v", id, err)
	}
	var rec struct {
		Spec vm.Spec `json:"spec"`
	}
	if err := json.Unmarshal(b, &rec); err != nil {
		t.Fatalf("record of firecracker VM %s: %v", id, err)
	}
	return rec.Spec
}

// TestFirecrackerDaemon runs `warmpool serve --provider firecracker` with
// the fake Firecracker binary (which serves the real agent protocol, running
// commands on the host) through everything the QEMU test does: a template
// built from a bzImage image, a pool, acquire, exec, release, a machine with
// a data disk, kill -9 with a lease held and warm VMs adopted, and SIGTERM.
func TestFirecrackerDaemon(t *testing.T) {
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	bins := t.TempDir()
	fakeBin, err := firecrackertest.BuildFake(bins)
	if err != nil {
		t.Fatal(err)
	}
	image := firecrackerImage(t, fakeBin)
	// Short: socket paths under state must fit in 108 bytes.
	state, err := os.MkdirTemp("", "wp-fc-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		killFirecrackers(state)
		if t.Failed() {
			t.Logf("daemon log:\n%s", tail(state))
		}
		os.RemoveAll(state)
	})
	cfg := filepath.Join(state, "config.yaml")
	if err := os.WriteFile(cfg, []byte("image: "+image+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	// startDaemon passes --provider qemu first; the later flag wins.
	serve := []string{"--provider", "firecracker", "--firecracker-bin", fakeBin, "--config", cfg}

	d := startDaemon(t, state, serve...)
	mustCLI(t, state, 5*time.Minute, "template", "build", "base", "--vcpus", "1", "--mem", "256")
	extracted, _ := filepath.Glob(filepath.Join(image, "vmlinux-*"))
	if len(extracted) != 1 {
		t.Fatalf("image directory holds extracted kernels %v, want one", extracted)
	}
	if f, err := elf.Open(extracted[0]); err != nil {
		t.Errorf("extracted kernel %s: %v", extracted[0], err)
	} else {
		f.Close()
	}
	mustCLI(t, state, time.Minute, "pool", "set", "py", "--template", "base", "--min", "2", "--max", "3")
	waitPool(t, state, "py", 2)

	l1 := acquire(t, state, "py")
	spec := vmSpec(t, state, l1.VMID)
	if spec.Kernel != extracted[0] {
		t.Errorf("clone's kernel is %s, want the extracted vmlinux %s", spec.Kernel, extracted[0])
	}
	args := strings.Fields(spec.Cmdline)
	for _, want := range []string{"reboot=k", "pci=off", "quiet", "warmpool.debug"} {
		if !slices.Contains(args, want) {
			t.Errorf("boot args %q lack %s", spec.Cmdline, want)
		}
	}
	if strings.Contains(spec.Cmdline, "tsc_early_khz") || strings.Contains(spec.Cmdline, "panic=-1") {
		t.Errorf("boot args %q carry QEMU's parameters", spec.Cmdline)
	}
	if out := mustCLI(t, state, time.Minute, "exec", l1.ID, "--", "echo", "hello over vsock"); out != "hello over vsock\n" {
		t.Errorf("exec output %q", out)
	}
	if _, err := cli(t, state, time.Minute, "exec", l1.ID, "--", "sh", "-c", "exit 7"); err == nil || !strings.Contains(err.Error(), "exit status 7") {
		t.Errorf("exit code did not pass through: %v", err)
	}
	mustCLI(t, state, time.Minute, "release", l1.ID)
	if slices.Contains(firecrackerProcesses(state), l1.VMID) {
		t.Errorf("released lease's VM %s still runs", l1.VMID)
	}

	var m machineJSON
	if err := json.Unmarshal([]byte(mustCLI(t, state, 2*time.Minute, "machine", "ensure", "dev", "--vcpus", "1", "--mem", "256", "--disk", "64", "-o", "json")), &m); err != nil {
		t.Fatalf("machine ensure output: %v", err)
	}
	if m.State != "running" || m.VMID == "" {
		t.Fatalf("machine after ensure: %+v, want running with a VM", m)
	}
	if ms := vmSpec(t, state, m.VMID); ms.Kernel != extracted[0] || ms.DataDisk == "" {
		t.Errorf("machine VM boots %s with data disk %q, want %s and a disk", ms.Kernel, ms.DataDisk, extracted[0])
	}

	waitPool(t, state, "py", 2)
	l2 := acquire(t, state, "py")
	waitPool(t, state, "py", 2)
	assertFirecrackersMatchState(t, state)
	before := firecrackerProcesses(state)

	// kill -9 with a lease held, VMs warm and a machine running: all of
	// them are adopted, and the pool is not filled on top of its warm VMs.
	d.kill()
	d = startDaemon(t, state, serve...)
	if out := mustCLI(t, state, time.Minute, "exec", l2.ID, "--", "echo", "kept"); out != "kept\n" {
		t.Errorf("exec in the lease kept over kill -9: %q", out)
	}
	if got := machineState(t, state, "dev"); got.State != "running" || got.VMID != m.VMID {
		t.Errorf("machine after the restart: %+v, want running on the same VM %s", got, m.VMID)
	}
	if p := waitPool(t, state, "py", 2); p.Ready != 2 {
		t.Errorf("pool after the restart holds %d ready VMs, want its 2 adopted ones", p.Ready)
	}
	if after := firecrackerProcesses(state); !slices.Equal(before, after) {
		t.Errorf("VMs before kill -9 %v, after the restart %v: want the same, all adopted", before, after)
	}
	assertFirecrackersMatchState(t, state)

	mustCLI(t, state, 2*time.Minute, "machine", "stop", "dev")
	if got := machineState(t, state, "dev"); got.State != "stopped" || got.VMID != "" {
		t.Errorf("machine after stop: %+v, want stopped without a VM", got)
	}
	if slices.Contains(firecrackerProcesses(state), m.VMID) {
		t.Errorf("the stopped machine's VM %s still runs", m.VMID)
	}
	if _, err := os.Stat(filepath.Join(state, "machines", "dev", "data.img")); err != nil {
		t.Errorf("stopping the machine lost its data disk: %v", err)
	}
	var m2 machineJSON
	if err := json.Unmarshal([]byte(mustCLI(t, state, 2*time.Minute, "machine", "ensure", "dev", "-o", "json")), &m2); err != nil || m2.State != "running" {
		t.Fatalf("machine ensure after stop: %+v, %v", m2, err)
	}

	// SIGTERM destroys the warm VMs and keeps the lease and the machine.
	d.term(t)
	want := []string{l2.VMID, m2.VMID}
	slices.Sort(want)
	if got := firecrackerProcesses(state); !slices.Equal(got, want) {
		t.Errorf("after SIGTERM firecracker runs %v, want the leased and machine VMs %v", got, want)
	}
	d = startDaemon(t, state, append(serve, "--stop-all")...)
	if out := mustCLI(t, state, time.Minute, "exec", l2.ID, "--", "echo", "still"); out != "still\n" {
		t.Errorf("exec in the lease kept over SIGTERM: %q", out)
	}
	d.term(t)
	if got := firecrackerProcesses(state); len(got) != 0 {
		t.Errorf("firecracker processes left after a --stop-all shutdown: %v", got)
	}
	if ids := storeVMs(t, state); len(ids) != 0 {
		t.Errorf("the state still lists VMs after a --stop-all shutdown: %v", ids)
	}
}

// jailedFirecrackers returns the --id and the user of every firecracker
// process chrooted under state (a jailed process's command line names no
// path of ours; its root directory does).
func jailedFirecrackers(state string) map[string]string {
	out := map[string]string{}
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		root, err := os.Readlink(filepath.Join("/proc", e.Name(), "root"))
		if err != nil || !strings.HasPrefix(root, state) {
			continue
		}
		b, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		args := strings.Split(string(b), "\x00")
		i := slices.Index(args, "--id")
		if filepath.Base(args[0]) != "firecracker" || i < 0 || i+1 >= len(args) {
			continue
		}
		status, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "status"))
		for _, line := range strings.Split(string(status), "\n") {
			if f := strings.Fields(line); len(f) > 1 && f[0] == "Uid:" {
				out[args[i+1]] = f[1]
			}
		}
	}
	return out
}

// TestFirecrackerDaemonJailed runs the daemon with --jailer-bin and a jail
// user from the configuration: warm VMs and leases run chrooted as that
// user, exec works through the jail's vsock socket, and a --stop-all
// shutdown leaves no process and no jail behind.
func TestFirecrackerDaemonJailed(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("SKIPPING: the jailer needs root to chroot and change user")
	}
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	bins := t.TempDir()
	fakeBin, err := firecrackertest.BuildFake(bins)
	if err != nil {
		t.Fatal(err)
	}
	jailerBin, err := firecrackertest.BuildFakeJailer(bins)
	if err != nil {
		t.Fatal(err)
	}
	image := firecrackerImage(t, fakeBin)
	state, err := os.MkdirTemp("", "wp-fj-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for id := range jailedFirecrackers(state) {
			t.Errorf("jailed firecracker %s still runs at cleanup", id)
		}
		killJailed(state)
		nothingLeft(t, state)
		// The namespaces of the VMs' own TAPs go with their VMs; after a
		// failure the test removes them.
		vms, _ := os.ReadDir(filepath.Join(state, "vms"))
		for _, v := range vms {
			if _, err := os.Stat("/run/netns/wpfc-" + v.Name()); err == nil {
				exec.Command("ip", "netns", "del", "wpfc-"+v.Name()).Run()
			}
		}
		if t.Failed() {
			t.Logf("daemon log:\n%s", tail(state))
		}
		os.RemoveAll(state)
	})
	// The jail must be reachable by the jail user.
	if err := os.Chmod(state, 0o755); err != nil {
		t.Fatal(err)
	}
	const jailUID = "40125"
	cfg := filepath.Join(state, "config.yaml")
	if err := os.WriteFile(cfg, []byte("image: "+image+"\nfirecracker: {uid: "+jailUID+", gid: 40126}\n"+
		"network: {cidr: "+testCIDR(t)+", warm: 1}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	serve := []string{"--provider", "firecracker", "--firecracker-bin", fakeBin, "--jailer-bin", jailerBin, "--config", cfg, "--stop-all"}
	d := startDaemon(t, state, serve...)
	mustCLI(t, state, 5*time.Minute, "template", "build", "base", "--vcpus", "1", "--mem", "256")
	// The template's interface had a TAP of the build VM's own; the pool
	// VMs' is their slot's (isolated, the default) or again their own
	// (none), each in the namespace the jailer joined.
	mustCLI(t, state, time.Minute, "pool", "set", "py", "--template", "base", "--min", "1", "--max", "2")
	mustCLI(t, state, time.Minute, "pool", "set", "off", "--template", "base", "--min", "1", "--max", "1", "--network", "none")
	waitPool(t, state, "py", 1)
	waitPool(t, state, "off", 1)
	l := acquireNet(t, state, "py")
	off := acquireNet(t, state, "off")
	if l.Address == nil || off.Address != nil {
		t.Errorf("addresses: isolated lease %v, none lease %v; want one and none", l.Address, off.Address)
	}
	if ns := firecrackerNetns(t, state, l.VMID); !strings.HasPrefix(ns, "wp-"+network.TagFor(state)+"-") {
		t.Errorf("isolated lease's Firecracker runs in namespace %q, want its slot's", ns)
	}
	if ns := firecrackerNetns(t, state, off.VMID); ns != "wpfc-"+off.VMID {
		t.Errorf("none lease's Firecracker runs in namespace %q, want wpfc-%s, its own", ns, off.VMID)
	}
	seen := []string{l.VMID, off.VMID}
	// The fake's guest agent runs inside the jail, where the only program
	// is the (fake) firecracker binary the jailer copied in.
	if out := mustCLI(t, state, time.Minute, "exec", l.ID, "--", "/firecracker", "--version"); !strings.HasPrefix(out, "Firecracker v") {
		t.Errorf("exec in the jail printed %q, want the jailed binary's version", out)
	}
	waitPool(t, state, "py", 1)
	procs := jailedFirecrackers(state)
	if uid, ok := procs[l.VMID]; !ok || uid != jailUID {
		t.Errorf("leased VM %s: jailed processes %v, want it running as uid %s", l.VMID, procs, jailUID)
	}
	if len(procs) < 2 {
		t.Errorf("jailed processes %v, want the lease and a warm VM", procs)
	}
	d.term(t)
	if left := jailedFirecrackers(state); len(left) != 0 {
		t.Errorf("jailed firecrackers left after a --stop-all shutdown: %v", left)
	}
	if jails, _ := filepath.Glob(filepath.Join(state, "jail", "*", "*")); len(jails) != 0 {
		t.Errorf("jail directories left after a --stop-all shutdown: %v", jails)
	}
	// The network slots are checked at cleanup (nothingLeft).
	for _, id := range append(seen, storeVMs(t, state)...) {
		if _, err := os.Stat("/run/netns/wpfc-" + id); err == nil {
			t.Errorf("the namespace of VM %s's own TAP is left after a --stop-all shutdown", id)
		}
	}
}

// firecrackerNetns is the name of the /run/netns namespace the jailed
// Firecracker of VM id under state runs in, "" when none is.
func firecrackerNetns(t *testing.T, state, id string) string {
	t.Helper()
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		root, err := os.Readlink(filepath.Join("/proc", e.Name(), "root"))
		if err != nil || !strings.HasPrefix(root, state) {
			continue
		}
		b, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if !slices.Contains(strings.Split(string(b), "\x00"), id) {
			continue
		}
		mine, err := os.Stat(filepath.Join("/proc", e.Name(), "ns", "net"))
		if err != nil {
			t.Fatal(err)
		}
		names, _ := os.ReadDir("/run/netns")
		for _, n := range names {
			if st, err := os.Stat(filepath.Join("/run/netns", n.Name())); err == nil && os.SameFile(st, mine) {
				return n.Name()
			}
		}
		return ""
	}
	t.Fatalf("no jailed Firecracker of VM %s under %s", id, state)
	return ""
}

func killJailed(state string) {
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if root, err := os.Readlink(filepath.Join("/proc", e.Name(), "root")); err == nil && strings.HasPrefix(root, state) {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}
