// Package api is warmpool's HTTP/JSON interface: the request and response
// types whose JSON shapes are part of the external contract, the Backend the
// daemon implements, the HTTP server that exposes a Backend, and the Go client
// the CLI uses.
//
// JSON shapes may gain fields; no field is ever renamed or removed.
package api

import (
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/warmpool/warmpool/network"
	"github.com/warmpool/warmpool/vm"
)

// Duration is a time.Duration that travels as a Go duration string ("2s",
// "1h30m") so that scripts never have to guess the unit.
type Duration time.Duration

// Std returns d as a time.Duration.
func (d Duration) Std() time.Duration { return time.Duration(d) }

// String formats d like time.Duration does.
func (d Duration) String() string { return time.Duration(d).String() }

// MarshalJSON writes d as a duration string.
func (d Duration) MarshalJSON() ([]byte, error) {
	return json.Marshal(time.Duration(d).String())
}

// UnmarshalJSON accepts only a duration string; a bare number is rejected
// because its unit would be a guess.
func (d *Duration) UnmarshalJSON(b []byte) error {
	// An *json.UnmarshalTypeError gets the field name filled in by the
	// decoder, so the client learns which duration was wrong.
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return &json.UnmarshalTypeError{Value: truncate(string(b), 40), Type: durationType}
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return &json.UnmarshalTypeError{Value: strconv.Quote(truncate(s, 40)), Type: durationType}
	}
	*d = Duration(v)
	return nil
}

var durationType = reflect.TypeFor[Duration]()

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}

// Limits on request values, checked by the server before a request reaches
// the backend.
const (
	// MaxPoolSize bounds min and max of a pool.
	MaxPoolSize = 1024
	// MaxWait bounds ?wait= on acquire.
	MaxWait = 10 * time.Minute
	// DefaultWait is used when acquire has no ?wait=.
	DefaultWait = 10 * time.Second
	// MaxTTL bounds lease and hold TTLs.
	MaxTTL = 30 * 24 * time.Hour
	// MaxExecTimeout bounds ExecRequest.Timeout.
	MaxExecTimeout = 24 * time.Hour
	// MaxArgs bounds the number of argv and env entries of an exec.
	MaxArgs = 4096
	// MaxOwnerLen bounds owner labels.
	MaxOwnerLen = 256
	// MaxDataDiskMiB bounds a machine's data disk (1 TiB).
	MaxDataDiskMiB = 1 << 20
)

// Timings says where the time of an acquire went.
type Timings struct {
	// WaitMS is the time spent waiting for a ready VM (0 on a hit).
	WaitMS int64 `json:"wait_ms"`
	// HandoffMS is the time to resume the VM and give it its identity.
	HandoffMS int64 `json:"handoff_ms"`
	// TotalMS is the whole acquire as the daemon saw it.
	TotalMS int64 `json:"total_ms"`
}

// Lease is a VM handed to one tenant. Releasing it destroys the VM.
type Lease struct {
	ID    string `json:"id"`
	Pool  string `json:"pool"`
	VMID  string `json:"vm_id"`
	Owner string `json:"owner,omitempty"`
	// Address is the guest's network address, null when it has none.
	Address   *string    `json:"address"`
	CreatedAt time.Time  `json:"created_at"`
	ExpiresAt *time.Time `json:"expires_at"`
	Timings   Timings    `json:"timings"`
	// Labels are the acquire's labels, kept with the lease.
	Labels map[string]string `json:"labels,omitempty"`
}

// PoolCounters are cumulative since the pool was created (or the daemon
// started).
type PoolCounters struct {
	Acquired           uint64 `json:"acquired"`
	Hits               uint64 `json:"hits"`
	Waits              uint64 `json:"waits"`
	Timeouts           uint64 `json:"timeouts"`
	Evicted            uint64 `json:"evicted"`
	ValidationFailures uint64 `json:"validation_failures"`
}

