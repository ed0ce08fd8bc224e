package server

import (
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

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

// normalPriorityGroup puts every process of process group pgid back in the
// normal class: a spare taken before its profile ended has children (the
// profile's `id -u`) that inherited the idle class and would otherwise
// hold the command up for as long as anything else in the guest wants the
// CPU. The shell itself was reset first, so what it starts from now on
// is normal already.
func normalPriorityGroup(pgid int) {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return
	}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == pgid {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		// The fields after the command name (which may hold spaces and
		// parentheses): state, ppid, pgrp.
		s := string(b)
		f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
		if len(f) >= 3 && f[2] == strconv.Itoa(pgid) {
			_ = setSparePriority(pid, false)
		}
	}
}
