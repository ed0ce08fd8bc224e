package daemon

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"reflect"
	"slices"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/warmpool/warmpool/api"
	"github.com/warmpool/warmpool/network"
	"github.com/warmpool/warmpool/pool"
	"github.com/warmpool/warmpool/vm"
)

// Config is the daemon's configuration file (YAML). Every key is optional;
// command-line flags override the top-level ones. The `doc` tags are the
// reference documentation: ConfigReference renders them and the README's
// configuration section is checked against it.
type Config struct {
	// Listen is where the API is served.
	Listen string `yaml:"listen" doc:"Where the API listens: unix:PATH or tcp:HOST:PORT. Default: unix socket warmpool.sock in the state directory (mode 0600). TCP requires token_file."`
	// TokenFile holds the bearer token a TCP listener requires.
	TokenFile string `yaml:"token_file" doc:"File holding the bearer token that clients of a TCP listener must send."`
	// E2B serves E2B's sandbox API for the official E2B SDKs.
	E2B E2BConfig `yaml:"e2b" doc:"E2B-compatible API (the official E2B SDKs as clients): off unless listen is set."`
	// Provider picks the hypervisor.
	Provider string `yaml:"provider" doc:"VM provider: qemu, firecracker or fake (in-memory, for tests)."`
	// Accel is QEMU's accelerator choice.
	Accel string `yaml:"accel" doc:"QEMU accelerator: auto (probe once, cached), kvm or tcg."`
	// local is what Options set for a daemon run in-process.
	local localConfig
	// Image is the guest image directory templates are built from.
	Image string `yaml:"image" doc:"Guest image directory (kernel + initramfs) for templates. Default: built on first use into the guest image cache (the one 'warmpool image build' fills)."`
	// Firecracker holds that provider's binaries.
	Firecracker FirecrackerConfig `yaml:"firecracker" doc:"Firecracker provider settings."`
	// WarmExec replaces the warm-up command of restored VMs.
	WarmExec []string `yaml:"warm_exec" doc:"Command every restored VM runs once before it enters its pool, so that under TCG a tenant's first command finds its code translated. Default [true]. A bash [flags] -c SCRIPT form, e.g. [/bin/bash, -l, -c, 'true'] for E2B's commands.run, runs SCRIPT in a subshell of that shell and leaves the shell parked with its profile read: the tenant's next command of that shape runs in it (a command the image lacks only loses the warm-up)."`
	// Intervals tune the background loops.
	Intervals Intervals `yaml:"intervals" doc:"How often background loops run."`
	// Limits bound what the daemon does at once.
	Limits Limits `yaml:"limits" doc:"Limits on what the daemon does and accepts."`
	// Templates are built at start when missing from the state.
	Templates map[string]TemplateConfig `yaml:"templates" doc:"Templates to build at start when the state has none of that name, keyed by name."`
	// Pools are created at start; a pool changed through the API keeps its
	// API settings (the state wins over the file once a pool exists there).
	Pools map[string]PoolConfig `yaml:"pools" doc:"Warm pools keyed by name. Created at start when the state has no pool of that name; changes made through the API persist and win."`
	// Adaptive tunes the controller of every adaptive pool.
	Adaptive AdaptiveConfig `yaml:"adaptive" doc:"How adaptive pools size themselves."`
	// Machines are recorded at start; they start on their first ensure.
	Machines map[string]MachineConfig `yaml:"machines" doc:"Long-lived machines keyed by name; recorded at start, started by their first ensure."`
	// MachineDefaults is the idle policy of machines that set none.
	MachineDefaults MachineDefaults `yaml:"machine_defaults" doc:"Idle policy of every machine whose own spec leaves it out."`
	// Network gives VMs addresses the host reaches them at.
	Network NetworkConfig `yaml:"network" doc:"VM networking (needs root): each VM with a network gets a slot (namespace, TAP, veth, nftables rules) and an address of its own."`
}

// E2BConfig is the E2B-compatible listener.
type E2BConfig struct {
	Listen  string `yaml:"listen" doc:"Where the E2B API (REST and every sandbox's envd on one port) listens: tcp:HOST:PORT. Default: off."`
	KeyFile string `yaml:"key_file" doc:"File of the E2B API keys clients may send, one per line, each e2b_ and hex digits ('warmpool e2b key create' appends one). Default: e2b-keys in the state directory."`
}

