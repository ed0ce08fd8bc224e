// Package template builds templates: a guest image cold-booted once with a
// given shape, caught the moment its agent answers, and snapshotted. Pools
// restore their warm VMs from a template's snapshot.
package template

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/warmpool/warmpool/agent"
	"github.com/warmpool/warmpool/guest"
	"github.com/warmpool/warmpool/vm"
)

// BuildOptions describes a template to build.
type BuildOptions struct {
	Name      string
	Provider  vm.Provider // must implement vm.Snapshotter and vm.AgentDialer
	Image     guest.Image
	VCPUs     int
	MemoryMiB int
	// Dir receives the snapshot. It must not exist or be empty; on failure
	// Build leaves it as it found it.
	Dir      string
	Progress func(step string)
	// DiskMiB is the size of the writable disk of a template whose image
	// has a root filesystem disk: what the template and each clone may
	// write over the image (DefaultDiskMiB when zero). Ignored for the
	// busybox image, whose root is the initramfs.
	DiskMiB int
	// ReadyTimeout bounds the cold boot until the agent answers; 5 minutes
	// when zero (a TCG boot on a busy host is slow).
	ReadyTimeout time.Duration
	// NIC, when set, gives the template a network interface, attached to
	// nothing while it is built: its clones restore with it and are each
	// attached to a TAP of their own (vm.Snapshot.WithNIC).
	NIC *vm.NIC
}

// Template is a built template.
type Template struct {
	Name        string      `json:"name"`
	Snapshot    vm.Snapshot `json:"snapshot"`
	ImageDigest string      `json:"image_digest"`
	VCPUs       int         `json:"vcpus"`
	MemoryMiB   int         `json:"memory_mib"`
	CreatedAt   time.Time   `json:"created_at"`
	// BootTime is how long the cold boot took until the agent answered.
	BootTime time.Duration `json:"boot_time"`
	// ProviderVersion is the hypervisor version the snapshot needs.
	ProviderVersion string `json:"provider_version,omitempty"`
	// DiskMiB is the writable disk's size; zero for the busybox image.
	DiskMiB int `json:"disk_mib,omitempty"`
}

// StackKey is the pool bucket VMs restored from t belong to.
func (t Template) StackKey() vm.StackKey {
	return vm.StackKey{Template: t.Name, VCPUs: t.VCPUs, MemoryMiB: t.MemoryMiB}
}

// ManifestName is the file in the snapshot directory that describes the template.
const ManifestName = "template.json"

// Load reads the template whose snapshot is in dir.
func Load(dir string) (Template, error) {
	b, err := os.ReadFile(filepath.Join(dir, ManifestName))
	if err != nil {
		return Template{}, fmt.Errorf("load template from %s: %w", dir, err)
	}
	var t Template
	if err := json.Unmarshal(b, &t); err != nil {
		return Template{}, fmt.Errorf("load template from %s: %w", dir, err)
	}
	return t, nil
}

// Label keys set on the build VM, so that a VM left by a crashed build can
// be recognised.
const (
	LabelTemplate = "warmpool.template"
	LabelRole     = "warmpool.role"
)