// Pool is a warm pool of one template.
type Pool struct {
	Name     string `json:"name"`
	Template string `json:"template"`
	Min      int    `json:"min"`
	Max      int    `json:"max"`
	// MaxAge is how long a warm VM may wait before it is replaced; 0 means
	// forever.
	MaxAge Duration `json:"max_age"`
	// Ready VMs are validated and waiting; Restoring are on their way.
	Ready     int `json:"ready"`
	Restoring int `json:"restoring"`
	// Leased counts live leases taken from this pool.
	Leased int `json:"leased"`
	// Generation changes whenever the template's snapshot changes.
	Generation uint64       `json:"generation"`
	Counters   PoolCounters `json:"counters"`
	// Network is the pool's network policy (none, isolated or egress) and
	// EgressAllow what an egress VM may reach (empty: anything beyond the
	// host).
	Network     string   `json:"network"`
	EgressAllow []string `json:"egress_allow,omitempty"`
	// LastError says why the pool cannot fill: its latest refill failure,
	// or why its template can neither be restored nor rebuilt. Null while
	// the pool refills fine.
	LastError *string `json:"last_error"`
	// Adaptive pools size themselves between Min and Max from demand.
	Adaptive bool `json:"adaptive"`
	// Target is the depth the pool fills towards: Min, or what an adaptive
	// pool's controller chose. Waiting acquirers get restores on top.
	Target  int `json:"target"`
	Waiting int `json:"waiting"`
	// RestoreMS is the pool's recent restore-to-ready time (weighted
	// average; 0 before its first restore).
	RestoreMS float64 `json:"restore_ms"`
	// Rate is an adaptive pool's estimated acquires per second; RefillMS
	// the restore time its target covers (0 for a fixed pool).
	Rate     float64 `json:"rate"`
	RefillMS float64 `json:"refill_ms"`
	// TargetReason says why an adaptive pool's target last changed (start,
	// rate, burst, miss, idle, bounds, budget), at TargetChanged; null for
	// a fixed pool.
	TargetReason  *string    `json:"target_reason"`
	TargetChanged *time.Time `json:"target_changed"`
	// Allowed is how many VMs the host's memory budget (limits.memory_mib)
	// grants the pool now: what it asks for, or less when the pools
	// together ask for more than the budget.
	Allowed int `json:"allowed"`
	// IdleVMSeconds sums the time VMs have waited ready in the pool since
	// the daemon started.
	IdleVMSeconds float64 `json:"idle_vm_seconds"`
}

// PoolRequest creates or replaces a pool (PUT /v1/pools/{name}).
type PoolRequest struct {
	Template string   `json:"template"`
	Min      int      `json:"min"`
	Max      int      `json:"max"`
	MaxAge   Duration `json:"max_age,omitempty"`
	// Adaptive sizes the pool from its demand, between Min and Max.
	Adaptive bool `json:"adaptive,omitempty"`
	// Network is none, isolated or egress; empty: the daemon's default
	// (isolated when network.cidr is set, else none).
	Network     string   `json:"network,omitempty"`
	EgressAllow []string `json:"egress_allow,omitempty"`
}

// Equal reports whether r and o ask for the same pool.
func (r PoolRequest) Equal(o PoolRequest) bool {
	return r.Template == o.Template && r.Min == o.Min && r.Max == o.Max && r.MaxAge == o.MaxAge &&
		r.Adaptive == o.Adaptive && r.Network == o.Network && slices.Equal(r.EgressAllow, o.EgressAllow)
}

// Validate names the first field of r that is wrong.
func (r PoolRequest) Validate() error {
	if err := ValidateNetwork(r.Network, r.EgressAllow); err != nil {
		return err
	}
	if err := vm.ValidateName("template", r.Template); err != nil {
		return err
	}
	if err := vm.ValidateRange("min", r.Min, 0, MaxPoolSize); err != nil {
		return err
	}
	if err := vm.ValidateRange("max", r.Max, 1, MaxPoolSize); err != nil {
		return err
	}
	if r.Min > r.Max {
		return &vm.FieldError{Field: "min", Value: r.Min, Reason: fmt.Sprintf("must not exceed max (%d)", r.Max)}
	}
	if r.MaxAge < 0 {
		return &vm.FieldError{Field: "max_age", Value: r.MaxAge, Reason: "must not be negative"}
	}
	return nil
}

