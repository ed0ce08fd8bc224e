package rootfs_test

import (
	"context"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/warmpool/warmpool/guest"
	"github.com/warmpool/warmpool/rootfs"
)

// needDebootstrap skips unless debootstrap and the host's Debian archive
// are there. The trees it builds are cached in the shared guest image
// cache (~/.cache/warmpool/debootstrap), so only the first run on a machine
// pays for debootstrap.
func needDebootstrap(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath("debootstrap"); err != nil {
		t.Skip("debootstrap not installed (scripts/deps.sh installs it)")
	}
	if _, err := rootfs.HostDebianMirror("/"); err != nil {
		t.Skip(err)
	}
}

func TestDebianBookwormWithPython(t *testing.T) {
	needDebootstrap(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	cache := t.TempDir()
	start := time.Now()
	img, err := rootfs.Build(ctx, rootfs.Options{
		Source:    rootfs.Source{Kind: rootfs.KindDebian, Arg: "bookworm"},
		Packages:  []string{"python3"},
		Base:      fakeBase(t),
		CacheDir:  cache,
		TreeCache: guest.DefaultCacheDir(),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("debian:bookworm + python3 built in %v (%d MiB disk)", time.Since(start).Round(time.Millisecond), img.Rootfs.SizeBytes>>20)
	if img.Source != "debian:bookworm" || !strings.Contains(strings.Join(img.Rootfs.Exec.Env, " "), "PATH=/usr/local/sbin:") {
		t.Errorf("source %q, exec env %q: want debian:bookworm with Debian's PATH", img.Source, img.Rootfs.Exec.Env)
	}
	// merged /usr: /usr/bin/python3 links to the versioned interpreter.
	if out := debugfs(t, img.Rootfs.Path, "stat /usr/bin/python3"); !strings.Contains(out, "Type: symlink") {
		t.Errorf("/usr/bin/python3 in the disk: %s", out)
	}
	if out := debugfs(t, img.Rootfs.Path, "ls -l /usr/lib/python3.11/json"); !strings.Contains(out, "decoder.py") {
		t.Errorf("python3's standard library missing from the disk: %s", out)
	}
	if out := debugfs(t, img.Rootfs.Path, "ls /var/cache/apt/archives"); strings.Contains(out, ".deb") {
		t.Errorf("downloaded packages left in the disk: %s", out)
	}
}

func TestDebianBadInput(t *testing.T) {
	needDebootstrap(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	for _, tc := range []struct {
		name     string
		suite    string
		packages []string
		want     string
	}{
		{"unknown package", "bookworm", []string{"no-such-package-warmpool"}, "unknown package no-such-package-warmpool"},
		{"unknown suite", "no-such-suite", nil, "debian:no-such-suite: unknown suite"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cache, trees := t.TempDir(), t.TempDir()
			_, err := rootfs.Build(ctx, rootfs.Options{
				Source:    rootfs.Source{Kind: rootfs.KindDebian, Arg: tc.suite},
				Packages:  tc.packages,
				Base:      fakeBase(t),
				CacheDir:  cache,
				TreeCache: trees,
			})
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("build: %v, want an error naming %q", err, tc.want)
			}
			t.Log(err)
			assertNothingCached(t, cache)
			assertNothingCached(t, trees)
		})
	}
}