// NetworkConfig is the range slots take their addresses from.
type NetworkConfig struct {
	CIDR  string `yaml:"cidr" doc:"IPv4 range the VMs' addresses come from, e.g. 10.77.0.0/24; each VM takes a /30 of it (its address is the third one), so a /24 holds 64. Must not overlap the host's addresses or routes. Empty: no networking, every pool and machine is network: none."`
	Slots int    `yaml:"slots" doc:"Network slots (VMs with a network, warm ones included) at most at once. Default 0: as many as cidr holds."`
	Warm  int    `yaml:"warm" doc:"Clean slots kept made ahead of the restores that need them (a released slot is scrubbed and kept while fewer are idle). Default 2."`
}

// defaultWarmSlots keeps a restore from waiting on a new namespace most of
// the time without holding many idle ones.
const defaultWarmSlots = 2

// FirecrackerConfig locates Firecracker's binaries.
type FirecrackerConfig struct {
	Binary string `yaml:"binary" doc:"Path of the firecracker binary. Default: found in PATH."`
	Jailer string `yaml:"jailer" doc:"Path of the jailer binary; empty runs firecracker without it."`
	UID    int    `yaml:"uid" doc:"User the jailer runs firecracker as. Default: the daemon's own user (as root, give an unprivileged one)."`
	GID    int    `yaml:"gid" doc:"Group the jailer runs firecracker as. Default: the daemon's own group."`
	// JailerArgs go to the jailer before "--".
	JailerArgs []string `yaml:"jailer_args" doc:"Extra jailer arguments, e.g. [--cgroup, cpu.max=50000 100000, --parent-cgroup, warmpool]. The cgroups the jailer creates (cgroup v2) are removed with their VMs."`
}

// Intervals are the periods of the daemon's background loops.
type Intervals struct {
	Sweep      Duration `yaml:"sweep" doc:"How often pools refill and evict. Default 1s."`
	Health     Duration `yaml:"health" doc:"How often warm VMs are validated. Default 30s."`
	LeaseCheck Duration `yaml:"lease_check" doc:"How often expired leases are destroyed. Default 1s."`
}

// Limits bound the daemon's work.
type Limits struct {
	Parallelism  int      `yaml:"parallelism" doc:"VMs restored or destroyed at once across all pools. Default 2."`
	MaxLeases    int      `yaml:"max_leases" doc:"Live leases the daemon hands out at most; 0 means no limit."`
	LeaseTTL     Duration `yaml:"lease_ttl" doc:"TTL of a lease whose acquire names none; 0 means leases live until released."`
	ExecTimeout  Duration `yaml:"exec_timeout" doc:"Timeout of a POST /v1/leases/{id}/exec whose request names none (the streaming exec and detached processes have none unless asked). Default 10m."`
	ShutdownWait Duration `yaml:"shutdown_wait" doc:"How long SIGTERM waits for in-flight requests before cancelling them (an exec's guest process is killed); destroying the warm VMs afterwards has its own time. Default 30s."`
	MemoryMiB    int      `yaml:"memory_mib" doc:"Guest memory all pools together may hold (fixed pools at their max, adaptive pools at their min; sum of VMs x template memory), in MiB; a pool change beyond it is refused. At run time adaptive pools grow only within it: when their targets together exceed it, the pools whose warm memory earned the fewest hits recently give way first. Default: the host's total memory."`
}

// TemplateConfig is a template to build at start.
type TemplateConfig struct {
	VCPUs     int    `yaml:"vcpus" doc:"vCPUs of the template and its clones. Default 1."`
	MemoryMiB int    `yaml:"memory_mib" doc:"Memory of the template and its clones in MiB. Default 256."`
	Image     string `yaml:"image" doc:"Image name (image build --name) or guest image directory; default: the daemon's image."`
	DiskMiB   int    `yaml:"disk_mib" doc:"Writable disk over an image's root filesystem in MiB: what the template and each clone may write. Default 1024; images with a root filesystem only."`
}

