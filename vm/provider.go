package vm

import (
	"context"
	"net"
	"time"
)

// Capability is a feature a provider may or may not have. A capability that
// comes with an optional interface is reached only through As, so the set a
// provider advertises is the one answer to what it can do: a wrapper that
// implements every optional interface but advertises its inner provider's
// capabilities offers exactly what the inner provider offers.
type Capability string

const (
	CapSnapshot     Capability = "snapshot"      // implements Snapshotter
	CapSharedMemory Capability = "shared-memory" // clones share the template's clean pages
	CapBalloon      Capability = "balloon"       // implements Ballooner
	CapAgent        Capability = "agent"         // implements AgentDialer
	CapDataDisk     Capability = "data-disk"     // honours Spec.DataDisk
	// CapRootDisk: honours Spec.RootDisk and Spec.WritableDisk, and gives
	// each VM restored from a snapshot its own copy-on-write writable disk.
	CapRootDisk Capability = "root-disk"
	CapAdopt    Capability = "adopt"   // List finds VMs started by an earlier process
	CapSuspend  Capability = "suspend" // implements Suspender
	// CapPrepareBoot: implements BootPreparer; a guest image must pass
	// through PrepareBoot before this provider can boot it.
	CapPrepareBoot Capability = "prepare-boot"
)

// Capabilities is the set of optional features a provider has.
type Capabilities map[Capability]bool

// Has reports whether c is in the set.
func (c Capabilities) Has(want Capability) bool { return c[want] }

// As returns p as the optional interface T when p advertises c, and false
// when it does not, even if p's type implements T. Every caller of an
// optional interface goes through As.
func As[T any](p Provider, c Capability) (T, bool) {
	if p == nil || !p.Capabilities().Has(c) {
		var zero T
		return zero, false
	}
	t, ok := any(p).(T)
	return t, ok
}

// Info describes what runs a provider's VMs, for status output and logs.
type Info struct {
	// Name is Provider.Name.
	Name string `json:"name"`
	// Version is the hypervisor's version, empty when the provider learns
	// it only from a running VM.
	Version string `json:"version,omitempty"`
	// Accel is the accelerator VMs run under ("kvm", "tcg"), empty for a
	// provider without that choice.
	Accel string `json:"accel,omitempty"`
	// NoGuestImage is true for a provider that never reads Spec.Kernel or
	// Spec.Initrd (the in-memory fake): callers need not build an image.
	NoGuestImage bool `json:"no_guest_image,omitempty"`
}

// Provider is the lifecycle every provider implements. All methods are safe
// for concurrent use. IDs are chosen by the provider and are valid names.
type Provider interface {
	// Name is the provider's short name.
	Name() string
	Capabilities() Capabilities
	// Info describes the hypervisor. It does not wait for anything slow;
	// ctx is for providers that ask a running process.
	Info(ctx context.Context) Info
	// Create boots a new VM from spec and returns once it is running.
	Create(ctx context.Context, spec Spec) (VM, error)
	// Pause stops the vCPUs; Resume starts them again. Both are idempotent.
	Pause(ctx context.Context, id string) error
	Resume(ctx context.Context, id string) error
	// Stop asks the guest to power off and waits up to grace, then forces it.
	// The VM's files stay until Destroy.
	Stop(ctx context.Context, id string, grace time.Duration) error
	// Destroy kills the VM if needed and removes everything the provider
	// created for it. Destroying an unknown ID returns ErrNotFound.
	Destroy(ctx context.Context, id string) error
	Inspect(ctx context.Context, id string) (VM, error)
	// List returns every VM the provider knows, including those left by an
	// earlier process when the provider has CapAdopt.
	List(ctx context.Context) ([]VM, error)
}

// BootPreparer is a provider that cannot boot a guest image as it is built
// (a compressed bzImage with a command line for QEMU's microvm): it turns
// the image into what it boots.
type BootPreparer interface {
	// PrepareBoot returns spec with Kernel, Initrd and Cmdline replaced by
	// what this provider boots for them; the other fields are unchanged.
	// Preparing the same kernel again reuses the earlier result.
	PrepareBoot(ctx context.Context, spec Spec) (Spec, error)
}

// Snapshotter creates and restores snapshots.
type Snapshotter interface {
	// Snapshot writes a snapshot of a paused VM into dir (created if absent).
	// The VM stays paused.
	Snapshot(ctx context.Context, id string, dir string) (Snapshot, error)
	// Restore creates a new VM from snap and returns it paused.
	Restore(ctx context.Context, snap Snapshot) (VM, error)
}

// Suspender saves a paused VM so that exactly one VM can later take its
// place, data disk included: a machine idled to disk, not a template. A
// template snapshot (Snapshotter.Snapshot) refuses VMs with a data disk,
// because its clones would share one writable disk; a single-use snapshot
// is restored once, after the VM it came from is gone, so the disk has one
// writer at a time.
//
// The snapshot is restored with Snapshotter.Restore, which returns the VM
// paused with the same data disk attached. Restore fails with
// ErrInvalidState while the suspended VM's process still runs, and for every
// restore after the first one that succeeded (the snapshot's memory may have
// moved into the restored VM); a restore that failed may be tried again.
type Suspender interface {
	// Suspend writes a single-use snapshot (Snapshot.SingleUse) of a paused
	// VM into dir (created if absent), with everything the guest wrote to
	// its disks flushed to them. From then on the VM can only be stopped or
	// destroyed: running it again would make its disk disagree with the
	// snapshot's memory, so Resume fails with ErrInvalidState.
	Suspend(ctx context.Context, id string, dir string) (Snapshot, error)
}

// Ballooner controls a VM's memory balloon.
type Ballooner interface {
	// SetBalloon sets how much memory the guest may use, in MiB.
	SetBalloon(ctx context.Context, id string, targetMiB int) error
	BalloonStats(ctx context.Context, id string) (BalloonStats, error)
}

// AgentDialer opens a fresh byte stream to the guest agent of a running VM.
// Each call returns a new connection; connections do not survive a snapshot.
type AgentDialer interface {
	DialAgent(ctx context.Context, id string) (net.Conn, error)
}
