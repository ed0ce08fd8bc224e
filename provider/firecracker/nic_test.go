package firecracker

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/warmpool/warmpool/vm"
)

var netnsCount int

// testNetns makes a named network namespace for one test.
func testNetns(t *testing.T) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("network namespaces need root")
	}
	netnsCount++
	name := "wpfc-" + strconv.Itoa(os.Getpid()) + "-" + strconv.Itoa(netnsCount)
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Skipf("ip netns add: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	return filepath.Join("/run/netns", name)
}

func sameNetns(t *testing.T, pid int, path string) bool {
	t.Helper()
	var a, b os.FileInfo
	a, err := os.Stat("/proc/" + strconv.Itoa(pid) + "/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	if b, err = os.Stat(path); err != nil {
		t.Fatal(err)
	}
	return os.SameFile(a, b)
}

// A VM with a NIC gets network-interfaces before boot with the slot's TAP
// and MAC, runs in the TAP's namespace, and a clone restored into another
// namespace has its TAP overridden at load; an interface attached to
// nothing is refused, as Firecracker has no TAP-less backend.
func TestNICRunsInItsNamespaceAndClonesAreOverridden(t *testing.T) {
	nsA, nsB := testNetns(t), testNetns(t)
	e := newEnv(t, nil)
	ctx := testCtx(t)
	spec := e.spec
	spec.NoBalloon = true
	spec.NIC = &vm.NIC{MAC: "02:77:70:00:00:02", Netns: nsA, TAP: "tap0"}
	v, err := e.p.Create(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	if cfg := vmConfig(t, e.p, v.ID); !strings.Contains(cfg, "host_dev_name:tap0") || !strings.Contains(cfg, "guest_mac:02:77:70:00:00:02") {
		t.Errorf("Firecracker's config of %s lacks the NIC: %s", v.ID, cfg)
	}
	if !sameNetns(t, v.PID, nsA) {
		t.Errorf("VM %s does not run in its TAP's namespace %s", v.ID, nsA)
	}
	if err := e.p.Pause(ctx, v.ID); err != nil {
		t.Fatal(err)
	}
	snap, err := e.p.Snapshot(ctx, v.ID, filepath.Join(t.TempDir(), "snap"))
	if err != nil {
		t.Fatal(err)
	}
	c, err := e.p.Restore(ctx, snap.WithNIC(nsB, "tap1"))
	if err != nil {
		t.Fatal(err)
	}
	if cfg := vmConfig(t, e.p, c.ID); !strings.Contains(cfg, "host_dev_name:tap1") {
		t.Errorf("clone %s was not given its own TAP at load: %s", c.ID, cfg)
	}
	if !sameNetns(t, c.PID, nsB) {
		t.Errorf("clone %s does not run in its TAP's namespace %s", c.ID, nsB)
	}
	if _, err := e.p.Restore(ctx, snap.WithNIC("", "")); err == nil || !strings.Contains(err.Error(), "TAP") {
		t.Errorf("restore with an unattached NIC = %v, want a refusal naming the TAP", err)
	}
	spec.NIC = &vm.NIC{MAC: "02:77:70:00:00:02"}
	var fe *vm.FieldError
	if _, err := e.p.Create(ctx, spec); !errors.As(err, &fe) {
		t.Errorf("create with an unattached NIC = %v, want a field error", err)
	}
}