// Template is a snapshot warm VMs are restored from.
type Template struct {
	Name      string `json:"name"`
	VCPUs     int    `json:"vcpus"`
	MemoryMiB int    `json:"memory_mib"`
	// Image is the host directory of the guest image it was built from.
	Image string `json:"image,omitempty"`
	// ImageSource is what the image was built from (image build --from);
	// "busybox" for the initramfs-only image.
	ImageSource string `json:"image_source,omitempty"`
	// ImageName is the image's name (image build --name) the template was
	// built from, empty for a directory or the daemon's default image.
	ImageName string `json:"image_name,omitempty"`
	// DiskMiB is the writable disk over the image's root filesystem; 0
	// for the busybox image.
	DiskMiB int `json:"disk_mib,omitempty"`
	// Generation increases with every rebuild of the same name.
	Generation   uint64    `json:"generation"`
	SnapshotID   string    `json:"snapshot_id,omitempty"`
	Provider     string    `json:"provider,omitempty"`
	SharedMemory bool      `json:"shared_memory"`
	CreatedAt    time.Time `json:"created_at"`
}

// TemplateRequest builds (or rebuilds) a template (POST /v1/templates).
type TemplateRequest struct {
	Name string `json:"name"`
	// Image is the name of an image in the daemon's image cache (image
	// build --name) or an absolute host directory holding a guest image;
	// empty means the daemon's default image.
	Image     string `json:"image,omitempty"`
	VCPUs     int    `json:"vcpus,omitempty"`      // 0: daemon default
	MemoryMiB int    `json:"memory_mib,omitempty"` // 0: daemon default
	// DiskMiB is the writable disk of a template whose image has a root
	// filesystem: what the template and each VM restored from it may
	// write over the image. 0: 1024; refused for the busybox image.
	DiskMiB int `json:"disk_mib,omitempty"`
}

// MaxTemplateDiskMiB bounds TemplateRequest.DiskMiB (1 TiB).
const MaxTemplateDiskMiB = 1 << 20

// validateImageRef accepts an image name or a clean absolute directory.
func validateImageRef(image string) error {
	if image == "" || imageNameRE.MatchString(image) {
		return nil
	}
	if !filepath.IsAbs(image) || filepath.Clean(image) != image {
		return &vm.FieldError{Field: "image", Value: image, Reason: "must be an image name (image ls) or a clean absolute directory path"}
	}
	return nil
}

