package vm

import (
	"context"
	"net"
	"time"
)

// Capability is a feature a provider may or may not have. Callers ask before
// they use an optional interface so they can give a clear error instead of a
// failed type assertion deep inside.
type Capability string

const (
	CapSnapshot     Capability = "snapshot"      // implements Snapshotter
	CapSharedMemory Capability = "shared-memory" // clones share the template's clean pages
	CapBalloon      Capability = "balloon"       // implements Ballooner
	CapAgent        Capability = "agent"         // implements AgentDialer
	CapDataDisk     Capability = "data-disk"     // honours Spec.DataDisk
	CapAdopt        Capability = "adopt"         // List finds VMs started by an earlier process
	CapSuspend      Capability = "suspend"       // implements Suspender
)

// Capabilities is the set of optional features a provider has.
type Capabilities map[Capability]bool

// Has reports whether c is in the set.
func (c Capabilities) Has(want Capability) bool { return c[want] }

// Provider is the lifecycle every provider implements. All methods are safe
// for concurrent use. IDs are chosen by the provider and are valid names.
type Provider interface {
	// Name is the provider's short name ("qemu", "firecracker", "fake").
	Name() string
	Capabilities() Capabilities
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
