package daemon

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/warmpool/warmpool/api"
	"github.com/warmpool/warmpool/events"
	"github.com/warmpool/warmpool/guest"
	"github.com/warmpool/warmpool/store"
	"github.com/warmpool/warmpool/vm"
)

// Events about templates the daemon repairs on its own.
const (
	// EventTemplateRebuilt: a template that could no longer be restored was
	// built again from its image; detail has reason, generation and
	// previous_generation.
	EventTemplateRebuilt = "template.rebuilt"
	// EventTemplateRebuildFailed: such a template could not be rebuilt; its
	// pools say why in last_error. Detail has reason, error and generation.
	EventTemplateRebuildFailed = "template.rebuild_failed"
)

// templateRepair rebuilds templates the provider can no longer restore (a
// hypervisor upgrade, a template made before a device was refused, deleted
// snapshot files), which would otherwise leave their pools failing and
// backing off forever. Each generation is rebuilt at most once, and a
// generation this daemon rebuilt itself is never rebuilt again: if the
// fresh build cannot be restored either, a rebuild loop would not help.
type templateRepair struct {
	ctx context.Context // the daemon's run context; rebuilds end with it

	mu     sync.Mutex
	closed bool
	wg     sync.WaitGroup
	// tried is the generation of each template a rebuild was started for.
	tried map[string]int
	// rebuilt is the generation each automatic rebuild produced.
	rebuilt map[string]int
	// broken says why a template's generation can neither be restored nor
	// rebuilt.
	broken map[string]brokenTemplate
	// running holds the templates being rebuilt; pending the latest
	// refusal of a newer generation reported meanwhile (its reason is the
	// provider's, not yet a last_error message).
	running map[string]struct{}
	pending map[string]brokenTemplate
}

type brokenTemplate struct {
	generation int
	reason     string
}

func newTemplateRepair(ctx context.Context) *templateRepair {
	return &templateRepair{ctx: ctx, tried: map[string]int{}, rebuilt: map[string]int{}, broken: map[string]brokenTemplate{},
		running: map[string]struct{}{}, pending: map[string]brokenTemplate{}}
}

// close stops new rebuilds and waits for those running; they end soon since
// the daemon's context has ended (or its start failed).
func (r *templateRepair) close() {
	r.mu.Lock()
	r.closed = true
	r.mu.Unlock()
	r.wg.Wait()
}

// checkTemplates looks for templates that cannot be restored before any pool
// tries, and starts rebuilding them.
func (d *Daemon) checkTemplates() {
	tpls, err := store.List(d.st, store.Templates)
	if err != nil {
		d.log.Error("list templates to check", "err", err)
		return
	}
	for _, t := range tpls {
		if reason := d.unrestorable(t); reason != "" {
			d.repairTemplate(t.Name, t.Generation, reason)
		}
	}
}

// unrestorable says why the provider cannot restore t, or "" when nothing
// visible from outside the provider stops it.
func (d *Daemon) unrestorable(t store.Template) string {
	snap := t.Snapshot
	if snap.Provider != d.prov.Name() {
		return fmt.Sprintf("built for provider %s, the daemon runs %s", snap.Provider, d.prov.Name())
	}
	// A provider that knows its hypervisor's version without starting a VM
	// says so in Info; the others' restores find out instead.
	if v := d.prov.Info(context.Background()).Version; v != "" && snap.ProviderVersion != v {
		return fmt.Sprintf("built with %s %q, this is %s %s", snap.Provider, snap.ProviderVersion, snap.Provider, v)
	}
	if _, err := os.Stat(snap.Dir); err != nil {
		return fmt.Sprintf("snapshot files are gone: %v", err)
	}
	if t.Image == "" {
		return "" // built from no image directory (a provider that needs none)
	}
	// Restores need the template's kernel and initrd, not only its snapshot.
	for _, f := range []string{snap.Spec.Kernel, snap.Spec.Initrd} {
		if f == "" {
			continue
		}
		if _, err := os.Stat(f); err != nil {
			return fmt.Sprintf("guest image file is gone: %v", err)
		}
	}
	return ""
}

// restoreIncompatible is the ownedProvider's report of a restore the
// provider refused with vm.ErrIncompatible.
func (d *Daemon) restoreIncompatible(snap vm.Snapshot, err error) {
	name, gen := d.snapshotOwner(snap.Dir)
	if name == "" {
		return // not a template: a machine's suspend snapshot, say
	}
	d.repairTemplate(name, gen, err.Error())
}

