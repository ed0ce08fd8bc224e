package daemon

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/warmpool/warmpool/api"
	"github.com/warmpool/warmpool/events"
	"github.com/warmpool/warmpool/provider/fake"
	"github.com/warmpool/warmpool/store"
	"github.com/warmpool/warmpool/vm"
)

// templateEvents collects the template.* events the daemon streams.
type templateEvents struct {
	mu  sync.Mutex
	evs []events.Event
}

func followTemplateEvents(t *testing.T, c *api.Client) *templateEvents {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	te := &templateEvents{}
	ready, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		_ = c.Events(ctx, api.EventFilter{KindPrefix: "template."}, func() { close(ready) }, func(e events.Event) error {
			te.mu.Lock()
			te.evs = append(te.evs, e)
			te.mu.Unlock()
			return nil
		})
	}()
	t.Cleanup(func() { cancel(); <-done })
	select {
	case <-ready:
	case <-done:
		t.Fatal("event stream ended before it started")
	case <-time.After(30 * time.Second):
		t.Fatal("event stream did not start")
	}
	return te
}

func (te *templateEvents) ofKind(kind string) []events.Event {
	te.mu.Lock()
	defer te.mu.Unlock()
	var out []events.Event
	for _, e := range te.evs {
		if e.Kind == kind {
			out = append(out, e)
		}
	}
	return out
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func currentTemplate(t *testing.T, c *api.Client, name string) api.Template {
	t.Helper()
	tpls, err := c.Templates(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	for _, tp := range tpls {
		if tp.Name == name {
			return tp
		}
	}
	t.Fatalf("no template %s in %+v", name, tpls)
	return api.Template{}
}

// refuseSnapshot makes the fake refuse every restore of snapshot id as a
// provider refuses a snapshot it cannot restore, and counts the refusals.
func refuseSnapshot(prov *fake.Provider, id, why string) *atomic.Int32 {
	var n atomic.Int32
	prov.SetHook(func(_ context.Context, op fake.Op, target string) error {
		if op == fake.OpRestore && target == id {
			n.Add(1)
			return fmt.Errorf("%s: %w", why, vm.ErrIncompatible)
		}
		return nil
	})
	return &n
}

// A template the provider stops accepting (a hypervisor upgrade, say) is
// rebuilt once, with its name and shape, and its pool refills from the new
// generation instead of backing off forever.
func TestIncompatibleTemplateIsRebuiltAndPoolRefills(t *testing.T) {
	prov := newFakeProvider()
	r := startFake(t, t.TempDir(), prov, "")
	c := r.client
	if _, err := c.BuildTemplate(ctxT(t), api.TemplateRequest{Name: "base", VCPUs: 2, MemoryMiB: 384}, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := c.SetPool(ctxT(t), "py", api.PoolRequest{Template: "base", Min: 2, Max: 2}); err != nil {
		t.Fatal(err)
	}
	waitReady(t, c, "py", 2)
	old := currentTemplate(t, c, "base")
	evs := followTemplateEvents(t, c)

	refusals := refuseSnapshot(prov, old.SnapshotID, "snapshot taken with QEMU 1.0")
	// The lease takes a warm VM; its replacement's restore is refused.
	if _, err := c.Acquire(ctxT(t), "py", 5*time.Second, api.AcquireRequest{}); err != nil {
		t.Fatalf("acquire: %v", err)
	}
	waitFor(t, "template.rebuilt", func() bool { return len(evs.ofKind(EventTemplateRebuilt)) > 0 })
	e := evs.ofKind(EventTemplateRebuilt)[0]
	if reason, _ := e.Detail["reason"].(string); e.Subject != "base" || !strings.Contains(reason, "QEMU 1.0") {
		t.Errorf("template.rebuilt = %+v, want subject base and the provider's reason", e)
	}
	now := currentTemplate(t, c, "base")
	if now.Generation != old.Generation+1 || now.SnapshotID == old.SnapshotID || now.VCPUs != 2 || now.MemoryMiB != 384 {
		t.Errorf("rebuilt template = %+v, want generation %d with a new snapshot and the old shape (2 vCPUs, 384 MiB)", now, old.Generation+1)
	}
	p := waitReady(t, c, "py", 2)
	if p.Generation != now.Generation || p.LastError != nil {
		t.Errorf("pool after the rebuild = %+v, want generation %d and no last_error", p, now.Generation)
	}
	lease, err := c.Acquire(ctxT(t), "py", 5*time.Second, api.AcquireRequest{})
	if err != nil {
		t.Fatalf("acquire after the rebuild: %v", err)
	}
	if v, err := prov.Inspect(ctxT(t), lease.VMID); err != nil || v.Snapshot != now.SnapshotID {
		t.Errorf("leased VM %+v (%v), want one restored from the new snapshot %s", v, err, now.SnapshotID)
	}
	if refusals.Load() == 0 {
		t.Error("the old snapshot was never refused: the test did not exercise the rebuild path")
	}
	if n := len(evs.ofKind(EventTemplateRebuilt)); n != 1 {
		t.Errorf("%d template.rebuilt events, want 1", n)
	}
}

// A rebuild that produces a template the provider refuses as well is not
// retried in a loop: the pool says why it cannot fill.
func TestRebuiltTemplateStillRefusedIsNotRebuiltAgain(t *testing.T) {
	prov := newFakeProvider()
	r := startFake(t, t.TempDir(), prov, "")
	c := r.client
	setupPool(t, c, 1, 1)
	evs := followTemplateEvents(t, c)
	// Every restore is refused, of every generation.
	prov.SetHook(func(_ context.Context, op fake.Op, _ string) error {
		if op == fake.OpRestore {
			return fmt.Errorf("machine type gone: %w", vm.ErrIncompatible)
		}
		return nil
	})
	if _, err := c.Acquire(ctxT(t), "py", 5*time.Second, api.AcquireRequest{}); err != nil {
		t.Fatalf("acquire: %v", err)
	}
	waitFor(t, "template.rebuild_failed", func() bool { return len(evs.ofKind(EventTemplateRebuildFailed)) > 0 })
	var p api.Pool
	waitFor(t, "the pool's last_error to name the template", func() bool {
		var err error
		p, err = c.Pool(ctxT(t), "py")
		return err == nil && p.LastError != nil && strings.Contains(*p.LastError, "could not be rebuilt")
	})
	if !strings.Contains(*p.LastError, "machine type gone") || !strings.Contains(*p.LastError, "warmpool template build base") {
		t.Errorf("last_error = %q, want the provider's reason and the command that fixes it", *p.LastError)
	}
	// An acquire that times out says why instead of only that it timed out.
	_, err := c.Acquire(ctxT(t), "py", 100*time.Millisecond, api.AcquireRequest{})
	if err == nil || !strings.Contains(err.Error(), "cannot refill") || !strings.Contains(err.Error(), "machine type gone") {
		t.Errorf("acquire from the broken pool = %v, want a timeout that names the refill failure", err)
	}
	time.Sleep(200 * time.Millisecond) // room for a rebuild loop to show itself
	if g := currentTemplate(t, c, "base").Generation; g != 2 {
		t.Errorf("template generation %d, want 2: one automatic rebuild, then none", g)
	}
}

// A template whose guest image was removed, and that was built from an
// image directory the daemon cannot recreate, is reported in the pool's
// last_error (GET /v1/pools) instead of timing acquires out silently.
func TestTemplateWithImageGoneShowsInPoolLastError(t *testing.T) {
	dir := t.TempDir()
	prov := newFakeProvider()
	r := startFake(t, dir, prov, "")
	setupPool(t, r.client, 1, 1)
	r.stop(t)

	// The template now says it was built from an image directory that has
	// since been deleted, as a real one would.
	gone := filepath.Join(t.TempDir(), "deleted-image")
	st, err := store.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	tpl, err := store.Get(st, store.Templates, "base")
	if err != nil {
		t.Fatal(err)
	}
	tpl.Image = gone
	tpl.Snapshot.Spec.Kernel = filepath.Join(gone, "vmlinuz")
	tpl.Snapshot.Spec.Initrd = filepath.Join(gone, "initrd.img")
	if err := store.Put(st, store.Templates, tpl); err != nil {
		t.Fatal(err)
	}
	st.Close()
	refuseSnapshot(prov, tpl.Snapshot.ID, "template's guest image: no such file")

	r = startFake(t, dir, prov, "")
	var pools []api.Pool
	waitFor(t, "GET /v1/pools to show a last_error", func() bool {
		pools, err = r.client.Pools(ctxT(t))
		return err == nil && len(pools) == 1 && pools[0].LastError != nil && strings.Contains(*pools[0].LastError, "could not be rebuilt")
	})
	msg := *pools[0].LastError
	for _, want := range []string{"template base", "guest image", gone} {
		if !strings.Contains(msg, want) {
			t.Errorf("last_error %q does not mention %q", msg, want)
		}
	}
	if g := currentTemplate(t, r.client, "base").Generation; g != 1 {
		t.Errorf("template generation %d, want 1 (nothing to rebuild from)", g)
	}
	// Building it again by hand (here: from the default image) clears it.
	if _, err := r.client.BuildTemplate(ctxT(t), api.TemplateRequest{Name: "base"}, nil); err != nil {
		t.Fatal(err)
	}
	if p := waitReady(t, r.client, "py", 1); p.LastError != nil {
		t.Errorf("last_error = %q after a manual rebuild, want none", *p.LastError)
	}
}

// versionedFake is the fake provider reporting a hypervisor version and
// recording it in its snapshots, as QEMU does.
type versionedFake struct {
	*fake.Provider
	version string
}

func (p versionedFake) Info(ctx context.Context) vm.Info {
	info := p.Provider.Info(ctx)
	info.Version = p.version
	return info
}

func (p versionedFake) Snapshot(ctx context.Context, id, dir string) (vm.Snapshot, error) {
	s, err := p.Provider.Snapshot(ctx, id, dir)
	s.ProviderVersion = p.version
	return s, err
}

// After a hypervisor upgrade the daemon rebuilds templates at start, before
// any restore fails; a later start on the same version rebuilds nothing.
func TestProviderUpgradeRebuildsTemplatesAtStart(t *testing.T) {
	dir := t.TempDir()
	prov := newFakeProvider()
	r := startWrapped(t, dir, prov, versionedFake{prov, "1.0"}, "")
	setupPool(t, r.client, 1, 1)
	r.stop(t)

	r = startWrapped(t, dir, prov, versionedFake{prov, "2.0"}, "")
	waitFor(t, "the template to be rebuilt", func() bool { return currentTemplate(t, r.client, "base").Generation == 2 })
	if p := waitReady(t, r.client, "py", 1); p.Generation != 2 || p.LastError != nil {
		t.Errorf("pool = %+v, want generation 2 and no last_error", p)
	}
	r.stop(t)

	r = startWrapped(t, dir, prov, versionedFake{prov, "2.0"}, "")
	waitReady(t, r.client, "py", 1)
	time.Sleep(200 * time.Millisecond) // room for a needless rebuild to finish
	if g := currentTemplate(t, r.client, "base").Generation; g != 2 {
		t.Errorf("template generation %d after a start on the same version, want 2", g)
	}
}

// A rebuild that waits for its turn behind a manual build of the same
// template builds nothing: the manual build already replaced the
// generation the rebuild was for.
func TestRebuildBehindAManualBuildBuildsNothing(t *testing.T) {
	prov := newFakeProvider()
	r := startFake(t, t.TempDir(), prov, "")
	if _, err := r.client.BuildTemplate(ctxT(t), api.TemplateRequest{Name: "base"}, nil); err != nil {
		t.Fatal(err)
	}
	snapshotting, finish := make(chan struct{}), make(chan struct{})
	var once sync.Once
	prov.SetHook(func(_ context.Context, op fake.Op, _ string) error {
		if op == fake.OpSnapshot {
			once.Do(func() { close(snapshotting) })
			<-finish
		}
		return nil
	})
	manual := make(chan error, 1)
	go func() {
		_, err := r.client.BuildTemplate(ctxT(t), api.TemplateRequest{Name: "base"}, nil)
		manual <- err
	}()
	<-snapshotting // the manual build holds the build lock now
	rebuilt := make(chan api.Template, 1)
	go func() {
		tpl, err := r.d.rebuild(ctxT(t), "base", 1)
		if err != nil {
			t.Errorf("rebuild: %v", err)
		}
		rebuilt <- tpl
	}()
	close(finish)
	if err := <-manual; err != nil {
		t.Fatalf("manual build: %v", err)
	}
	if tpl := <-rebuilt; tpl.Generation != 0 {
		t.Errorf("the rebuild of generation 1 built generation %d after a manual build replaced it", tpl.Generation)
	}
	if got := currentTemplate(t, r.client, "base").Generation; got != 2 {
		t.Errorf("template generation = %d, want 2: one manual build after the first", got)
	}
}
