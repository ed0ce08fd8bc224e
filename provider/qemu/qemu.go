// Package qemu runs warmpool's VMs with QEMU's microvm machine, controlled
// over QMP on a Unix socket.
//
// Every VM lives in its own directory RunDir/<id>/ (record, pid file, QMP
// and agent sockets, console and QEMU logs, and its RAM file when RunDir is
// on tmpfs); RunDir is StateDir/vms unless the caller puts it elsewhere. A
// clone's writable disk is StateDir/disks/<id>.qcow2. QEMU runs in its own
// session, so VMs outlive the process that started them; a later Provider
// on the same directories finds them again in List.
//
// Templates share memory with their clones: a VM's RAM is a file mapped
// shared, a snapshot writes only device state (migration capability
// x-ignore-shared) next to a copy of that file, and each clone maps the copy
// privately, so clean pages stay shared between all clones of a template.
// Nothing in a clone may discard RAM, because QEMU discards by punching
// holes into the backing file even through a private mapping: such
// templates are created with vm.Spec.NoBalloon, and shared snapshots of VMs
// with a balloon are refused.
package qemu

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/warmpool/warmpool/internal/atomicfile"
	"github.com/warmpool/warmpool/internal/pidwatch"
	"github.com/warmpool/warmpool/provider/qemu/qmp"
	"github.com/warmpool/warmpool/vm"
)

// Accelerators.
const (
	AccelAuto = "auto"
	AccelKVM  = "kvm"
	AccelTCG  = "tcg"
)

// Snapshot modes.
const (
	// SnapshotShared writes only device state; clones map the template's
	// memory file copy-on-write.
	SnapshotShared = "shared"
	// SnapshotCopy writes the whole of guest RAM into the stream; each clone
	// loads its own copy.
	SnapshotCopy = "copy"
)

// DefaultTBSizeMiB bounds TCG's translation cache per VM. QEMU's own default
// (1 GiB, touched lazily) lets the cache of a long-running VM grow far past
// what a warm VM needs; see BenchmarkCloneMemory.
const DefaultTBSizeMiB = 32

// Options configures a Provider.
type Options struct {
	// StateDir holds the clones' writable disks under disks/, and the VMs'
	// directories under vms/ unless RunDir is set. Required.
	StateDir string
	// RunDir holds one directory per VM; StateDir/vms when empty. Socket
	// paths inside it must fit in 108 bytes, so keep it short. On tmpfs
	// (see DefaultRunDir) the files every VM start and stop creates and
	// removes stay out of the state disk's journal, whose commits the state
	// database's fsyncs would otherwise wait behind. Close removes it when
	// no VM is left in it, and its parent too when that is DefaultRunDir's.
	RunDir string
	// Binary is the QEMU executable; qemu-system-x86_64 from PATH when empty.
	Binary string
	// Accel is "auto" (default: KVM when a probe boot under KVM answers,
	// else TCG), "kvm" or "tcg".
	Accel string
	// AccelCache, when set, is a file where the "auto" probe's answer is
	// kept for every provider of this host (DefaultAccelCache), beside the
	// copy in StateDir: a probe that cannot tell by a failure takes its
	// whole deadline of CPU, and each new state directory paid it again.
	AccelCache string
	// TBSizeMiB bounds TCG's translation cache; DefaultTBSizeMiB when 0,
	// QEMU's default when negative.
	TBSizeMiB int
	// SnapshotMode is SnapshotShared (default) or SnapshotCopy.
	SnapshotMode string
	// RAMDir is where VMs' RAM files live when StateDir is not on tmpfs;
	// /dev/shm when empty. Guest RAM must not be on a disk-backed file
	// system, or it would be written back to the disk.
	RAMDir string
	// StatsPollInterval is how often the guest reports memory statistics
	// through the balloon; 2s when zero.
	StatsPollInterval time.Duration
	Logger            *slog.Logger
}

// Provider runs VMs with QEMU. It implements vm.Provider, vm.Snapshotter,
// vm.Suspender, vm.Ballooner and vm.AgentDialer.
type Provider struct {
	opts     Options
	log      *slog.Logger
	vmsDir   string
	disksDir string
	ownRun   bool   // vmsDir is outside StateDir: Close removes it when empty
	version  string // "7.2.22", from qemu --version

	accelOnce sync.Once
	accel     string
	accelErr  error
	// accelChosen publishes accel to Accel without racing the probe.
	accelChosen atomic.Pointer[string]

	mu  sync.Mutex
	vms map[string]*machine

	exits  vm.ExitFeed
	closed atomic.Bool // exits after Close belong to whoever adopts the VMs

	// beforeHandOver, set by tests, runs once a new VM exists and before
	// its caller hears of it.
	beforeHandOver func(id string)
}

