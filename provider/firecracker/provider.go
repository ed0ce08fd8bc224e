// Package firecracker runs VMs with Firecracker, configured over its HTTP
// API on a Unix socket. Every VM is one firecracker process in its own
// session (VMs outlive the daemon that started them) with one directory under
// StateDir/vms/<id>/ holding its record, pid file, log and sockets, so a
// restarted daemon finds and adopts them.
package firecracker

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/warmpool/warmpool/internal/atomicfile"
	"github.com/warmpool/warmpool/internal/singleuse"
	"github.com/warmpool/warmpool/internal/tap"
	"github.com/warmpool/warmpool/vm"
)

// DefaultBootArgs is the kernel command line used when a Spec has none.
// Firecracker describes its virtio-mmio devices to the kernel itself; the
// guest needs a serial console, reboot through the keyboard controller (so
// that a guest reboot ends the process) and no PCI probing.
const DefaultBootArgs = "console=ttyS0 reboot=k panic=1 pci=off"

// AgentPort is the vsock port the guest agent listens on.
const AgentPort = 1024

// guestCID is the vsock context ID of every guest. Each VM has its own vsock
// device and host socket, so the CID need not be unique.
const guestCID = 3

// dataDriveID names the optional Spec.DataDisk drive.
const dataDriveID = "data"

// File names inside a VM's directory (or jail root).
const (
	apiSocketName = "api.sock"
	// The vsock socket is given to Firecracker as a path relative to its
	// working directory (the VM's directory), so that a snapshot restored
	// in another directory binds its own socket there even on releases
	// without vsock_override.
	vsockSocketName = "vsock.sock"
	recordName      = "vm.json"
	pidName         = "firecracker.pid"
	logName         = "firecracker.log"
	cloneDiskName   = "data.img"
	// Files of a snapshot directory.
	snapStateName = "vmstate"
	snapMemName   = "memory"
	snapDiskName  = "data.img"
	snapMetaName  = "snapshot.json"
)

// Options configure the provider.
type Options struct {
	// StateDir holds one directory per VM under vms/.
	StateDir string
	// Binary is the firecracker executable; "firecracker" from PATH when
	// empty.
	Binary string
	// JailerBinary and Jailer run Firecracker under its jailer. Both or
	// neither.
	JailerBinary string
	Jailer       *JailerOptions
	// Network, when set, gives each VM its network interfaces (the TAP
	// devices must exist). Restored clones get theirs through
	// network_overrides on Firecracker 1.12 and later.
	Network func(vmID string) []NetworkInterface
	// MMDS, when set, enables the metadata service on the VM's interfaces.
	MMDS *MMDSOptions
	// Logger receives one line per lifecycle step; nil discards.
	Logger *slog.Logger
	// StartTimeout bounds how long a new process may take to open its API
	// socket; 10s when zero.
	StartTimeout time.Duration
}

// NetworkInterface is one guest network device backed by a host TAP device.
type NetworkInterface struct {
	ID          string // iface_id, e.g. "eth0"
	HostDevName string // TAP device on the host
	GuestMAC    string // optional
}

// MMDSOptions enable Firecracker's microVM metadata service.
type MMDSOptions struct {
	Version     string // "V1" or "V2"; Firecracker's default when empty
	IPv4Address string // link-local address; Firecracker's default when empty
	// Metadata returns the data store of a VM; nil leaves it empty.
	Metadata func(vmID string) any
}

// JailerOptions run each VM under Firecracker's jailer: chrooted into
// ChrootBase/<firecracker binary name>/<id>/root as UID:GID, in its own
// cgroup. Everything the VM uses (kernel, initrd, disks, snapshot files,
// sockets) is linked or copied into the jail. A Spec.DataDisk is hard-linked
// (so it must be on ChrootBase's file system) and handed to UID:GID, since
// Firecracker opens it read-write.
type JailerOptions struct {
	UID, GID   int
	ChrootBase string
	// CgroupVersion is 2 unless set; Firecracker recommends cgroup v2.
	CgroupVersion int
	// NetNS is an optional network namespace path to join.
	NetNS string
	// ExtraArgs go to the jailer before "--", e.g. --cgroup settings.
	ExtraArgs []string
}

// Provider runs Firecracker VMs. It implements vm.Provider, vm.Snapshotter,
// vm.Suspender, vm.Ballooner and vm.AgentDialer.
type Provider struct {
	opts Options
	log  *slog.Logger

	// cgroups is what the jailer is asked to do with cgroups; mountsFile
	// is /proc/mounts, where their hierarchies are found.
	cgroups    jailerCgroups
	mountsFile string

	mu sync.Mutex
	// children are processes this provider started: their exit is observed
	// by Wait (so no zombie remains). Adopted VMs are not children.
	children map[string]*child

	exits      vm.ExitFeed
	exitStates map[string]*exitState

	// canUnattached: the provider may make network namespaces, which an
	// interface attached to nothing needs here (root).
	canUnattached bool
}

type child struct {
	pid    int
	exited chan struct{}
}

var (
	_ vm.Provider     = (*Provider)(nil)
	_ vm.Snapshotter  = (*Provider)(nil)
	_ vm.Ballooner    = (*Provider)(nil)
	_ vm.AgentDialer  = (*Provider)(nil)
	_ vm.BootPreparer = (*Provider)(nil)
)

