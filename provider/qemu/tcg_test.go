package qemu

import (
	"os"
	"path/filepath"
	"testing"
)

func TestHostTSCKHz(t *testing.T) {
	dir := t.TempDir()
	write := func(name, text string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	constant := write("a", "processor\t: 0\ncpu MHz\t\t: 2096.003\nflags\t\t: fpu tsc constant_tsc nonstop_tsc\n")
	if got := hostTSCKHz(constant); got != 2096003 {
		t.Errorf("constant TSC at 2096.003 MHz: got %d kHz", got)
	}
	varying := write("b", "cpu MHz\t\t: 1200.000\nflags\t\t: fpu tsc\n")
	if got := hostTSCKHz(varying); got != 0 {
		t.Errorf("TSC without constant_tsc: got %d kHz, want 0 (unknown)", got)
	}
	if got := hostTSCKHz(filepath.Join(dir, "missing")); got != 0 {
		t.Errorf("missing cpuinfo: got %d", got)
	}
}
