package daemon

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/warmpool/warmpool/api"
	"github.com/warmpool/warmpool/events"
	"github.com/warmpool/warmpool/guest"
	"github.com/warmpool/warmpool/store"
	"github.com/warmpool/warmpool/template"
	"github.com/warmpool/warmpool/vm"
)

// Defaults of a template request that names no shape.
const (
	defaultTemplateVCPUs     = 1
	defaultTemplateMemoryMiB = 256
)

func templateRequest(name string, tc TemplateConfig) api.TemplateRequest {
	return api.TemplateRequest{Name: name, Image: tc.Image, VCPUs: tc.VCPUs, MemoryMiB: tc.MemoryMiB, DiskMiB: tc.DiskMiB}
}

// template reads the template name from the store.
func (d *Daemon) template(name string) (store.Template, bool) {
	t, err := store.Get(d.st, store.Templates, name)
	if err != nil {
		if !errors.Is(err, vm.ErrNotFound) {
			d.log.Error("read template", "template", name, "err", err)
		}
		return store.Template{}, false
	}
	return t, true
}

// snapshotOwner says which template generation a snapshot directory holds.
func (d *Daemon) snapshotOwner(dir string) (string, int) {
	tpls, err := store.List(d.st, store.Templates)
	if err != nil {
		d.log.Error("list templates", "err", err)
	}
	for _, t := range tpls {
		if t.Snapshot.Dir == dir {
			return t.Name, t.Generation
		}
	}
	return "", 0
}

// imageName is ref when it names an image (image build --name), empty when
// it is a directory.
func imageName(ref string) string {
	if filepath.IsAbs(ref) {
		return ""
	}
	return ref
}

func templateAPI(t store.Template) api.Template {
	return api.Template{
		Name:         t.Name,
		VCPUs:        t.VCPUs,
		MemoryMiB:    t.MemoryMiB,
		Image:        t.Image,
		Generation:   uint64(t.Generation),
		SnapshotID:   t.Snapshot.ID,
		Provider:     t.Snapshot.Provider,
		SharedMemory: t.Snapshot.SharedMemory,
		CreatedAt:    t.CreatedAt,
		ImageSource:  t.ImageSource,
		ImageName:    t.ImageName,
		DiskMiB:      t.DiskMiB,
	}
}

// Templates implements api.Backend.
func (d *Daemon) Templates(ctx context.Context) ([]api.Template, error) {
	tpls, err := store.List(d.st, store.Templates)
	if err != nil {
		return nil, err
	}
	out := make([]api.Template, 0, len(tpls))
	for _, t := range tpls {
		out = append(out, templateAPI(t))
	}
	return out, nil
}

// guestImage loads the image in dir, or returns the daemon's default image
// (built on first use into the shared guest image cache, the one `warmpool
// image build` fills) when dir is empty.
func (d *Daemon) guestImage(ctx context.Context, dir string, progress func(string)) (guest.Image, error) {
	dir = or(dir, d.cfg.Image)
	if dir != "" && !filepath.IsAbs(dir) {
		// A name that means nothing is an error whatever the provider.
		named, err := guest.ResolveName(d.cfg.local.imageCacheDir, dir)
		if err != nil {
			return guest.Image{}, err
		}
		dir = named
	}
	if d.prov.Info(ctx).NoGuestImage {
		// A provider that boots nothing would only make the daemon download
		// a kernel, so it gets names that nothing opens.
		return guest.Image{Kernel: "/nonexistent/no-guest-image/kernel", Initrd: "/nonexistent/no-guest-image/initrd", Digest: "none"}, nil
	}
	if dir != "" {
		img, err := guest.Load(dir)
		if err != nil {
			return guest.Image{}, err
		}
		return d.prepareBoot(ctx, img)
	}
	d.imageMu.Lock()
	defer d.imageMu.Unlock()
	if d.image != nil && imageFilesExist(*d.image) {
		return *d.image, nil
	}
	img, err := guest.Build(ctx, guest.BuildOptions{Agent: d.agent, CacheDir: d.cfg.local.imageCacheDir, Progress: func(step string, _, _ int64) {
		if progress != nil {
			progress(step)
		}
	}})
	if errors.Is(err, guest.ErrNoAgent) {
		return guest.Image{}, fmt.Errorf("guest image: %w; run a warmpool binary built with `make build` (it embeds the agent), or build an image with `warmpool image build --agent FILE --out DIR` and pass it as --image DIR (or `image:` in the config)", err)
	}
	if err != nil {
		return guest.Image{}, fmt.Errorf("guest image: %w", err)
	}
	if img, err = d.prepareBoot(ctx, img); err != nil {
		return guest.Image{}, err
	}
	d.image = &img
	return img, nil
}