// New checks opts and prepares the state directory.
func New(opts Options) (*Provider, error) {
	if opts.StateDir == "" {
		return nil, &vm.FieldError{Field: "state_dir", Value: "", Reason: "must not be empty"}
	}
	abs, err := filepath.Abs(opts.StateDir)
	if err != nil {
		return nil, fmt.Errorf("firecracker state dir %s: %w", opts.StateDir, err)
	}
	opts.StateDir = abs
	if opts.Binary == "" {
		opts.Binary = "firecracker"
	}
	bin, err := exec.LookPath(opts.Binary)
	if err != nil {
		return nil, fmt.Errorf("firecracker binary %s: %w", opts.Binary, err)
	}
	if opts.Binary, err = filepath.Abs(bin); err != nil {
		return nil, fmt.Errorf("firecracker binary %s: %w", bin, err)
	}
	var cgroups jailerCgroups
	if (opts.Jailer == nil) != (opts.JailerBinary == "") {
		return nil, &vm.FieldError{Field: "jailer", Value: opts.JailerBinary, Reason: "the jailer binary and jailer options go together"}
	}
	if opts.Jailer != nil {
		if opts.JailerBinary, err = exec.LookPath(opts.JailerBinary); err != nil {
			return nil, fmt.Errorf("jailer binary %s: %w", opts.JailerBinary, err)
		}
		if opts.Jailer.ChrootBase == "" {
			return nil, &vm.FieldError{Field: "jailer.chroot_base", Value: "", Reason: "must not be empty"}
		}
		if opts.Jailer.CgroupVersion == 0 {
			opts.Jailer.CgroupVersion = 2
		}
		if cgroups, err = parseJailerArgs(opts.Jailer.ExtraArgs, opts.Binary); err != nil {
			return nil, err
		}
	}
	if opts.StartTimeout == 0 {
		opts.StartTimeout = 10 * time.Second
	}
	if err := os.MkdirAll(filepath.Join(opts.StateDir, "vms"), 0o700); err != nil {
		return nil, fmt.Errorf("firecracker state dir: %w", err)
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Provider{opts: opts, log: log.With("provider", "firecracker"), cgroups: cgroups, mountsFile: "/proc/mounts", children: map[string]*child{}, exitStates: map[string]*exitState{},
		canUnattached: os.Geteuid() == 0}, nil
}

// Name implements vm.Provider.
func (p *Provider) Name() string { return "firecracker" }

// Capabilities implements vm.Provider.
func (p *Provider) Capabilities() vm.Capabilities {
	return vm.Capabilities{
		vm.CapSnapshot: true,
		// The File memory backend maps the snapshot's memory file privately:
		// clones share its clean pages through the page cache.
		vm.CapSharedMemory: true,
		vm.CapBalloon:      true,
		vm.CapAgent:        true,
		vm.CapDataDisk:     true,
		vm.CapRootDisk:     true,
		vm.CapAdopt:        true,
		vm.CapSuspend:      true,
		vm.CapPrepareBoot:  true,
		vm.CapExitEvents:   true,
		vm.CapNetwork:      true,
		// A TAP for an interface attached to nothing needs a namespace
		// of its own to hold it (unattachedNetns).
		vm.CapNetworkUnattached: p.canUnattached,
	}
}

// Info implements vm.Provider. Firecracker's version is known only from a
// running process, so it stays empty; each snapshot records it.
func (p *Provider) Info(context.Context) vm.Info { return vm.Info{Name: p.Name()} }

// record is what a VM's directory remembers about it.
type record struct {
	ID        string    `json:"id"`
	Spec      vm.Spec   `json:"spec"`
	CreatedAt time.Time `json:"created_at"`
	Snapshot  string    `json:"snapshot,omitempty"`
	// Root is where Firecracker's files live on the host: the VM directory,
	// or the jail root under the jailer.
	Root   string `json:"root"`
	Jailed bool   `json:"jailed,omitempty"`
	// JailDir is removed on Destroy (ChrootBase/firecracker/<id>).
	JailDir string `json:"jail_dir,omitempty"`
	// Cgroups are the cgroup directories the jailer creates for the VM;
	// removing them falls to whoever ran the jailer.
	Cgroups []string `json:"cgroups,omitempty"`
	// DataDiskPath is the disk the VM writes, as the host sees it.
	DataDiskPath string `json:"data_disk_path,omitempty"`
	// WritableDiskPath is the disk the VM writes its root filesystem's
	// changes to, as the host sees it: the caller's, or a clone's own copy
	// inside Root, which goes with the VM.
	WritableDiskPath string `json:"writable_disk_path,omitempty"`
	// SuspendedTo is the single-use snapshot the VM was suspended to: it
	// must not run again.
	SuspendedTo string `json:"suspended_to,omitempty"`
	// ScratchNetns is the network namespace the provider made for an
	// interface attached to nothing (see unattachedNetns); it goes with
	// the VM.
	ScratchNetns string `json:"scratch_netns,omitempty"`
}

// instance is a VM's paths.
type instance struct {
	record
	dir string // StateDir/vms/<id>
}

// hostPath is where a file Firecracker knows by name lives on the host.
func (in *instance) hostPath(name string) string { return filepath.Join(in.Root, name) }

// fcPath is how Firecracker must name a file of the VM: inside the jail,
// paths are relative to the jail root.
func (in *instance) fcPath(name string) string {
	if in.Jailed {
		return "/" + name
	}
	return filepath.Join(in.Root, name)
}

func (in *instance) client() *apiClient {
	return newAPIClient(in.ID, in.hostPath(apiSocketName))
}

func (p *Provider) vmDir(id string) string { return filepath.Join(p.opts.StateDir, "vms", id) }

func newID(prefix string) string {
	b := make([]byte, 5)
	rand.Read(b)
	return prefix + hex.EncodeToString(b)
}

// newInstance creates the directories of a new VM.
func (p *Provider) newInstance(spec vm.Spec) (*instance, error) {
	id := newID("fc-")
	in := &instance{dir: p.vmDir(id), record: record{ID: id, Spec: spec, CreatedAt: time.Now().UTC(), Root: p.vmDir(id)}}
	if spec.NIC != nil && !spec.NIC.Attached() {
		// Named now, so that every record of the VM names it before it
		// exists: a VM found after a crash takes it with it.
		in.ScratchNetns = scratchNetnsName(id)
	}
	if p.opts.Jailer != nil {
		in.Jailed = true
		in.JailDir = filepath.Join(p.opts.Jailer.ChrootBase, filepath.Base(p.opts.Binary), id)
		in.Root = filepath.Join(in.JailDir, "root")
		if len(p.cgroups.files) > 0 {
			mounts, err := os.ReadFile(p.mountsFile)
			if err != nil {
				return nil, fmt.Errorf("find cgroup hierarchies for the jailer: %w", err)
			}
			in.Cgroups = p.cgroups.dirs(string(mounts), p.opts.Jailer.CgroupVersion, id)
		}
	}
	if n := len(in.hostPath(apiSocketName)); n >= 108 {
		return nil, &vm.FieldError{Field: "state_dir", Value: p.opts.StateDir, Reason: fmt.Sprintf("socket path of %d bytes exceeds the 107 a Unix socket allows", n)}
	}
	if err := os.MkdirAll(in.dir, 0o700); err != nil {
		return nil, fmt.Errorf("create vm dir: %w", err)
	}
	if in.Jailed {
		if err := os.MkdirAll(in.Root, 0o700); err != nil {
			os.RemoveAll(in.dir)
			return nil, fmt.Errorf("create jail root: %w", err)
		}
		if err := os.Chown(in.Root, p.opts.Jailer.UID, p.opts.Jailer.GID); err != nil {
			p.removeFiles(in)
			return nil, fmt.Errorf("chown jail root %s: %w", in.Root, err)
		}
	}
	return in, nil
}

func (p *Provider) saveRecord(in *instance) error {
	if err := atomicfile.WriteJSON(filepath.Join(in.dir, recordName), 0o600, in.record); err != nil {
		return fmt.Errorf("save vm record: %w", err)
	}
	return nil
}

// load finds a VM by ID, including one started by an earlier process.
func (p *Provider) load(id string) (*instance, error) {
	if vm.ValidateName("id", id) != nil {
		return nil, fmt.Errorf("firecracker vm %q: %w", id, vm.ErrNotFound)
	}
	dir := p.vmDir(id)
	b, err := os.ReadFile(filepath.Join(dir, recordName))
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("firecracker vm %s: %w", id, vm.ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("firecracker vm %s: %w", id, err)
	}
	in := &instance{dir: dir}
	if err := json.Unmarshal(b, &in.record); err != nil {
		return nil, fmt.Errorf("firecracker vm %s: corrupt record %s: %w", id, filepath.Join(dir, recordName), err)
	}
	return in, nil
}

// start launches the process for in and waits until its API answers.
func (p *Provider) start(ctx context.Context, in *instance) (*apiClient, error) {
	apiArg := in.fcPath(apiSocketName)
	var cmd *exec.Cmd
	if in.Jailed {
		j := p.opts.Jailer
		args := []string{
			"--id", in.ID,
			"--exec-file", p.opts.Binary,
			"--uid", strconv.Itoa(j.UID),
			"--gid", strconv.Itoa(j.GID),
			"--chroot-base-dir", j.ChrootBase,
			"--cgroup-version", strconv.Itoa(j.CgroupVersion),
		}
		if ns := p.netns(in); ns != "" {
			args = append(args, "--netns", ns)
		}
		args = append(args, j.ExtraArgs...)
		// The jailer passes --id itself; Firecracker refuses it twice.
		args = append(args, "--", "--api-sock", apiArg)
		cmd = exec.Command(p.opts.JailerBinary, args...)
	} else {
		cmd = exec.Command(p.opts.Binary, "--api-sock", apiArg, "--id", in.ID)
	}
	cmd.Dir = in.Root
	// Its own session: the VM must survive the daemon and its terminal.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	logFile, err := os.OpenFile(filepath.Join(in.dir, logName), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("firecracker %s: open log: %w", in.ID, err)
	}
	defer logFile.Close()
	cmd.Stdout, cmd.Stderr = logFile, logFile
	if in.ScratchNetns != "" {
		if _, err := tap.NewNetns(in.ScratchNetns, UnattachedTAP); err != nil {
			return nil, fmt.Errorf("firecracker %s: the TAP of its unattached interface: %w", in.ID, err)
		}
	}
	startCmd := cmd.Start
	if ns := p.netns(in); ns != "" && !in.Jailed {
		// Without the jailer's --netns the process is born in the
		// namespace that holds its TAP.
		startCmd = func() error { return tap.InNetns(ns, cmd.Start) }
	}
	if err := startCmd(); err != nil {
		return nil, fmt.Errorf("firecracker %s: start %s: %w", in.ID, cmd.Path, err)
	}
	c := &child{pid: cmd.Process.Pid, exited: make(chan struct{})}
	go func() {
		cmd.Wait()
		// Before exited closes: a Stop or Destroy waiting for the exit has
		// marked it as its own by then.
		p.processExited(in.ID, describeExit(cmd.ProcessState))
		close(c.exited)
	}()
	p.mu.Lock()
	p.children[in.ID] = c
	p.mu.Unlock()
	if err := os.WriteFile(filepath.Join(in.dir, pidName), []byte(strconv.Itoa(c.pid)+"\n"), 0o600); err != nil {
		return nil, fmt.Errorf("firecracker %s: write pid file: %w", in.ID, err)
	}
	p.log.Debug("process started", "vm", in.ID, "pid", c.pid)

	api := in.client()
	ctx, cancel := context.WithTimeout(ctx, p.opts.StartTimeout)
	defer cancel()
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		if _, err := os.Stat(in.hostPath(apiSocketName)); err == nil {
			var info instanceInfo
			if err := api.do(ctx, "GET", "/", nil, &info); err == nil {
				return api, nil
			}
		}
		select {
		case <-c.exited:
			return nil, fmt.Errorf("firecracker %s: process exited before its API socket opened: %s", in.ID, p.logTail(in))
		case <-ctx.Done():
			return nil, fmt.Errorf("firecracker %s: API socket %s did not answer: %w", in.ID, in.hostPath(apiSocketName), ctx.Err())
		case <-tick.C:
		}
	}
}