var (
	_ vm.Provider    = (*Provider)(nil)
	_ vm.Snapshotter = (*Provider)(nil)
	_ vm.Ballooner   = (*Provider)(nil)
	_ vm.AgentDialer = (*Provider)(nil)
	_ vm.Suspender   = (*Provider)(nil)
)

// record is what a VM's directory says about it, for a later process.
type record struct {
	ID        string        `json:"id"`
	Spec      vm.Spec       `json:"spec"`
	CreatedAt time.Time     `json:"created_at"`
	Snapshot  string        `json:"snapshot,omitempty"`
	Config    machineConfig `json:"config"`
	TargetMiB int           `json:"balloon_target_mib,omitempty"`
	// SuspendedTo is the single-use snapshot this VM was suspended to. Such
	// a VM never runs again: its memory and disk now belong to the snapshot.
	SuspendedTo string `json:"suspended_to,omitempty"`
}

// machine is one VM this process knows.
type machine struct {
	id  string
	dir string

	// op serialises operations that change the VM (pause, stop, snapshot,
	// destroy).
	op sync.Mutex

	mu       sync.Mutex
	rec      record
	proc     processIdentity
	qmp      *qmp.Conn
	exited   chan struct{} // closed when our child exits; nil when adopted
	creating bool
	gone     bool // destroyed

	// handedOver: the caller knows the VM (Create or Restore returned it,
	// or it was adopted), so its exit is news worth reporting.
	handedOver bool
	// expected: the caller's Stop or Destroy ends the process.
	expected bool
	// guestReason is why the guest shut down, from QMP, for the exit.
	guestReason string
	qmpDrained  chan struct{}  // closed when the QMP event loop of the current connection ends
	stopWatch   func()         // ends the pidfd watch of an adopted VM
	procFiles   *pidwatch.Proc // the process's /proc files Alive reads; nil until it first asks
}

// maxSocketPath is the room a Unix socket path has on Linux.
const maxSocketPath = 107

// idLen is the length of generated VM IDs.
const idLen = 12

var versionRE = regexp.MustCompile(`version (\d+\.\d+\.\d+)`)

// New returns a provider keeping its VMs under opts.StateDir. It checks that
// QEMU runs but starts nothing.
func New(opts Options) (*Provider, error) {
	if opts.StateDir == "" {
		return nil, &vm.FieldError{Field: "state_dir", Value: "", Reason: "must not be empty"}
	}
	abs, err := filepath.Abs(opts.StateDir)
	if err != nil {
		return nil, fmt.Errorf("qemu state dir %s: %w", opts.StateDir, err)
	}
	opts.StateDir = abs
	vmsDir := filepath.Join(abs, "vms")
	if opts.RunDir != "" {
		if vmsDir, err = filepath.Abs(opts.RunDir); err != nil {
			return nil, fmt.Errorf("qemu run dir %s: %w", opts.RunDir, err)
		}
	}
	if n := len(filepath.Join(vmsDir, strings.Repeat("x", idLen), agentSocket)); n > maxSocketPath {
		field, value := "state_dir", abs
		if opts.RunDir != "" {
			field, value = "run_dir", vmsDir
		}
		return nil, &vm.FieldError{Field: field, Value: value, Reason: fmt.Sprintf("too long: VM socket paths would be %d bytes, Unix sockets allow %d", n, maxSocketPath)}
	}
	switch opts.Accel {
	case "":
		opts.Accel = AccelAuto
	case AccelAuto, AccelKVM, AccelTCG:
	default:
		return nil, &vm.FieldError{Field: "accel", Value: opts.Accel, Reason: "must be auto, kvm or tcg"}
	}
	switch opts.SnapshotMode {
	case "":
		opts.SnapshotMode = SnapshotShared
	case SnapshotShared, SnapshotCopy:
	default:
		return nil, &vm.FieldError{Field: "snapshot_mode", Value: opts.SnapshotMode, Reason: "must be shared or copy"}
	}
	if opts.TBSizeMiB == 0 {
		opts.TBSizeMiB = DefaultTBSizeMiB
	}
	if opts.RAMDir == "" {
		opts.RAMDir = "/dev/shm"
	}
	if opts.StatsPollInterval <= 0 {
		opts.StatsPollInterval = 2 * time.Second
	}
	if opts.Binary == "" {
		opts.Binary = "qemu-system-x86_64"
	}
	bin, err := exec.LookPath(opts.Binary)
	if err != nil {
		return nil, fmt.Errorf("qemu binary %s: %w (install qemu-system-x86)", opts.Binary, err)
	}
	opts.Binary = bin
	out, err := exec.Command(bin, "--version").Output()
	if err != nil {
		return nil, fmt.Errorf("run %s --version: %w", bin, err)
	}
	m := versionRE.FindSubmatch(out)
	if m == nil {
		return nil, fmt.Errorf("run %s --version: no version in %q", bin, out)
	}
	disksDir := filepath.Join(abs, "disks")
	for _, d := range []string{vmsDir, disksDir} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("qemu state dir: %w", err)
		}
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	p := &Provider{
		opts:     opts,
		log:      log.With("provider", "qemu"),
		vmsDir:   vmsDir,
		disksDir: disksDir,
		ownRun:   vmsDir != filepath.Join(abs, "vms"),
		version:  string(m[1]),
		vms:      make(map[string]*machine),
	}
	if err := p.sweepOrphanDisks(); err != nil {
		return nil, err
	}
	return p, nil
}

