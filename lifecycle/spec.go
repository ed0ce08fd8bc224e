package lifecycle

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"path/filepath"

	"github.com/warmpool/warmpool/vm"
)

// MaxDataDiskMiB bounds the persistent data disk (1 TiB). The file is sparse,
// so the bound only guards against typos, not against disk usage.
const MaxDataDiskMiB = 1 << 20

// maxCmdline is what the x86 boot protocol accepts.
const maxCmdline = 2048

// MachineSpec is what a caller wants a named machine to look like.
type MachineSpec struct {
	Name      string `json:"name"`
	VCPUs     int    `json:"vcpus"`
	MemoryMiB int    `json:"memory_mib"`
	Kernel    string `json:"kernel,omitempty"`
	Initrd    string `json:"initrd,omitempty"`
	Cmdline   string `json:"cmdline,omitempty"`
	// KernelDigest identifies the content of kernel and initrd (for example a
	// sha256 of both). Paths alone cannot tell that an image was rebuilt in
	// place; when the digest is empty the paths stand in for it.
	KernelDigest string `json:"kernel_digest,omitempty"`
	// DataDiskMiB is the size of the persistent data disk; 0 means none.
	DataDiskMiB int `json:"data_disk_mib,omitempty"`
	// RootDisk is the image's read-only root filesystem disk, if it has
	// one; KernelDigest covers it.
	RootDisk string `json:"root_disk,omitempty"`
	// Idle is this machine's idle policy; nil means the manager's
	// Config.Idle. It is not part of the Fingerprint: changing it never
	// recreates the machine, it only reschedules the idle steps.
	Idle *IdlePolicy `json:"idle,omitempty"`
}

// Validate reports the first field that cannot be honoured as a *vm.FieldError.
func (s MachineSpec) Validate() error {
	if err := vm.ValidateName("name", s.Name); err != nil {
		return err
	}
	if err := vm.ValidateRange("vcpus", s.VCPUs, 1, vm.MaxVCPUs); err != nil {
		return err
	}
	if err := vm.ValidateRange("memory_mib", s.MemoryMiB, vm.MinMemoryMiB, vm.MaxMemoryMiB); err != nil {
		return err
	}
	if s.Kernel != "" && !filepath.IsAbs(s.Kernel) {
		return &vm.FieldError{Field: "kernel", Value: s.Kernel, Reason: "must be an absolute path"}
	}
	if s.Initrd != "" && !filepath.IsAbs(s.Initrd) {
		return &vm.FieldError{Field: "initrd", Value: s.Initrd, Reason: "must be an absolute path"}
	}
	if len(s.Cmdline) > maxCmdline {
		return &vm.FieldError{Field: "cmdline", Value: s.Cmdline[:32] + "...", Reason: "longer than 2048 bytes"}
	}
	if err := vm.ValidateRange("data_disk_mib", s.DataDiskMiB, 0, MaxDataDiskMiB); err != nil {
		return err
	}
	if s.Idle != nil {
		return s.Idle.validate()
	}
	return nil
}

// Fingerprint is everything about a machine that can only change by
// recreating its VM. Two specs with equal fingerprints need no recreate.
type Fingerprint struct {
	VCPUs       int    `json:"vcpus"`
	MemoryMiB   int    `json:"memory_mib"`
	Kernel      string `json:"kernel"`
	Cmdline     string `json:"cmdline"`
	DataDiskMiB int    `json:"data_disk_mib"`
}

// Fingerprint returns the recreate-relevant part of s.
func (s MachineSpec) Fingerprint() Fingerprint {
	kernel := s.KernelDigest
	if kernel == "" && (s.Kernel != "" || s.Initrd != "") {
		kernel = "path:" + s.Kernel + "|" + s.Initrd
	}
	return Fingerprint{
		VCPUs:       s.VCPUs,
		MemoryMiB:   s.MemoryMiB,
		Kernel:      kernel,
		Cmdline:     s.Cmdline,
		DataDiskMiB: s.DataDiskMiB,
	}
}

// String is a short stable hash, handy in logs and labels.
func (f Fingerprint) String() string {
	b, _ := json.Marshal(f)
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:6])
}

// Diff names the fields that differ between a and b, using the JSON names of
// MachineSpec so that users recognise them.
func Diff(a, b Fingerprint) []string {
	var fields []string
	if a.VCPUs != b.VCPUs {
		fields = append(fields, "vcpus")
	}
	if a.MemoryMiB != b.MemoryMiB {
		fields = append(fields, "memory_mib")
	}
	if a.Kernel != b.Kernel {
		fields = append(fields, "kernel")
	}
	if a.Cmdline != b.Cmdline {
		fields = append(fields, "cmdline")
	}
	if a.DataDiskMiB != b.DataDiskMiB {
		fields = append(fields, "data_disk_mib")
	}
	return fields
}

// Labels a machine's VM carries so that a restarted daemon can recognise it
// and tell which spec it was created from.
const (
	LabelMachine     = "warmpool.machine"
	LabelFingerprint = "warmpool.machine.fingerprint"
)

func encodeFingerprint(f Fingerprint) string {
	b, _ := json.Marshal(f)
	return string(b)
}

func decodeFingerprint(s string) (Fingerprint, bool) {
	var f Fingerprint
	if s == "" || json.Unmarshal([]byte(s), &f) != nil {
		return Fingerprint{}, false
	}
	return f, true
}