func (p *Provider) logTail(in *instance) string {
	b, _ := os.ReadFile(filepath.Join(in.dir, logName))
	b = bytes.TrimSpace(b)
	if len(b) > 400 {
		b = b[len(b)-400:]
	}
	if len(b) == 0 {
		return "no output"
	}
	return string(b)
}

// runningVersion asks the process which Firecracker it is.
func runningVersion(ctx context.Context, api *apiClient) (string, version, error) {
	var v firecrackerVersion
	if err := api.do(ctx, "GET", "/version", nil, &v); err != nil {
		return "", version{}, err
	}
	parsed, err := parseVersion(v.Version)
	if err != nil {
		return "", version{}, fmt.Errorf("firecracker %s: %w", api.vmID, err)
	}
	return v.Version, parsed, nil
}

// Create implements vm.Provider: it configures a fresh process and starts
// the guest.
func (p *Provider) Create(ctx context.Context, spec vm.Spec) (vm.VM, error) {
	if err := spec.Validate(); err != nil {
		return vm.VM{}, err
	}
	if spec.Kernel == "" {
		return vm.VM{}, &vm.FieldError{Field: "kernel", Value: "", Reason: "Firecracker needs a kernel image"}
	}
	if err := p.checkNIC(spec.NIC); err != nil {
		return vm.VM{}, err
	}
	if err := checkELF(spec.Kernel); err != nil {
		return vm.VM{}, &vm.FieldError{Field: "kernel", Value: spec.Kernel, Reason: err.Error()}
	}
	if spec.Cmdline == "" {
		spec.Cmdline = DefaultBootArgs
	}
	if err := ctx.Err(); err != nil {
		return vm.VM{}, fmt.Errorf("create firecracker vm: %w", err)
	}
	in, err := p.newInstance(spec)
	if err != nil {
		return vm.VM{}, err
	}
	if err := p.boot(ctx, in); err != nil {
		p.discard(in)
		return vm.VM{}, fmt.Errorf("create firecracker vm: %w", err)
	}
	p.log.Info("vm created", "vm", in.ID, "name", spec.Name)
	p.handOver(in.ID)
	return p.Inspect(ctx, in.ID)
}