// DefaultRunDir is where a daemon on stateDir keeps its VMs' directories:
// stateDir/vms when that is on tmpfs already, else a directory of its own
// on /dev/shm named after stateDir, so that two state directories never
// share one. Empty means StateDir/vms.
func DefaultRunDir(stateDir string) string {
	abs, err := filepath.Abs(stateDir)
	if err != nil || onTmpfs(abs) || !onTmpfs("/dev/shm") {
		return ""
	}
	sum := sha256.Sum256([]byte(abs))
	return filepath.Join("/dev/shm", "warmpool-"+hex.EncodeToString(sum[:6]), "vms")
}

// DefaultAccelCache is the host-wide file for the accelerator probe's
// answer: on /dev/shm, so it lasts until the host reboots (a new boot
// probes again), one per user. Empty when /dev/shm is no tmpfs.
func DefaultAccelCache() string {
	if !onTmpfs("/dev/shm") {
		return ""
	}
	return filepath.Join("/dev/shm", fmt.Sprintf("warmpool-accel-%d.json", os.Getuid()))
}

// Name is "qemu".
func (p *Provider) Name() string { return "qemu" }

// Version is the QEMU version this provider runs.
func (p *Provider) Version() string { return p.version }

// Info implements vm.Provider.
func (p *Provider) Info(context.Context) vm.Info {
	return vm.Info{Name: p.Name(), Version: p.version, Accel: p.Accel()}
}

// Capabilities lists what this provider does.
func (p *Provider) Capabilities() vm.Capabilities {
	return vm.Capabilities{
		vm.CapSnapshot:     true,
		vm.CapSharedMemory: p.opts.SnapshotMode == SnapshotShared,
		vm.CapBalloon:      true,
		vm.CapAgent:        true,
		vm.CapDataDisk:     true,
		vm.CapRootDisk:     true,
		vm.CapAdopt:        true,
		vm.CapSuspend:      true,
		vm.CapExitEvents:   true,
		vm.CapNetwork:      true,
		// A hub port nothing else is on.
		vm.CapNetworkUnattached: true,
	}
}

// Close lets go of this process's QMP connections. VMs keep running; another
// Provider on the same StateDir adopts them. QEMU serves one QMP client at a
// time, so a daemon closes before its successor starts.
func (p *Provider) Close() error {
	p.mu.Lock()
	ms := make([]*machine, 0, len(p.vms))
	for _, m := range p.vms {
		ms = append(ms, m)
	}
	p.vms = make(map[string]*machine)
	p.closed.Store(true)
	p.mu.Unlock()
	for _, m := range ms {
		m.mu.Lock()
		c, stopWatch := m.qmp, m.stopWatch
		m.qmp, m.stopWatch = nil, nil
		m.closeProcFiles()
		m.mu.Unlock()
		if c != nil {
			c.Close()
		}
		if stopWatch != nil {
			stopWatch()
		}
	}
	if p.ownRun {
		// Fails, as it should, while VMs are left running for a successor.
		if os.Remove(p.vmsDir) == nil && strings.HasPrefix(filepath.Base(filepath.Dir(p.vmsDir)), "warmpool-") {
			os.Remove(filepath.Dir(p.vmsDir))
		}
	}
	return nil
}

func newID() string {
	const alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
	b := make([]byte, idLen)
	rand.Read(b)
	for i := range b {
		b[i] = alphabet[int(b[i])%len(alphabet)]
	}
	// IDs start with a letter so they never look like flags or numbers.
	b[0] = alphabet[int(b[0])%26]
	return string(b)
}

