// Package vm is the shared vocabulary of warmpool: what a VM is, how it is
// specified, and the small interfaces a provider implements. It imports
// nothing else from warmpool so every other package can depend on it.
package vm

import (
	"fmt"
	"time"
)

// Spec describes a VM to boot. A provider fills in nothing of its own here;
// anything provider-specific lives in the provider's options.
type Spec struct {
	// Name is a human label (a machine or template name); IDs are chosen by
	// the provider.
	Name      string `json:"name,omitempty"`
	VCPUs     int    `json:"vcpus"`
	MemoryMiB int    `json:"memory_mib"`
	// Kernel and Initrd are host paths of the guest image.
	Kernel  string `json:"kernel,omitempty"`
	Initrd  string `json:"initrd,omitempty"`
	Cmdline string `json:"cmdline,omitempty"`
	// DataDisk is an optional host path of a raw disk image attached as a
	// second, persistent drive. The provider never deletes it.
	DataDisk string `json:"data_disk,omitempty"`
	// RootDisk is an optional host path of a read-only root filesystem
	// disk (an image's ext4), shared by every VM that boots it; the
	// provider attaches it read-only and never writes or deletes it.
	RootDisk string `json:"root_disk,omitempty"`
	// WritableDisk is an optional host path of a raw disk the guest
	// writes its root filesystem's changes to (the overlay's upper layer).
	// The caller owns the file. A snapshot keeps a frozen copy of it, and
	// every VM restored from the snapshot writes to a private copy-on-write
	// layer over that copy, which goes with the VM on Destroy.
	WritableDisk string `json:"writable_disk,omitempty"`
	// NoBalloon asks for no memory balloon device, so Ballooner calls on
	// the VM fail with ErrUnsupported. Templates set it because a clone's
	// balloon could punch holes into the template memory file other clones
	// share; a provider may refuse a shared-memory snapshot of a VM that
	// has a balloon.
	NoBalloon bool `json:"no_balloon,omitempty"`
	// Labels are opaque to providers but persisted with the VM so that
	// callers can recognise VMs left by an earlier run.
	Labels map[string]string `json:"labels,omitempty"`
	// NIC, when set, gives the VM a network interface (CapNetwork).
	NIC *NIC `json:"nic,omitempty"`
}

// Serials a provider gives Spec.RootDisk and Spec.WritableDisk, by which
// the guest's init finds them (the kernel's order of disks does not matter).
// The kernel command line names the disks by these serials; a provider that
// cannot set a disk's serial replaces the serial there with the device the
// guest kernel gives the disk (/dev/vda), which the guest's init accepts too.
const (
	RootDiskSerial     = "wp-root"
	WritableDiskSerial = "wp-rw"
)

// Validate reports the first field of s that no provider could honour.
func (s Spec) Validate() error {
	if s.Name != "" {
		if err := ValidateName("name", s.Name); err != nil {
			return err
		}
	}
	if err := ValidateRange("vcpus", s.VCPUs, 1, MaxVCPUs); err != nil {
		return err
	}
	if err := ValidateRange("memory_mib", s.MemoryMiB, MinMemoryMiB, MaxMemoryMiB); err != nil {
		return err
	}
	return s.NIC.Validate()
}

// Limits that catch absurd requests before they reach a provider.
const (
	MaxVCPUs     = 64
	MinMemoryMiB = 64
	MaxMemoryMiB = 256 * 1024
)

// StackKey identifies a bucket of interchangeable warm VMs: VMs restored from
// the same template snapshot with the same shape.
type StackKey struct {
	Template  string `json:"template"`
	VCPUs     int    `json:"vcpus"`
	MemoryMiB int    `json:"memory_mib"`
}

func (k StackKey) String() string {
	return fmt.Sprintf("%s/%dcpu/%dmib", k.Template, k.VCPUs, k.MemoryMiB)
}

// Validate checks that the key names a template and a sane shape.
func (k StackKey) Validate() error {
	if err := ValidateName("template", k.Template); err != nil {
		return err
	}
	if err := ValidateRange("vcpus", k.VCPUs, 1, MaxVCPUs); err != nil {
		return err
	}
	return ValidateRange("memory_mib", k.MemoryMiB, MinMemoryMiB, MaxMemoryMiB)
}

// Snapshot is a template a provider can restore VMs from. Dir holds every
// file of the snapshot and belongs to whoever asked for the snapshot.
type Snapshot struct {
	ID        string    `json:"id"`
	Provider  string    `json:"provider"`
	Dir       string    `json:"dir"`
	Spec      Spec      `json:"spec"`
	CreatedAt time.Time `json:"created_at"`
	// ProviderVersion is the hypervisor's version; snapshots are not portable
	// across versions.
	ProviderVersion string `json:"provider_version,omitempty"`
	// SharedMemory is true when clones map the snapshot's memory file
	// copy-on-write instead of loading a copy of it.
	SharedMemory bool `json:"shared_memory,omitempty"`
	// SingleUse marks a snapshot made by Suspender.Suspend: it restores one
	// VM, once, in place of the suspended one, and is no template. Providers
	// enforce this from their own files, not from this field.
	SingleUse bool `json:"single_use,omitempty"`
	// Meta carries provider-specific details needed to restore.
	Meta map[string]string `json:"meta,omitempty"`
}

// Status is the coarse run state of a VM as the provider sees it.
type Status string

const (
	StatusCreating Status = "creating"
	StatusRunning  Status = "running"
	StatusPaused   Status = "paused"
	StatusStopped  Status = "stopped" // process gone or guest powered off; files may remain until Destroy
	StatusUnknown  Status = "unknown"
)

// VM is a provider's view of one VM.
type VM struct {
	ID       string `json:"id"`
	Provider string `json:"provider"`
	Spec     Spec   `json:"spec"`
	Status   Status `json:"status"`
	// PID of the hypervisor process, 0 when there is none.
	PID int `json:"pid,omitempty"`
	// Dir is the VM's private directory on the host.
	Dir string `json:"dir,omitempty"`
	// Snapshot is the ID of the snapshot the VM was restored from, if any.
	Snapshot  string    `json:"snapshot,omitempty"`
	CreatedAt time.Time `json:"created_at"`
}

// BalloonStats is the guest's memory as seen through the balloon device.
type BalloonStats struct {
	TargetMiB int `json:"target_mib"`
	ActualMiB int `json:"actual_mib"`
	// Guest-reported numbers, zero when the guest has not reported yet.
	TotalMiB     int `json:"total_mib"`
	FreeMiB      int `json:"free_mib"`
	AvailableMiB int `json:"available_mib"`
}