func (p *Provider) boot(ctx context.Context, in *instance) error {
	spec := in.Spec
	kernel, initrd, disk := spec.Kernel, spec.Initrd, spec.DataDisk
	if in.Jailed {
		var err error
		if kernel, err = p.linkIntoJail(in, spec.Kernel, "vmlinux", false); err != nil {
			return err
		}
		if initrd != "" {
			if initrd, err = p.linkIntoJail(in, spec.Initrd, "initrd", false); err != nil {
				return err
			}
		}
		if disk != "" {
			// The guest's writes must reach the caller's disk: link only.
			if disk, err = p.linkIntoJail(in, spec.DataDisk, cloneDiskName, true); err != nil {
				return err
			}
			// Firecracker, no longer root, opens the disk read-write.
			if err := os.Chown(spec.DataDisk, p.opts.Jailer.UID, p.opts.Jailer.GID); err != nil {
				return fmt.Errorf("hand data disk %s to the jail's user: %w", spec.DataDisk, err)
			}
		}
	}
	in.DataDiskPath = spec.DataDisk
	drives, err := p.imageDrives(in)
	if err != nil {
		return err
	}
	in.Spec.Cmdline = guestDiskCmdline(in.Spec.Cmdline, drives)
	spec.Cmdline = in.Spec.Cmdline
	if err := p.saveRecord(in); err != nil {
		return err
	}
	api, err := p.start(ctx, in)
	if err != nil {
		return err
	}
	defer api.close()
	if err := api.do(ctx, "PUT", "/machine-config", machineConfig{VCPUCount: spec.VCPUs, MemMiB: spec.MemoryMiB}, nil); err != nil {
		return err
	}
	if err := api.do(ctx, "PUT", "/boot-source", bootSource{KernelImagePath: kernel, InitrdPath: initrd, BootArgs: spec.Cmdline}, nil); err != nil {
		return err
	}
	// The image's drives first: the guest names them in this order.
	for _, d := range drives {
		body := drive{DriveID: d.id, PathOnHost: d.path, IsReadOnly: d.readOnly}
		if err := api.do(ctx, "PUT", "/drives/"+d.id, body, nil); err != nil {
			return err
		}
	}
	if disk != "" {
		d := drive{DriveID: dataDriveID, PathOnHost: disk}
		if err := api.do(ctx, "PUT", "/drives/"+dataDriveID, d, nil); err != nil {
			return err
		}
	}
	ifaces := p.interfaces(in)
	for _, n := range ifaces {
		body := networkInterface{IfaceID: n.ID, HostDevName: n.HostDevName, GuestMAC: n.GuestMAC}
		if err := api.do(ctx, "PUT", "/network-interfaces/"+n.ID, body, nil); err != nil {
			return err
		}
	}
	// A relative path: see vsockSocketName.
	vsockPath := vsockSocketName
	if in.Jailed {
		vsockPath = in.fcPath(vsockSocketName)
	}
	if err := api.do(ctx, "PUT", "/vsock", vsockDevice{GuestCID: guestCID, UDSPath: vsockPath}, nil); err != nil {
		return err
	}
	if !spec.NoBalloon {
		balloon := balloonDevice{AmountMiB: 0, DeflateOnOOM: true, StatsPollingIntervalS: 1}
		if err := api.do(ctx, "PUT", "/balloon", balloon, nil); err != nil {
			return err
		}
	}
	if p.opts.MMDS != nil && len(ifaces) > 0 {
		cfg := mmdsConfig{Version: p.opts.MMDS.Version, IPv4Address: p.opts.MMDS.IPv4Address}
		for _, n := range ifaces {
			cfg.NetworkInterfaces = append(cfg.NetworkInterfaces, n.ID)
		}
		if err := api.do(ctx, "PUT", "/mmds/config", cfg, nil); err != nil {
			return err
		}
		if p.opts.MMDS.Metadata != nil {
			if data := p.opts.MMDS.Metadata(in.ID); data != nil {
				if err := api.do(ctx, "PUT", "/mmds", data, nil); err != nil {
					return err
				}
			}
		}
	}
	return api.do(ctx, "PUT", "/actions", instanceAction{ActionType: "InstanceStart"}, nil)
}