func (p *Provider) validateSpec(spec vm.Spec) error {
	if err := spec.Validate(); err != nil {
		return err
	}
	if spec.Kernel == "" {
		return &vm.FieldError{Field: "kernel", Value: "", Reason: "required by the qemu provider"}
	}
	for _, f := range []struct{ field, path string }{{"kernel", spec.Kernel}, {"initrd", spec.Initrd}, {"data_disk", spec.DataDisk}, {"root_disk", spec.RootDisk}, {"writable_disk", spec.WritableDisk}} {
		if f.path == "" {
			continue
		}
		if !filepath.IsAbs(f.path) {
			return &vm.FieldError{Field: f.field, Value: f.path, Reason: "must be an absolute path"}
		}
		if strings.ContainsAny(f.path, ",") {
			return &vm.FieldError{Field: f.field, Value: f.path, Reason: "must not contain ','"}
		}
		st, err := os.Stat(f.path)
		if err != nil {
			return &vm.FieldError{Field: f.field, Value: f.path, Reason: "cannot be read: " + err.Error()}
		}
		if !st.Mode().IsRegular() && !(f.field == "data_disk" && st.Mode()&os.ModeDevice != 0) {
			return &vm.FieldError{Field: f.field, Value: f.path, Reason: "is not a regular file"}
		}
	}
	return nil
}

// Create boots a VM from spec and returns once QEMU runs it.
func (p *Provider) Create(ctx context.Context, spec vm.Spec) (vm.VM, error) {
	if err := p.validateSpec(spec); err != nil {
		return vm.VM{}, fmt.Errorf("create qemu vm: %w", err)
	}
	if err := ctx.Err(); err != nil {
		return vm.VM{}, fmt.Errorf("create qemu vm: %w", err)
	}
	accel, err := p.resolveAccel(ctx, spec)
	if err != nil {
		return vm.VM{}, fmt.Errorf("create qemu vm: %w", err)
	}
	id := newID()
	dir := filepath.Join(p.vmsDir, id)
	cfg := machineConfig{
		Accel:     accel,
		VCPUs:     spec.VCPUs,
		MemoryMiB: spec.MemoryMiB,
		Kernel:    spec.Kernel,
		Initrd:    spec.Initrd,
		Append:    p.kernelArgs(spec.Cmdline, accel),
		DataDisk:  spec.DataDisk,
		NoBalloon: spec.NoBalloon,
		// The guest's disks by serial: see diskArgs.
		RootDisk:     spec.RootDisk,
		WritableDisk: spec.WritableDisk,
	}
	if spec.NIC != nil {
		cfg.NICMAC = spec.NIC.MAC
	}
	if accel == AccelTCG && p.opts.TBSizeMiB > 0 {
		cfg.TBSizeMiB = p.opts.TBSizeMiB
	}
	if p.opts.SnapshotMode == SnapshotShared {
		// Every VM may become a template, so its RAM is a shared file from
		// the start.
		cfg.MemPath, cfg.MemShared, cfg.OwnsMem = p.ramPath(dir, id), true, true
	}
	rec := record{ID: id, Spec: spec, CreatedAt: time.Now().UTC(), Config: cfg}
	m, err := p.start(ctx, rec)
	if err != nil {
		return vm.VM{}, fmt.Errorf("create qemu vm %s: %w", id, err)
	}
	p.log.Info("vm created", "id", id, "accel", accel, "pid", m.proc.PID)
	return p.handOver(ctx, m)
}

// handOver reports a VM this provider has just made to the caller. The VM
// exists now whatever happens to ctx: a cancellation that arrives after the
// work is done must not turn into an error that leaves a running VM nobody
// knows the ID of, so the status query does not heed it. A VM whose status
// still cannot be read is removed before the error returns.
func (p *Provider) handOver(ctx context.Context, m *machine) (vm.VM, error) {
	m.mu.Lock()
	m.handedOver = true
	m.mu.Unlock()
	if p.beforeHandOver != nil {
		p.beforeHandOver(m.id)
	}
	qctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	v, err := p.inspect(qctx, m)
	if err != nil {
		if rerr := p.remove(m); rerr != nil {
			p.log.Error("remove vm whose status cannot be read", "id", m.id, "err", rerr)
		}
		return vm.VM{}, fmt.Errorf("status of new vm %s: %w", m.id, err)
	}
	return v, nil
}

func (p *Provider) kernelArgs(cmdline, accel string) string {
	args := strings.TrimSpace(cmdline)
	if accel == AccelTCG && !strings.Contains(args, "tsc_early_khz=") {
		if extra := TCGKernelArgs(); extra != "" {
			args = strings.TrimSpace(args + " " + extra)
		}
	}
	if accel == AccelTCG && !strings.Contains(args, "norandmaps") {
		// TCG finds a translation by the code's virtual address. With
		// address-space randomisation every new process (each shell a
		// tenant's command starts) maps its executable and libraries
		// elsewhere and is translated anew; without it the translations
		// a warm-up command left serve the tenant's first command. Only
		// layouts inside the guest lose their randomness, and only
		// under TCG.
		args = strings.TrimSpace(args + " norandmaps")
	}
	return args
}

// ramPath is where a new VM's RAM file goes: its own directory when that is
// on tmpfs, else RAMDir.
func (p *Provider) ramPath(dir, id string) string {
	if onTmpfs(p.vmsDir) {
		return filepath.Join(dir, ramFile)
	}
	return filepath.Join(p.opts.RAMDir, "warmpool-"+id+".ram")
}

