// Package e2etest drives the real warmpool binary against real QEMU VMs:
// the daemon as a subprocess, the CLI as the user runs it, and a kill -9 of
// the daemon in the middle. Each test runs its own daemon on a state
// directory of its own; the templates they start from are built once per
// test binary (fixture_test.go), since each build is a cold boot under TCG.
package e2etest

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/warmpool/warmpool/api"
	"github.com/warmpool/warmpool/internal/paths"
	"github.com/warmpool/warmpool/provider/qemu"
	"github.com/warmpool/warmpool/store"
)

var (
	warmpoolBin string
	// buildErr is why the binary could not be built.
	buildErr error
)

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

// run builds the CLI once for every test (the Firecracker tests need it
// even where QEMU is absent), in a directory that outlives each test.
func run(m *testing.M) int {
	tmp, err := os.MkdirTemp("", "warmpool-e2e-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(tmp)
	defer removeSeed()
	bin := filepath.Join(tmp, "warmpool")
	// As `make build` does: the guest agent first, embedded in the binary.
	for _, argv := range [][]string{{"go", "generate", "./cmd/warmpool"}, {"go", "build", "-o", bin, "./cmd/warmpool"}} {
		build := exec.Command(argv[0], argv[1:]...)
		build.Dir = "../.."
		if out, err := build.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("build warmpool: %s: %v\n%s", strings.Join(argv, " "), err, out)
			return m.Run()
		}
	}
	warmpoolBin = bin
	return m.Run()
}

// installation is how a test runs the warmpool binary: which file, in which
// working directory (empty: the test's) and with which environment (nil:
// the test's).
type installation struct {
	bin string
	dir string
	env []string
	// cred, when set, is the user the binary runs as.
	cred *syscall.Credential
}

// checkout runs the binary TestMain built from the test's directory, inside
// the source tree.
func checkout() installation { return installation{bin: warmpoolBin} }

func (in installation) command(ctx context.Context, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, in.bin, args...)
	cmd.Dir = in.dir
	env := in.env
	if env == nil {
		env = os.Environ()
	}
	cmd.Env = append(slices.Clone(env), "WARMPOOL_SOCKET=")
	if in.cred != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: in.cred}
	}
	return cmd
}

// daemon is `warmpool serve` running as a subprocess.
type daemon struct {
	cmd    *exec.Cmd
	exited chan struct{} // closed once Wait returned; err is its result
	err    error
}

// startDaemon starts `warmpool serve` on state with extra flags and returns
// once the daemon answers, which is after its restart reconciliation.
func startDaemon(t *testing.T, state string, flags ...string) *daemon {
	t.Helper()
	return checkout().startDaemon(t, state, flags...)
}