func (o BuildOptions) validate() (vm.Snapshotter, vm.AgentDialer, error) {
	if err := vm.ValidateName("name", o.Name); err != nil {
		return nil, nil, err
	}
	if err := vm.ValidateRange("vcpus", o.VCPUs, 1, vm.MaxVCPUs); err != nil {
		return nil, nil, err
	}
	if err := vm.ValidateRange("memory_mib", o.MemoryMiB, vm.MinMemoryMiB, vm.MaxMemoryMiB); err != nil {
		return nil, nil, err
	}
	if o.Image.Kernel == "" || o.Image.Initrd == "" {
		return nil, nil, &vm.FieldError{Field: "image", Value: o.Image.Dir, Reason: "has no kernel or initrd (build one with guest.Build)"}
	}
	if o.Dir == "" {
		return nil, nil, &vm.FieldError{Field: "dir", Value: o.Dir, Reason: "must name the snapshot directory"}
	}
	if o.Provider == nil {
		return nil, nil, &vm.FieldError{Field: "provider", Value: "", Reason: "must be set"}
	}
	snap, okSnap := vm.As[vm.Snapshotter](o.Provider, vm.CapSnapshot)
	dial, okDial := vm.As[vm.AgentDialer](o.Provider, vm.CapAgent)
	if !okSnap {
		return nil, nil, fmt.Errorf("template %s: provider %s cannot snapshot: %w", o.Name, o.Provider.Name(), vm.ErrUnsupported)
	}
	if !okDial {
		return nil, nil, fmt.Errorf("template %s: provider %s has no agent channel: %w", o.Name, o.Provider.Name(), vm.ErrUnsupported)
	}
	return snap, dial, nil
}

// Build cold-boots opts.Image with the requested shape, waits until its
// agent answers, pauses it, snapshots it into opts.Dir and destroys the build
// VM. Whatever happens, the build VM is gone when Build returns, and on
// failure opts.Dir is as Build found it.
func Build(ctx context.Context, opts BuildOptions) (_ Template, err error) {
	snapshotter, dialer, err := opts.validate()
	if err != nil {
		return Template{}, err
	}
	progress := func(step string) {
		if opts.Progress != nil {
			opts.Progress(step)
		}
	}
	p := opts.Provider

	restoreDir, err := claimDir(opts.Dir)
	if err != nil {
		return Template{}, fmt.Errorf("template %s: %w", opts.Name, err)
	}
	defer func() {
		if err != nil {
			restoreDir()
		}
	}()

	spec := vm.Spec{
		Name:      opts.Name,
		VCPUs:     opts.VCPUs,
		MemoryMiB: opts.MemoryMiB,
		Kernel:    opts.Image.Kernel,
		Initrd:    opts.Image.Initrd,
		Cmdline:   opts.Image.Cmdline,
		// A clone's balloon could punch holes into the memory file that all
		// clones of a shared-memory template map (see vm.Spec.NoBalloon).
		NoBalloon: true,
		Labels:    map[string]string{LabelTemplate: opts.Name, LabelRole: "template-build"},
		NIC:       opts.NIC,
	}
	diskMiB, err := attachRootDisk(ctx, &spec, opts)
	if err != nil {
		return Template{}, fmt.Errorf("template %s: %w", opts.Name, err)
	}
	if spec.WritableDisk != "" {
		// The snapshot keeps its own frozen copy; the build VM's goes
		// with the build VM.
		defer os.Remove(spec.WritableDisk)
	}
	progress("boot " + opts.Name)
	start := time.Now()
	v, err := p.Create(ctx, spec)
	if err != nil {
		return Template{}, fmt.Errorf("template %s: boot: %w", opts.Name, err)
	}
	destroyed := false
	destroy := func() error {
		if destroyed {
			return nil
		}
		destroyed = true
		// Cleanup must happen even when ctx is what ended the build.
		dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
		defer cancel()
		if err := p.Destroy(dctx, v.ID); err != nil && !errors.Is(err, vm.ErrNotFound) {
			return fmt.Errorf("template %s: destroy build VM %s: %w", opts.Name, v.ID, err)
		}
		return nil
	}
	defer func() {
		if derr := destroy(); derr != nil && err == nil {
			err = derr
		}
	}()

	progress("wait for agent")
	readyCtx, cancel := context.WithTimeout(ctx, cmp.Or(opts.ReadyTimeout, 5*time.Minute))
	err = agent.WaitReady(readyCtx, dialer, v.ID)
	cancel()
	if err != nil {
		return Template{}, fmt.Errorf("template %s: %w", opts.Name, err)
	}
	bootTime := time.Since(start)

	if spec.WritableDisk != "" {
		progress("sync the guest's disk writes")
		note, err := syncGuest(ctx, dialer, v.ID)
		if err != nil {
			return Template{}, fmt.Errorf("template %s: %w", opts.Name, err)
		}
		if note != "" {
			progress(note)
		}
	}
	progress("pause")
	if err := p.Pause(ctx, v.ID); err != nil {
		return Template{}, fmt.Errorf("template %s: pause build VM %s: %w", opts.Name, v.ID, err)
	}
	progress("snapshot")
	snap, err := snapshotter.Snapshot(ctx, v.ID, opts.Dir)
	if err != nil {
		return Template{}, fmt.Errorf("template %s: snapshot build VM %s into %s: %w", opts.Name, v.ID, opts.Dir, err)
	}
	if err := destroy(); err != nil {
		return Template{}, err
	}
	t := Template{
		Name:            opts.Name,
		Snapshot:        snap,
		ImageDigest:     opts.Image.Digest,
		VCPUs:           opts.VCPUs,
		MemoryMiB:       opts.MemoryMiB,
		CreatedAt:       cmp.Or(snap.CreatedAt, time.Now()).UTC(),
		BootTime:        bootTime,
		ProviderVersion: snap.ProviderVersion,
		DiskMiB:         diskMiB,
	}
	b, err := json.MarshalIndent(t, "", "  ")
	if err != nil {
		return Template{}, fmt.Errorf("template %s: %w", opts.Name, err)
	}
	if err := os.WriteFile(filepath.Join(opts.Dir, ManifestName), append(b, '\n'), 0o644); err != nil {
		return Template{}, fmt.Errorf("template %s: %w", opts.Name, err)
	}
	progress("done")
	return t, nil
}

