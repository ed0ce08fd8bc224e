// Package pidwatch tells when a process that is not our child exits, such
// as a VM's hypervisor that an earlier run of the daemon started: Wait only
// works for children, so it polls a pidfd (Linux 5.3+), which becomes
// readable when the process ends.
package pidwatch

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// Watch calls onExit once, from a goroutine of its own, when the process
// pid exits, unless stop is called first. A process that has exited
// already (even one not yet reaped) is reported at once. The caller must
// check, after Watch returns, that pid is still the process it means: a
// pidfd pins the process it was opened on, so a PID reused before the open
// would be watched instead.
func Watch(pid int, onExit func()) (stop func(), err error) {
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return nil, fmt.Errorf("watch pid %d: pidfd_open: %w", pid, err)
	}
	var wake [2]int
	if err := unix.Pipe2(wake[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		unix.Close(pidfd)
		return nil, fmt.Errorf("watch pid %d: pipe: %w", pid, err)
	}
	go func() {
		defer unix.Close(pidfd)
		defer unix.Close(wake[0])
		fds := []unix.PollFd{{Fd: int32(pidfd), Events: unix.POLLIN}, {Fd: int32(wake[0]), Events: unix.POLLIN}}
		for {
			_, err := unix.Poll(fds, -1)
			if errors.Is(err, unix.EINTR) {
				continue
			}
			if err != nil || fds[1].Revents != 0 {
				return // stopped, or nothing more we can learn
			}
			if fds[0].Revents != 0 {
				onExit()
				return
			}
		}
	}()
	var once sync.Once
	return func() { once.Do(func() { unix.Close(wake[1]) }) }, nil
}

// pfExiting is the kernel's PF_EXITING task flag: do_exit has begun.
const pfExiting = 0x4

// sigkillBit is SIGKILL in the kernel's pending-signal masks.
const sigkillBit = 1 << (uint(unix.SIGKILL) - 1)

// Exiting reports whether the process pid is on its way out or gone: it
// was sent SIGKILL, has begun to exit, is a zombie, or does not exist. It
// closes the moment between a kill and the exit itself, which for a process
// with a large address space lasts milliseconds, in which a plain liveness
// check still sees a running process.
func Exiting(pid int) bool {
	dir := "/proc/" + strconv.Itoa(pid)
	stat, err := os.ReadFile(dir + "/stat")
	if err != nil || exitingByStat(stat) {
		return true
	}
	status, err := os.ReadFile(dir + "/status")
	return err != nil || sigkillShared(status)
}

// Proc answers Exiting for one process from its /proc files, opened once:
// a read through an open file skips the path lookup that makes most of the
// cost of Exiting, and the files stay bound to the process they were
// opened on, so a reused PID cannot answer for it.
type Proc struct {
	stat, status *os.File
	buf          []byte
}

// OpenProc opens pid's /proc files. The caller must check afterwards that
// pid is still the process it means (its start time), as with Watch.
func OpenProc(pid int) (*Proc, error) {
	dir := "/proc/" + strconv.Itoa(pid)
	stat, err := os.Open(dir + "/stat")
	if err != nil {
		return nil, fmt.Errorf("open %s/stat: %w", dir, err)
	}
	status, err := os.Open(dir + "/status")
	if err != nil {
		stat.Close()
		return nil, fmt.Errorf("open %s/status: %w", dir, err)
	}
	return &Proc{stat: stat, status: status, buf: make([]byte, 4096)}, nil
}

// Exiting is the package's Exiting for this process. It is not safe for
// concurrent use.
func (p *Proc) Exiting() bool {
	n, err := p.stat.ReadAt(p.buf, 0)
	if n == 0 || (err != nil && !errors.Is(err, io.EOF)) || exitingByStat(p.buf[:n]) {
		return true
	}
	n, err = p.status.ReadAt(p.buf, 0)
	return n == 0 || (err != nil && !errors.Is(err, io.EOF)) || sigkillShared(p.buf[:n])
}

// Close closes the files.
func (p *Proc) Close() error {
	return errors.Join(p.stat.Close(), p.status.Close())
}

// exitingByStat reads a /proc/PID/stat: zombie or gone, PF_EXITING, or a
// SIGKILL still pending on the main thread.
func exitingByStat(b []byte) bool {
	// Fields resume after the command name's last ')'.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return false
	}
	f := strings.Fields(string(b[i+1:]))
	// f[0] is field 3 of proc(5): state; f[6] flags; f[28] signal (the
	// thread's pending signals).
	if len(f) < 29 {
		return false
	}
	if f[0] == "Z" || f[0] == "X" || f[0] == "x" {
		return true
	}
	flags, err1 := strconv.ParseUint(f[6], 10, 64)
	pending, err2 := strconv.ParseUint(f[28], 10, 64)
	if err1 != nil || err2 != nil {
		return false
	}
	return flags&pfExiting != 0 || pending&sigkillBit != 0
}

// sigkillShared reads the process-wide pending signals from a
// /proc/PID/status. A kill(2) queues SIGKILL there (and on every thread) in
// the sender's call; a thread taking it off its own queue to exit leaves
// this one set, so it covers the instant before PF_EXITING.
func sigkillShared(b []byte) bool {
	for line := range strings.Lines(string(b)) {
		hex, ok := strings.CutPrefix(line, "ShdPnd:")
		if !ok {
			continue
		}
		mask, err := strconv.ParseUint(strings.TrimSpace(hex), 16, 64)
		return err == nil && mask&sigkillBit != 0
	}
	return false
}
