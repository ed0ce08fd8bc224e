package fakefirecracker

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
)

// AgentPort is the vsock port the guest agent listens on.
const AgentPort = 1024

// Options configure a fake Firecracker process.
type Options struct {
	ID   string
	Spec *Spec
	// Version is what GET /version reports and what snapshots record;
	// the description's version when empty. Request fields newer than it
	// are rejected as unknown, as an older Firecracker would.
	Version string
	// Agent serves one host connection to the guest agent. Nil closes every
	// connection after the handshake.
	Agent func(ctx context.Context, conn io.ReadWriteCloser) error
	// IgnoreCtrlAltDel makes the guest ignore SendCtrlAltDel, like a guest
	// that hangs on shutdown.
	IgnoreCtrlAltDel bool
	Logger           *slog.Logger
}

type machineState int

const (
	notStarted machineState = iota
	running
	paused
)

func (s machineState) String() string {
	return [...]string{"Not started", "Running", "Paused"}[s]
}

// config is everything a client configured, and what a snapshot carries.
type config struct {
	MachineConfig map[string]any            `json:"machine-config"`
	BootSource    map[string]any            `json:"boot-source,omitempty"`
	Drives        map[string]map[string]any `json:"drives,omitempty"`
	Network       map[string]map[string]any `json:"network-interfaces,omitempty"`
	Vsock         map[string]any            `json:"vsock,omitempty"`
	Balloon       map[string]any            `json:"balloon,omitempty"`
	MMDSConfig    map[string]any            `json:"mmds-config,omitempty"`
	MMDS          any                       `json:"mmds,omitempty"`
}

// snapshotMagic starts every vmstate file this fake writes.
const snapshotMagic = "fakefirecracker-vmstate"

type vmstate struct {
	Magic   string `json:"magic"`
	Version string `json:"version"`
	Config  config `json:"config"`
}

// Server is one fake Firecracker process: its API and its guest.
type Server struct {
	opts Options
	log  *slog.Logger

	mu       sync.Mutex
	resumed  *sync.Cond // broadcast on every state change
	state    machineState
	fresh    bool // nothing configured but the logger and metrics
	unusable string
	cfg      config
	logger   bool
	metrics  bool
	vsockLn  net.Listener
	conns    map[net.Conn]bool
	// drives are the files the guest's block devices are backed by, open
	// for the process's life as Firecracker keeps them: a file replaced
	// at the same path afterwards is not what the guest writes.
	drives   map[string]*os.File
	done     chan struct{}
	doneOnce sync.Once
	ctx      context.Context
	cancel   context.CancelFunc
}

// New returns a fake Firecracker in its initial, unconfigured state.
func New(opts Options) *Server {
	if opts.Version == "" {
		opts.Version = opts.Spec.Version
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &Server{
		opts:  opts,
		log:   log,
		fresh: true,
		cfg: config{
			MachineConfig: map[string]any{"vcpu_count": 1.0, "mem_size_mib": 128.0, "smt": false, "track_dirty_pages": false},
			Drives:        map[string]map[string]any{},
			Network:       map[string]map[string]any{},
		},
		conns:  map[net.Conn]bool{},
		drives: map[string]*os.File{},
		done:   make(chan struct{}),
		ctx:    ctx,
		cancel: cancel,
	}
	s.resumed = sync.NewCond(&s.mu)
	return s
}

// Done is closed when the guest has powered off: the process should exit.
func (s *Server) Done() <-chan struct{} { return s.done }

// Close stops the guest: closes the vsock socket and every connection.
func (s *Server) Close() {
	s.powerOff()
}

func (s *Server) powerOff() {
	s.doneOnce.Do(func() {
		s.cancel()
		s.mu.Lock()
		if s.vsockLn != nil {
			s.vsockLn.Close()
		}
		for c := range s.conns {
			c.Close()
		}
		s.state = notStarted
		s.resumed.Broadcast()
		s.mu.Unlock()
		close(s.done)
	})
}

type fault struct{ msg string }

func faultf(format string, args ...any) *fault { return &fault{fmt.Sprintf(format, args...)} }

func writeFault(w http.ResponseWriter, status int, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(map[string]string{"fault_message": msg})
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusOK)
	json.NewEncoder(w).Encode(v)
}