// claimDir checks that dir is absent or empty and returns a function that
// puts it back that way.
func claimDir(dir string) (restore func(), err error) {
	entries, err := os.ReadDir(dir)
	switch {
	case errors.Is(err, os.ErrNotExist):
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return nil, fmt.Errorf("create snapshot directory: %w", err)
		}
		return func() { os.RemoveAll(dir) }, nil
	case err != nil:
		return nil, fmt.Errorf("snapshot directory: %w", err)
	case len(entries) > 0:
		return nil, &vm.FieldError{Field: "dir", Value: dir, Reason: "is not empty (a template is already there?)"}
	}
	return func() {
		entries, _ := os.ReadDir(dir)
		for _, e := range entries {
			os.RemoveAll(filepath.Join(dir, e.Name()))
		}
	}, nil
}

// syncWait bounds the guest's sync before a snapshot.
const syncWait = time.Minute

// syncGuest makes the guest write out its dirty pages and journal before
// the VM is paused for its snapshot. A disk request still in flight when
// the template is paused never completes in its clones: a clone restored
// that way hangs at its first write, or at a read that updates an atime,
// which was seen when the host was busy and the pause met the guest's
// journal commit after boot. It runs through /bin/sh, which every image
// with a root filesystem has, so that busybox's sync applet serves where
// the image has no sync program; an image with neither is left as before
// (the returned note says so).
func syncGuest(ctx context.Context, d vm.AgentDialer, id string) (note string, err error) {
	ctx, cancel := context.WithTimeout(ctx, syncWait)
	defer cancel()
	c, err := agent.Dial(ctx, d, id)
	if err != nil {
		return "", fmt.Errorf("sync build VM %s: %w", id, err)
	}
	defer c.Close()
	var stderr bytes.Buffer
	code, err := c.Exec(ctx, agent.ExecRequest{Argv: []string{"/bin/sh", "-c", "sync"}}, io.Discard, &stderr)
	if err != nil {
		return "", fmt.Errorf("sync build VM %s: %w", id, err)
	}
	if code != 0 {
		return fmt.Sprintf("guest sync exited %d (%s): snapshot taken without it", code, bytes.TrimSpace(stderr.Bytes())), nil
	}
	return "", nil
}
