package server

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
	"unsafe"

	"github.com/warmpool/warmpool/agent/proto"
	"github.com/warmpool/warmpool/internal/procfs"
	"golang.org/x/sys/unix"
)

func kernelRelease() string {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return ""
	}
	return unix.ByteSliceToString(u.Release[:])
}

// SystemOptions returns Options whose effects act on the running kernel: the
// ones the guest agent uses. They need root (CAP_SYS_ADMIN, CAP_SYS_TIME,
// CAP_SYS_BOOT).
func SystemOptions() Options {
	return Options{
		AddEntropy:  AddKernelEntropy,
		SetTime:     setTime,
		SetHostname: SetIdentity,
		SetNetwork:  SetNetwork,
		PowerOff:    PowerOff,
		Stats:       ReadProcStats,
	}
}

// randPoolInfo mirrors struct rand_pool_info from <linux/random.h>; the
// buffer follows the two counters directly.
type randPoolInfo struct {
	entropyCount int32
	bufSize      int32
	buf          [proto.MaxEntropy]byte
}

const (
	ioctlRNDADDENTROPY = 0x40085203 // _IOW('R', 0x03, int[2])
	ioctlRNDRESEEDCRNG = 0x5207     // _IO('R', 0x07), Linux 4.17+
)

// AddKernelEntropy mixes b into the kernel's input pool, crediting it as
// entropy, and then forces the CRNG to reseed from the pool. Without the
// reseed, clones restored from one snapshot would keep the identical CRNG
// state they were frozen with until the next scheduled reseed. A kernel that
// took the bytes but cannot reseed now gives an error wrapping
// ErrNotReseeded.
func AddKernelEntropy(b []byte) error {
	if len(b) > proto.MaxEntropy {
		return fmt.Errorf("entropy of %d bytes exceeds %d", len(b), proto.MaxEntropy)
	}
	f, err := os.OpenFile("/dev/urandom", os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	info := randPoolInfo{entropyCount: int32(len(b) * 8), bufSize: int32(len(b))}
	copy(info.buf[:], b)
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), ioctlRNDADDENTROPY, uintptr(unsafe.Pointer(&info))); errno != 0 {
		return fmt.Errorf("RNDADDENTROPY: %w", errno)
	}
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), ioctlRNDRESEEDCRNG, 0)
	switch errno {
	case 0:
		return nil
	case unix.ENODATA:
		// It will be initialised once enough entropy is credited (these
		// bytes count), and seeds from the pool then.
		return fmt.Errorf("%w: RNDRESEEDCRNG: %w (the CRNG is not initialised yet)", ErrNotReseeded, errno)
	case unix.EINVAL, unix.ENOTTY:
		return fmt.Errorf("%w: RNDRESEEDCRNG: %w (a kernel before 4.17 has no reseed ioctl)", ErrNotReseeded, errno)
	}
	return fmt.Errorf("RNDRESEEDCRNG: %w", errno)
}

func setTime(t time.Time) error {
	tv := unix.NsecToTimeval(t.UnixNano())
	return unix.Settimeofday(&tv)
}

// PowerOff ends the VM. Without ACPI (Firecracker on x86) a power-off only
// halts the vCPUs and the hypervisor keeps running, while a reboot through
// the keyboard controller (the guest boots with reboot=k there) makes it
// exit; QEMU runs with -no-reboot, so a reboot ends it too.
func PowerOff() error {
	unix.Sync()
	if _, err := os.Stat("/sys/firmware/acpi"); err != nil {
		return unix.Reboot(unix.LINUX_REBOOT_CMD_RESTART)
	}
	return unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
}

// ReadProcStats reads memory, uptime and load from /proc.
func ReadProcStats() (proto.Stats, error) {
	var st proto.Stats
	mem, err := procfs.ReadKiB("/proc/meminfo")
	if err != nil {
		return st, fmt.Errorf("read guest memory: %w", err)
	}
	st.MemTotalKiB, st.MemFreeKiB, st.MemAvailableKiB = mem["MemTotal"], mem["MemFree"], mem["MemAvailable"]
	var info unix.Sysinfo_t
	if err := unix.Sysinfo(&info); err != nil {
		return st, fmt.Errorf("sysinfo: %w", err)
	}
	st.Procs = int(info.Procs)
	st.Load1 = float64(info.Loads[0]) / 65536
	if up, err := os.ReadFile("/proc/uptime"); err == nil {
		if f := strings.Fields(string(up)); len(f) > 0 {
			if secs, err := strconv.ParseFloat(f[0], 64); err == nil {
				st.UptimeMillis = int64(secs * 1000)
			}
		}
	} else {
		st.UptimeMillis = int64(info.Uptime) * 1000
	}
	st.Hostname, _ = os.Hostname()
	st.UnixNano = time.Now().UnixNano()
	return st, nil
}