// newerFields lists request fields by the Firecracker release that
// introduced them, so the fake can play an older release.
var newerFields = []struct {
	path, field string
	since       string
}{
	{"/snapshot/load", "network_overrides", "1.12.0"},
	{"/snapshot/load", "vsock_override", "1.16.0"},
	{"/snapshot/load", "clock_realtime", "1.16.0"},
}

func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(io.LimitReader(r.Body, 1<<20))
	if err != nil {
		writeFault(w, http.StatusBadRequest, "read request body: "+err.Error())
		return
	}
	r.Body = io.NopCloser(bytes.NewReader(body))
	if err := s.opts.Spec.Validate(r); err != nil {
		s.log.Info("rejected by the API description", "method", r.Method, "path", r.URL.Path, "err", err)
		writeFault(w, http.StatusBadRequest, err.Error())
		return
	}
	var fields map[string]any
	if len(body) > 0 {
		if err := json.Unmarshal(body, &fields); err != nil {
			writeFault(w, http.StatusBadRequest, "An error occurred when deserializing the json body of a request: "+err.Error())
			return
		}
	}
	for _, nf := range newerFields {
		if r.URL.Path == nf.path && fields[nf.field] != nil && versionLess(s.opts.Version, nf.since) {
			writeFault(w, http.StatusBadRequest, fmt.Sprintf("An error occurred when deserializing the json body of a request: unknown field `%s` (Firecracker %s)", nf.field, s.opts.Version))
			return
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.unusable != "" && r.Method != http.MethodGet {
		writeFault(w, http.StatusBadRequest, "The microVM is unusable: "+s.unusable)
		return
	}
	out, f := s.handle(r.Method, r.URL.Path, fields)
	if f != nil {
		s.log.Info("request failed", "method", r.Method, "path", r.URL.Path, "fault", f.msg)
		writeFault(w, http.StatusBadRequest, f.msg)
		return
	}
	if out != nil {
		writeJSON(w, out)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

var (
	errAfterStart  = faultf("The requested operation is not supported after starting the microVM.")
	errBeforeStart = faultf("The requested operation is not supported before starting the microVM.")
)

// handle runs one validated request with s.mu held.
func (s *Server) handle(method, path string, body map[string]any) (any, *fault) {
	seg := strings.Split(strings.Trim(path, "/"), "/")
	preboot := func() *fault {
		if s.state != notStarted {
			return errAfterStart
		}
		s.fresh = false
		return nil
	}
	postboot := func() *fault {
		if s.state == notStarted {
			return errBeforeStart
		}
		return nil
	}
	switch method + " " + seg[0] {
	case "GET ":
		return map[string]any{"app_name": "Firecracker", "id": s.opts.ID, "state": s.state.String(), "vmm_version": s.opts.Version}, nil
	case "GET version":
		return map[string]any{"firecracker_version": s.opts.Version}, nil
	case "GET machine-config":
		return s.cfg.MachineConfig, nil
	case "GET vm":
		return s.cfg, nil
	case "PUT logger", "PUT metrics":
		if s.state != notStarted {
			return nil, errAfterStart
		}
		already := &s.logger
		if seg[0] == "metrics" {
			already = &s.metrics
		}
		if *already {
			return nil, faultf("Reinitialization of %s not allowed.", seg[0])
		}
		*already = true
		return nil, nil
	case "PUT machine-config", "PATCH machine-config":
		if f := preboot(); f != nil {
			return nil, f
		}
		next := map[string]any{}
		if method == "PATCH" {
			for k, v := range s.cfg.MachineConfig {
				next[k] = v
			}
		} else {
			next["smt"], next["track_dirty_pages"] = false, false
		}
		for k, v := range body {
			next[k] = v
		}
		if vcpus, _ := next["vcpu_count"].(float64); next["smt"] == true && vcpus > 1 && int(vcpus)%2 == 1 {
			return nil, faultf("The vCPU number is invalid! The vCPU number can only be 1 or an even number when SMT is enabled.")
		}
		if mem, _ := next["mem_size_mib"].(float64); mem < 1 {
			return nil, faultf("The memory size (MiB) is invalid.")
		}
		s.cfg.MachineConfig = next
		return nil, nil
	case "PUT boot-source":
		if f := preboot(); f != nil {
			return nil, f
		}
		if err := readable(body["kernel_image_path"]); err != nil {
			return nil, faultf("The kernel file cannot be opened: %v", err)
		}
		if p, ok := body["initrd_path"]; ok {
			if err := readable(p); err != nil {
				return nil, faultf("The initrd file cannot be opened due to invalid path or invalid permissions. %v", err)
			}
		}
		s.cfg.BootSource = body
		return nil, nil
	case "PUT drives":
		if f := preboot(); f != nil {
			return nil, f
		}
		if body["drive_id"] != seg[1] {
			return nil, faultf("The id from the path [%s] does not match the id from the body [%v]!", seg[1], body["drive_id"])
		}
		if body["is_root_device"] == true {
			for id, d := range s.cfg.Drives {
				if id != seg[1] && d["is_root_device"] == true {
					return nil, faultf("A root block device already exists!")
				}
			}
		}
		if err := s.openDrive(seg[1], body["path_on_host"], body["is_read_only"] != true); err != nil {
			return nil, faultf("Unable to create the block device: BackingFile(%v)", err)
		}
		s.cfg.Drives[seg[1]] = body
		return nil, nil
	case "PATCH drives":
		if f := postboot(); f != nil {
			return nil, f
		}
		if body["drive_id"] != seg[1] {
			return nil, faultf("The id from the path [%s] does not match the id from the body [%v]!", seg[1], body["drive_id"])
		}
		d, ok := s.cfg.Drives[seg[1]]
		if !ok {
			return nil, faultf("Invalid block device ID: %s", seg[1])
		}
		if p, ok := body["path_on_host"]; ok {
			if err := s.openDrive(seg[1], p, d["is_read_only"] != true); err != nil {
				return nil, faultf("Unable to patch the block device: BackingFile(%v)", err)
			}
			d["path_on_host"] = p
		}
		return nil, nil
	case "PUT network-interfaces":
		if f := preboot(); f != nil {
			return nil, f
		}
		if body["iface_id"] != seg[1] {
			return nil, faultf("The id from the path [%s] does not match the id from the body [%v]!", seg[1], body["iface_id"])
		}
		if err := tapExists(body["host_dev_name"]); err != nil {
			return nil, faultf("Could not create the network device: Open tap device failed: %v", err)
		}
		s.cfg.Network[seg[1]] = body
		return nil, nil
	case "PATCH network-interfaces":
		if f := postboot(); f != nil {
			return nil, f
		}
		if _, ok := s.cfg.Network[seg[1]]; !ok {
			return nil, faultf("Invalid network interface ID - not found.")
		}
		return nil, nil
	case "PUT vsock":
		if f := preboot(); f != nil {
			return nil, f
		}
		s.cfg.Vsock = body
		return nil, nil
	case "PUT balloon":
		if f := preboot(); f != nil {
			return nil, f
		}
		if amount, _ := body["amount_mib"].(float64); amount > s.memMiB() {
			return nil, faultf("Amount of pages requested cannot be greater than the guest memory.")
		}
		s.cfg.Balloon = body
		return nil, nil
	case "PATCH balloon":
		if s.cfg.Balloon == nil {
			return nil, faultf("Balloon device not configured.")
		}
		if len(seg) > 1 && seg[1] == "statistics" {
			if iv, _ := s.cfg.Balloon["stats_polling_interval_s"].(float64); iv == 0 && s.state != notStarted {
				return nil, faultf("Statistics for the balloon device are not enabled")
			}
			s.cfg.Balloon["stats_polling_interval_s"] = body["stats_polling_interval_s"]
			return nil, nil
		}
		if len(seg) > 1 {
			return nil, faultf("Free page hinting is not enabled.")
		}
		if amount, _ := body["amount_mib"].(float64); amount > s.memMiB() {
			return nil, faultf("Amount of pages requested cannot be greater than the guest memory.")
		}
		s.cfg.Balloon["amount_mib"] = body["amount_mib"]
		return nil, nil
	case "GET balloon":
		if s.cfg.Balloon == nil {
			return nil, faultf("Balloon device not configured.")
		}
		if len(seg) == 1 {
			return s.cfg.Balloon, nil
		}
		if seg[1] != "statistics" {
			return nil, faultf("Free page hinting is not enabled.")
		}
		if iv, _ := s.cfg.Balloon["stats_polling_interval_s"].(float64); iv == 0 {
			return nil, faultf("Statistics for the balloon device are not enabled")
		}
		if f := postboot(); f != nil {
			return nil, f
		}
		return s.balloonStats(), nil
	case "PUT mmds":
		if len(seg) > 1 { // /mmds/config
			if f := preboot(); f != nil {
				return nil, f
			}
			ifaces, _ := body["network_interfaces"].([]any)
			if len(ifaces) == 0 {
				return nil, faultf("The list of network interface IDs that allow forwarding MMDS requests is empty.")
			}
			for _, id := range ifaces {
				if _, ok := s.cfg.Network[fmt.Sprint(id)]; !ok {
					return nil, faultf("The list of network interface IDs provided contains at least one ID that does not correspond to any existing network interface.")
				}
			}
			s.cfg.MMDSConfig = body
			return nil, nil
		}
		s.fresh = false
		s.cfg.MMDS = body
		return nil, nil
	case "PATCH mmds":
		if s.cfg.MMDS == nil {
			return nil, faultf("The MMDS data store is not initialized.")
		}
		current, _ := s.cfg.MMDS.(map[string]any)
		for k, v := range body {
			current[k] = v
		}
		return nil, nil
	case "GET mmds":
		if s.cfg.MMDS == nil {
			return nil, faultf("The MMDS data store is not initialized.")
		}
		return s.cfg.MMDS, nil
	case "PUT entropy", "PUT serial", "PUT cpu-config", "PUT pmem", "PUT hotplug":
		return nil, preboot()
	case "PUT actions":
		return nil, s.action(fmt.Sprint(body["action_type"]))
	case "PATCH vm":
		if f := postboot(); f != nil {
			return nil, f
		}
		if body["state"] == "Paused" {
			s.state = paused
		} else {
			s.state = running
		}
		s.resumed.Broadcast()
		return nil, nil
	case "PUT snapshot":
		if seg[1] == "create" {
			return nil, s.createSnapshot(body)
		}
		return nil, s.loadSnapshot(body)
	}
	return nil, faultf("Invalid request method and/or path: %s %s.", method, path)
}

func (s *Server) memMiB() float64 {
	m, _ := s.cfg.MachineConfig["mem_size_mib"].(float64)
	return m
}

func readable(p any) error { return openable(p, false) }

// openable opens a file the way Firecracker will use it: a drive that is
// not read-only needs write permission too (which matters under the
// jailer, where Firecracker is not root).
func openable(p any, write bool) error {
	path, ok := p.(string)
	if !ok {
		return errors.New("no path")
	}
	flag := os.O_RDONLY
	if write {
		flag = os.O_RDWR
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return err
	}
	return f.Close()
}

// openDrive opens the file backing drive id (relative paths against the
// working directory, as Firecracker does) and keeps it open in place of
// the drive's earlier file. It logs the descriptor so that a test can
// play the guest and write through exactly the file the process has open
// (/proc/PID/fd/FD); see DriveOpenedMsg.
func (s *Server) openDrive(id string, p any, write bool) error {
	path, ok := p.(string)
	if !ok {
		return errors.New("no path")
	}
	flag := os.O_RDONLY
	if write {
		flag = os.O_RDWR
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return err
	}
	if old := s.drives[id]; old != nil {
		old.Close()
	}
	s.drives[id] = f
	s.log.Info(DriveOpenedMsg, "drive", id, "fd", f.Fd(), "path", path, "write", write)
	return nil
}

// DriveOpenedMsg is the log message of every drive the fake opens, with
// drive=ID and fd=N.
const DriveOpenedMsg = "drive opened"

func (s *Server) action(kind string) *fault {
	switch kind {
	case "InstanceStart":
		if s.state != notStarted {
			return errAfterStart
		}
		if s.cfg.BootSource == nil {
			return faultf("Cannot start microvm without kernel configuration.")
		}
		if err := checkELF(s.cfg.BootSource["kernel_image_path"].(string)); err != nil {
			return faultf("Cannot load kernel due to invalid memory configuration or invalid kernel image: %v", err)
		}
		if err := s.startVsock(""); err != nil {
			return faultf("Cannot create vsock device: %v", err)
		}
		s.state = running
		s.fresh = false
		s.resumed.Broadcast()
		return nil
	case "SendCtrlAltDel":
		if s.state == notStarted {
			return errBeforeStart
		}
		if s.state == running && !s.opts.IgnoreCtrlAltDel {
			// The guest sees the key press, shuts down and, booted with
			// reboot=k, resets through the keyboard controller, which ends
			// the Firecracker process.
			time.AfterFunc(50*time.Millisecond, s.powerOff)
		}
		return nil
	case "FlushMetrics":
		if !s.metrics {
			return faultf("The metrics system is not initialized.")
		}
		return nil
	}
	return faultf("Unknown action %q.", kind)
}

func checkELF(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	magic := make([]byte, 4)
	if _, err := io.ReadFull(f, magic); err != nil || string(magic) != "\x7fELF" {
		return fmt.Errorf("%s is not an ELF kernel (Firecracker on x86_64 boots an uncompressed vmlinux)", path)
	}
	return nil
}

func (s *Server) balloonStats() map[string]any {
	const mib = 1 << 20
	target, _ := s.cfg.Balloon["amount_mib"].(float64)
	mem := s.memMiB()
	used := min(40, mem/4) // what the fake guest's kernel and agent occupy
	free := max(0, mem-target-used)
	return map[string]any{
		"target_pages":     int64(target) * mib / 4096,
		"actual_pages":     int64(target) * mib / 4096,
		"target_mib":       int64(target),
		"actual_mib":       int64(target),
		"total_memory":     int64(mem-target) * mib,
		"free_memory":      int64(free) * mib,
		"available_memory": int64(free+used/2) * mib,
	}
}

func (s *Server) createSnapshot(body map[string]any) *fault {
	if s.state == notStarted {
		return errBeforeStart
	}
	if s.state != paused {
		return faultf("Cannot create a snapshot of a running microVM: pause it first.")
	}
	if body["snapshot_type"] == "Diff" && s.cfg.MachineConfig["track_dirty_pages"] != true {
		return faultf("Diff snapshots are not allowed on uVMs with dirty page tracking disabled.")
	}
	state, _ := json.Marshal(vmstate{Magic: snapshotMagic, Version: s.opts.Version, Config: s.cfg})
	if err := os.WriteFile(body["snapshot_path"].(string), state, 0o600); err != nil {
		return faultf("Cannot save the microVM state: %v", err)
	}
	// The memory file has the guest's full size but is sparse: tests stay
	// small while the provider sees a realistic file.
	mem, err := os.OpenFile(body["mem_file_path"].(string), os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return faultf("Cannot write memory file: %v", err)
	}
	defer mem.Close()
	if _, err := mem.WriteString("fake guest memory of " + s.opts.ID + "\n"); err != nil {
		return faultf("Cannot write memory file: %v", err)
	}
	if err := mem.Truncate(int64(s.memMiB()) << 20); err != nil {
		return faultf("Cannot write memory file: %v", err)
	}
	return nil
}

func (s *Server) loadSnapshot(body map[string]any) *fault {
	if !s.fresh || s.state != notStarted {
		return faultf("Loading a microVM snapshot not allowed after configuring boot-specific resources.")
	}
	// From here on every failure leaves the process unusable.
	f := s.load(body)
	if f != nil {
		s.unusable = "a snapshot load failed: " + f.msg
	}
	return f
}

func (s *Server) load(body map[string]any) *fault {
	memPath, hasFile := body["mem_file_path"].(string)
	backend, hasBackend := body["mem_backend"].(map[string]any)
	if hasFile == hasBackend {
		return faultf("Exactly one of mem_file_path or mem_backend must be present.")
	}
	if hasBackend {
		if backend["backend_type"] != "File" {
			return faultf("The fake Firecracker serves only the File memory backend.")
		}
		memPath = backend["backend_path"].(string)
	}
	raw, err := os.ReadFile(body["snapshot_path"].(string))
	if err != nil {
		return faultf("Load snapshot error: Failed to open snapshot file: %v", err)
	}
	var st vmstate
	if err := json.Unmarshal(raw, &st); err != nil || st.Magic != snapshotMagic {
		return faultf("Load snapshot error: Failed to load microVM state: invalid snapshot file")
	}
	if st.Version != s.opts.Version {
		return faultf("Load snapshot error: Snapshot version %s is not supported by Firecracker %s.", st.Version, s.opts.Version)
	}
	info, err := os.Stat(memPath)
	if err == nil {
		err = openable(memPath, false)
	}
	if err != nil {
		return faultf("Load snapshot error: Failed to open memory backing file: %v", err)
	}
	s.cfg = st.Config
	if info.Size() != int64(s.memMiB())<<20 {
		return faultf("Load snapshot error: memory file is %d bytes, the snapshot's guest has %v MiB", info.Size(), s.memMiB())
	}
	for id, d := range s.cfg.Drives {
		if err := s.openDrive(id, d["path_on_host"], d["is_read_only"] != true); err != nil {
			return faultf("Load snapshot error: cannot reopen drive %s: %v", id, err)
		}
	}
	if overrides, ok := body["network_overrides"].([]any); ok {
		for _, o := range overrides {
			o := o.(map[string]any)
			iface, ok := s.cfg.Network[fmt.Sprint(o["iface_id"])]
			if !ok {
				return faultf("Load snapshot error: network override for unknown interface %v", o["iface_id"])
			}
			iface["host_dev_name"] = o["host_dev_name"]
		}
	}
	for id, iface := range s.cfg.Network {
		if err := tapExists(iface["host_dev_name"]); err != nil {
			return faultf("Load snapshot error: cannot restore network device %s: Open tap device failed: %v", id, err)
		}
	}
	udsOverride := ""
	if o, ok := body["vsock_override"].(map[string]any); ok {
		if s.cfg.Vsock == nil {
			return faultf("Load snapshot error: vsock override without a vsock device")
		}
		udsOverride = o["uds_path"].(string)
	}
	if err := s.startVsock(udsOverride); err != nil {
		return faultf("Load snapshot error: cannot create vsock device: %v", err)
	}
	s.fresh = false
	s.state = paused
	if body["resume_vm"] == true {
		s.state = running
	}
	s.resumed.Broadcast()
	return nil
}

// startVsock listens on the vsock device's Unix socket. Paths are resolved
// against the process's working directory, as Firecracker does.
func (s *Server) startVsock(override string) error {
	if s.cfg.Vsock == nil {
		return nil
	}
	path, _ := s.cfg.Vsock["uds_path"].(string)
	if override != "" {
		path = override
		s.cfg.Vsock["uds_path"] = override
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return err
	}
	s.vsockLn = ln
	go s.acceptVsock(ln)
	return nil
}

var nextHostPort = struct {
	sync.Mutex
	n int
}{n: 1 << 30}

func (s *Server) acceptVsock(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		s.mu.Lock()
		s.conns[c] = true
		s.mu.Unlock()
		go func() {
			defer func() {
				c.Close()
				s.mu.Lock()
				delete(s.conns, c)
				s.mu.Unlock()
			}()
			s.serveVsock(c)
		}()
	}
}

// serveVsock runs the host-initiated connection protocol: "CONNECT <port>\n"
// answered by "OK <host port>\n" once the guest accepted, or a closed
// connection when nothing listens on that port.
func (s *Server) serveVsock(c net.Conn) {
	line, err := readLine(c)
	if err != nil {
		return
	}
	port, ok := strings.CutPrefix(line, "CONNECT ")
	if !ok {
		return
	}
	if n, err := strconv.Atoi(port); err != nil || n != AgentPort || s.opts.Agent == nil {
		return
	}
	// A paused guest cannot accept the connection.
	if !s.waitRunning() {
		return
	}
	nextHostPort.Lock()
	nextHostPort.n++
	hostPort := nextHostPort.n
	nextHostPort.Unlock()
	if _, err := fmt.Fprintf(c, "OK %d\n", hostPort); err != nil {
		return
	}
	if err := s.opts.Agent(s.ctx, &pausableConn{Conn: c, s: s}); err != nil {
		s.log.Info("agent connection ended", "err", err)
	}
}

// readLine reads up to '\n' one byte at a time so that nothing after the
// handshake line is consumed.
func readLine(c net.Conn) (string, error) {
	var b []byte
	one := make([]byte, 1)
	for len(b) < 64 {
		if _, err := c.Read(one); err != nil {
			return "", err
		}
		if one[0] == '\n' {
			return string(b), nil
		}
		b = append(b, one[0])
	}
	return "", errors.New("handshake line too long")
}

// waitRunning blocks while the guest is paused; false once it is gone.
func (s *Server) waitRunning() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	for s.state == paused {
		s.resumed.Wait()
	}
	return s.state == running
}

// pausableConn stalls the guest's side of a connection while its vCPUs are
// paused, as a real guest would.
type pausableConn struct {
	net.Conn
	s *Server
}

func (p *pausableConn) Read(b []byte) (int, error) {
	n, err := p.Conn.Read(b)
	if n > 0 && !p.s.waitRunning() {
		return 0, io.EOF
	}
	return n, err
}

func (p *pausableConn) Write(b []byte) (int, error) {
	if !p.s.waitRunning() {
		return 0, io.ErrClosedPipe
	}
	return p.Conn.Write(b)
}

func versionLess(a, b string) bool {
	pa, pb := parseVersion(a), parseVersion(b)
	for i := range pa {
		if pa[i] != pb[i] {
			return pa[i] < pb[i]
		}
	}
	return false
}

func parseVersion(v string) [3]int {
	var out [3]int
	v = strings.TrimPrefix(v, "v")
	if i := strings.IndexAny(v, "-+ "); i >= 0 {
		v = v[:i]
	}
	for i, part := range strings.SplitN(v, ".", 3) {
		out[i], _ = strconv.Atoi(part)
	}
	return out
}

// tapExists fails unless name is a network device of the namespace the
// process runs in. Firecracker opens its TAP devices by name when an
// interface is configured and when a snapshot is loaded; a real one
// running as root would make a missing one (carrying nothing), a jailed
// one fails, so the fake fails always: the TAP must be where the VMM runs.
func tapExists(name any) error {
	n, _ := name.(string)
	if _, err := net.InterfaceByName(n); err != nil {
		return fmt.Errorf("TAP %q in the process's network namespace: %w", n, err)
	}
	return nil
}