func (in installation) startDaemon(t *testing.T, state string, flags ...string) *daemon {
	t.Helper()
	start := time.Now()
	logf, err := os.OpenFile(filepath.Join(state, "daemon.log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd := in.command(context.Background(), append([]string{"serve", "--state", state, "--provider", "qemu"}, flags...)...)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	d := &daemon{cmd: cmd, exited: make(chan struct{})}
	go func() { d.err = cmd.Wait(); close(d.exited) }()
	t.Cleanup(func() { d.kill() })
	deadline := time.Now().Add(2 * time.Minute)
	for {
		if _, err := in.cli(t, state, 10*time.Second, "status"); err == nil {
			t.Logf("daemon %v answered %s after its start", flags, time.Since(start).Round(time.Millisecond))
			return d
		}
		select {
		case <-d.exited:
			t.Fatalf("daemon exited: %v\n%s", d.err, tail(state))
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("daemon did not answer within 2 minutes\n%s", tail(state))
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func (d *daemon) kill() {
	_ = d.cmd.Process.Signal(syscall.SIGKILL)
	<-d.exited
}

func (d *daemon) term(t *testing.T) {
	t.Helper()
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.exited:
		if d.err != nil {
			t.Errorf("daemon exited with %v after SIGTERM", d.err)
		}
	case <-time.After(2 * time.Minute):
		t.Error("daemon did not stop within 2 minutes of SIGTERM")
	}
}

func tail(state string) string {
	b, _ := os.ReadFile(filepath.Join(state, "daemon.log"))
	if len(b) > 4000 {
		b = b[len(b)-4000:]
	}
	return string(b)
}

// cli runs the warmpool CLI against the daemon of state.
func cli(t *testing.T, state string, timeout time.Duration, args ...string) (string, error) {
	t.Helper()
	return checkout().cli(t, state, timeout, args...)
}

func (in installation) cli(t *testing.T, state string, timeout time.Duration, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := in.command(ctx, append([]string{"--state", state}, args...)...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	if err != nil {
		return out.String(), fmt.Errorf("warmpool %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	return out.String(), nil
}

func mustCLI(t *testing.T, state string, timeout time.Duration, args ...string) string {
	t.Helper()
	return checkout().mustCLI(t, state, timeout, args...)
}

func (in installation) mustCLI(t *testing.T, state string, timeout time.Duration, args ...string) string {
	t.Helper()
	out, err := in.cli(t, state, timeout, args...)
	if err != nil {
		t.Fatalf("%v\ndaemon log:\n%s", err, tail(state))
	}
	return out
}

type poolJSON struct {
	Name      string `json:"name"`
	Ready     int    `json:"ready"`
	Restoring int    `json:"restoring"`
}

type leaseJSON struct {
	ID      string `json:"id"`
	VMID    string `json:"vm_id"`
	Timings struct {
		WaitMS    int64 `json:"wait_ms"`
		HandoffMS int64 `json:"handoff_ms"`
		TotalMS   int64 `json:"total_ms"`
	} `json:"timings"`
}

func waitPool(t *testing.T, state, name string, ready int) poolJSON {
	t.Helper()
	return checkout().waitPool(t, state, name, ready)
}

func (in installation) waitPool(t *testing.T, state, name string, ready int) poolJSON {
	t.Helper()
	deadline := time.Now().Add(5 * time.Minute)
	var last string
	for time.Now().Before(deadline) {
		out, err := in.cli(t, state, 30*time.Second, "pool", "ls", "-o", "json")
		last = out
		if err == nil {
			var pools []poolJSON
			if json.Unmarshal([]byte(out), &pools) == nil {
				for _, p := range pools {
					if p.Name == name && p.Ready >= ready && p.Restoring == 0 {
						return p
					}
				}
			}
		}
		time.Sleep(500 * time.Millisecond)
	}
	t.Fatalf("pool %s never reached %d ready VMs; last: %s\n%s", name, ready, last, tail(state))
	return poolJSON{}
}

// qemuProcesses returns the command lines of QEMU processes that belong to
// state, by PID.
func qemuProcesses(t *testing.T, state string) map[int]string {
	t.Helper()
	out := map[int]string{}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		cmdline := strings.ReplaceAll(string(b), "\x00", " ")
		if strings.Contains(cmdline, "qemu-system") && ofState(cmdline, state) {
			out[pid] = cmdline
		}
	}
	return out
}

// storeVMs reads the VM IDs the state lists from a copy of the database
// (the running daemon holds the original's lock).
func storeVMs(t *testing.T, state string) []string {
	t.Helper()
	cp := t.TempDir()
	b, err := os.ReadFile(filepath.Join(state, store.FileName))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(cp, store.FileName), b, 0o600); err != nil {
		t.Fatal(err)
	}
	st, err := store.Open(cp)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	recs, err := store.List(st, store.VMs)
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, r := range recs {
		ids = append(ids, r.ID)
	}
	return ids
}

// assertProcessesMatchState checks that every QEMU process of state runs a
// VM the state lists and every listed VM has its process. It retries for a
// while: a refill may be between its process start and its record.
func assertProcessesMatchState(t *testing.T, state string) {
	t.Helper()
	var problem string
	for range 60 {
		problem = ""
		ids := storeVMs(t, state)
		procs := qemuProcesses(t, state)
		claimed := map[string]bool{}
		for pid, cmdline := range procs {
			var owners []string
			for _, id := range ids {
				if strings.Contains(cmdline, id) {
					owners = append(owners, id)
				}
			}
			if len(owners) != 1 {
				problem += fmt.Sprintf("process %d belongs to %d listed VMs %v: %s\n", pid, len(owners), owners, cmdline)
			}
			for _, o := range owners {
				claimed[o] = true
			}
		}
		for _, id := range ids {
			if !claimed[id] {
				problem += fmt.Sprintf("listed VM %s has no QEMU process\n", id)
			}
		}
		if problem == "" {
			return
		}
		time.Sleep(500 * time.Millisecond)
	}
	t.Errorf("process table and state disagree:\n%s", problem)
}

// ofState: a QEMU command line names the daemon's state directory or its
// VMs' run directory.
func ofState(cmdline, state string) bool {
	run := qemu.DefaultRunDir(state)
	return strings.Contains(cmdline, state) || run != "" && strings.Contains(cmdline, run)
}

func killStrays(state string) {
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if bytes.Contains(b, []byte("qemu-system")) && ofState(string(b), state) {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

type machineJSON struct {
	Name  string `json:"name"`
	State string `json:"state"`
	VMID  string `json:"vm_id"`
}

func machineState(t *testing.T, state, name string) machineJSON {
	t.Helper()
	var ms []machineJSON
	if err := json.Unmarshal([]byte(mustCLI(t, state, time.Minute, "machine", "ls", "-o", "json")), &ms); err != nil {
		t.Fatalf("machine ls output: %v", err)
	}
	for _, m := range ms {
		if m.Name == name {
			return m
		}
	}
	t.Fatalf("machine ls does not list %s: %+v", name, ms)
	return machineJSON{}
}

func acquire(t *testing.T, state, pool string) leaseJSON {
	t.Helper()
	return checkout().acquire(t, state, pool)
}

func (in installation) acquire(t *testing.T, state, pool string) leaseJSON {
	t.Helper()
	start := time.Now()
	var l leaseJSON
	if err := json.Unmarshal([]byte(in.mustCLI(t, state, 2*time.Minute, "acquire", pool, "--wait", "60s", "-o", "json")), &l); err != nil || l.ID == "" {
		t.Fatalf("acquire output: %v", err)
	}
	t.Logf("acquire through the CLI took %s; the daemon's timings: %+v", time.Since(start).Round(time.Millisecond), l.Timings)
	return l
}

// processIDs returns the VM IDs (the provider's directory names in the
// command lines) of state's QEMU processes.
func processVMs(t *testing.T, state string) []string {
	t.Helper()
	var ids []string
	for _, cmdline := range qemuProcesses(t, state) {
		for _, f := range strings.Fields(cmdline) {
			if strings.HasPrefix(f, "-name") {
				continue
			}
			if after, ok := strings.CutPrefix(f, "warmpool-"); ok {
				ids = append(ids, after)
				break
			}
		}
	}
	slices.Sort(ids)
	return ids
}

// waitProcesses waits until state's QEMU processes run exactly the VMs want.
func waitProcesses(t *testing.T, state string, want ...string) {
	t.Helper()
	slices.Sort(want)
	var got []string
	for range 120 {
		if got = processVMs(t, state); slices.Equal(got, want) {
			return
		}
		time.Sleep(500 * time.Millisecond)
	}
	t.Errorf("QEMU processes run VMs %v, want %v", got, want)
}

// ramFiles lists the shared-memory files of state's VMs (QEMU's
// memory-backend-file mem-path=...).
func ramFiles(t *testing.T, state string, ids []string) []string {
	t.Helper()
	var left []string
	run := qemu.DefaultRunDir(state)
	for _, id := range ids {
		m, _ := filepath.Glob("/dev/shm/*" + id + "*")
		left = append(left, m...)
		if run != "" {
			m, _ = filepath.Glob(filepath.Join(run, id, "*"))
			left = append(left, m...)
		}
	}
	return left
}

// metric returns the value of the sample name (labels included, as in
// `warmpool_handoffs_total{entropy="reseeded"}`) on the daemon's /metrics.
func metric(t *testing.T, state, name string) float64 {
	t.Helper()
	c := api.NewClient(paths.Socket(state), "")
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	text, err := c.Metrics(ctx)
	if err != nil {
		t.Fatalf("GET /metrics: %v", err)
	}
	for line := range strings.SplitSeq(text, "\n") {
		if v, ok := strings.CutPrefix(line, name+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatalf("metric %s: %v", line, err)
			}
			return f
		}
	}
	t.Fatalf("/metrics has no sample %s", name)
	return 0
}

// assertEntropyHandedOff checks that each of the daemon's acquires so far
// gave its guest 32 bytes of entropy and that the guest reported them added
// and its CRNG reseeded.
func assertEntropyHandedOff(t *testing.T, state string, acquires int) {
	t.Helper()
	if got := metric(t, state, "warmpool_handoff_entropy_bytes_total"); got != float64(32*acquires) {
		t.Errorf("guests report %v bytes of hand-off entropy after %d acquires, want %d", got, acquires, 32*acquires)
	}
	if got := metric(t, state, `warmpool_handoffs_total{entropy="reseeded"}`); got != float64(acquires) {
		t.Errorf("%v hand-offs reseeded their guest's CRNG after %d acquires, want every one", got, acquires)
	}
}

// warmVMs is the VMs of state's QEMU processes other than those of leases
// and machines.
func warmVMs(t *testing.T, state string, notWarm ...string) []string {
	t.Helper()
	var ids []string
	for _, id := range processVMs(t, state) {
		if !slices.Contains(notWarm, id) {
			ids = append(ids, id)
		}
	}
	return ids
}

// qemuState skips the test when QEMU is missing and otherwise gives it a
// fresh state directory; at the end every process of that state is
// killed, the daemon's log shown if the test failed, and the directory
// removed.
func qemuState(t *testing.T, what, prefix string) string {
	t.Helper()
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		t.Skip("SKIPPING the " + what + ": qemu-system-x86_64 is not installed (make deps installs it)")
	}
	state, err := os.MkdirTemp("", prefix)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		killStrays(state)
		if t.Failed() {
			t.Logf("daemon log:\n%s", tail(state))
		}
		run := qemu.DefaultRunDir(state)
		os.RemoveAll(state)
		if run != "" {
			os.RemoveAll(filepath.Dir(run))
		}
	})
	return state
}

func TestQEMUDaemonSurvivesKill9(t *testing.T) {
	state := qemuState(t, "real-VM daemon test", "wp-e2e-")

	// Every VM ID ever seen, to check at the end that none left a RAM file.
	seen := map[string]bool{}
	see := func() {
		for _, id := range processVMs(t, state) {
			seen[id] = true
		}
	}
	t.Cleanup(func() {
		killStrays(state)
		if left := ramFiles(t, state, slices.Collect(maps.Keys(seen))); len(left) > 0 {
			t.Errorf("RAM files left behind: %v", left)
			for _, f := range left {
				os.Remove(f)
			}
		}
	})

	useTemplate(t, state, "base", busybox256)
	d := startDaemon(t, state)
	mustCLI(t, state, time.Minute, "pool", "set", "py", "--template", "base", "--min", "2", "--max", "3")
	waitPool(t, state, "py", 2)
	see()

	l1 := acquire(t, state, "py")
	assertEntropyHandedOff(t, state, 1)
	if out := mustCLI(t, state, time.Minute, "exec", l1.ID, "--", "echo", "hello from the guest"); out != "hello from the guest\n" {
		t.Errorf("exec output %q", out)
	}
	if _, err := cli(t, state, time.Minute, "exec", l1.ID, "--", "sh", "-c", "exit 7"); err == nil || !strings.Contains(err.Error(), "exit status 7") {
		t.Errorf("exit code did not pass through: %v", err)
	}
	mustCLI(t, state, time.Minute, "release", l1.ID)
	mustCLI(t, state, time.Minute, "release", l1.ID) // idempotent

	// A machine boots from the daemon's guest image and is recorded.
	start := time.Now()
	var m machineJSON
	if err := json.Unmarshal([]byte(mustCLI(t, state, 5*time.Minute, "machine", "ensure", "dev", "--vcpus", "1", "--mem", "256", "-o", "json")), &m); err != nil {
		t.Fatalf("machine ensure output: %v", err)
	}
	t.Logf("machine ensure (cold boot) took %s", time.Since(start).Round(time.Millisecond))
	if m.State != "running" || m.VMID == "" {
		t.Errorf("machine after ensure: %+v, want running with a VM", m)
	}

	waitPool(t, state, "py", 2)
	l2 := acquire(t, state, "py")
	assertEntropyHandedOff(t, state, 2)
	waitPool(t, state, "py", 2)
	see()
	assertProcessesMatchState(t, state)
	warmBefore := warmVMs(t, state, l2.VMID, m.VMID)

	// kill -9 with a lease held, VMs warm and a machine running.
	d.kill()
	if len(qemuProcesses(t, state)) < 4 {
		t.Errorf("VMs did not outlive the daemon: %v", qemuProcesses(t, state))
	}
	d = startDaemon(t, state)
	if out := mustCLI(t, state, time.Minute, "exec", l2.ID, "--", "hostname"); strings.TrimSpace(out) != l2.ID {
		t.Errorf("hostname of the kept lease's VM = %q, want the lease ID %s", out, l2.ID)
	}
	if got := machineState(t, state, "dev"); got.State != "running" || got.VMID != m.VMID {
		t.Errorf("machine after the restart: %+v, want running on the same VM %s", got, m.VMID)
	}
	if p := waitPool(t, state, "py", 2); p.Ready != 2 {
		t.Errorf("pool after the restart holds %d ready VMs, want its 2 adopted ones and no more", p.Ready)
	}
	// Adopted, not replaced: the same warm VMs as before the kill, and no
	// new ones (freshly restored VMs would make the counts right too).
	if warmAfter := warmVMs(t, state, l2.VMID, m.VMID); !slices.Equal(warmBefore, warmAfter) {
		t.Errorf("warm VMs before kill -9 %v, after the restart %v: want the same, adopted", warmBefore, warmAfter)
	}
	see()
	assertProcessesMatchState(t, state)

	mustCLI(t, state, 2*time.Minute, "machine", "stop", "dev")
	if got := machineState(t, state, "dev"); got.State != "stopped" || got.VMID != "" {
		t.Errorf("machine after stop: %+v, want stopped without a VM", got)
	}
	assertProcessesMatchState(t, state)
	if slices.Contains(processVMs(t, state), m.VMID) {
		t.Errorf("the stopped machine's VM %s still has a QEMU process", m.VMID)
	}
	mustCLI(t, state, time.Minute, "release", l2.ID)

	// SIGTERM destroys the warm VMs and keeps the leased one and the machine.
	l3 := acquire(t, state, "py")
	var m2 machineJSON
	if err := json.Unmarshal([]byte(mustCLI(t, state, 5*time.Minute, "machine", "ensure", "dev", "-o", "json")), &m2); err != nil || m2.State != "running" {
		t.Fatalf("machine ensure after stop: %+v, %v", m2, err)
	}
	see()
	d.term(t)
	waitProcesses(t, state, l3.VMID, m2.VMID)

	// A daemon with --stop-all adopts both, and destroys both on SIGTERM.
	d = startDaemon(t, state, "--stop-all")
	if out := mustCLI(t, state, time.Minute, "exec", l3.ID, "--", "hostname"); strings.TrimSpace(out) != l3.ID {
		t.Errorf("hostname of the lease kept over SIGTERM = %q, want %s", out, l3.ID)
	}
	if got := machineState(t, state, "dev"); got.State != "running" || got.VMID != m2.VMID {
		t.Errorf("machine after a SIGTERM restart: %+v, want running on VM %s", got, m2.VMID)
	}
	see()
	d.term(t)
	waitProcesses(t, state)
	if ids := storeVMs(t, state); len(ids) != 0 {
		t.Errorf("the state still lists VMs after a --stop-all shutdown: %v", ids)
	}
}