// prepareBoot turns img into what the provider boots, when the provider
// cannot boot the image as built. img.Digest stays the image's, so
// templates and machines built before and after agree on what they booted.
func (d *Daemon) prepareBoot(ctx context.Context, img guest.Image) (guest.Image, error) {
	bp, ok := vm.As[vm.BootPreparer](d.prov, vm.CapPrepareBoot)
	if !ok {
		return img, nil
	}
	spec, err := bp.PrepareBoot(ctx, vm.Spec{Kernel: img.Kernel, Initrd: img.Initrd, Cmdline: img.Cmdline})
	if err != nil {
		return guest.Image{}, fmt.Errorf("prepare guest image %s for provider %s: %w", img.Dir, d.prov.Name(), err)
	}
	img.Kernel, img.Initrd, img.Cmdline = spec.Kernel, spec.Initrd, spec.Cmdline
	return img, nil
}

// imageFilesExist reports whether img's kernel and initrd are still there
// (someone may have cleared the image cache while the daemon ran).
func imageFilesExist(img guest.Image) bool {
	for _, f := range []string{img.Kernel, img.Initrd} {
		if _, err := os.Stat(f); f != "" && err != nil {
			return false
		}
	}
	return true
}

// BuildTemplate implements api.Backend. Each generation is built into its
// own directory, templates/<name>/<generation>, because VMs restored from
// the previous one may still map its files.
func (d *Daemon) BuildTemplate(ctx context.Context, req api.TemplateRequest, progress func(string)) (api.Template, error) {
	return d.buildGeneration(ctx, req, progress, 0)
}

// buildGeneration builds the next generation of a template. replacing, when
// not 0, is the generation the build is meant to replace: if another build
// replaced it while this one waited for its turn, nothing is built and the
// zero Template is returned.
func (d *Daemon) buildGeneration(ctx context.Context, req api.TemplateRequest, progress func(string), replacing int) (api.Template, error) {
	if err := d.checkOpen(); err != nil {
		return api.Template{}, err
	}
	if progress == nil {
		progress = func(string) {}
	}
	// Builds are CPU-heavy and few; one at a time keeps them from starving
	// the pools.
	d.buildMu.Lock()
	defer d.buildMu.Unlock()
	if replacing != 0 {
		if cur, ok := d.template(req.Name); !ok || cur.Generation != replacing {
			return api.Template{}, nil
		}
	}
	vcpus := or(req.VCPUs, defaultTemplateVCPUs)
	mem := or(req.MemoryMiB, defaultTemplateMemoryMiB)
	img, err := d.guestImage(ctx, req.Image, progress)
	if err != nil {
		return api.Template{}, fmt.Errorf("build template %s: %w", req.Name, err)
	}
	prev, _ := d.template(req.Name)
	gen := prev.Generation + 1
	dir := filepath.Join(d.stateDir, "templates", req.Name, strconv.Itoa(gen))
	if err := os.RemoveAll(dir); err != nil {
		return api.Template{}, fmt.Errorf("build template %s: clear %s: %w", req.Name, dir, err)
	}
	bctx := withPurpose(ctx, vmPurpose{role: store.RoleTemplateBuild})
	t, err := buildTemplate(bctx, req.Name, d.prov, img, vcpus, mem, req.DiskMiB, dir, progress)
	if err != nil {
		os.RemoveAll(dir)
		return api.Template{}, fmt.Errorf("build template %s: %w", req.Name, err)
	}
	rec := store.Template{
		Name:        req.Name,
		Snapshot:    t.Snapshot,
		Generation:  gen,
		ImageDigest: t.ImageDigest,
		Image:       img.Dir,
		VCPUs:       vcpus,
		MemoryMiB:   mem,
		CreatedAt:   time.Now(),
		ImageSource: or(img.Source, "busybox"),
		ImageName:   imageName(or(req.Image, d.cfg.Image)),
		DiskMiB:     t.DiskMiB,
	}
	if img.Rootfs != nil {
		e := img.Rootfs.Exec
		rec.Exec = &store.ExecDefaults{Env: e.Env, WorkingDir: e.WorkingDir, User: e.User}
	}
	if err := store.Put(d.st, store.Templates, rec); err != nil {
		os.RemoveAll(dir)
		return api.Template{}, fmt.Errorf("record template %s: %w", req.Name, err)
	}
	d.bus.Publish(events.Event{Kind: "template.built", Subject: req.Name, Detail: map[string]any{"generation": gen}})
	// Pools of this template move to the new snapshot; their warm VMs of
	// the old one are replaced by the pool.
	if err := d.registerPools(); err != nil {
		d.log.Error("re-register pools after template build", "template", req.Name, "err", err)
	}
	d.removeUnusedTemplateDirs()
	return templateAPI(rec), nil
}

