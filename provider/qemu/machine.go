package qemu

import (
	"bufio"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// Files inside a VM's directory.
const (
	recordFile  = "vm.json"
	pidFile     = "qemu.pid"
	qmpSocket   = "qmp.sock"
	agentSocket = "agent.sock"
	consoleLog  = "console.log"
	qemuLog     = "qemu.log"
	ramFile     = "ram"
)

// Files inside a snapshot's directory.
const (
	snapStateFile  = "state"
	snapMemoryFile = "memory"
	snapMetaFile   = "snapshot.json"
)

// AgentPortName is the virtio-serial port the guest agent listens on.
const AgentPortName = "org.warmpool.agent"

// balloonID is the QOM id of the balloon device (/machine/peripheral/balloon).
const balloonID = "balloon"

// machineConfig is everything that decides QEMU's command line. A clone must
// be started with the same device set as its template, so the snapshot keeps
// the template's config and restores derive theirs from it.
type machineConfig struct {
	Accel     string `json:"accel"` // "kvm" or "tcg"
	TBSizeMiB int    `json:"tb_size_mib,omitempty"`
	// CPU is the -cpu model; empty for QEMU's default, which new VMs get.
	// A clone keeps its template's, as the guest kernel chose its timers
	// for that CPU: templates built with qemu64,+arat (one-shot APIC timer,
	// a tickless idle) restore with it. That model was dropped because its
	// timer programming made every hand-off under TCG about twice as slow,
	// a worse trade than the idle ticks it saved.
	CPU       string `json:"cpu,omitempty"`
	VCPUs     int    `json:"vcpus"`
	MemoryMiB int    `json:"memory_mib"`
	Kernel    string `json:"kernel"`
	Initrd    string `json:"initrd,omitempty"`
	// Append is the full kernel command line, machine parameters included.
	Append   string `json:"append"`
	DataDisk string `json:"data_disk,omitempty"`
	// RootDisk is the image's root filesystem, attached read-only.
	RootDisk string `json:"root_disk,omitempty"`
	// WritableDisk takes the guest's root filesystem writes; a clone's is
	// its own qcow2 layer (WritableFormat "qcow2") over the snapshot's
	// frozen raw copy.
	WritableDisk   string `json:"writable_disk,omitempty"`
	WritableFormat string `json:"writable_format,omitempty"`
	// MemPath is the file backing guest RAM; empty for anonymous memory.
	MemPath string `json:"mem_path,omitempty"`
	// MemShared maps MemPath shared (share=on): writes reach the file, which
	// is what lets a snapshot skip RAM. Clones map the template's file
	// privately instead.
	MemShared bool `json:"mem_shared,omitempty"`
	// OwnsMem says MemPath belongs to this VM and goes with it on Destroy.
	OwnsMem bool `json:"owns_mem,omitempty"`
	// Incoming starts QEMU waiting for a migration stream.
	Incoming bool `json:"incoming,omitempty"`
	// NoBalloon leaves out the virtio-balloon device (and with it free page
	// reporting). A VM whose RAM file becomes a shared template needs this:
	// QEMU 7.2 gives ballooned or reported pages back by punching holes
	// into the backing file even when the clone maps it privately, which
	// would wipe those pages for every other clone of the template.
	NoBalloon bool `json:"no_balloon,omitempty"`
	// NICMAC, when set, gives the guest a virtio-net interface with this
	// MAC (see nicArgs).
	NICMAC string `json:"nic_mac,omitempty"`
}

// args builds QEMU's command line for a VM living in dir.
func (c machineConfig) args(dir string) []string {
	accel := c.Accel
	if accel == "tcg" && c.TBSizeMiB > 0 {
		accel += ",tb-size=" + strconv.Itoa(c.TBSizeMiB)
	}
	a := []string{
		"-name", "warmpool-" + filepath.Base(dir),
		"-M", "microvm,memory-backend=mem",
		"-accel", accel,
	}
	if c.CPU != "" {
		a = append(a, "-cpu", c.CPU)
	}
	a = append(a,
		"-nodefaults", "-no-user-config", "-nographic",
		// A guest reboot (or panic with panic=-1) ends the process instead of
		// starting the guest over.
		"-no-reboot",
		"-m", strconv.Itoa(c.MemoryMiB),
		"-smp", strconv.Itoa(c.VCPUs),
		"-object", c.memoryBackend(),
		"-kernel", c.Kernel,
	)
	if c.Initrd != "" {
		a = append(a, "-initrd", c.Initrd)
	}
	a = append(a,
		"-append", c.Append,
		"-serial", "file:"+filepath.Join(dir, consoleLog),
		"-qmp", "unix:"+filepath.Join(dir, qmpSocket)+",server=on,wait=off",
		// The order of virtio devices decides their virtio-mmio slots, which
		// a clone must share with its template: keep it fixed.
		"-device", "virtio-serial-device,id=serial",
		"-chardev", "socket,id=agent,path="+filepath.Join(dir, agentSocket)+",server=on,wait=off",
		"-device", "virtserialport,chardev=agent,name="+AgentPortName,
	)
	if !c.NoBalloon {
		a = append(a, "-device", "virtio-balloon-device,id="+balloonID+",free-page-reporting=on")
	}
	a = append(a, c.diskArgs()...)
	if c.DataDisk != "" {
		a = append(a,
			"-drive", "id=data,if=none,format=raw,cache=writeback,file="+c.DataDisk,
			"-device", "virtio-blk-device,drive=data",
		)
	}
	a = append(a, c.nicArgs()...)
	if c.Incoming {
		a = append(a, "-S", "-incoming", "defer")
	}
	return a
}

func (c machineConfig) memoryBackend() string {
	size := strconv.Itoa(c.MemoryMiB) + "M"
	if c.MemPath == "" {
		return "memory-backend-ram,id=mem,size=" + size
	}
	share := "off"
	if c.MemShared {
		share = "on"
	}
	return "memory-backend-file,id=mem,size=" + size + ",mem-path=" + c.MemPath + ",share=" + share
}

// TCGKernelArgs are kernel parameters a guest needs under TCG here: the
// guest cannot calibrate its TSC against the emulated PIT on a loaded host
// and then hangs right after "tsc: Marking TSC unstable"; telling it the rate
// skips the calibration. tsc=reliable keeps the TSC as the clocksource: the
// clocksource watchdog compares it with jiffies, which lose ticks whenever
// the host is too busy to run the vCPU, marks the TSC unstable and falls
// back to jiffies, a clocksource no tickless idle can run on. Empty when
// the host TSC is not constant. Exported for tests that start QEMU
// themselves.
func TCGKernelArgs() string {
	khz := hostTSCKHz("/proc/cpuinfo")
	if khz <= 0 {
		return ""
	}
	return "tsc_early_khz=" + strconv.Itoa(khz) + " tsc=reliable"
}

func hostTSCKHz(cpuinfo string) int {
	f, err := os.Open(cpuinfo)
	if err != nil {
		return 0
	}
	defer f.Close()
	var mhz float64
	constant := false
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() && (mhz == 0 || !constant) {
		key, value, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		switch strings.TrimSpace(key) {
		case "cpu MHz":
			if mhz == 0 {
				mhz, _ = strconv.ParseFloat(strings.TrimSpace(value), 64)
			}
		case "flags":
			constant = constant || strings.Contains(" "+value+" ", " constant_tsc ")
		}
	}
	if !constant || mhz <= 0 {
		return 0
	}
	return int(math.Round(mhz * 1000))
}

// processIdentity is a PID plus the process's start time, so that a PID
// reused by an unrelated process after a crash is not mistaken for ours.
type processIdentity struct {
	PID   int
	Start uint64
}

func (p processIdentity) String() string {
	return strconv.Itoa(p.PID) + " " + strconv.FormatUint(p.Start, 10) + "\n"
}

func parseIdentity(b []byte) (processIdentity, error) {
	f := strings.Fields(string(b))
	if len(f) != 2 {
		return processIdentity{}, fmt.Errorf("pid file %q: want \"PID START\"", b)
	}
	pid, err := strconv.Atoi(f[0])
	if err != nil || pid <= 0 {
		return processIdentity{}, fmt.Errorf("pid file %q: bad pid", b)
	}
	start, err := strconv.ParseUint(f[1], 10, 64)
	if err != nil {
		return processIdentity{}, fmt.Errorf("pid file %q: bad start time", b)
	}
	return processIdentity{PID: pid, Start: start}, nil
}

// procStat returns a process's state letter and start time (clock ticks
// since boot) from /proc/PID/stat.
func procStat(pid int) (state byte, start uint64, err error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, 0, err
	}
	// The command name may hold spaces and parentheses; fields resume after
	// the last ')'.
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return 0, 0, fmt.Errorf("parse /proc/%d/stat", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 20 {
		return 0, 0, fmt.Errorf("parse /proc/%d/stat: %d fields", pid, len(f))
	}
	start, err = strconv.ParseUint(f[19], 10, 64)
	if err != nil {
		return 0, 0, fmt.Errorf("parse /proc/%d/stat start time: %w", pid, err)
	}
	return f[0][0], start, nil
}

func identityOf(pid int) (processIdentity, error) {
	_, start, err := procStat(pid)
	if err != nil {
		return processIdentity{}, err
	}
	return processIdentity{PID: pid, Start: start}, nil
}

// alive reports whether the process is still ours and not a zombie.
func (p processIdentity) alive() bool {
	if p.PID <= 0 {
		return false
	}
	state, start, err := procStat(p.PID)
	if err != nil || start != p.Start {
		return false
	}
	return state != 'Z' && state != 'X'
}

func (p processIdentity) kill() error {
	if !p.alive() {
		return nil
	}
	if err := unix.Kill(p.PID, syscall.SIGKILL); err != nil && !errors.Is(err, unix.ESRCH) {
		return fmt.Errorf("kill qemu pid %d: %w", p.PID, err)
	}
	return nil
}

// onTmpfs reports whether dir is on a RAM-backed file system, where guest
// RAM files may live without being written back to a disk.
func onTmpfs(dir string) bool {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return false
	}
	return st.Type == unix.TMPFS_MAGIC
}