// checkELF catches the most common mistake: handing Firecracker the
// distribution's compressed bzImage.
func checkELF(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	magic := make([]byte, 4)
	if _, err := io.ReadFull(f, magic); err != nil || string(magic) != "\x7fELF" {
		return errors.New("not an uncompressed ELF vmlinux, which Firecracker on x86_64 requires (PrepareBoot extracts it from a bzImage)")
	}
	return nil
}

// linkIntoJail makes src visible inside the jail as name and returns the
// path Firecracker must use. A hard link shares the file; when src is on
// another file system it is copied unless mustShare.
func (p *Provider) linkIntoJail(in *instance, src, name string, mustShare bool) (string, error) {
	dst := in.hostPath(name)
	if err := os.Link(src, dst); err != nil {
		if mustShare {
			return "", fmt.Errorf("link %s into the jail at %s (the disk must be on the jail's file system): %w", src, dst, err)
		}
		if err := copyFile(src, dst); err != nil {
			return "", fmt.Errorf("copy %s into the jail: %w", src, err)
		}
		if err := os.Chown(dst, p.opts.Jailer.UID, p.opts.Jailer.GID); err != nil {
			return "", fmt.Errorf("chown %s: %w", dst, err)
		}
	}
	return in.fcPath(name), nil
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		os.Remove(dst)
		return err
	}
	return out.Close()
}

// Inspect implements vm.Provider.
func (p *Provider) Inspect(ctx context.Context, id string) (vm.VM, error) {
	in, err := p.load(id)
	if err != nil {
		return vm.VM{}, err
	}
	return p.inspect(ctx, in), nil
}

func (p *Provider) inspect(ctx context.Context, in *instance) vm.VM {
	v := vm.VM{
		ID: in.ID, Provider: p.Name(), Spec: in.Spec, Dir: in.dir,
		Snapshot: in.Snapshot, CreatedAt: in.CreatedAt, Status: vm.StatusStopped,
	}
	pid := p.alivePID(in)
	if pid == 0 {
		return v
	}
	v.PID = pid
	p.watchAdopted(in, pid)
	api := in.client()
	defer api.close()
	var info instanceInfo
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if err := api.do(ctx, "GET", "/", nil, &info); err != nil {
		v.Status = vm.StatusUnknown
		return v
	}
	switch info.State {
	case "Running":
		v.Status = vm.StatusRunning
	case "Paused":
		v.Status = vm.StatusPaused
	case "Not started":
		v.Status = vm.StatusCreating
	default:
		v.Status = vm.StatusUnknown
	}
	return v
}

// alivePID returns the VM's process ID while it runs, 0 once it is gone.
func (p *Provider) alivePID(in *instance) int {
	p.mu.Lock()
	c := p.children[in.ID]
	p.mu.Unlock()
	if c != nil {
		select {
		case <-c.exited:
			return 0
		default:
			return c.pid
		}
	}
	b, err := os.ReadFile(filepath.Join(in.dir, pidName))
	if err != nil {
		return 0
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return 0
	}
	// The pid may have been reused since: it is ours only if its command
	// line names this VM.
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil || !bytes.Contains(cmdline, []byte(in.ID)) {
		return 0
	}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err == nil {
		if i := bytes.LastIndexByte(stat, ')'); i > 0 && i+2 < len(stat) && stat[i+2] == 'Z' {
			return 0
		}
	}
	return pid
}

// List implements vm.Provider: every VM directory, including those left by
// an earlier process.
func (p *Provider) List(ctx context.Context) ([]vm.VM, error) {
	entries, err := os.ReadDir(filepath.Join(p.opts.StateDir, "vms"))
	if err != nil {
		return nil, fmt.Errorf("list firecracker vms: %w", err)
	}
	var out []vm.VM
	for _, e := range entries {
		if !e.IsDir() {
			continue
		}
		in, err := p.load(e.Name())
		if err != nil {
			if !errors.Is(err, vm.ErrNotFound) {
				p.log.Warn("skipping unreadable vm dir", "dir", e.Name(), "err", err)
			}
			continue
		}
		out = append(out, p.inspect(ctx, in))
	}
	return out, nil
}

// running loads a VM whose process is alive.
func (p *Provider) running(id string) (*instance, error) {
	in, err := p.load(id)
	if err != nil {
		return nil, err
	}
	if p.alivePID(in) == 0 {
		return nil, fmt.Errorf("firecracker vm %s is stopped: %w", id, vm.ErrInvalidState)
	}
	return in, nil
}

func (p *Provider) setState(ctx context.Context, id, state string) error {
	in, err := p.running(id)
	if err != nil {
		return err
	}
	api := in.client()
	defer api.close()
	if err := api.do(ctx, "PATCH", "/vm", vmState{State: state}, nil); err != nil {
		var apiErr *APIError
		if errors.As(err, &apiErr) {
			return fmt.Errorf("%w: %w", err, vm.ErrInvalidState)
		}
		return err
	}
	return nil
}

// Pause implements vm.Provider.
func (p *Provider) Pause(ctx context.Context, id string) error {
	return p.setState(ctx, id, "Paused")
}

// Resume implements vm.Provider. A suspended VM stays paused: its data disk
// now belongs to the snapshot's one restore.
func (p *Provider) Resume(ctx context.Context, id string) error {
	if in, err := p.load(id); err == nil && in.SuspendedTo != "" {
		return fmt.Errorf("resume firecracker vm %s: suspended to snapshot %s: %w", id, in.SuspendedTo, vm.ErrInvalidState)
	}
	return p.setState(ctx, id, "Resumed")
}

