package e2etest

import (
	"context"
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/warmpool/warmpool/guest"
)

// A user who copies bin/warmpool somewhere else has no source tree and
// perhaps no Go toolchain: the binary must still build the guest image, and
// the daemon it runs must build templates (whose default image it builds on
// first use) that pools restore and leases exec in.
func TestQEMUInstalledBinaryOutsideCheckout(t *testing.T) {
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		t.Skip("SKIPPING the installed-binary test: qemu-system-x86_64 is not installed (make deps installs it)")
	}
	root, err := os.MkdirTemp("", "wp-inst-")
	if err != nil {
		t.Fatal(err)
	}
	state := filepath.Join(root, "s")
	t.Cleanup(func() {
		killStrays(state)
		if t.Failed() {
			t.Logf("daemon log:\n%s", tail(state))
		}
		os.RemoveAll(root)
	})
	for _, d := range []string{filepath.Join(root, "bin"), filepath.Join(root, "wd"), filepath.Join(root, "home"), state} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	bin := filepath.Join(root, "bin", "warmpool")
	copyFile(t, warmpoolBin, bin)

	// The CLI and the daemon each get a cache of their own, so that each
	// builds the image itself.
	cliCache, daemonCache := filepath.Join(root, "cli-cache"), filepath.Join(root, "daemon-cache")
	seedKernel(t, cliCache)
	seedKernel(t, daemonCache)
	user := installation{bin: bin, dir: filepath.Join(root, "wd"), env: installedEnv(root, cliCache)}
	server := installation{bin: bin, dir: filepath.Join(root, "wd"), env: installedEnv(root, daemonCache)}

	var img guest.Image
	start := time.Now()
	if err := json.Unmarshal([]byte(user.mustCLI(t, state, 15*time.Minute, "image", "build", "-o", "json")), &img); err != nil {
		t.Fatalf("image build output: %v", err)
	}
	t.Logf("image build outside the checkout took %s", time.Since(start).Round(time.Millisecond))
	if !strings.HasPrefix(img.Dir, cliCache) {
		t.Errorf("image built into %s, want the cache of the binary's user under %s", img.Dir, cliCache)
	}
	// Built here, inside the checkout, the agent comes from the source: an
	// equal digest means the binary's embedded agent is the source's.
	srcCache := filepath.Join(root, "src-cache")
	seedKernel(t, srcCache)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	fromSource, err := guest.Build(ctx, guest.BuildOptions{CacheDir: srcCache, KernelPackage: img.KernelPackage})
	if err != nil {
		t.Fatalf("build the image from the source tree: %v", err)
	}
	if img.Digest != fromSource.Digest {
		t.Errorf("the installed binary's image has digest %s, the source tree's %s: the embedded agent is not the source's", img.Digest, fromSource.Digest)
	}

	d := server.startDaemon(t, state)
	server.mustCLI(t, state, 15*time.Minute, "template", "build", "base", "--vcpus", "1", "--mem", "256")
	var tpls []struct {
		Name  string `json:"name"`
		Image string `json:"image"`
	}
	if err := json.Unmarshal([]byte(server.mustCLI(t, state, time.Minute, "template", "ls", "-o", "json")), &tpls); err != nil || len(tpls) != 1 {
		t.Fatalf("template ls: %v, %+v", err, tpls)
	}
	if !strings.HasPrefix(tpls[0].Image, daemonCache) {
		t.Errorf("the daemon's template uses the image %s, want one it built into its cache %s", tpls[0].Image, daemonCache)
	} else if daemonImg, err := guest.Load(tpls[0].Image); err != nil || daemonImg.Digest != fromSource.Digest {
		t.Errorf("the daemon's image: %v, digest %s, want %s", err, daemonImg.Digest, fromSource.Digest)
	}
	user.mustCLI(t, state, time.Minute, "pool", "set", "py", "--template", "base", "--min", "1", "--max", "1")
	user.waitPool(t, state, "py", 1)
	l := user.acquire(t, state, "py")
	if out := user.mustCLI(t, state, time.Minute, "exec", l.ID, "--", "echo", "hello from outside"); out != "hello from outside\n" {
		t.Errorf("exec output %q", out)
	}
	user.mustCLI(t, state, time.Minute, "release", l.ID)
	d.term(t)
	waitProcesses(t, state)
}

