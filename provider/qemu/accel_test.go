package qemu

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/warmpool/warmpool/internal/atomicfile"
	"github.com/warmpool/warmpool/internal/realvm"
	"github.com/warmpool/warmpool/vm"
)

func TestAutoAccel(t *testing.T) {
	realvm.RequireQEMU(t)
	kernel := filepath.Join(t.TempDir(), "vmlinuz")
	os.WriteFile(kernel, []byte("not a kernel"), 0o644)
	spec := vm.Spec{VCPUs: 1, MemoryMiB: 128, Kernel: kernel}
	ctx := context.Background()
	saved := kvmDevice
	t.Cleanup(func() { kvmDevice = saved })

	t.Run("no kvm device means tcg without a probe", func(t *testing.T) {
		kvmDevice = filepath.Join(t.TempDir(), "missing")
		p, err := New(Options{StateDir: realvm.StateDir(t)})
		if err != nil {
			t.Fatal(err)
		}
		if a := p.Accel(); a != AccelAuto {
			t.Errorf("Accel before any VM = %q, want auto", a)
		}
		start := time.Now()
		if a, err := p.resolveAccel(ctx, spec); err != nil || a != AccelTCG {
			t.Fatalf("resolveAccel = %q, %v; want tcg", a, err)
		}
		if a := p.Accel(); a != AccelTCG {
			t.Errorf("Accel after the decision = %q, want tcg", a)
		}
		if d := time.Since(start); d > time.Second {
			t.Errorf("deciding without /dev/kvm took %v", d)
		}
		if _, err := os.Stat(filepath.Join(p.opts.StateDir, accelCacheFile)); err == nil {
			t.Error("cached a decision that needed no probe")
		}
	})

	t.Run("kvm that cannot boot falls back to tcg and is cached", func(t *testing.T) {
		// A device that opens but is no KVM: the probe boot fails.
		kvmDevice = filepath.Join(t.TempDir(), "kvm")
		os.WriteFile(kvmDevice, nil, 0o600)
		dir := realvm.StateDir(t)
		p, err := New(Options{StateDir: dir})
		if err != nil {
			t.Fatal(err)
		}
		if a, err := p.resolveAccel(ctx, spec); err != nil || a != AccelTCG {
			t.Fatalf("resolveAccel = %q, %v; want tcg", a, err)
		}
		b, err := os.ReadFile(filepath.Join(dir, accelCacheFile))
		if err != nil {
			t.Fatalf("probe result not cached: %v", err)
		}
		var c accelCache
		json.Unmarshal(b, &c)
		if c.Accel != AccelTCG || c.Key == "" {
			t.Errorf("cache %+v", c)
		}
		if entries, _ := os.ReadDir(filepath.Join(dir, "vms")); len(entries) != 0 {
			t.Errorf("probe left %d VM directories", len(entries))
		}
		// A later provider trusts the cache instead of probing again.
		c.Accel = AccelKVM
		atomicfile.WriteJSON(filepath.Join(dir, accelCacheFile), 0o600, c)
		p2, _ := New(Options{StateDir: dir})
		if a, _ := p2.resolveAccel(ctx, spec); a != AccelKVM {
			t.Errorf("second provider chose %q, want the cached kvm", a)
		}
	})

	t.Run("a host-wide cache serves a new state directory", func(t *testing.T) {
		kvmDevice = filepath.Join(t.TempDir(), "kvm")
		os.WriteFile(kvmDevice, nil, 0o600)
		host := filepath.Join(t.TempDir(), "accel.json")
		p, err := New(Options{StateDir: realvm.StateDir(t), AccelCache: host})
		if err != nil {
			t.Fatal(err)
		}
		if a, err := p.resolveAccel(ctx, spec); err != nil || a != AccelTCG {
			t.Fatalf("resolveAccel = %q, %v; want tcg", a, err)
		}
		// The host's answer, made kvm so that only a read of it explains
		// the choice; a second state directory takes it without probing.
		b, err := os.ReadFile(host)
		if err != nil {
			t.Fatalf("host-wide cache not written: %v", err)
		}
		var c accelCache
		json.Unmarshal(b, &c)
		c.Accel = AccelKVM
		atomicfile.WriteJSON(host, 0o600, c)
		dir2 := realvm.StateDir(t)
		p2, _ := New(Options{StateDir: dir2, AccelCache: host})
		start := time.Now()
		if a, _ := p2.resolveAccel(ctx, spec); a != AccelKVM {
			t.Errorf("provider on a new state dir chose %q, want the host's kvm", a)
		}
		if d := time.Since(start); d > probeDeadline/2 {
			t.Errorf("it took %v: it probed", d)
		}
		if a, ok := readAccelCache(filepath.Join(dir2, accelCacheFile), c.Key); !ok || a != AccelKVM {
			t.Errorf("state dir cache after the host's answer: %q %v", a, ok)
		}
		// Another QEMU or kernel is another key: not trusted.
		c.Key += "-other"
		atomicfile.WriteJSON(host, 0o600, c)
		if _, ok := readAccelCache(host, c.Key[:len(c.Key)-len("-other")]); ok {
			t.Error("a cache of another key was trusted")
		}
	})
}
