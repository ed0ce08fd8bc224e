package store

import (
	"encoding/json"
	"time"

	"github.com/warmpool/warmpool/vm"
)

// The kinds of record the daemon keeps.
var (
	Templates = Kind[Template]{bucket: "templates"}
	Pools     = Kind[Pool]{bucket: "pools"}
	Leases    = Kind[Lease]{bucket: "leases"}
	Machines  = Kind[Machine]{bucket: "machines"}
	VMs       = Kind[VM]{bucket: "vms"}
	NetSlots  = Kind[NetSlot]{bucket: "net_slots"}
)

var allBuckets = []string{"templates", "pools", "leases", "machines", "vms", "net_slots"}

// Template is a built template: a snapshot that warm VMs are restored from.
type Template struct {
	Name     string      `json:"name"`
	Snapshot vm.Snapshot `json:"snapshot"`
	// Generation grows by one on every rebuild of the same name. A warm VM
	// restored from an older generation is stale and is never handed out.
	Generation  int    `json:"generation"`
	ImageDigest string `json:"image_digest,omitempty"`
	// Image is the guest image directory it was built from.
	Image     string    `json:"image,omitempty"`
	VCPUs     int       `json:"vcpus"`
	MemoryMiB int       `json:"memory_mib"`
	CreatedAt time.Time `json:"created_at"`
	// ImageSource is what the image was built from (busybox, debian:SUITE...).
	ImageSource string `json:"image_source,omitempty"`
	// ImageName is the name it was built from (image build --name), empty
	// for a directory or the daemon's default image.
	ImageName string `json:"image_name,omitempty"`
	// DiskMiB is the writable disk's size, 0 without a root filesystem.
	DiskMiB int `json:"disk_mib,omitempty"`
	// Exec is the image's exec defaults; nil for the busybox image.
	Exec *ExecDefaults `json:"exec,omitempty"`
}

// ExecDefaults are what a command in a VM of the template runs with unless
// the exec request says otherwise (the image config's Env, WorkingDir,
// User).
type ExecDefaults struct {
	Env        []string `json:"env,omitempty"`
	WorkingDir string   `json:"working_dir,omitempty"`
	User       string   `json:"user,omitempty"`
}

// StoreKey is the template's name.
func (t Template) StoreKey() string { return t.Name }

// Pool is a pool's spec as the user set it (through the API or the config
// file).
type Pool struct {
	Name     string        `json:"name"`
	Template string        `json:"template"`
	Min      int           `json:"min"`
	Max      int           `json:"max"`
	MaxAge   time.Duration `json:"max_age,omitempty"`
	// Adaptive sizes the pool from its demand between Min and Max.
	Adaptive bool `json:"adaptive,omitempty"`
	// LeaseTTL, when set, is the default lifetime of a lease from this pool.
	LeaseTTL time.Duration `json:"lease_ttl,omitempty"`
	// Network is the pool's network policy as given ("" is the daemon's
	// default) and EgressAllow its allow-list.
	Network     string    `json:"network,omitempty"`
	EgressAllow []string  `json:"egress_allow,omitempty"`
	UpdatedAt   time.Time `json:"updated_at"`
}

// StoreKey is the pool's name.
func (p Pool) StoreKey() string { return p.Name }

// Lease is a VM handed to a tenant. It lives until released or expired,
// across daemon restarts.
type Lease struct {
	ID    string `json:"id"`
	Pool  string `json:"pool"`
	VMID  string `json:"vm_id"`
	Owner string `json:"owner,omitempty"`
	// Template and Generation say what the VM was restored from.
	Template   string    `json:"template,omitempty"`
	Generation int       `json:"generation,omitempty"`
	CreatedAt  time.Time `json:"created_at"`
	// TTL is zero for a lease that lives until released.
	TTL       time.Duration `json:"ttl,omitempty"`
	ExpiresAt *time.Time    `json:"expires_at,omitempty"`
	// Labels are the acquire's; Env is the default environment of every
	// exec in the lease.
	Labels map[string]string `json:"labels,omitempty"`
	Env    []string          `json:"env,omitempty"`
	// The acquire's timings, kept so that a restarted daemon still reports
	// them.
	WaitMS    int64 `json:"wait_ms,omitempty"`
	HandoffMS int64 `json:"handoff_ms,omitempty"`
	TotalMS   int64 `json:"total_ms,omitempty"`
}

// StoreKey is the lease ID.
func (l Lease) StoreKey() string { return l.ID }

// Expired reports whether the lease has a deadline that has passed at now.
func (l Lease) Expired(now time.Time) bool {
	return l.ExpiresAt != nil && !now.Before(*l.ExpiresAt)
}

// Machine is a long-lived machine's record. Record is the lifecycle
// manager's own record for it, kept opaque here so the store does not
// depend on the layer above.
type Machine struct {
	Name string `json:"name"`
	// Spec is the desired spec callers recorded (the API's shape).
	Spec      json.RawMessage `json:"spec,omitempty"`
	Record    json.RawMessage `json:"record,omitempty"`
	UpdatedAt time.Time       `json:"updated_at"`
}

// StoreKey is the machine's name.
func (m Machine) StoreKey() string { return m.Name }

// Role is what a VM owned by the daemon is for.
type Role string

const (
	RoleNew           Role = "new"            // created, purpose not recorded yet; destroyed by a restart
	RoleWarm          Role = "warm"           // in a pool, waiting to be acquired
	RoleLeased        Role = "leased"         // handed out; Lease names the lease
	RoleTemplateBuild Role = "template-build" // booted to snapshot a template; never adopted
	RoleMachine       Role = "machine"        // a long-lived machine; Machine names it
)

// VM is a VM the daemon owns. Every VM the provider runs for this state
// directory has one record, written before the VM is used and removed after
// it is destroyed, so a restart can tell what each VM was for.
type VM struct {
	ID         string `json:"id"`
	Provider   string `json:"provider"`
	Role       Role   `json:"role"`
	Pool       string `json:"pool,omitempty"`
	Template   string `json:"template,omitempty"`
	Generation int    `json:"generation,omitempty"`
	Lease      string `json:"lease,omitempty"`
	Machine    string `json:"machine,omitempty"`
	// SnapshotDir is the snapshot the VM was restored from; the template
	// files there must stay while the VM lives (clones map them).
	SnapshotDir string    `json:"snapshot_dir,omitempty"`
	CreatedAt   time.Time `json:"created_at"`
}

// StoreKey is the provider's VM ID.
func (v VM) StoreKey() string { return v.ID }

// NetSlot is a network slot the daemon holds: bound to VM VMID, or kept
// for Machine between its VMs, or (neither) taken for a VM still being
// made. Slot is the network package's record, opaque here.
type NetSlot struct {
	ID      string          `json:"id"`
	Slot    json.RawMessage `json:"slot"`
	VMID    string          `json:"vm_id,omitempty"`
	Machine string          `json:"machine,omitempty"`
	// CreatedAt is when the slot was taken.
	CreatedAt time.Time `json:"created_at"`
}

// StoreKey is the slot's ID (its namespace's name).
func (s NetSlot) StoreKey() string { return s.ID }