// Stop implements vm.Provider: Ctrl-Alt-Del (the guest, booted with
// reboot=k, ends the process as it reboots), then SIGKILL after grace.
func (p *Provider) Stop(ctx context.Context, id string, grace time.Duration) error {
	in, err := p.load(id)
	if err != nil {
		return err
	}
	pid := p.alivePID(in)
	if pid == 0 {
		return nil
	}
	defer p.expectExit(in)()
	api := in.client()
	defer api.close()
	var info instanceInfo
	// A suspended VM must not run again, not even to shut down.
	graceful := grace > 0 && in.SuspendedTo == ""
	if err := api.do(ctx, "GET", "/", nil, &info); err == nil && graceful {
		if info.State == "Paused" {
			// A paused guest cannot react to the key press.
			if err := api.do(ctx, "PATCH", "/vm", vmState{State: "Resumed"}, nil); err != nil {
				p.log.Warn("resume before graceful stop failed", "vm", id, "err", err)
			}
		}
		if info.State != "Not started" {
			if err := api.do(ctx, "PUT", "/actions", instanceAction{ActionType: "SendCtrlAltDel"}, nil); err != nil {
				p.log.Warn("SendCtrlAltDel failed; killing", "vm", id, "err", err)
			} else if p.waitExit(ctx, in, grace) {
				p.log.Info("vm stopped", "vm", id)
				return nil
			}
		}
	}
	if err := p.kill(ctx, in); err != nil {
		return err
	}
	p.log.Info("vm killed", "vm", id)
	return nil
}

// waitExit reports whether the process ended within d.
func (p *Provider) waitExit(ctx context.Context, in *instance, d time.Duration) bool {
	deadline := time.NewTimer(d)
	defer deadline.Stop()
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		if p.alivePID(in) == 0 {
			return true
		}
		select {
		case <-deadline.C:
			return false
		case <-ctx.Done():
			return false
		case <-tick.C:
		}
	}
}

func (p *Provider) kill(ctx context.Context, in *instance) error {
	pid := p.alivePID(in)
	if pid == 0 {
		return nil
	}
	p.expectExit(in)
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("kill firecracker %s (pid %d): %w", in.ID, pid, err)
	}
	// SIGKILL cannot be ignored; the wait only covers the kernel's teardown.
	if !p.waitExit(context.WithoutCancel(ctx), in, 10*time.Second) {
		return fmt.Errorf("firecracker %s (pid %d) survived SIGKILL", in.ID, pid)
	}
	return nil
}

// Destroy implements vm.Provider.
func (p *Provider) Destroy(ctx context.Context, id string) error {
	in, err := p.load(id)
	if err != nil {
		return err
	}
	if err := p.kill(ctx, in); err != nil {
		return err
	}
	if err := p.removeFiles(in); err != nil {
		return fmt.Errorf("destroy firecracker vm %s: %w", id, err)
	}
	p.mu.Lock()
	delete(p.children, id)
	p.mu.Unlock()
	p.forgetExits(id)
	p.log.Info("vm destroyed", "vm", id)
	return nil
}

// discard undoes a failed Create or Restore.
func (p *Provider) discard(in *instance) {
	if err := p.kill(context.Background(), in); err != nil {
		p.log.Warn("cleanup after failure", "vm", in.ID, "err", err)
	}
	if err := p.removeFiles(in); err != nil {
		p.log.Warn("cleanup after failure", "vm", in.ID, "err", err)
	}
	p.mu.Lock()
	delete(p.children, in.ID)
	p.mu.Unlock()
	p.forgetExits(in.ID)
}

func (p *Provider) removeFiles(in *instance) error {
	// A cgroup left behind costs little; a VM that cannot be destroyed
	// because of one would stay listed for ever.
	if err := removeCgroups(in.Cgroups); err != nil {
		p.log.Warn("remove the jailer's cgroups", "vm", in.ID, "err", err)
	}
	var errs []error
	if in.ScratchNetns != "" {
		errs = append(errs, tap.RemoveNetns(in.ScratchNetns))
	}
	if in.JailDir != "" {
		errs = append(errs, os.RemoveAll(in.JailDir))
	}
	errs = append(errs, os.RemoveAll(in.dir))
	return errors.Join(errs...)
}