// PoolConfig is a pool to create at start.
type PoolConfig struct {
	Template    string   `yaml:"template" doc:"Template the pool's VMs are restored from (required)."`
	Min         int      `yaml:"min" doc:"Ready VMs the pool keeps at least."`
	Max         int      `yaml:"max" doc:"Warm VMs the pool holds at most (required, >= min)."`
	MaxAge      Duration `yaml:"max_age" doc:"Warm VMs older than this are replaced; 0 keeps them forever."`
	Adaptive    bool     `yaml:"adaptive" doc:"Size the pool from its demand between min and max (see the adaptive section) instead of keeping min ready."`
	Network     string   `yaml:"network" doc:"Network policy of the pool's VMs: none (no interface), isolated (the host reaches the VM at its address, the VM reaches nothing) or egress (isolated, and the VM may reach beyond the host's uplink, never the host's own addresses or other VMs). Default: isolated when network.cidr is set, else none."`
	EgressAllow []string `yaml:"egress_allow" doc:"With network: egress, the only destinations allowed, each CIDR[:PORT] (a port allows TCP and UDP). Empty: anything beyond the host."`
}

// AdaptiveConfig tunes every adaptive pool.
type AdaptiveConfig struct {
	Quantile       float64  `yaml:"quantile" doc:"Share of refills whose arrivals an adaptive pool's target covers (the refill time is the median of its last 64 restores). Default 0.99."`
	Headroom       int      `yaml:"headroom" doc:"VMs added to the computed target (within max). Default 0."`
	RateHalfLife   Duration `yaml:"rate_half_life" doc:"Half-life of the weighted acquire-rate estimate. Default 30s."`
	BurstWindow    Duration `yaml:"burst_window" doc:"Window of the burst detector: the acquires within it set the rate when they are more than the weighted estimate. Default 3s."`
	ScaleDownAfter Duration `yaml:"scale_down_after" doc:"How long demand must stay below the target before the pool shrinks. Default 15s."`
	ScaleDownEvery Duration `yaml:"scale_down_every" doc:"Time between two steps down of one VM each. Default 5s."`
	MinIdle        Duration `yaml:"min_idle" doc:"Least time a ready VM has waited before it is destroyed to shrink (not when the memory budget cuts the pool). Default 15s."`
}

func (a AdaptiveConfig) pool() pool.AdaptiveConfig {
	return pool.AdaptiveConfig{
		Quantile: a.Quantile, Headroom: a.Headroom, RateHalfLife: a.RateHalfLife.Std(), BurstWindow: a.BurstWindow.Std(),
		ScaleDownAfter: a.ScaleDownAfter.Std(), ScaleDownEvery: a.ScaleDownEvery.Std(), MinIdle: a.MinIdle.Std(),
	}
}

// MachineConfig is a machine to record at start.
type MachineConfig struct {
	VCPUs        int       `yaml:"vcpus" doc:"vCPUs of the machine. Default 1."`
	MemoryMiB    int       `yaml:"memory_mib" doc:"Memory of the machine in MiB. Default 512."`
	DataDiskMiB  int       `yaml:"data_disk_mib" doc:"Size of its persistent data disk in MiB; 0 means none."`
	Cmdline      string    `yaml:"cmdline" doc:"Appended to the guest kernel command line."`
	Image        string    `yaml:"image" doc:"Image name or guest image directory the machine boots; an image's root filesystem is read-only with writes kept in memory. Default: the daemon's image."`
	IdleAfter    *Duration `yaml:"idle_after" doc:"Shrink the balloon after this long without activity or holds; 0s turns it off. Default: machine_defaults.idle_after."`
	SuspendAfter *Duration `yaml:"suspend_after" doc:"Suspend to a snapshot after this long without activity or holds; 0s turns it off. Default: machine_defaults.suspend_after."`
	Network      string    `yaml:"network" doc:"Network policy of the machine, as a pool's; its address stays the same across restarts, recreation and suspend."`
	EgressAllow  []string  `yaml:"egress_allow" doc:"With network: egress, the only destinations allowed, as a pool's."`
}

// MachineDefaults is the daemon-wide idle policy. Both steps are off unless
// configured: only API calls and holds count as activity, so a guest busy
// on its own (a container serving requests) would be squeezed or frozen.
type MachineDefaults struct {
	IdleAfter      Duration `yaml:"idle_after" doc:"Shrink an unused machine's balloon to what its guest uses plus idle_reserve_mib after this long without activity or holds. Default 0s: off."`
	SuspendAfter   Duration `yaml:"suspend_after" doc:"Suspend an unused machine to a snapshot after this long without activity or holds, freeing its memory and CPU; the next ensure restores it. Default 0s: off."`
	IdleReserveMiB int      `yaml:"idle_reserve_mib" doc:"Memory an idle guest keeps above what it uses, in MiB. Default 64."`
}