// installedEnv is the environment of a user with a fresh home, cache and
// state, and no Go toolchain in PATH.
func installedEnv(root, cache string) []string {
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if k == "HOME" || k == "PATH" || strings.HasPrefix(k, "XDG_") || strings.HasPrefix(k, "GO") || strings.HasPrefix(k, "WARMPOOL_") {
			continue
		}
		env = append(env, kv)
	}
	var path []string
	for _, dir := range filepath.SplitList(os.Getenv("PATH")) {
		if _, err := os.Stat(filepath.Join(dir, "go")); err == nil {
			continue
		}
		path = append(path, dir)
	}
	home := filepath.Join(root, "home")
	return append(env,
		"PATH="+strings.Join(path, string(filepath.ListSeparator)),
		"HOME="+home,
		"XDG_CACHE_HOME="+cache,
		"XDG_STATE_HOME="+filepath.Join(home, "state"),
		"XDG_CONFIG_HOME="+filepath.Join(home, "config"),
	)
}

// seedKernel links the kernel packages the user's guest image cache has
// already unpacked into cache/warmpool, so that a cold image cache does not
// download the kernel again; without any, the build downloads it.
func seedKernel(t *testing.T, cache string) {
	t.Helper()
	dst := filepath.Join(cache, "warmpool", "kernels")
	if err := os.MkdirAll(dst, 0o755); err != nil {
		t.Fatal(err)
	}
	done, _ := filepath.Glob(filepath.Join(guest.DefaultCacheDir(), "kernels", "*", ".complete"))
	for _, marker := range done {
		pkg := filepath.Dir(marker)
		if err := os.Symlink(pkg, filepath.Join(dst, filepath.Base(pkg))); err != nil {
			t.Fatal(err)
		}
	}
	if len(done) == 0 {
		t.Logf("no unpacked kernel in %s: the image builds download it", guest.DefaultCacheDir())
	}
}

func copyFile(t *testing.T, src, dst string) {
	t.Helper()
	in, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
}

