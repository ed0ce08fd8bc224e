package rootfs

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/warmpool/warmpool/guest"
)

// debianEnv is the exec environment of a Debian image (Debian's default
// PATH for root, as login shells set it).
var debianEnv = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}

// debootstrapTree returns a directory holding a minbase debootstrap of
// suite with packages, from mirror. Trees are cached under
// cache/debootstrap by a key of every input, so a second build (or a second
// CI run on the same machine) skips debootstrap; the tree must not be
// changed.
func debootstrapTree(ctx context.Context, cache, suite, mirror string, packages []string, progress func(string, int64, int64)) (string, error) {
	if _, err := exec.LookPath("debootstrap"); err != nil {
		return "", fmt.Errorf("debian:%s needs debootstrap (Debian's debootstrap package; scripts/deps.sh installs it): %w", suite, err)
	}
	if _, err := os.Stat(filepath.Join("/usr/share/debootstrap/scripts", suite)); err != nil {
		return "", fmt.Errorf("debian:%s: unknown suite (debootstrap has no script for it in /usr/share/debootstrap/scripts)", suite)
	}
	version, _ := exec.Command("dpkg-query", "-W", "-f=${Version}", "debootstrap").Output()
	h := sha256.New()
	fmt.Fprintf(h, "debootstrap %s\nvariant minbase\nsuite %s\nmirror %s\npackages %s\n", version, suite, mirror, strings.Join(packages, ","))
	key := hex.EncodeToString(h.Sum(nil))[:16]
	dir := filepath.Join(cache, "debootstrap", key)
	root := filepath.Join(dir, "root")
	// Its own lock: two builds of one tree wait for each other, while the
	// image cache's lock stays free for other builds.
	unlock, err := guest.LockCache(ctx, filepath.Dir(dir))
	if err != nil {
		return "", err
	}
	defer unlock()
	if _, err := os.Stat(filepath.Join(dir, "complete")); err == nil {
		progress("debootstrap "+suite+" (cached)", 0, -1)
		return root, nil
	}
	if err := checkPackagesKnown(ctx, suite, packages); err != nil {
		return "", err
	}
	tmp, err := os.MkdirTemp(filepath.Dir(dir), ".debootstrap-")
	if err != nil {
		return "", fmt.Errorf("debootstrap cache: %w", err)
	}
	defer removeUnmounted(tmp)
	args := []string{"--variant=minbase"}
	if len(packages) > 0 {
		args = append(args, "--include="+strings.Join(packages, ","))
	}
	args = append(args, suite, filepath.Join(tmp, "root"), mirror)
	cmd := exec.CommandContext(ctx, "debootstrap", args...)
	// SIGTERM first: debootstrap's exit trap unmounts the /proc, /sys and
	// /dev it mounted in the target.
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = 30 * time.Second
	out, err := cmd.StdoutPipe()
	if err != nil {
		return "", err
	}
	cmd.Stderr = cmd.Stdout
	if err := cmd.Start(); err != nil {
		return "", fmt.Errorf("debootstrap %s: %w", suite, err)
	}
	var log []string
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		line := sc.Text()
		log = append(log, line)
		if msg, ok := strings.CutPrefix(line, "I: "); ok {
			progress("debootstrap "+suite+": "+strings.TrimSuffix(msg, "..."), 0, -1)
		}
	}
	_, _ = io.Copy(io.Discard, out)
	if err := cmd.Wait(); err != nil {
		return "", fmt.Errorf("debootstrap %s from %s with packages [%s] failed: %s: %w", suite, mirror, strings.Join(packages, " "), debootstrapError(log), err)
	}
	// The downloaded .debs are apt's cache, not part of the image.
	debs, _ := filepath.Glob(filepath.Join(tmp, "root", "var/cache/apt/archives/*.deb"))
	for _, d := range debs {
		_ = os.Remove(d)
	}
	if err := os.WriteFile(filepath.Join(tmp, "complete"), nil, 0o644); err != nil {
		return "", err
	}
	_ = os.RemoveAll(dir)
	if err := os.Rename(tmp, dir); err != nil {
		return "", fmt.Errorf("debootstrap cache: %w", err)
	}
	return root, nil
}

// debootstrapError is what a failed debootstrap said went wrong: its E:
// lines, else its last lines.
func debootstrapError(log []string) string {
	var errs []string
	for _, l := range log {
		if strings.HasPrefix(l, "E: ") {
			errs = append(errs, strings.TrimPrefix(l, "E: "))
		}
	}
	if len(errs) == 0 {
		errs = log[max(0, len(log)-3):]
	}
	return strings.Join(errs, "; ")
}

// checkPackagesKnown refuses, before debootstrap downloads anything, a
// package the host's apt index does not know, when the suite is the host's
// own (other suites are left to debootstrap, which fails as clearly but
// later).
func checkPackagesKnown(ctx context.Context, suite string, packages []string) error {
	if len(packages) == 0 || hostSuite() != suite {
		return nil
	}
	all := append([]string{"show", "--no-all-versions"}, packages...)
	if exec.CommandContext(ctx, "apt-cache", all...).Run() == nil {
		return nil
	}
	var unknown []string
	for _, p := range packages {
		if err := exec.CommandContext(ctx, "apt-cache", "show", "--no-all-versions", p).Run(); err != nil {
			unknown = append(unknown, p)
		}
	}
	if len(unknown) > 0 {
		slices.Sort(unknown)
		return fmt.Errorf("debian:%s: unknown package %s (apt-cache show finds no such package in the host's index)", suite, strings.Join(unknown, ", "))
	}
	return nil
}

func hostSuite() string {
	b, err := os.ReadFile("/etc/os-release")
	if err != nil {
		return ""
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VERSION_CODENAME="); ok {
			return strings.Trim(v, `"`)
		}
	}
	return ""
}

// removeUnmounted removes dir after detaching whatever is still mounted
// below it (a debootstrap that was killed before its exit trap ran leaves
// /proc, /sys and bind-mounted /dev nodes there), so that removing the tree
// never reaches into a mounted filesystem.
func removeUnmounted(dir string) {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err == nil {
		var below []string
		for line := range strings.SplitSeq(string(data), "\n") {
			f := strings.Fields(line)
			if len(f) > 4 && strings.HasPrefix(f[4], dir+"/") {
				below = append(below, f[4])
			}
		}
		// Deepest first.
		slices.SortFunc(below, func(a, b string) int { return strings.Count(b, "/") - strings.Count(a, "/") })
		for _, mp := range below {
			if err := unix.Unmount(mp, unix.MNT_DETACH); err != nil {
				slog.Warn("unmount leftover of debootstrap", "path", mp, "err", err)
			}
		}
		if len(below) > 0 {
			if err := os.RemoveAll(dir); err != nil {
				slog.Warn("remove failed debootstrap tree", "dir", dir, "err", err)
			}
			return
		}
	}
	_ = os.RemoveAll(dir)
}