// imageNameRE is guest.CheckName's rule.
var imageNameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,62}$`)

// Validate names the first field of r that is wrong.
func (r TemplateRequest) Validate() error {
	if err := vm.ValidateName("name", r.Name); err != nil {
		return err
	}
	if err := validateImageRef(r.Image); err != nil {
		return err
	}
	if r.DiskMiB != 0 {
		if err := vm.ValidateRange("disk_mib", r.DiskMiB, 16, MaxTemplateDiskMiB); err != nil {
			return err
		}
	}
	if r.VCPUs != 0 {
		if err := vm.ValidateRange("vcpus", r.VCPUs, 1, vm.MaxVCPUs); err != nil {
			return err
		}
	}
	if r.MemoryMiB != 0 {
		if err := vm.ValidateRange("memory_mib", r.MemoryMiB, vm.MinMemoryMiB, vm.MaxMemoryMiB); err != nil {
			return err
		}
	}
	return nil
}

// AcquireRequest is the optional body of POST /v1/pools/{name}/acquire.
type AcquireRequest struct {
	// Owner is a free-form label recorded with the lease.
	Owner string `json:"owner,omitempty"`
	// TTL destroys the lease's VM after this long; 0 means no expiry.
	TTL Duration `json:"ttl,omitempty"`
	// Labels are free-form KEY: VALUE pairs kept with the lease and listed
	// with it.
	Labels map[string]string `json:"labels,omitempty"`
	// Env entries are KEY=VALUE, the default environment of every exec in
	// the lease (an exec's own Env wins). They are not listed.
	Env []string `json:"env,omitempty"`
	// Wait comes from ?wait= and is how long to wait for a ready VM. The
	// backend applies it to the wait only, so a hand-off that starts just
	// before the deadline is not cut short.
	Wait time.Duration `json:"-"`
}

// Validate names the first field of r that is wrong.
func (r AcquireRequest) Validate() error {
	if err := validateOwner(r.Owner); err != nil {
		return err
	}
	if r.TTL < 0 || r.TTL.Std() > MaxTTL {
		return &vm.FieldError{Field: "ttl", Value: r.TTL, Reason: "must be between 0s and " + MaxTTL.String()}
	}
	if r.Wait < 0 || r.Wait > MaxWait {
		return &vm.FieldError{Field: "wait", Value: r.Wait, Reason: "must be between 0s and " + MaxWait.String()}
	}
	if err := validateLabels(r.Labels); err != nil {
		return err
	}
	return validateEnv(r.Env)
}

// Limits on lease labels.
const (
	MaxLabels        = 64
	MaxLabelKeyLen   = 128
	MaxLabelValueLen = 1024
)

func validateLabels(labels map[string]string) error {
	if len(labels) > MaxLabels {
		return &vm.FieldError{Field: "labels", Value: len(labels), Reason: fmt.Sprintf("more than %d entries", MaxLabels)}
	}
	for k, v := range labels {
		if k == "" || len(k) > MaxLabelKeyLen {
			return &vm.FieldError{Field: "labels", Value: truncate(k, 40), Reason: fmt.Sprintf("a key must be 1 to %d bytes", MaxLabelKeyLen)}
		}
		if len(v) > MaxLabelValueLen {
			return &vm.FieldError{Field: "labels", Value: k, Reason: fmt.Sprintf("value longer than %d bytes", MaxLabelValueLen)}
		}
		if hasControl(k) || hasControl(v) {
			return &vm.FieldError{Field: "labels", Value: k, Reason: "must not contain control characters"}
		}
	}
	return nil
}

func hasControl(s string) bool {
	for _, r := range s {
		if r < 0x20 || r == 0x7f {
			return true
		}
	}
	return false
}

func validateEnv(env []string) error {
	if len(env) > MaxArgs {
		return &vm.FieldError{Field: "env", Value: len(env), Reason: fmt.Sprintf("more than %d entries", MaxArgs)}
	}
	for _, kv := range env {
		if i := indexByte(kv, '='); i <= 0 {
			return &vm.FieldError{Field: "env", Value: truncate(kv, 40), Reason: "must be KEY=VALUE"}
		}
	}
	return nil
}

// LeaseTTLRequest sets when a lease expires (PUT /v1/leases/{id}/ttl): TTL
// from now, or never for 0.
type LeaseTTLRequest struct {
	TTL Duration `json:"ttl"`
}

// Validate names the first field of r that is wrong.
func (r LeaseTTLRequest) Validate() error {
	if r.TTL < 0 || r.TTL.Std() > MaxTTL {
		return &vm.FieldError{Field: "ttl", Value: r.TTL, Reason: "must be between 0s and " + MaxTTL.String()}
	}
	return nil
}

func validateOwner(owner string) error {
	if len(owner) > MaxOwnerLen {
		return &vm.FieldError{Field: "owner", Value: truncate(owner, 40), Reason: fmt.Sprintf("longer than %d bytes", MaxOwnerLen)}
	}
	for _, r := range owner {
		if r < 0x20 || r == 0x7f {
			return &vm.FieldError{Field: "owner", Value: owner, Reason: "must not contain control characters"}
		}
	}
	return nil
}

// ExecRequest runs a command in a leased VM (POST /v1/leases/{id}/exec).
type ExecRequest struct {
	Argv []string `json:"argv"`
	// Env entries are KEY=VALUE, added to the agent's environment.
	Env []string `json:"env,omitempty"`
	// Dir is the working directory inside the guest; empty means the
	// image's WorkingDir, else the agent's (/).
	Dir string `json:"dir,omitempty"`
	// User runs the command as NAME, UID, NAME:GROUP or UID:GID of the
	// guest's /etc/passwd; empty means the image's User, else root.
	User string `json:"user,omitempty"`
	// Stdin is fed to the command, then closed.
	Stdin []byte `json:"stdin,omitempty"`
	// Timeout kills the command after this long; 0 means the daemon default.
	Timeout Duration `json:"timeout,omitempty"`
}

// Validate names the first field of r that is wrong.
func (r ExecRequest) Validate() error {
	if len(r.Argv) == 0 || r.Argv[0] == "" {
		return &vm.FieldError{Field: "argv", Value: r.Argv, Reason: "must name a command"}
	}
	if len(r.Argv) > MaxArgs {
		return &vm.FieldError{Field: "argv", Value: len(r.Argv), Reason: fmt.Sprintf("more than %d entries", MaxArgs)}
	}
	if err := validateEnv(r.Env); err != nil {
		return err
	}
	if r.Timeout < 0 || r.Timeout.Std() > MaxExecTimeout {
		return &vm.FieldError{Field: "timeout", Value: r.Timeout, Reason: "must be between 0s and " + MaxExecTimeout.String()}
	}
	return nil
}

func indexByte(s string, c byte) int {
	for i := 0; i < len(s); i++ {
		if s[i] == c {
			return i
		}
	}
	return -1
}

// ExecFrame is one line of the newline-delimited JSON stream that answers
// POST /v1/leases/{id}/exec. Output frames carry Stream ("stdout" or
// "stderr") and Data (base64 in JSON); the last frame carries either
// ExitCode or Error.
type ExecFrame struct {
	Stream   string `json:"stream,omitempty"`
	Data     []byte `json:"data,omitempty"`
	ExitCode *int   `json:"exit_code,omitempty"`
	Error    *Error `json:"error,omitempty"`
	// Running ends a logs stream without follow whose process still runs.
	Running bool `json:"running,omitempty"`
}

// TemplateFrame is one line of the stream that answers POST /v1/templates
// when the client sends "Accept: application/x-ndjson": progress lines, then
// the template or an error.
type TemplateFrame struct {
	Progress string    `json:"progress,omitempty"`
	Template *Template `json:"template,omitempty"`
	Error    *Error    `json:"error,omitempty"`
}

// MachineSpec is the desired shape of a long-lived machine.
type MachineSpec struct {
	VCPUs     int `json:"vcpus"`
	MemoryMiB int `json:"memory_mib"`
	// DataDiskMiB is the size of the persistent data disk; 0 means none.
	DataDiskMiB int `json:"data_disk_mib,omitempty"`
	// Cmdline is appended to the guest kernel command line.
	Cmdline string `json:"cmdline,omitempty"`
	// Image is the image (name or absolute directory) the machine boots;
	// empty means the daemon's. An image with a root filesystem is the
	// machine's read-only root, with its writes kept in memory (the data
	// disk is what lasts).
	Image string `json:"image,omitempty"`
	// IdleAfter shrinks the balloon after this long without activity or
	// holds; SuspendAfter suspends the machine to a snapshot. nil means the
	// daemon default, "0s" turns the step off.
	IdleAfter    *Duration `json:"idle_after,omitempty"`
	SuspendAfter *Duration `json:"suspend_after,omitempty"`
	// Network and EgressAllow are the machine's network policy, as a
	// pool's (PoolRequest.Network).
	Network     string   `json:"network,omitempty"`
	EgressAllow []string `json:"egress_allow,omitempty"`
}

// The shape a machine gets when nobody gave one: `warmpool machine ensure
// NAME` of a new machine, or an ensure without a body.
const (
	DefaultMachineVCPUs     = 1
	DefaultMachineMemoryMiB = 512
)

