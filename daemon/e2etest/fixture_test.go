package e2etest

// Shared templates: each real-VM test runs its own daemon on its own state
// directory, but the templates it starts from are built once per test
// binary. A test asks for one before it starts its daemon:
//
//	state := qemuState(t, "real-VM foo test", "wp-e2e-foo-")
//	useTemplate(t, state, "base", busybox256)
//	d := startDaemon(t, state)
//	mustCLI(t, state, time.Minute, "pool", "set", "p", "--template", "base", ...)
//
// The first request for a shape builds it with a daemon of the package's
// own (`template build` through the CLI, then SIGTERM); every request then
// writes that template's record, under the name the test gives, into the
// test's store. The test's daemon finds the template as if it had built it
// (generation 1; a `template build` of the same name in the test builds a
// generation 2 into the test's own state). The snapshot files stay in the
// package's seed state, which no test writes to: clones map the memory file
// with share=off and copy the disk layer into their own VM directory. TestMain
// removes the seed state at the end.
//
// The shapes are those the tests need; a new test should use one of them
// (or add one here) rather than build a template of its own, since every
// template build is a cold boot under TCG.

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/warmpool/warmpool/guest"
	"github.com/warmpool/warmpool/store"
)

// templateShape is what `template build` is asked for.
type templateShape struct {
	VCPUs     int
	MemoryMiB int
	// Image is an image name in the shared image cache, built on first use
	// by ImageArgs (`image build ARGS --name Image`); empty is the daemon's
	// busybox image.
	Image     string
	ImageArgs []string
	DiskMiB   int
}

var (
	// busybox256 is the daemon's default image at the default shape.
	busybox256 = templateShape{VCPUs: 1, MemoryMiB: 256}
	// busybox512 leaves room in the guest's memory for files of 100 MiB.
	busybox512 = templateShape{VCPUs: 1, MemoryMiB: 512}
	// debianPython is debian:bookworm with python3 (and bash) on a 512 MiB
	// writable disk.
	debianPython = templateShape{VCPUs: 1, MemoryMiB: 256, Image: "wp-e2e-bookworm-py",
		ImageArgs: []string{"--from", "debian:bookworm", "--packages", "python3"}, DiskMiB: 512}
)

func (s templateShape) buildArgs(name string) []string {
	args := []string{"template", "build", name, "--vcpus", fmt.Sprint(s.VCPUs), "--mem", fmt.Sprint(s.MemoryMiB)}
	if s.Image != "" {
		args = append(args, "--image", s.Image)
	}
	if s.DiskMiB != 0 {
		args = append(args, "--disk", fmt.Sprint(s.DiskMiB))
	}
	return args
}

var seed struct {
	mu     sync.Mutex
	state  string
	images []string // names this package made in the shared image cache
	built  map[string]store.Template
	failed map[string]bool
}

// useTemplate gives the store of state (whose daemon must not run yet) the
// template of shape under name, building it on first use.
func useTemplate(t *testing.T, state, name string, shape templateShape) {
	t.Helper()
	rec := seedTemplate(t, shape)
	rec.Name = name
	st, err := store.Open(state)
	if err != nil {
		t.Fatalf("open the store of %s to seed template %s: %v", state, name, err)
	}
	defer st.Close()
	if err := store.Put(st, store.Templates, rec); err != nil {
		t.Fatalf("seed template %s into %s: %v", name, state, err)
	}
}

// seedTemplate returns the record of the template of shape, built by the
// seed daemon on the first call for that shape.
func seedTemplate(t *testing.T, shape templateShape) store.Template {
	t.Helper()
	key := fmt.Sprintf("%+v", shape)
	seed.mu.Lock()
	defer seed.mu.Unlock()
	if rec, ok := seed.built[key]; ok {
		return rec
	}
	if seed.failed[key] {
		t.Fatalf("the shared template %s failed to build in an earlier test", key)
	}
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	if seed.state == "" {
		dir, err := os.MkdirTemp("", "wp-e2e-seed-")
		if err != nil {
			t.Fatal(err)
		}
		seed.state, seed.built, seed.failed = dir, map[string]store.Template{}, map[string]bool{}
	}
	// Whatever stops this build (a t.Fatal included) marks the shape
	// failed, so that later tests fail at once instead of building again.
	seed.failed[key] = true
	start := time.Now()
	if shape.Image != "" {
		args := append(append([]string{"image", "build"}, shape.ImageArgs...), "--name", shape.Image, "-o", "json")
		mustCLI(t, seed.state, 30*time.Minute, args...)
		seed.images = append(seed.images, shape.Image)
		t.Logf("shared image %s (%v) built in %s", shape.Image, shape.ImageArgs, time.Since(start).Round(time.Millisecond))
	}
	d := startDaemon(t, seed.state)
	name := fmt.Sprintf("t%d", len(seed.built))
	var tpl struct {
		Generation int `json:"generation"`
	}
	out := mustCLI(t, seed.state, 15*time.Minute, append(shape.buildArgs(name), "-o", "json")...)
	if err := json.Unmarshal([]byte(out), &tpl); err != nil || tpl.Generation != 1 {
		t.Fatalf("template build output %q: %v, want generation 1", out, err)
	}
	d.term(t)
	st, err := store.Open(seed.state)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	rec, err := store.Get(st, store.Templates, name)
	if err != nil {
		t.Fatalf("read the shared template %s: %v", name, err)
	}
	t.Logf("shared template %+v built in %s", shape, time.Since(start).Round(time.Millisecond))
	delete(seed.failed, key)
	seed.built[key] = rec
	return rec
}

// removeSeed ends the seed state: its processes (a build cut short), its
// directory and the image names it made.
func removeSeed() {
	seed.mu.Lock()
	defer seed.mu.Unlock()
	if seed.state == "" {
		return
	}
	killStrays(seed.state)
	os.RemoveAll(seed.state)
	for _, n := range seed.images {
		os.Remove(filepath.Join(guest.DefaultCacheDir(), "names", n))
	}
}
