package rootfs

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// A debootstrap killed before its exit trap leaves filesystems mounted in
// its target; removing the tree must detach them, not fail on them or
// reach into them.
func TestRemoveUnmountedDetachesLeftoverMounts(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mounting needs root")
	}
	dir := filepath.Join(t.TempDir(), "tree")
	mp := filepath.Join(dir, "root/proc")
	if err := os.MkdirAll(mp, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", mp, "tmpfs", 0, "size=1m"); err != nil {
		t.Skipf("mount tmpfs: %v", err)
	}
	t.Cleanup(func() { _ = unix.Unmount(mp, unix.MNT_DETACH) })
	if err := os.WriteFile(filepath.Join(mp, "inside"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	removeUnmounted(dir)
	if _, err := os.Lstat(dir); err == nil {
		t.Errorf("%s still exists", dir)
	}
	info, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(info), dir) {
		t.Errorf("a mount below %s is left", dir)
	}
}