// start creates the VM's directory, starts QEMU in its own session and
// connects to its QMP socket. On failure nothing of the VM is left.
func (p *Provider) start(ctx context.Context, rec record) (*machine, error) {
	return p.startPrepared(ctx, rec, nil)
}

// startPrepared is start with prepare run in the new VM's directory before
// QEMU starts (to put files there that QEMU opens).
func (p *Provider) startPrepared(ctx context.Context, rec record, prepare func(dir string) error) (_ *machine, err error) {
	dir := filepath.Join(p.vmsDir, rec.ID)
	err = os.Mkdir(dir, 0o700)
	if errors.Is(err, os.ErrNotExist) {
		// Another Provider on this run directory closed it empty.
		if err = os.MkdirAll(p.vmsDir, 0o700); err == nil {
			err = os.Mkdir(dir, 0o700)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("make vm dir: %w", err)
	}
	m := &machine{id: rec.ID, dir: dir, rec: rec, creating: true}
	p.mu.Lock()
	p.vms[rec.ID] = m
	p.mu.Unlock()
	defer func() {
		if err != nil {
			p.remove(m)
		}
	}()
	if prepare != nil {
		if err := prepare(dir); err != nil {
			return nil, err
		}
	}
	if err := atomicfile.WriteJSON(filepath.Join(dir, recordFile), 0o600, rec); err != nil {
		return nil, err
	}
	logf, err := os.OpenFile(filepath.Join(dir, qemuLog), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open qemu log: %w", err)
	}
	defer logf.Close()
	netArgs, tapFile, err := netdevArgs(rec.Config, rec.Spec.NIC)
	if err != nil {
		return nil, err
	}
	if tapFile != nil {
		defer tapFile.Close()
	}
	cmd := exec.Command(p.opts.Binary, append(rec.Config.args(dir), netArgs...)...)
	cmd.Dir = dir
	cmd.Stdout, cmd.Stderr = logf, logf
	if tapFile != nil {
		cmd.ExtraFiles = []*os.File{tapFile}
	}
	// Its own session: a signal to the daemon's process group (Ctrl-C, a
	// service manager stopping the daemon) does not reach the VMs.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", p.opts.Binary, err)
	}
	exited := make(chan struct{})
	go func() {
		cmd.Wait() // reap; the exit shows up as the VM's status
		// Reported before exited closes, so that a Destroy or Stop,
		// which waits for exited, has marked the exit as its own in time.
		p.processExited(m, describeExit(cmd.ProcessState))
		close(exited)
	}()
	proc, err := identityOf(cmd.Process.Pid)
	if err != nil {
		cmd.Process.Kill()
		<-exited
		return nil, fmt.Errorf("qemu exited at once: %s", p.logTail(dir))
	}
	m.mu.Lock()
	m.proc, m.exited = proc, exited
	m.mu.Unlock()
	if err := os.WriteFile(filepath.Join(dir, pidFile), []byte(proc.String()), 0o600); err != nil {
		return nil, fmt.Errorf("write pid file: %w", err)
	}
	conn, err := p.waitQMP(ctx, dir, exited)
	if err != nil {
		return nil, err
	}
	drained := p.watchQMP(m, conn)
	m.mu.Lock()
	m.qmp, m.qmpDrained = conn, drained
	m.creating = false
	m.mu.Unlock()
	if !rec.Config.Incoming && !rec.Config.NoBalloon {
		if err := p.enableStats(ctx, conn); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// waitQMP connects to a starting QEMU's QMP socket, failing early when the
// process exits.
func (p *Provider) waitQMP(ctx context.Context, dir string, exited <-chan struct{}) (*qmp.Conn, error) {
	path := filepath.Join(dir, qmpSocket)
	for delay := time.Millisecond; ; {
		if _, err := os.Stat(path); err == nil {
			c, err := qmp.Dial(ctx, path)
			if err == nil {
				return c, nil
			}
			if ctx.Err() != nil {
				return nil, fmt.Errorf("connect qmp: %w", ctx.Err())
			}
		}
		select {
		case <-exited:
			return nil, fmt.Errorf("qemu exited during start: %s", p.logTail(dir))
		case <-ctx.Done():
			return nil, fmt.Errorf("wait for qmp socket: %w", ctx.Err())
		case <-time.After(delay):
		}
		delay = min(delay*2, 20*time.Millisecond)
	}
}

func (p *Provider) enableStats(ctx context.Context, c *qmp.Conn) error {
	secs := int(p.opts.StatsPollInterval / time.Second)
	if secs < 1 {
		secs = 1
	}
	err := c.Execute(ctx, "qom-set", map[string]any{
		"path": "/machine/peripheral/" + balloonID, "property": "guest-stats-polling-interval", "value": secs,
	}, nil)
	if err != nil {
		return fmt.Errorf("enable balloon statistics: %w", err)
	}
	return nil
}

// logTail is the end of QEMU's own log, for errors about a failed start.
func (p *Provider) logTail(dir string) string {
	b, _ := os.ReadFile(filepath.Join(dir, qemuLog))
	s := strings.TrimSpace(string(b))
	if len(s) > 500 {
		s = "..." + s[len(s)-500:]
	}
	if s == "" {
		return "no output"
	}
	return s
}

// remove kills the VM's process and deletes everything it owns.
func (p *Provider) remove(m *machine) error {
	m.mu.Lock()
	conn, proc, exited, cfg, stopWatch := m.qmp, m.proc, m.exited, m.rec.Config, m.stopWatch
	m.qmp, m.stopWatch = nil, nil
	m.gone = true
	m.closeProcFiles()
	m.mu.Unlock()
	if stopWatch != nil {
		stopWatch()
	}
	if err := proc.kill(); err != nil {
		return err
	}
	if conn != nil {
		conn.Close()
	}
	if err := waitGone(proc, exited, 30*time.Second); err != nil {
		return err
	}
	p.mu.Lock()
	if p.vms[m.id] == m {
		delete(p.vms, m.id)
	}
	p.mu.Unlock()
	if cfg.OwnsMem && cfg.MemPath != "" {
		if err := os.Remove(cfg.MemPath); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("remove ram file: %w", err)
		}
	}
	if cfg.WritableDisk == p.cloneDiskPath(m.id) {
		if err := os.Remove(cfg.WritableDisk); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("remove clone disk: %w", err)
		}
	}
	if err := os.RemoveAll(m.dir); err != nil {
		return fmt.Errorf("remove vm dir: %w", err)
	}
	return nil
}