// defaultIdleReserveMiB leaves an idle guest room for a burst before it is
// woken (page cache, a cron job) without making the shrink pointless.
const defaultIdleReserveMiB = 64

// Duration reads YAML duration strings such as "30s" or "5m".
type Duration time.Duration

// UnmarshalYAML accepts only duration strings, so that a bare number never
// has to be guessed into a unit.
func (d *Duration) UnmarshalYAML(n *yaml.Node) error {
	var s string
	if err := n.Decode(&s); err != nil || n.Tag != "!!str" {
		return fmt.Errorf("line %d: duration must be a string such as \"30s\", got %q", n.Line, n.Value)
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("line %d: duration %q: want a value such as \"30s\" or \"5m\"", n.Line, s)
	}
	if v < 0 {
		return fmt.Errorf("line %d: duration %q must not be negative", n.Line, s)
	}
	*d = Duration(v)
	return nil
}

// MarshalYAML writes d as a duration string.
func (d Duration) MarshalYAML() (any, error) { return time.Duration(d).String(), nil }

// Std is d as a time.Duration.
func (d Duration) Std() time.Duration { return time.Duration(d) }

func or[T comparable](v, def T) T {
	var zero T
	if v == zero {
		return def
	}
	return v
}

// LoadConfig reads a config file. Unknown keys are errors, so a typo never
// silently means "default".
func LoadConfig(path string) (Config, error) {
	f, err := os.Open(path)
	if err != nil {
		return Config{}, fmt.Errorf("read config: %w", err)
	}
	defer f.Close()
	cfg, err := ParseConfig(f)
	if err != nil {
		return Config{}, fmt.Errorf("config %s: %w", path, err)
	}
	return cfg, nil
}

// ParseConfig decodes and validates a YAML config.
func ParseConfig(r io.Reader) (Config, error) {
	var cfg Config
	dec := yaml.NewDecoder(io.LimitReader(r, 1<<20))
	dec.KnownFields(true)
	if err := dec.Decode(&cfg); err != nil && !errors.Is(err, io.EOF) {
		return Config{}, err
	}
	if err := cfg.Validate(); err != nil {
		return Config{}, err
	}
	return cfg, nil
}

// Validate names the first key of c that is wrong.
func (c Config) Validate() error {
	if c.Provider != "" {
		if err := checkProviderName(c.Provider); err != nil {
			return err
		}
	}
	switch c.Accel {
	case "", "auto", "kvm", "tcg":
	default:
		return &vm.FieldError{Field: "accel", Value: c.Accel, Reason: "must be auto, kvm or tcg"}
	}
	if c.Listen != "" && !strings.HasPrefix(c.Listen, "unix:") && !strings.HasPrefix(c.Listen, "tcp:") {
		return &vm.FieldError{Field: "listen", Value: c.Listen, Reason: "must be unix:PATH or tcp:HOST:PORT"}
	}
	if c.E2B.Listen != "" {
		if !strings.HasPrefix(c.E2B.Listen, "tcp:") {
			return &vm.FieldError{Field: "e2b.listen", Value: c.E2B.Listen, Reason: "must be tcp:HOST:PORT"}
		}
	}
	if err := vm.ValidateRange("limits.parallelism", c.Limits.Parallelism, 0, 64); err != nil {
		return err
	}
	if err := vm.ValidateRange("limits.max_leases", c.Limits.MaxLeases, 0, 1<<20); err != nil {
		return err
	}
	if err := vm.ValidateRange("limits.memory_mib", c.Limits.MemoryMiB, 0, 1<<30); err != nil {
		return err
	}
	if err := vm.ValidateRange("firecracker.uid", c.Firecracker.UID, 0, 1<<31-1); err != nil {
		return err
	}
	if err := vm.ValidateRange("firecracker.gid", c.Firecracker.GID, 0, 1<<31-1); err != nil {
		return err
	}
	if c.Network.CIDR != "" {
		if err := network.CheckConfig(c.networkConfig("")); err != nil {
			return &vm.FieldError{Field: "network", Value: c.Network.CIDR, Reason: err.Error()}
		}
	} else if c.Network.Slots != 0 || c.Network.Warm != 0 {
		return &vm.FieldError{Field: "network", Value: "", Reason: "slots and warm need network.cidr"}
	}
	for _, name := range sortedKeys(c.Templates) {
		t := c.Templates[name]
		req := api.TemplateRequest{Name: name, Image: t.Image, VCPUs: t.VCPUs, MemoryMiB: t.MemoryMiB}
		if err := req.Validate(); err != nil {
			return fmt.Errorf("templates.%s: %w", name, err)
		}
	}
	if err := c.Adaptive.pool().Validate(); err != nil {
		return err
	}
	for _, name := range sortedKeys(c.Pools) {
		p := c.Pools[name]
		if err := vm.ValidateName("pool", name); err != nil {
			return fmt.Errorf("pools: %w", err)
		}
		if err := p.request().Validate(); err != nil {
			return fmt.Errorf("pools.%s: %w", name, err)
		}
		if err := c.checkNetworkPolicy(p.Network); err != nil {
			return fmt.Errorf("pools.%s: %w", name, err)
		}
	}
	if err := vm.ValidateRange("machine_defaults.idle_reserve_mib", c.MachineDefaults.IdleReserveMiB, 0, vm.MaxMemoryMiB); err != nil {
		return err
	}
	for _, name := range sortedKeys(c.Machines) {
		if err := vm.ValidateName("machine", name); err != nil {
			return fmt.Errorf("machines: %w", err)
		}
		if err := c.Machines[name].spec().Validate(); err != nil {
			return fmt.Errorf("machines.%s: %w", name, err)
		}
		if err := c.checkNetworkPolicy(c.Machines[name].Network); err != nil {
			return fmt.Errorf("machines.%s: %w", name, err)
		}
	}
	return nil
}