// WithDefaults fills a zero VCPUs or MemoryMiB with the defaults above.
func (s MachineSpec) WithDefaults() MachineSpec {
	if s.VCPUs == 0 {
		s.VCPUs = DefaultMachineVCPUs
	}
	if s.MemoryMiB == 0 {
		s.MemoryMiB = DefaultMachineMemoryMiB
	}
	return s
}

// MachineRequest sets a machine's whole desired spec (PUT /v1/machines/{name}).
type MachineRequest = MachineSpec

// MachineEnsureRequest is the optional body of POST
// /v1/machines/{name}/ensure. The daemon merges it into the recorded spec
// in one step: a field left out (or the whole body) keeps what is
// recorded, or the default shape for a machine never recorded. A field
// that is given replaces the recorded one; "0s" turns an idle step off.
// Going back to the daemon's default idle policy takes a PUT.
type MachineEnsureRequest struct {
	VCPUs        *int      `json:"vcpus,omitempty"`
	MemoryMiB    *int      `json:"memory_mib,omitempty"`
	DataDiskMiB  *int      `json:"data_disk_mib,omitempty"`
	Cmdline      *string   `json:"cmdline,omitempty"`
	Image        *string   `json:"image,omitempty"`
	IdleAfter    *Duration `json:"idle_after,omitempty"`
	SuspendAfter *Duration `json:"suspend_after,omitempty"`
	Network      *string   `json:"network,omitempty"`
	EgressAllow  *[]string `json:"egress_allow,omitempty"`
}

