package daemon

import (
	"errors"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/warmpool/warmpool/vm"
)

func TestParseConfig(t *testing.T) {
	cfg, err := ParseConfig(strings.NewReader(`
listen: tcp:127.0.0.1:7070
token_file: /etc/warmpool/token
provider: fake
intervals: {sweep: 2s}
limits: {parallelism: 4, lease_ttl: 1h}
templates:
  base: {vcpus: 2, memory_mib: 512}
pools:
  py: {template: base, min: 1, max: 4, max_age: 30m}
machines:
  dev: {vcpus: 2, memory_mib: 1024, idle_after: 5m}
`))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Pools["py"].MaxAge.Std() != 30*time.Minute || cfg.Templates["base"].MemoryMiB != 512 ||
		cfg.Limits.LeaseTTL.Std() != time.Hour || cfg.Machines["dev"].IdleAfter.Std() != 5*time.Minute {
		t.Errorf("parsed %+v", cfg)
	}
}

func TestParseConfigRejects(t *testing.T) {
	for _, tc := range []struct{ yaml, want string }{
		{"pools:\n  py: {template: base, min: 1, max: 4, maxage: 3}\n", "maxage"},
		{"provdier: qemu\n", "provdier"},
		{"provider: vmware\n", "provider"},
		{"pools:\n  py: {template: base, min: 5, max: 4}\n", "min"},
		{"pools:\n  ../x: {template: base, max: 4}\n", "pool"},
		{"pools:\n  py: {template: base, max: -1}\n", "max"},
		{"limits: {lease_ttl: 30}\n", "duration"},
		{"limits: {lease_ttl: -1s}\n", "negative"},
		{"templates:\n  base: {memory_mib: 1}\n", "memory_mib"},
		{"machines:\n  dev: {vcpus: -1, memory_mib: 256}\n", "vcpus"},
		{"machine_defaults: {idle_after: 5}\n", "duration"},
		{"machine_defaults: {idle_reserve_mib: -1}\n", "idle_reserve_mib"},
		{"listen: 0.0.0.0:80\n", "listen"},
		{"e2b: {listen: unix:/tmp/e2b.sock}\n", "e2b.listen"},
		{"e2b: {listne: tcp:127.0.0.1:3000}\n", "listne"},
	} {
		_, err := ParseConfig(strings.NewReader(tc.yaml))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("ParseConfig(%q) = %v, want an error naming %q", tc.yaml, err, tc.want)
		}
	}
}

func TestTCPListenNeedsToken(t *testing.T) {
	_, _, err := resolveConfig(Options{StateDir: t.TempDir(), Listen: "tcp:127.0.0.1:0"})
	if !errors.Is(err, vm.ErrInvalid) || !strings.Contains(err.Error(), "token") {
		t.Errorf("tcp listen without token = %v", err)
	}
}

// The README's configuration reference is ConfigReference's output, so it
// cannot drift from the code. Regenerate it by pasting the output of
// `go test ./daemon -run TestREADMEConfigReference -v` (printed on failure).
func TestREADMEConfigReference(t *testing.T) {
	b, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	ref := ConfigReference()
	if !strings.Contains(string(b), ref) {
		t.Errorf("README.md lacks the current configuration reference; put this in its configuration section:\n\n%s", ref)
	}
	for _, key := range []string{"`listen`", "`pools.<name>.max_age`", "`limits.lease_ttl`", "`intervals.sweep`"} {
		if !strings.Contains(ref, key) {
			t.Errorf("reference lacks %s", key)
		}
	}
}