// repairTemplate starts rebuilding generation gen of a template, unless it
// was tried already, is no longer current, or was itself a rebuild.
func (d *Daemon) repairTemplate(name string, gen int, reason string) {
	r := d.repair
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return
	}
	if _, ok := r.running[name]; ok {
		// The rebuild registers the new generation with the pools before
		// it returns, so a refusal of the new generation can arrive while
		// it runs; it is judged once the rebuild has finished.
		if gen > r.pending[name].generation {
			r.pending[name] = brokenTemplate{generation: gen, reason: reason}
		}
		return
	}
	if r.tried[name] >= gen {
		return
	}
	if t, ok := d.template(name); !ok || t.Generation != gen {
		return
	}
	r.tried[name] = gen
	if r.rebuilt[name] == gen {
		d.markBroken(name, gen, reason, errors.New("the daemon's own rebuild of it cannot be restored either"))
		return
	}
	d.log.Warn("template cannot be restored; rebuilding it", "template", name, "generation", gen, "reason", reason)
	r.running[name] = struct{}{}
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		d.rebuildTemplate(r.ctx, name, gen, reason)
	}()
}

// rebuildTemplate builds a new generation of the template with the same
// name, shape and image; its pools move to it and drain the old one.
func (d *Daemon) rebuildTemplate(ctx context.Context, name string, gen int, reason string) {
	built, err := d.rebuild(ctx, name, gen)
	r := d.repair
	r.mu.Lock()
	delete(r.running, name)
	pending, refused := r.pending[name]
	delete(r.pending, name)
	switch {
	case err == nil && built.Generation == 0: // someone else built it meanwhile
	case err == nil:
		r.rebuilt[name] = int(built.Generation)
		delete(r.broken, name)
		d.log.Warn("template rebuilt", "template", name, "generation", built.Generation, "previous_generation", gen, "reason", reason)
		d.bus.Publish(events.Event{Kind: EventTemplateRebuilt, Subject: name, Detail: map[string]any{
			"reason": reason, "generation": built.Generation, "previous_generation": gen,
		}})
	case ctx.Err() != nil:
		// Shutting down; the next start checks again.
	default:
		d.markBroken(name, gen, reason, err)
	}
	r.mu.Unlock()
	if refused {
		d.repairTemplate(name, pending.generation, pending.reason)
	}
}

// rebuild builds the template again from its image, or returns the zero
// Template when generation gen is no longer current.
func (d *Daemon) rebuild(ctx context.Context, name string, gen int) (api.Template, error) {
	t, ok := d.template(name)
	if !ok {
		return api.Template{}, nil
	}
	// Whether gen is still current is judged once the build's turn comes.
	image, err := rebuildImage(t.Image)
	if err != nil {
		return api.Template{}, err
	}
	return d.buildGeneration(ctx, api.TemplateRequest{Name: name, Image: image, VCPUs: t.VCPUs, MemoryMiB: t.MemoryMiB, DiskMiB: t.DiskMiB},
		func(step string) { d.log.Info("rebuilding template", "template", name, "step", step) }, gen)
}

// markBroken records why a template stays unusable, for its pools'
// last_error. It runs under repair.mu.
func (d *Daemon) markBroken(name string, gen int, reason string, err error) {
	msg := fmt.Sprintf("template %s (generation %d) cannot be restored (%s) and could not be rebuilt: %v; build it again with `warmpool template build %s`",
		name, gen, reason, err, name)
	d.repair.broken[name] = brokenTemplate{generation: gen, reason: msg}
	d.log.Error("template cannot be restored nor rebuilt", "template", name, "generation", gen, "reason", reason, "err", err)
	d.bus.Publish(events.Event{Kind: EventTemplateRebuildFailed, Subject: name, Detail: map[string]any{
		"reason": reason, "error": err.Error(), "generation": gen,
	}})
}

// brokenReason says why template name's current generation can neither be
// restored nor rebuilt, or "".
func (d *Daemon) brokenReason(name string) string {
	t, ok := d.template(name)
	if !ok {
		return ""
	}
	d.repair.mu.Lock()
	defer d.repair.mu.Unlock()
	if b, ok := d.repair.broken[name]; ok && b.generation == t.Generation {
		return b.reason
	}
	return ""
}

// poolLastError says why pool p cannot fill: its template can neither be
// restored nor rebuilt, or its latest refill failed; "" when it refills.
func (d *Daemon) poolLastError(p store.Pool) string {
	if why := d.brokenReason(p.Template); why != "" {
		return why
	}
	st, err := d.pools.Status(p.Name)
	if err != nil {
		return ""
	}
	return st.LastError
}

// rebuildImage is the image directory to rebuild a template from: the one
// it was built from while that still loads, else "" (the daemon's default
// image, built again if need be) when it was a default image in the shared
// cache. An explicitly chosen image that is gone cannot be guessed.
func rebuildImage(dir string) (string, error) {
	if dir == "" {
		return "", nil
	}
	_, err := guest.Load(dir)
	if err == nil {
		return dir, nil
	}
	cache := filepath.Clean(guest.DefaultCacheDir()) + string(filepath.Separator)
	if strings.HasPrefix(filepath.Clean(dir), cache) {
		return "", nil
	}
	return "", fmt.Errorf("its guest image is gone: %w", err)
}