// waitGone waits until the process has exited (and, for our own child, been
// reaped).
func waitGone(proc processIdentity, exited <-chan struct{}, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for proc.alive() {
		if time.Now().After(deadline) {
			return fmt.Errorf("qemu pid %d still running %s after kill", proc.PID, limit)
		}
		time.Sleep(2 * time.Millisecond)
	}
	if exited != nil {
		select {
		case <-exited:
		case <-time.After(time.Until(deadline)):
			return fmt.Errorf("qemu pid %d not reaped after %s", proc.PID, limit)
		}
	}
	return nil
}

// lookup returns the machine with id, adopting it from its directory when
// an earlier process started it.
func (p *Provider) lookup(ctx context.Context, id string) (*machine, error) {
	if err := vm.ValidateName("id", id); err != nil {
		return nil, fmt.Errorf("qemu vm %q: %w", id, vm.ErrNotFound)
	}
	p.mu.Lock()
	m := p.vms[id]
	p.mu.Unlock()
	if m != nil {
		return m, nil
	}
	return p.adopt(ctx, id)
}

// adopt loads a VM left by another process from its directory.
func (p *Provider) adopt(ctx context.Context, id string) (*machine, error) {
	dir := filepath.Join(p.vmsDir, id)
	b, err := os.ReadFile(filepath.Join(dir, recordFile))
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("qemu vm %s: %w", id, vm.ErrNotFound)
		}
		return nil, fmt.Errorf("read qemu vm %s: %w", id, err)
	}
	var rec record
	if err := json.Unmarshal(b, &rec); err != nil {
		return nil, fmt.Errorf("read qemu vm %s record: %w", id, err)
	}
	m := &machine{id: id, dir: dir, rec: rec, handedOver: true}
	if b, err := os.ReadFile(filepath.Join(dir, pidFile)); err == nil {
		if proc, err := parseIdentity(b); err == nil {
			m.proc = proc
		}
	}
	p.mu.Lock()
	if other := p.vms[id]; other != nil {
		p.mu.Unlock()
		return other, nil
	}
	p.vms[id] = m
	p.mu.Unlock()
	p.log.Info("vm adopted", "id", id, "pid", m.proc.PID, "alive", m.proc.alive())
	p.watchAdopted(m)
	return m, nil
}

// conn returns the VM's QMP connection, reconnecting when it was lost or the
// VM was adopted. ErrInvalidState when QEMU is not running.
func (p *Provider) conn(ctx context.Context, m *machine) (*qmp.Conn, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.gone {
		return nil, fmt.Errorf("qemu vm %s: %w", m.id, vm.ErrNotFound)
	}
	if m.qmp != nil {
		select {
		case <-m.qmp.Done():
			m.qmp = nil
		default:
			return m.qmp, nil
		}
	}
	if !m.proc.alive() {
		return nil, fmt.Errorf("qemu vm %s is not running: %w", m.id, vm.ErrInvalidState)
	}
	dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	c, err := qmp.Dial(dctx, filepath.Join(m.dir, qmpSocket))
	if err != nil {
		return nil, fmt.Errorf("qemu vm %s: %w", m.id, err)
	}
	m.qmp, m.qmpDrained = c, p.watchQMP(m, c)
	return c, nil
}