// EnsureRequest asks for every field of s, so that an ensure with it
// leaves nothing of the recorded spec but what s leaves to the daemon's
// default (a nil IdleAfter or SuspendAfter keeps the recorded step).
func (s MachineSpec) EnsureRequest() MachineEnsureRequest {
	return MachineEnsureRequest{
		VCPUs: &s.VCPUs, MemoryMiB: &s.MemoryMiB, DataDiskMiB: &s.DataDiskMiB, Cmdline: &s.Cmdline, Image: &s.Image,
		IdleAfter: s.IdleAfter, SuspendAfter: s.SuspendAfter,
		Network: &s.Network, EgressAllow: &s.EgressAllow,
	}
}

// Merge returns base with the fields r gives replaced.
func (r MachineEnsureRequest) Merge(base MachineSpec) MachineSpec {
	set := func(dst *int, v *int) {
		if v != nil {
			*dst = *v
		}
	}
	set(&base.VCPUs, r.VCPUs)
	set(&base.MemoryMiB, r.MemoryMiB)
	set(&base.DataDiskMiB, r.DataDiskMiB)
	if r.Cmdline != nil {
		base.Cmdline = *r.Cmdline
	}
	if r.Image != nil {
		base.Image = *r.Image
	}
	// Copies: the merged spec must not share a Duration with the request.
	if r.IdleAfter != nil {
		d := *r.IdleAfter
		base.IdleAfter = &d
	}
	if r.Network != nil {
		base.Network = *r.Network
	}
	if r.EgressAllow != nil {
		base.EgressAllow = slices.Clone(*r.EgressAllow)
	}
	if r.SuspendAfter != nil {
		d := *r.SuspendAfter
		base.SuspendAfter = &d
	}
	return base
}

// Validate names the first given field that is wrong. Merged into any
// valid spec, a valid request gives a valid spec.
func (r MachineEnsureRequest) Validate() error {
	return r.Merge(MachineSpec{}.WithDefaults()).Validate()
}

// Equal reports whether s and o ask for the same machine.
func (s MachineSpec) Equal(o MachineSpec) bool {
	same := func(a, b *Duration) bool { return (a == nil) == (b == nil) && (a == nil || *a == *b) }
	return s.VCPUs == o.VCPUs && s.MemoryMiB == o.MemoryMiB && s.DataDiskMiB == o.DataDiskMiB &&
		s.Cmdline == o.Cmdline && s.Image == o.Image && same(s.IdleAfter, o.IdleAfter) && same(s.SuspendAfter, o.SuspendAfter) &&
		s.Network == o.Network && slices.Equal(s.EgressAllow, o.EgressAllow)
}

