package server

import "golang.org/x/sys/unix"

// setSparePriority puts a spare shell, while it reads its profile and
// waits, in the idle scheduling class (background) or back in the normal
// one once a command takes it over: a spare started after a command ended
// must not slow what the guest runs next.
func setSparePriority(pid int, background bool) error {
	policy := uint32(unix.SCHED_NORMAL)
	if background {
		policy = unix.SCHED_IDLE
	}
	return unix.SchedSetAttr(pid, &unix.SchedAttr{Policy: policy}, 0)
}