type statusInfo struct {
	Status  string `json:"status"`
	Running bool   `json:"running"`
}

func (p *Provider) queryStatus(ctx context.Context, m *machine) (string, error) {
	c, err := p.conn(ctx, m)
	if err != nil {
		return "", err
	}
	var st statusInfo
	if err := c.Execute(ctx, "query-status", nil, &st); err != nil {
		return "", fmt.Errorf("qemu vm %s: %w", m.id, err)
	}
	return st.Status, nil
}

func mapStatus(s string) vm.Status {
	switch s {
	case "running":
		return vm.StatusRunning
	case "paused", "postmigrate", "suspended", "prelaunch", "finish-migrate", "save-vm", "restore-vm":
		return vm.StatusPaused
	case "inmigrate":
		return vm.StatusCreating
	case "shutdown":
		return vm.StatusStopped
	default: // guest-panicked, internal-error, io-error, watchdog, debug, colo
		return vm.StatusUnknown
	}
}

func (p *Provider) inspect(ctx context.Context, m *machine) (vm.VM, error) {
	m.mu.Lock()
	v := vm.VM{
		ID:        m.id,
		Provider:  p.Name(),
		Spec:      m.rec.Spec,
		PID:       m.proc.PID,
		Dir:       m.dir,
		Snapshot:  m.rec.Snapshot,
		CreatedAt: m.rec.CreatedAt,
	}
	creating, gone, proc := m.creating, m.gone, m.proc
	m.mu.Unlock()
	switch {
	case gone:
		return vm.VM{}, fmt.Errorf("qemu vm %s: %w", m.id, vm.ErrNotFound)
	case creating:
		v.Status = vm.StatusCreating
		return v, nil
	case !proc.alive():
		v.Status, v.PID = vm.StatusStopped, 0
		return v, nil
	}
	st, err := p.queryStatus(ctx, m)
	if err != nil {
		if ctx.Err() != nil {
			return vm.VM{}, err
		}
		if !proc.alive() {
			v.Status, v.PID = vm.StatusStopped, 0
			return v, nil
		}
		p.log.Warn("vm status unknown", "id", m.id, "err", err)
		v.Status = vm.StatusUnknown
		return v, nil
	}
	v.Status = mapStatus(st)
	return v, nil
}

// Inspect reports a VM's state.
func (p *Provider) Inspect(ctx context.Context, id string) (vm.VM, error) {
	m, err := p.lookup(ctx, id)
	if err != nil {
		return vm.VM{}, err
	}
	return p.inspect(ctx, m)
}

// List returns every VM in the state directory, including those an earlier
// process started. VMs whose QEMU is gone are StatusStopped until destroyed.
func (p *Provider) List(ctx context.Context) ([]vm.VM, error) {
	entries, err := os.ReadDir(p.vmsDir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil // another Provider on this run directory closed it empty
	}
	if err != nil {
		return nil, fmt.Errorf("list qemu vms in %s: %w", p.vmsDir, err)
	}
	var out []vm.VM
	for _, e := range entries {
		if !e.IsDir() || vm.ValidateName("id", e.Name()) != nil {
			continue
		}
		m, err := p.lookup(ctx, e.Name())
		if errors.Is(err, vm.ErrNotFound) {
			continue // a VM being created or destroyed right now
		}
		if err != nil {
			return nil, err
		}
		v, err := p.inspect(ctx, m)
		if errors.Is(err, vm.ErrNotFound) {
			continue
		}
		if err != nil {
			return nil, err
		}
		out = append(out, v)
	}
	return out, nil
}

// Pause stops the VM's vCPUs.
func (p *Provider) Pause(ctx context.Context, id string) error {
	return p.runState(ctx, id, "stop")
}

// Resume starts the VM's vCPUs again.
func (p *Provider) Resume(ctx context.Context, id string) error {
	return p.runState(ctx, id, "cont")
}

