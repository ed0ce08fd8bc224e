// Package pidwatch tells when a process that is not our child exits, such
// as a VM's hypervisor that an earlier run of the daemon started: Wait only
// works for children, so it polls a pidfd (Linux 5.3+), which becomes
// readable when the process ends.
package pidwatch

import (
	"errors"
	"fmt"
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