// removeUnusedTemplateDirs deletes template generations that are neither
// current nor the origin of a VM that still exists. It runs under buildMu
// or before the API is up, so no build is writing a directory meanwhile.
func (d *Daemon) removeUnusedTemplateDirs() {
	keep := map[string]bool{}
	tpls, err := store.List(d.st, store.Templates)
	if err != nil {
		d.log.Error("list templates to clean up their directories", "err", err)
		return
	}
	for _, t := range tpls {
		keep[t.Snapshot.Dir] = true
	}
	vms, err := store.List(d.st, store.VMs)
	if err != nil {
		d.log.Error("list VMs to clean up templates", "err", err)
		return
	}
	for _, v := range vms {
		if v.SnapshotDir != "" {
			keep[v.SnapshotDir] = true
		}
	}
	root := filepath.Join(d.stateDir, "templates")
	names, _ := os.ReadDir(root)
	for _, n := range names {
		gens, _ := os.ReadDir(filepath.Join(root, n.Name()))
		for _, g := range gens {
			dir := filepath.Join(root, n.Name(), g.Name())
			if keptBy(keep, dir) {
				continue
			}
			d.log.Info("removing unused template generation", "dir", dir)
			if err := os.RemoveAll(dir); err != nil {
				d.log.Warn("remove template generation", "dir", dir, "err", err)
			}
		}
	}
}

// keptBy reports whether dir holds one of the kept snapshot directories.
func keptBy(keep map[string]bool, dir string) bool {
	for k := range keep {
		if k == dir || strings.HasPrefix(k, dir+string(filepath.Separator)) {
			return true
		}
	}
	return false
}

type builtTemplate struct {
	Snapshot    vm.Snapshot
	ImageDigest string
	DiskMiB     int
}

// buildTemplate cold-boots img with the given shape through p (so the build
// VM is recorded while it exists) and snapshots it into dir.
func buildTemplate(ctx context.Context, name string, p *ownedProvider, img guest.Image, vcpus, mem, diskMiB int, dir string, progress func(string)) (builtTemplate, error) {
	t, err := template.Build(ctx, template.BuildOptions{
		NIC:       templateNIC(p),
		Name:      name,
		Provider:  p,
		Image:     img,
		VCPUs:     vcpus,
		MemoryMiB: mem,
		DiskMiB:   diskMiB,
		Dir:       dir,
		Progress:  progress,
	})
	if err != nil {
		return builtTemplate{}, err
	}
	return builtTemplate{Snapshot: t.Snapshot, ImageDigest: t.ImageDigest, DiskMiB: t.DiskMiB}, nil
}