func (p *Provider) runState(ctx context.Context, id, cmd string) error {
	m, err := p.lookup(ctx, id)
	if err != nil {
		return err
	}
	m.op.Lock()
	defer m.op.Unlock()
	st, err := p.queryStatus(ctx, m)
	if err != nil {
		return fmt.Errorf("%s qemu vm %s: %w", cmd, id, err)
	}
	switch mapStatus(st) {
	case vm.StatusRunning, vm.StatusPaused:
	default:
		return fmt.Errorf("%s qemu vm %s in state %s: %w", cmd, id, st, vm.ErrInvalidState)
	}
	m.mu.Lock()
	suspendedTo := m.rec.SuspendedTo
	m.mu.Unlock()
	if cmd == "cont" && suspendedTo != "" {
		return fmt.Errorf("resume qemu vm %s: suspended to snapshot %s, only that snapshot may run it again: %w", id, suspendedTo, vm.ErrInvalidState)
	}
	c, err := p.conn(ctx, m)
	if err != nil {
		return err
	}
	if err := c.Execute(ctx, cmd, nil, nil); err != nil {
		return fmt.Errorf("%s qemu vm %s: %w", cmd, id, err)
	}
	return nil
}

// Stop asks the guest to power off (through its agent, else ACPI),
// waits up to grace for QEMU to exit, then quits QEMU and finally kills it.
// A paused VM cannot shut itself down and is stopped at once.
func (p *Provider) Stop(ctx context.Context, id string, grace time.Duration) error {
	m, err := p.lookup(ctx, id)
	if err != nil {
		return err
	}
	m.op.Lock()
	defer m.op.Unlock()
	m.mu.Lock()
	proc, exited := m.proc, m.exited
	m.mu.Unlock()
	if !proc.alive() {
		return nil
	}
	defer m.expectExit()()
	st, _ := p.queryStatus(ctx, m)
	if mapStatus(st) == vm.StatusRunning && grace > 0 {
		gctx, cancel := context.WithTimeout(ctx, grace)
		p.askShutdown(gctx, m)
		waitExit(gctx, proc, exited)
		cancel()
	}
	if proc.alive() {
		if c, err := p.conn(ctx, m); err == nil {
			qctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			c.Execute(qctx, "quit", nil, nil)
			waitExit(qctx, proc, exited)
			cancel()
		}
	}
	if err := proc.kill(); err != nil {
		return fmt.Errorf("stop qemu vm %s: %w", id, err)
	}
	if err := waitGone(proc, exited, 30*time.Second); err != nil {
		return fmt.Errorf("stop qemu vm %s: %w", id, err)
	}
	m.mu.Lock()
	if m.qmp != nil {
		m.qmp.Close()
		m.qmp = nil
	}
	m.mu.Unlock()
	p.log.Info("vm stopped", "id", id)
	return nil
}

func (p *Provider) askShutdown(ctx context.Context, m *machine) {
	conn, err := p.DialAgent(ctx, m.id)
	if err == nil {
		err = agentShutdown(ctx, conn)
		conn.Close()
	}
	if err == nil {
		return
	}
	p.log.Debug("agent shutdown failed, trying ACPI", "id", m.id, "err", err)
	if c, err := p.conn(ctx, m); err == nil {
		if err := c.Execute(ctx, "system_powerdown", nil, nil); err != nil {
			p.log.Debug("system_powerdown failed", "id", m.id, "err", err)
		}
	}
}

// waitExit waits until the process is gone or ctx ends.
func waitExit(ctx context.Context, proc processIdentity, exited <-chan struct{}) {
	t := time.NewTicker(5 * time.Millisecond)
	defer t.Stop()
	for proc.alive() {
		select {
		case <-exited:
			return
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// Destroy kills the VM if it runs and removes its directory and RAM file.
func (p *Provider) Destroy(ctx context.Context, id string) error {
	m, err := p.lookup(ctx, id)
	if err != nil {
		return err
	}
	m.op.Lock()
	defer m.op.Unlock()
	m.mu.Lock()
	gone := m.gone
	m.mu.Unlock()
	if gone {
		return fmt.Errorf("qemu vm %s: %w", id, vm.ErrNotFound)
	}
	if err := p.remove(m); err != nil {
		return fmt.Errorf("destroy qemu vm %s: %w", id, err)
	}
	p.log.Info("vm destroyed", "id", id)
	return nil
}

// DialAgent connects to the guest agent's virtio-serial port. QEMU serves
// one connection at a time; a second waits until the first closes.
func (p *Provider) DialAgent(ctx context.Context, id string) (net.Conn, error) {
	m, err := p.lookup(ctx, id)
	if err != nil {
		return nil, err
	}
	m.mu.Lock()
	alive, gone := m.proc.alive(), m.gone
	m.mu.Unlock()
	if gone {
		return nil, fmt.Errorf("qemu vm %s: %w", id, vm.ErrNotFound)
	}
	if !alive {
		return nil, fmt.Errorf("dial agent of qemu vm %s: not running: %w", id, vm.ErrInvalidState)
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", filepath.Join(m.dir, agentSocket))
	if err != nil {
		return nil, fmt.Errorf("dial agent of qemu vm %s: %w", id, err)
	}
	return c, nil
}

// StateDir is the provider's absolute state directory.
func (p *Provider) StateDir() string { return p.opts.StateDir }