// A binary from `go install .../cmd/warmpool@VERSION` has no embedded agent
// (the module zip holds only what git tracks): its image build compiles the
// agent of its own version from the module cache. The module is served at a
// made-up version from a local proxy made of this checkout's HEAD.
//
// The install is the command a user types, into the machine's own module
// cache and build cache: its dependencies (Kubernetes' among them) are then
// the same directories, compiled with the same flags, as in TestMain's `go
// build`, so only warmpool's own packages compile again. A version of its
// own per run keeps concurrent runs of different checkouts apart; the test
// removes it from the module cache at the end.
func TestGoInstalledBinaryBuildsImage(t *testing.T) {
	for _, tool := range []string{"git", "go"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("SKIPPING the go install test: %s is not installed", tool)
		}
	}
	root := t.TempDir()
	version := "v0.0.1-e2etest.r" + randomHex(t, 6)
	proxy := filepath.Join(root, "proxy", "github.com", "warmpool", "warmpool", "@v")
	if err := os.MkdirAll(proxy, 0o755); err != nil {
		t.Fatal(err)
	}
	// A module zip leaves out the directories that are modules of their
	// own (the Kubernetes tools under scripts/), as the Go proxy does.
	nested := exec.Command("git", "ls-files", "--", "*/go.mod")
	nested.Dir = "../.."
	mods, err := nested.Output()
	if err != nil {
		t.Skipf("SKIPPING the go install test: not a git checkout (git ls-files: %v)", err)
	}
	args := []string{"archive", "--format=zip", "--prefix=github.com/warmpool/warmpool@" + version + "/",
		"-o", filepath.Join(proxy, version+".zip"), "HEAD", "--", "."}
	for _, m := range strings.Fields(string(mods)) {
		args = append(args, ":(exclude)"+filepath.Dir(m))
	}
	archive := exec.Command("git", args...)
	archive.Dir = "../.."
	if out, err := archive.CombinedOutput(); err != nil {
		t.Skipf("SKIPPING the go install test: not a git checkout (git archive: %v: %s)", err, out)
	}
	copyFile(t, "../../go.mod", filepath.Join(proxy, version+".mod"))
	info := `{"Version":"` + version + `","Time":"2026-01-01T00:00:00Z"}`
	if err := os.WriteFile(filepath.Join(proxy, version+".info"), []byte(info), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(proxy, "list"), []byte(version+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	goEnv := func(key string) string {
		t.Helper()
		out, err := exec.Command("go", "env", key).Output()
		if err != nil {
			t.Fatalf("go env %s: %v", key, err)
		}
		return strings.TrimSpace(string(out))
	}
	modcache, gocache := goEnv("GOMODCACHE"), goEnv("GOCACHE")
	t.Cleanup(func() {
		// -modcacherw below made the extracted module writable.
		os.RemoveAll(filepath.Join(modcache, "github.com", "warmpool", "warmpool@"+version))
		// The download directory's list names the versions go fetched; only
		// `@latest` and the like read it, and no real proxy has this module.
		dl := filepath.Join(modcache, "cache", "download", "github.com", "warmpool", "warmpool", "@v")
		left, _ := filepath.Glob(filepath.Join(dl, version+".*"))
		for _, f := range append(left, filepath.Join(dl, "list")) {
			os.Remove(f)
		}
	})
	gobin := filepath.Join(root, "bin")
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if k == "HOME" || strings.HasPrefix(k, "XDG_") || k == "GOPROXY" || k == "GOMODCACHE" || k == "GOSUMDB" || k == "GOBIN" || k == "GOFLAGS" || k == "GOPATH" || k == "GOTOOLCHAIN" || k == "GOCACHE" {
			continue
		}
		env = append(env, kv)
	}
	cache := filepath.Join(root, "cache")
	seedKernel(t, cache)
	env = append(env,
		// Every dependency is in the module cache already (TestMain's
		// build needed them); only this module comes from the proxy, and
		// nothing goes to the network.
		"GOPROXY=file://"+filepath.Join(root, "proxy"),
		"GOMODCACHE="+modcache,
		"GOCACHE="+gocache,
		"GOPATH="+filepath.Join(root, "gopath"),
		"GOSUMDB=off",
		"GOFLAGS=-modcacherw",
		"GOTOOLCHAIN=local",
		"HOME="+filepath.Join(root, "home"),
		"XDG_CACHE_HOME="+cache,
	)
	install := exec.Command("go", "install", "github.com/warmpool/warmpool/cmd/warmpool@"+version)
	install.Env = append(slices.Clone(env), "GOBIN="+gobin)
	install.Dir = root
	start := time.Now()
	if out, err := install.CombinedOutput(); err != nil {
		t.Fatalf("go install: %v\n%s", err, out)
	}
	t.Logf("go install took %s", time.Since(start).Round(time.Millisecond))
	if _, err := os.Stat(filepath.Join(modcache, "github.com", "warmpool", "warmpool@"+version, "cmd", "warmpool-agent")); err != nil {
		t.Fatalf("go install did not put the module into the module cache: %v", err)
	}

	user := installation{bin: filepath.Join(gobin, "warmpool"), dir: root, env: env}
	var img guest.Image
	start = time.Now()
	if err := json.Unmarshal([]byte(user.mustCLI(t, filepath.Join(root, "s"), 15*time.Minute, "image", "build", "-o", "json")), &img); err != nil {
		t.Fatalf("image build output: %v", err)
	}
	t.Logf("image build with the agent compiled from the module cache took %s", time.Since(start).Round(time.Millisecond))
	if !strings.HasPrefix(img.Dir, cache) {
		t.Errorf("image built into %s, want under %s", img.Dir, cache)
	}
	var again guest.Image
	if err := json.Unmarshal([]byte(user.mustCLI(t, filepath.Join(root, "s"), 15*time.Minute, "image", "build", "-o", "json")), &again); err != nil || again.Digest != img.Digest {
		t.Errorf("a second image build gave digest %s (%v), want the first one's %s: the agent compiled from the module cache is not reproducible", again.Digest, err, img.Digest)
	}
}
