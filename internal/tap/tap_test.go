package tap

import (
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
)

func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("network namespaces need root")
	}
}

func netnsName(t *testing.T) string {
	return "wptap-" + strconv.Itoa(os.Getpid()) + "-" + strings.ReplaceAll(t.Name(), "/", "-")
}

// links lists the interface names inside namespace name.
func links(t *testing.T, name string) []string {
	t.Helper()
	out, err := exec.Command("ip", "-n", name, "-o", "link").CombinedOutput()
	if err != nil {
		t.Fatalf("ip -n %s link: %v: %s", name, err, out)
	}
	var names []string
	for line := range strings.SplitSeq(strings.TrimSpace(string(out)), "\n") {
		f := strings.Fields(line)
		if len(f) > 1 {
			names = append(names, strings.TrimSuffix(f[1], ":"))
		}
	}
	return names
}

// A namespace made for a TAP holds that TAP and lo only, a VMM can open
// the TAP from it, and removing it leaves no namespace file.
func TestNewNetnsHoldsOnlyItsTAP(t *testing.T) {
	needRoot(t)
	name := netnsName(t)
	path, err := NewNetns(name, "tap0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { RemoveNetns(name) })
	if got := strings.Join(links(t, name), " "); got != "lo tap0" {
		t.Errorf("links in %s: %q, want lo and tap0", name, got)
	}
	f, err := Open(path, "tap0")
	if err != nil {
		t.Fatalf("open the TAP: %v", err)
	}
	f.Close()
	if _, err := NewNetns(name, "tap0"); err == nil {
		t.Errorf("a second namespace of the same name was made")
	}
	if _, err := os.Stat(path); err != nil {
		t.Errorf("a refused second namespace removed the first: %v", err)
	}
	if err := RemoveNetns(name); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Errorf("namespace file %s after RemoveNetns: %v", path, err)
	}
	if err := RemoveNetns(name); err != nil {
		t.Errorf("removing a namespace that is gone: %v", err)
	}
}

// A TAP that cannot be made leaves no namespace behind.
func TestNewNetnsLeavesNothingOnError(t *testing.T) {
	needRoot(t)
	name := netnsName(t)
	if _, err := NewNetns(name, "no/slash"); err == nil {
		RemoveNetns(name)
		t.Fatal("a TAP name with a slash was accepted")
	}
	if _, err := os.Stat(NetnsPath(name)); !os.IsNotExist(err) {
		t.Errorf("namespace file after a failed NewNetns: %v", err)
	}
}
