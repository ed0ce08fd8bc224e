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
