package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/warmpool/warmpool/vm"
)

// compatSnapshot is a shared-memory template snapshot on disk whose files
// all exist, taken by QEMU 7.2.0; only the field a case changes makes it
// unrestorable. Restore must refuse it before starting any process, so
// these cases need no QEMU binary.
func compatSnapshot(t *testing.T, change func(snap *vm.Snapshot, cfg *machineConfig)) vm.Snapshot {
	t.Helper()
	dir := t.TempDir()
	for _, f := range []string{"state", "memory", "vmlinuz", "initrd.img"} {
		if err := os.WriteFile(filepath.Join(dir, f), []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	cfg := machineConfig{Accel: AccelTCG, VCPUs: 1, MemoryMiB: 256, NoBalloon: true,
		Kernel: filepath.Join(dir, "vmlinuz"), Initrd: filepath.Join(dir, "initrd.img")}
	snap := vm.Snapshot{ID: "tpl", Provider: "qemu", Dir: dir, ProviderVersion: "7.2.0", SharedMemory: true,
		Meta: map[string]string{metaState: "state", metaMemory: "memory"}}
	change(&snap, &cfg)
	b, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	snap.Meta[metaConfig] = string(b)
	return snap
}

func TestRestoreRefusesIncompatibleSnapshots(t *testing.T) {
	p := &Provider{version: "7.2.0", vmsDir: t.TempDir()}
	cases := []struct {
		name   string
		change func(*vm.Snapshot, *machineConfig)
		says   string
	}{
		{"other QEMU version", func(s *vm.Snapshot, _ *machineConfig) { s.ProviderVersion = "6.2.0" },
			`taken with QEMU "6.2.0", this is QEMU 7.2.0`},
		{"balloon in a shared template", func(_ *vm.Snapshot, c *machineConfig) { c.NoBalloon = false },
			"template built with a balloon device, rebuild it"},
		{"guest image removed", func(_ *vm.Snapshot, c *machineConfig) { c.Kernel = filepath.Join(filepath.Dir(c.Kernel), "gone") },
			"template's guest image"},
		{"state file removed", func(s *vm.Snapshot, _ *machineConfig) { s.Meta[metaState] = "gone" },
			"snapshot state"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := p.Restore(context.Background(), compatSnapshot(t, tc.change))
			if !errors.Is(err, vm.ErrIncompatible) {
				t.Fatalf("Restore = %v, want an error wrapping vm.ErrIncompatible", err)
			}
			if !strings.Contains(err.Error(), tc.says) {
				t.Errorf("Restore error %q does not say %q", err, tc.says)
			}
		})
	}
	// A snapshot with its context cancelled gets past every check: the
	// cases above fail for what they changed, not for something shared.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := p.Restore(ctx, compatSnapshot(t, func(*vm.Snapshot, *machineConfig) {}))
	if !errors.Is(err, context.Canceled) {
		t.Errorf("Restore of a compatible snapshot with a cancelled context = %v, want context.Canceled", err)
	}
}