// Snapshot implements vm.Snapshotter: a full snapshot of a paused VM into
// dir, with the Firecracker version that wrote it.
func (p *Provider) Snapshot(ctx context.Context, id, dir string) (vm.Snapshot, error) {
	in, err := p.running(id)
	if err != nil {
		return vm.Snapshot{}, err
	}
	dir, err = filepath.Abs(dir)
	if err != nil {
		return vm.Snapshot{}, fmt.Errorf("snapshot %s: %w", id, err)
	}
	api := in.client()
	defer api.close()
	var info instanceInfo
	if err := api.do(ctx, "GET", "/", nil, &info); err != nil {
		return vm.Snapshot{}, fmt.Errorf("snapshot %s: %w", id, err)
	}
	if info.State != "Paused" {
		return vm.Snapshot{}, fmt.Errorf("snapshot %s: the vm is %s, pause it first: %w", id, info.State, vm.ErrInvalidState)
	}
	if in.SuspendedTo != "" {
		return vm.Snapshot{}, fmt.Errorf("snapshot %s: suspended to snapshot %s: %w", id, in.SuspendedTo, vm.ErrInvalidState)
	}
	raw, _, err := runningVersion(ctx, api)
	if err != nil {
		return vm.Snapshot{}, fmt.Errorf("snapshot %s: %w", id, err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return vm.Snapshot{}, fmt.Errorf("snapshot %s: %w", id, err)
	}
	stateName, memName := snapStateName, snapMemName
	statePath, memPath := filepath.Join(dir, stateName), filepath.Join(dir, memName)
	if in.Jailed {
		// Firecracker can write only inside its jail; move the files out.
		statePath, memPath = in.fcPath("snapshot."+stateName), in.fcPath("snapshot."+memName)
	}
	req := snapshotCreate{SnapshotType: "Full", SnapshotPath: statePath, MemFilePath: memPath}
	if err := api.do(ctx, "PUT", "/snapshot/create", req, nil); err != nil {
		return vm.Snapshot{}, fmt.Errorf("snapshot %s into %s: %w", id, dir, err)
	}
	if in.Jailed {
		for _, name := range []string{stateName, memName} {
			if err := moveFile(in.hostPath("snapshot."+name), filepath.Join(dir, name)); err != nil {
				return vm.Snapshot{}, fmt.Errorf("snapshot %s: %w", id, err)
			}
		}
	}
	snap := vm.Snapshot{
		ID: newID("fcsnap-"), Provider: p.Name(), Dir: dir, Spec: in.Spec,
		CreatedAt: time.Now().UTC(), ProviderVersion: raw, SharedMemory: true,
		Meta: map[string]string{"vmstate": stateName, "memory": memName, "source_vm": id},
	}
	if in.DataDiskPath != "" {
		// Each clone gets its own copy of the disk as it was at snapshot
		// time (the VM is paused, so it is consistent with the memory).
		if err := copyFile(in.DataDiskPath, filepath.Join(dir, snapDiskName)); err != nil {
			return vm.Snapshot{}, fmt.Errorf("snapshot %s: copy data disk: %w", id, err)
		}
		snap.Meta["data_disk"] = snapDiskName
	}
	diskMeta, err := freezeWritableDisk(in, dir)
	if err != nil {
		return vm.Snapshot{}, fmt.Errorf("snapshot %s: %w", id, err)
	}
	for k, v := range diskMeta {
		snap.Meta[k] = v
	}
	b, _ := json.MarshalIndent(snap, "", "  ")
	if err := os.WriteFile(filepath.Join(dir, snapMetaName), b, 0o600); err != nil {
		return vm.Snapshot{}, fmt.Errorf("snapshot %s: %w", id, err)
	}
	p.log.Info("snapshot created", "vm", id, "dir", dir, "firecracker", raw)
	return snap, nil
}

func moveFile(src, dst string) error {
	if err := os.Rename(src, dst); err == nil {
		return nil
	}
	if err := copyFile(src, dst); err != nil {
		return err
	}
	return os.Remove(src)
}

// Restore implements vm.Snapshotter: a fresh process loads the snapshot
// (memory file mapped privately, so clones share its clean pages) and the
// VM is returned paused.
func (p *Provider) Restore(ctx context.Context, snap vm.Snapshot) (vm.VM, error) {
	if snap.Provider != p.Name() {
		return vm.VM{}, &vm.FieldError{Field: "snapshot.provider", Value: snap.Provider, Reason: "not a Firecracker snapshot"}
	}
	stateName, memName := snap.Meta["vmstate"], snap.Meta["memory"]
	if stateName == "" || memName == "" {
		return vm.VM{}, &vm.FieldError{Field: "snapshot.meta", Value: snap.Meta, Reason: "names no vmstate or memory file"}
	}
	if singleuse.IsSingleUse(snap.Dir) {
		return p.restoreSuspended(ctx, snap)
	}
	for _, name := range []string{stateName, memName} {
		if _, err := os.Stat(filepath.Join(snap.Dir, name)); errors.Is(err, os.ErrNotExist) {
			return vm.VM{}, fmt.Errorf("restore from %s: snapshot file %s missing: %w", snap.Dir, name, vm.ErrNotFound)
		} else if err != nil {
			return vm.VM{}, fmt.Errorf("restore from %s: %w", snap.Dir, err)
		}
	}
	if err := ctx.Err(); err != nil {
		return vm.VM{}, fmt.Errorf("restore from %s: %w", snap.Dir, err)
	}
	spec := snap.Spec
	if err := p.checkNIC(spec.NIC); err != nil {
		// A template built where the provider could back its interface
		// (root): one built here would have none.
		return vm.VM{}, fmt.Errorf("restore from %s: %w (rebuild the template): %w", snap.Dir, err, vm.ErrIncompatible)
	}
	spec.DataDisk, spec.WritableDisk = "", ""
	in, err := p.newInstance(spec)
	if err != nil {
		return vm.VM{}, err
	}
	in.Snapshot = snap.ID
	if err := p.restore(ctx, in, snap); err != nil {
		p.discard(in)
		return vm.VM{}, fmt.Errorf("restore from %s: %w", snap.Dir, err)
	}
	p.log.Info("vm restored", "vm", in.ID, "snapshot", snap.ID)
	p.handOver(in.ID)
	return p.Inspect(ctx, in.ID)
}

func (p *Provider) restore(ctx context.Context, in *instance, snap vm.Snapshot) error {
	statePath, memPath, err := p.snapshotFiles(in, snap)
	if err != nil {
		return err
	}
	if err := p.cloneImageDisks(in, snap); err != nil {
		return err
	}
	if name := snap.Meta["data_disk"]; name != "" {
		// Firecracker reopens the drive at its snapshotted path; the clone's
		// own copy replaces it before the guest runs.
		if err := copyFile(filepath.Join(snap.Dir, name), in.hostPath(cloneDiskName)); err != nil {
			return fmt.Errorf("copy data disk for clone: %w", err)
		}
		if in.Jailed {
			if err := os.Chown(in.hostPath(cloneDiskName), p.opts.Jailer.UID, p.opts.Jailer.GID); err != nil {
				return err
			}
		}
		in.DataDiskPath = in.hostPath(cloneDiskName)
		in.Spec.DataDisk = in.DataDiskPath
	}
	api, raw, ver, err := p.startForLoad(ctx, in)
	if err != nil {
		return err
	}
	defer api.close()
	if snap.ProviderVersion != "" && snap.ProviderVersion != raw {
		return fmt.Errorf("snapshot %s was taken with Firecracker %s but %s is running: %w (%w)", snap.ID, snap.ProviderVersion, raw, vm.ErrIncompatible, vm.ErrInvalidState)
	}
	load := snapshotLoad{
		SnapshotPath: statePath,
		MemBackend:   memoryBackend{BackendType: "File", BackendPath: memPath},
		ResumeVM:     false,
	}
	if overrides := p.overrides(in); ver.atLeast(1, 12) {
		load.NetworkOverrides = overrides
	} else if len(overrides) > 0 {
		p.log.Warn("Firecracker before 1.12 cannot override a clone's TAP device; the clone reuses the template's", "vm", in.ID, "firecracker", raw)
	}
	load.VsockOverride = vsockOverrideFor(in, ver)
	if err := api.do(ctx, "PUT", "/snapshot/load", load, nil); err != nil {
		return err
	}
	if in.DataDiskPath != "" {
		d := partialDrive{DriveID: dataDriveID, PathOnHost: in.fcPath(cloneDiskName)}
		if err := api.do(ctx, "PATCH", "/drives/"+dataDriveID, d, nil); err != nil {
			return err
		}
	}
	return nil
}

// snapshotFiles returns the paths Firecracker loads snap's state and memory
// from: in the snapshot's directory, or linked into in's jail. The memory
// file must stay the same inode for sharing to work: link, and copy only
// across file systems.
func (p *Provider) snapshotFiles(in *instance, snap vm.Snapshot) (statePath, memPath string, err error) {
	statePath = filepath.Join(snap.Dir, snap.Meta["vmstate"])
	memPath = filepath.Join(snap.Dir, snap.Meta["memory"])
	if !in.Jailed {
		return statePath, memPath, nil
	}
	if statePath, err = p.linkIntoJail(in, statePath, "snapshot.vmstate", false); err != nil {
		return "", "", err
	}
	if memPath, err = p.linkIntoJail(in, memPath, "snapshot.memory", false); err != nil {
		return "", "", err
	}
	return statePath, memPath, nil
}

// startForLoad records in and starts its Firecracker process, which waits
// for a snapshot to load. It returns the API client (the caller closes it)
// and the running Firecracker's version.
func (p *Provider) startForLoad(ctx context.Context, in *instance) (_ *apiClient, raw string, ver version, err error) {
	if err := p.saveRecord(in); err != nil {
		return nil, "", version{}, err
	}
	api, err := p.start(ctx, in)
	if err != nil {
		return nil, "", version{}, err
	}
	raw, ver, err = runningVersion(ctx, api)
	if err != nil {
		api.close()
		return nil, "", version{}, err
	}
	return api, raw, ver, nil
}

// vsockOverrideFor points a loaded snapshot's vsock device at in's own
// socket. Firecracker before 1.16 cannot: it reopens the socket path the
// snapshot recorded.
func vsockOverrideFor(in *instance, ver version) *vsockOverride {
	if !ver.atLeast(1, 16) {
		return nil
	}
	if in.Jailed {
		return &vsockOverride{UDSPath: in.fcPath(vsockSocketName)}
	}
	return &vsockOverride{UDSPath: vsockSocketName}
}

// ballooned loads a running VM that has a balloon device. A clone has the
// devices of the VM its snapshot came from, so Spec.NoBalloon carries over.
func (p *Provider) ballooned(id string) (*instance, error) {
	in, err := p.running(id)
	if err != nil {
		return nil, err
	}
	if in.Spec.NoBalloon {
		return nil, fmt.Errorf("balloon of firecracker vm %s: created without a balloon device: %w", id, vm.ErrUnsupported)
	}
	return in, nil
}

// SetBalloon implements vm.Ballooner: the guest may use targetMiB, the
// balloon holds the rest.
func (p *Provider) SetBalloon(ctx context.Context, id string, targetMiB int) error {
	in, err := p.ballooned(id)
	if err != nil {
		return err
	}
	if err := vm.ValidateRange("target_mib", targetMiB, 1, in.Spec.MemoryMiB); err != nil {
		return err
	}
	api := in.client()
	defer api.close()
	return api.do(ctx, "PATCH", "/balloon", balloonUpdate{AmountMiB: in.Spec.MemoryMiB - targetMiB}, nil)
}

// BalloonStats implements vm.Ballooner, in terms of guest memory (not
// balloon size) like SetBalloon.
func (p *Provider) BalloonStats(ctx context.Context, id string) (vm.BalloonStats, error) {
	in, err := p.ballooned(id)
	if err != nil {
		return vm.BalloonStats{}, err
	}
	api := in.client()
	defer api.close()
	var st balloonStatistics
	if err := api.do(ctx, "GET", "/balloon/statistics", nil, &st); err != nil {
		return vm.BalloonStats{}, err
	}
	return vm.BalloonStats{
		TargetMiB:    in.Spec.MemoryMiB - st.TargetMiB,
		ActualMiB:    in.Spec.MemoryMiB - st.ActualMiB,
		TotalMiB:     int(st.TotalMemory >> 20),
		FreeMiB:      int(st.FreeMemory >> 20),
		AvailableMiB: int(st.AvailableMemory >> 20),
	}, nil
}

// DialAgent implements vm.AgentDialer over Firecracker's vsock: connect to
// the VM's vsock socket, ask for the agent's port, and hand back the stream.
func (p *Provider) DialAgent(ctx context.Context, id string) (net.Conn, error) {
	in, err := p.running(id)
	if err != nil {
		return nil, err
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", in.hostPath(vsockSocketName))
	if err != nil {
		return nil, fmt.Errorf("dial agent of %s: %w", id, err)
	}
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	line, err := vsockHandshake(conn, AgentPort)
	if !stop() || ctx.Err() != nil {
		conn.Close()
		return nil, fmt.Errorf("dial agent of %s: %w", id, context.Cause(ctx))
	}
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("dial agent of %s: vsock CONNECT %d: %w", id, AgentPort, err)
	}
	if !strings.HasPrefix(line, "OK ") {
		conn.Close()
		return nil, fmt.Errorf("dial agent of %s: vsock CONNECT %d answered %q", id, AgentPort, line)
	}
	return conn, nil
}

// vsockHandshake sends "CONNECT <port>\n" and reads the answer line one byte
// at a time so nothing the agent sends after it is swallowed.
func vsockHandshake(conn net.Conn, port int) (string, error) {
	if _, err := fmt.Fprintf(conn, "CONNECT %d\n", port); err != nil {
		return "", err
	}
	var line []byte
	one := make([]byte, 1)
	for len(line) < 64 {
		if _, err := conn.Read(one); err != nil {
			if errors.Is(err, io.EOF) {
				return "", errors.New("connection closed: nothing listens on that port in the guest")
			}
			return "", err
		}
		if one[0] == '\n' {
			return string(line), nil
		}
		line = append(line, one[0])
	}
	return "", errors.New("answer line too long")
}