// Validate names the first field of s that is wrong.
func (s MachineSpec) Validate() error {
	if err := vm.ValidateRange("vcpus", s.VCPUs, 1, vm.MaxVCPUs); err != nil {
		return err
	}
	if err := vm.ValidateRange("memory_mib", s.MemoryMiB, vm.MinMemoryMiB, vm.MaxMemoryMiB); err != nil {
		return err
	}
	if err := vm.ValidateRange("data_disk_mib", s.DataDiskMiB, 0, MaxDataDiskMiB); err != nil {
		return err
	}
	if err := validateImageRef(s.Image); err != nil {
		return err
	}
	if len(s.Cmdline) > 4096 {
		return &vm.FieldError{Field: "cmdline", Value: truncate(s.Cmdline, 40), Reason: "longer than 4096 bytes"}
	}
	for _, r := range s.Cmdline {
		if r < 0x20 || r == 0x7f {
			return &vm.FieldError{Field: "cmdline", Value: s.Cmdline, Reason: "must not contain control characters"}
		}
	}
	if s.IdleAfter != nil && *s.IdleAfter < 0 {
		return &vm.FieldError{Field: "idle_after", Value: *s.IdleAfter, Reason: "must not be negative"}
	}
	if s.SuspendAfter != nil && *s.SuspendAfter < 0 {
		return &vm.FieldError{Field: "suspend_after", Value: *s.SuspendAfter, Reason: "must not be negative"}
	}
	return ValidateNetwork(s.Network, s.EgressAllow)
}

// ValidateNetwork checks a network policy and its egress allow-list.
func ValidateNetwork(policy string, allow []string) error {
	p, err := network.ParsePolicy(policy)
	if err != nil {
		return &vm.FieldError{Field: "network", Value: policy, Reason: "must be none, isolated or egress"}
	}
	if _, err := network.ParseAllow(allow); err != nil {
		return &vm.FieldError{Field: "egress_allow", Value: strings.Join(allow, ","), Reason: err.Error()}
	}
	if len(allow) > 0 && p != network.PolicyEgress {
		return &vm.FieldError{Field: "egress_allow", Value: strings.Join(allow, ","), Reason: "needs network: egress"}
	}
	return nil
}

// Machine states as reported in Machine.State.
const (
	MachineNotExist  = "not_exist"
	MachineCreating  = "creating"
	MachineCreated   = "created"
	MachineStarting  = "starting"
	MachineRunning   = "running"
	MachineIdle      = "idle"
	MachineSuspended = "suspended"
	MachineStopping  = "stopping"
	MachineStopped   = "stopped"
	MachineFailed    = "failed"
)

// Machine is a named long-lived VM managed by the daemon.
type Machine struct {
	Name  string      `json:"name"`
	State string      `json:"state"`
	Spec  MachineSpec `json:"spec"`
	// Since is when the machine entered State.
	Since     time.Time `json:"since"`
	LastError *string   `json:"last_error"`
	// Holds is the number of live holds keeping the machine awake.
	Holds int `json:"holds"`
	// BalloonMiB is the balloon target, null when no balloon is set.
	BalloonMiB *int   `json:"balloon_mib"`
	VMID       string `json:"vm_id,omitempty"`
	// Address is where the host reaches the machine, null without a
	// network; it stays the same for the machine's whole life.
	Address *string `json:"address"`
	// IdleAfter and SuspendAfter are the idle policy in force: the spec's,
	// else the daemon's default. 0s means the step is off.
	IdleAfter    Duration `json:"idle_after"`
	SuspendAfter Duration `json:"suspend_after"`
}

// StopRequest is the optional body of POST /v1/machines/{name}/stop.
type StopRequest struct {
	// Force kills the VM without waiting for a graceful power-off.
	Force bool `json:"force,omitempty"`
}