func (p PoolConfig) request() api.PoolRequest {
	return api.PoolRequest{Template: p.Template, Min: p.Min, Max: p.Max, MaxAge: api.Duration(p.MaxAge), Adaptive: p.Adaptive, Network: p.Network, EgressAllow: p.EgressAllow}
}

func (m MachineConfig) spec() api.MachineSpec {
	s := api.MachineSpec{VCPUs: m.VCPUs, MemoryMiB: m.MemoryMiB, DataDiskMiB: m.DataDiskMiB, Cmdline: m.Cmdline, Image: m.Image,
		Network: m.Network, EgressAllow: m.EgressAllow}.WithDefaults()
	if m.IdleAfter != nil {
		d := api.Duration(*m.IdleAfter)
		s.IdleAfter = &d
	}
	if m.SuspendAfter != nil {
		d := api.Duration(*m.SuspendAfter)
		s.SuspendAfter = &d
	}
	return s
}

// networkConfig is the network manager's configuration for the daemon
// whose slots carry tag.
func (c Config) networkConfig(tag string) network.Config {
	return network.Config{CIDR: c.Network.CIDR, Tag: tag, MaxSlots: c.Network.Slots, Warm: c.Network.Warm}
}

// checkNetworkPolicy refuses a policy that needs a network the
// configuration does not have.
func (c Config) checkNetworkPolicy(policy string) error {
	if c.Network.CIDR == "" && policy != "" && policy != string(network.PolicyNone) {
		return &vm.FieldError{Field: "network", Value: policy, Reason: "needs network.cidr to be set"}
	}
	return nil
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// ConfigReference is the configuration file reference as a Markdown table,
// one row per key (nested keys dotted, keys under a name shown as <name>).
// The README's configuration section must contain it verbatim.
func ConfigReference() string {
	var b bytes.Buffer
	b.WriteString("| key | type | meaning |\n|---|---|---|\n")
	writeReference(&b, "", reflect.TypeFor[Config]())
	return b.String()
}

func writeReference(b *bytes.Buffer, prefix string, t reflect.Type) {
	for i := range t.NumField() {
		f := t.Field(i)
		key := strings.Split(f.Tag.Get("yaml"), ",")[0]
		if key == "" || key == "-" {
			continue
		}
		path := prefix + key
		ft := f.Type
		typ := typeName(ft)
		fmt.Fprintf(b, "| `%s` | %s | %s |\n", path, typ, f.Tag.Get("doc"))
		switch {
		case ft.Kind() == reflect.Struct:
			writeReference(b, path+".", ft)
		case ft.Kind() == reflect.Map && ft.Elem().Kind() == reflect.Struct:
			writeReference(b, path+".<name>.", ft.Elem())
		}
	}
}

func typeName(t reflect.Type) string {
	if t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	switch {
	case t == reflect.TypeFor[Duration]():
		return "duration"
	case t.Kind() == reflect.Map:
		return "map"
	case t.Kind() == reflect.Struct:
		return "section"
	}
	return t.Kind().String()
}
