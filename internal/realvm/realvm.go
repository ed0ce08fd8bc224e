// Package realvm helps tests that boot real VMs: it skips them loudly when
// QEMU is missing and builds the guest image once per test binary into the
// shared cache directory.
package realvm

import (
	"context"
	"os"
	"os/exec"
	"sync"
	"testing"
	"time"

	"github.com/warmpool/warmpool/guest"
)

// QEMUBinary is the emulator real-VM tests need.
const QEMUBinary = "qemu-system-x86_64"

// RequireQEMU skips the test, loudly, when QEMU is not installed.
func RequireQEMU(tb testing.TB) {
	tb.Helper()
	if _, err := exec.LookPath(QEMUBinary); err != nil {
		tb.Skip("SKIPPING real-VM test: " + QEMUBinary + " not installed (apt-get install qemu-system-x86, or make deps)")
	}
}

var (
	imageOnce sync.Once
	image     guest.Image
	imageErr  error
)

// Image returns the guest image, building it on first use in this test
// binary (into guest.DefaultCacheDir, shared with every other test and run,
// so only the first build on a machine is slow).
func Image(tb testing.TB) guest.Image {
	tb.Helper()
	RequireQEMU(tb)
	imageOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
		defer cancel()
		image, imageErr = guest.Build(ctx, guest.BuildOptions{})
	})
	if imageErr != nil {
		tb.Fatalf("build guest image: %v", imageErr)
	}
	return image
}

// StateDir returns a new, short directory for a provider's state (socket
// paths inside must stay under 108 bytes, which t.TempDir may exceed),
// removed when the test ends.
func StateDir(tb testing.TB) string {
	tb.Helper()
	dir, err := os.MkdirTemp("", "wp-")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}
