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

// testNetns makes a named network namespace for one test, holding a TAP
// of each name taps gives (as a network slot holds its TAP).
func testNetns(t *testing.T, taps ...string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("network namespaces need root")
	}
	netnsCount++
	name := "wptest-" + strconv.Itoa(os.Getpid()) + "-" + strconv.Itoa(netnsCount)
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Skipf("ip netns add: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	for _, tp := range taps {
		if out, err := exec.Command("ip", "-n", name, "tuntap", "add", "dev", tp, "mode", "tap", "vnet_hdr").CombinedOutput(); err != nil {
			t.Fatalf("ip tuntap add %s: %v: %s", tp, err, out)
		}
	}
	return filepath.Join("/run/netns", name)
}

// scratchLeft lists the namespaces the provider made for unattached
// interfaces that are still there.
func scratchLeft(t *testing.T) []string {
	t.Helper()
	m, _ := filepath.Glob("/run/netns/wpfc-fc-*")
	return m
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
// namespace has its TAP overridden at load.
func TestNICRunsInItsNamespaceAndClonesAreOverridden(t *testing.T) {
	nsA, nsB := testNetns(t, "tap0"), testNetns(t, "tap1")
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
	// A TAP that is not in the namespace fails, as Firecracker cannot
	// open it.
	if _, err := e.p.Restore(ctx, snap.WithNIC(nsA, "tap9")); err == nil || !strings.Contains(err.Error(), "tap9") {
		t.Errorf("restore onto a missing TAP = %v, want a failure naming it", err)
	}
}

// A template is built with an interface attached to nothing: the VM gets
// a TAP of its own in a namespace with nothing else, and its clones
// restore with the interface, either onto a slot's TAP in the slot's
// namespace or (network none) onto a TAP of their own again. Each such
// namespace goes with its VM, also when the restore fails.
func TestUnattachedNICGetsATAPOfItsOwn(t *testing.T) {
	t.Run("plain", func(t *testing.T) {
		slot := testNetns(t, UnattachedTAP)
		testUnattachedNIC(t, newEnv(t, nil), slot)
	})
	// The jailer joins the namespace (--netns) and Firecracker, no longer
	// root, opens the TAP there.
	t.Run("jailed", func(t *testing.T) {
		slot := testNetns(t, UnattachedTAP)
		e, _ := newJailedEnv(t)
		testUnattachedNIC(t, e, slot)
	})
}

func testUnattachedNIC(t *testing.T, e *env, slot string) {
	ctx := testCtx(t)
	if !e.p.Capabilities().Has(vm.CapNetworkUnattached) {
		t.Fatal("a root provider lacks network-unattached")
	}
	spec := e.spec
	spec.NoBalloon = true
	spec.NIC = &vm.NIC{MAC: "02:77:70:00:00:02"}
	tmpl, err := e.p.Create(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	scratch := "/run/netns/" + scratchNetnsName(tmpl.ID)
	if !sameNetns(t, tmpl.PID, scratch) {
		t.Errorf("template VM %s does not run in its own namespace %s", tmpl.ID, scratch)
	}
	if cfg := vmConfig(t, e.p, tmpl.ID); !strings.Contains(cfg, "host_dev_name:"+UnattachedTAP) {
		t.Errorf("template VM's config lacks its TAP: %s", cfg)
	}
	if out, err := exec.Command("ip", "-n", scratchNetnsName(tmpl.ID), "-o", "link").CombinedOutput(); err != nil || strings.Count(string(out), "\n") != 2 {
		t.Errorf("the template's namespace holds more than lo and its TAP: %v\n%s", err, out)
	}
	if err := e.p.Pause(ctx, tmpl.ID); err != nil {
		t.Fatal(err)
	}
	snap, err := e.p.Snapshot(ctx, tmpl.ID, filepath.Join(t.TempDir(), "snap"))
	if err != nil {
		t.Fatal(err)
	}
	if snap.Spec.NIC == nil || snap.Spec.NIC.Attached() {
		t.Fatalf("the snapshot's NIC is %+v, want one attached to nothing", snap.Spec.NIC)
	}
	if err := e.p.Destroy(ctx, tmpl.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(scratch); !os.IsNotExist(err) {
		t.Errorf("the template VM's namespace outlived it: %v", err)
	}

	attached, err := e.p.Restore(ctx, snap.WithNIC(slot, UnattachedTAP))
	if err != nil {
		t.Fatal(err)
	}
	if !sameNetns(t, attached.PID, slot) {
		t.Errorf("clone %s does not run in its slot's namespace", attached.ID)
	}
	if in, _ := e.p.load(attached.ID); in.ScratchNetns != "" {
		t.Errorf("a clone attached to a slot got a namespace of its own too: %s", in.ScratchNetns)
	}

	none, err := e.p.Restore(ctx, snap)
	if err != nil {
		t.Fatal(err)
	}
	if !sameNetns(t, none.PID, "/run/netns/"+scratchNetnsName(none.ID)) {
		t.Errorf("clone %s with an unattached NIC does not run in a namespace of its own", none.ID)
	}
	if none.Spec.NIC == nil || none.Spec.NIC.Attached() {
		t.Errorf("clone's NIC is %+v, want one attached to nothing (its hand-off removes it)", none.Spec.NIC)
	}
	if err := e.p.Destroy(ctx, none.ID); err != nil {
		t.Fatal(err)
	}
	if left := scratchLeft(t); len(left) > 0 {
		t.Errorf("after destroy, left: %v", left)
	}

	// A restore that fails after the namespace was made takes it with it.
	t.Setenv("FAKE_FIRECRACKER_VERSION", "1.17.0")
	if _, err := e.p.Restore(ctx, snap); !errors.Is(err, vm.ErrIncompatible) {
		t.Fatalf("restore under another Firecracker = %v, want ErrIncompatible", err)
	}
	if left := scratchLeft(t); len(left) > 0 {
		t.Errorf("after a failed restore, left: %v", left)
	}
}

// Without root the provider cannot make a TAP of the VM's own: an
// interface attached to nothing is refused, and it says so.
func TestUnattachedNICNeedsRoot(t *testing.T) {
	e := newEnv(t, nil)
	e.p.canUnattached = false
	if e.p.Capabilities().Has(vm.CapNetworkUnattached) {
		t.Error("network-unattached without the means to make a namespace")
	}
	spec := e.spec
	spec.NIC = &vm.NIC{MAC: "02:77:70:00:00:02"}
	var fe *vm.FieldError
	if _, err := e.p.Create(testCtx(t), spec); !errors.As(err, &fe) || !strings.Contains(err.Error(), "root") {
		t.Errorf("create with an unattached NIC, not root = %v, want a field error naming root", err)
	}
	// A template built as root: the daemon rebuilds it, without the
	// interface, on ErrIncompatible.
	snap := vm.Snapshot{Provider: "firecracker", Dir: t.TempDir(), Spec: spec, Meta: map[string]string{"vmstate": "s", "memory": "m"}}
	for _, f := range []string{"s", "m"} {
		os.WriteFile(filepath.Join(snap.Dir, f), nil, 0o600)
	}
	if _, err := e.p.Restore(testCtx(t), snap); !errors.Is(err, vm.ErrIncompatible) {
		t.Errorf("restore of a template with an unattached NIC, not root = %v, want ErrIncompatible", err)
	}
}
