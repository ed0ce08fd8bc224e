//go:build linux

package agent_test

import (
	"os"
	"path/filepath"
	"regexp"
	"testing"

	"github.com/warmpool/warmpool/agent/server"
)

func TestIdentityFilesAreFreshPerHandoff(t *testing.T) {
	root := t.TempDir()
	for _, f := range []string{"etc", "var/lib/dbus", "var/lib/systemd"} {
		if err := os.MkdirAll(filepath.Join(root, f), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	template := map[string]string{
		"etc/machine-id":              "0123456789abcdef0123456789abcdef\n",
		"var/lib/dbus/machine-id":     "0123456789abcdef0123456789abcdef\n",
		"var/lib/systemd/random-seed": "seed",
		"etc/hostname":                "warmpool\n",
	}
	for f, c := range template {
		if err := os.WriteFile(filepath.Join(root, f), []byte(c), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	read := func(f string) string {
		b, err := os.ReadFile(filepath.Join(root, f))
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	if err := server.WriteIdentityFiles(root, "lease-a"); err != nil {
		t.Fatal(err)
	}
	first := read("etc/machine-id")
	if !regexp.MustCompile(`^[0-9a-f]{32}\n$`).MatchString(first) || first == template["etc/machine-id"] {
		t.Errorf("machine-id after hand-off = %q", first)
	}
	if read("var/lib/dbus/machine-id") != first {
		t.Errorf("dbus machine-id %q, want %q", read("var/lib/dbus/machine-id"), first)
	}
	if got := read("etc/hostname"); got != "lease-a\n" {
		t.Errorf("hostname file = %q", got)
	}
	if got := read("etc/hosts"); !regexp.MustCompile(`(?m)^127\.0\.1\.1\tlease-a$`).MatchString(got) || !regexp.MustCompile(`(?m)^127\.0\.0\.1\tlocalhost$`).MatchString(got) {
		t.Errorf("hosts = %q", got)
	}
	if _, err := os.Stat(filepath.Join(root, "var/lib/systemd/random-seed")); !os.IsNotExist(err) {
		t.Errorf("saved random seed still there: %v", err)
	}
	if err := server.WriteIdentityFiles(root, "lease-b"); err != nil {
		t.Fatal(err)
	}
	if read("etc/machine-id") == first {
		t.Error("two hand-offs gave the same machine-id")
	}
}

// The hand-off rewrites an identity file in place, cut to its new length,
// but never writes through a symlink: an image whose /etc/hosts links
// elsewhere gets a file of its own and the link's target stays as it was.
func TestIdentityFilesReplaceLinksAndShorterContent(t *testing.T) {
	root := t.TempDir()
	if err := os.MkdirAll(filepath.Join(root, "etc"), 0o755); err != nil {
		t.Fatal(err)
	}
	target := filepath.Join(root, "elsewhere")
	if err := os.WriteFile(target, []byte("not the guest's hosts\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(target, filepath.Join(root, "etc/hosts")); err != nil {
		t.Fatal(err)
	}
	long := "a-hostname-much-longer-than-the-lease-id-that-replaces-it\n"
	if err := os.WriteFile(filepath.Join(root, "etc/hostname"), []byte(long), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := server.WriteIdentityFiles(root, "lease-a"); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(target); string(b) != "not the guest's hosts\n" {
		t.Errorf("the hand-off wrote through the /etc/hosts symlink: its target holds %q", b)
	}
	if fi, err := os.Lstat(filepath.Join(root, "etc/hosts")); err != nil || !fi.Mode().IsRegular() {
		t.Errorf("/etc/hosts after the hand-off: %v %v, want a regular file", fi, err)
	}
	if b, _ := os.ReadFile(filepath.Join(root, "etc/hostname")); string(b) != "lease-a\n" {
		t.Errorf("hostname file = %q, want the lease ID alone", b)
	}
}