// HoldRequest is the body of POST /v1/machines/{name}/hold.
type HoldRequest struct {
	Owner string `json:"owner,omitempty"`
	// TTL ends the hold after this long; 0 means until released.
	TTL Duration `json:"ttl,omitempty"`
}

// Validate names the first field of r that is wrong.
func (r HoldRequest) Validate() error {
	if err := validateOwner(r.Owner); err != nil {
		return err
	}
	if r.TTL < 0 || r.TTL.Std() > MaxTTL {
		return &vm.FieldError{Field: "ttl", Value: r.TTL, Reason: "must be between 0s and " + MaxTTL.String()}
	}
	return nil
}

// Hold keeps a machine from idling or suspending while it lives.
type Hold struct {
	ID        string     `json:"id"`
	Machine   string     `json:"machine"`
	Owner     string     `json:"owner,omitempty"`
	CreatedAt time.Time  `json:"created_at"`
	ExpiresAt *time.Time `json:"expires_at"`
}

// Status is the daemon's summary (GET /v1/status).
type Status struct {
	Version  string `json:"version"`
	Provider string `json:"provider"`
	// Accel is the accelerator the provider uses ("kvm", "tcg"), if any.
	Accel        string    `json:"accel,omitempty"`
	Capabilities []string  `json:"capabilities"`
	StateDir     string    `json:"state_dir"`
	StartedAt    time.Time `json:"started_at"`
	Templates    int       `json:"templates"`
	Pools        int       `json:"pools"`
	Leases       int       `json:"leases"`
	Machines     int       `json:"machines"`
	// VMs is every VM the daemon owns: warm, leased and machines.
	VMs int `json:"vms"`
	// Network is "on, CIDR", or "off: WHY" when network.cidr is set but
	// networking cannot be had (not root); empty without network.cidr.
	Network string `json:"network,omitempty"`
}

// Error is the JSON body of every error response, and the error the Client
// returns for one.
type Error struct {
	Message string `json:"error"`
	Code    string `json:"code"`
	// Status is the HTTP status; it is not part of the body.
	Status int `json:"-"`
	// RetryAfter is the server's Retry-After hint, if any.
	RetryAfter time.Duration `json:"-"`
}

func (e *Error) Error() string { return e.Message }

// Is lets errors.Is(err, ErrNothingReady) and friends match errors that came
// over the wire.
func (e *Error) Is(target error) bool {
	switch target {
	case ErrNothingReady:
		return e.Code == CodeNothingReady
	case vm.ErrNotFound:
		return e.Code == CodeNotFound
	case vm.ErrInvalid:
		return e.Code == CodeInvalidArgument
	case vm.ErrInvalidState:
		return e.Code == CodeConflict
	case vm.ErrExhausted:
		return e.Code == CodeExhausted
	case vm.ErrUnsupported:
		return e.Code == CodeUnsupported
	}
	return false
}

// Error codes, the "code" of an error body.
const (
	CodeInvalidArgument = "invalid_argument" // 400
	CodeUnauthorized    = "unauthorized"     // 401
	CodeNotFound        = "not_found"        // 404
	CodeMethod          = "method_not_allowed"
	CodeConflict        = "conflict"       // 409: vm.ErrInvalidState
	CodeExhausted       = "exhausted"      // 409: vm.ErrExhausted
	CodeTooLarge        = "body_too_large" // 413
	CodeUnsupportedType = "unsupported_media_type"
	CodeInternal        = "internal"      // 500
	CodeUnsupported     = "unsupported"   // 501: vm.ErrUnsupported
	CodeNothingReady    = "nothing_ready" // 503 + Retry-After
	CodeUnavailable     = "unavailable"   // 503: the daemon is shutting down
)

// ErrNothingReady is what Backend.Acquire returns (wrapped or not) when no VM
// became ready within the wait. The server answers 503 with Retry-After; the
// client's error matches it with errors.Is.
var ErrNothingReady = errors.New("nothing ready")

// ErrShuttingDown is what a backend returns when it no longer takes work.
var ErrShuttingDown = errors.New("daemon is shutting down")
