package qemu

import (
	"context"
	"encoding/json"
	"os"
	"strconv"
	"syscall"
	"time"

	"github.com/warmpool/warmpool/internal/pidwatch"
	"github.com/warmpool/warmpool/provider/qemu/qmp"
	"github.com/warmpool/warmpool/vm"
	"golang.org/x/sys/unix"
)

var _ vm.ExitNotifier = (*Provider)(nil)

// OnExit implements vm.ExitNotifier. QEMU's exit is seen by waiting on the
// child (VMs this provider started) or through a pidfd (VMs adopted from an
// earlier process); a guest that powered off, rebooted or panicked ends
// the process too (-no-reboot), and the QMP SHUTDOWN event before it gives
// the reason. A STOP event alone is no exit: it is a pause, ours or QEMU's
// reaction to an I/O error, and the process stays.
func (p *Provider) OnExit(fn func(vm.Exit)) (stop func()) { return p.exits.OnExit(fn) }

// Alive implements vm.ExitNotifier from the QEMU process's /proc files: a
// QEMU that was sent SIGKILL counts as dead at once, though tearing down
// its memory takes it a while. Machine ensures ask it every time, so it
// reads files it keeps open instead of looking the paths up again.
func (p *Provider) Alive(id string) bool {
	if vm.ValidateName("id", id) != nil {
		return false
	}
	p.mu.Lock()
	m := p.vms[id]
	p.mu.Unlock()
	if m == nil {
		var err error
		if m, err = p.adopt(context.Background(), id); err != nil {
			return false
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.gone {
		return false
	}
	if m.procFiles == nil {
		// The files are opened once, on a process checked to be ours
		// before and after: from then on they answer for it alone.
		if !m.proc.alive() {
			return false
		}
		pf, err := pidwatch.OpenProc(m.proc.PID)
		if err != nil {
			return false
		}
		if !m.proc.alive() {
			pf.Close()
			return false
		}
		m.procFiles = pf
	}
	return !m.procFiles.Exiting()
}

// closeProcFiles closes the files Alive reads; m.mu must be held.
func (m *machine) closeProcFiles() {
	if m.procFiles != nil {
		m.procFiles.Close()
		m.procFiles = nil
	}
}

// expectExit marks the VM's coming exit as one the caller asked for. It
// returns a function that takes the mark back, for a Stop that failed
// while the process still runs.
func (m *machine) expectExit() (undo func()) {
	m.mu.Lock()
	m.expected = true
	m.mu.Unlock()
	return func() {
		m.mu.Lock()
		if m.proc.alive() {
			m.expected = false
		}
		m.mu.Unlock()
	}
}

// processExited reports the end of m's QEMU unless the caller caused it,
// or never heard of the VM (a Create or Restore that failed).
func (p *Provider) processExited(m *machine, how string) {
	m.mu.Lock()
	drained := m.qmpDrained
	m.mu.Unlock()
	if drained != nil {
		// QEMU sends SHUTDOWN just before it exits: let the event loop
		// read to the end of the dead process's socket first.
		select {
		case <-drained:
		case <-time.After(200 * time.Millisecond):
		}
	}
	m.mu.Lock()
	report := m.handedOver && !m.expected && !m.gone && !p.closed.Load()
	reason := how
	if m.guestReason != "" {
		reason = m.guestReason + " (" + how + ")"
	}
	m.mu.Unlock()
	if !report {
		return
	}
	p.log.Warn("vm exited", "id", m.id, "reason", reason)
	p.exits.Notify(vm.Exit{ID: m.id, At: time.Now(), Reason: reason})
}

// describeExit says how a child ended, from its wait status.
func describeExit(st *os.ProcessState) string {
	if st == nil {
		return "qemu exited"
	}
	if ws, ok := st.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return "qemu killed by signal " + strconv.Itoa(int(ws.Signal())) + " (" + unix.SignalName(ws.Signal()) + ")"
	}
	return "qemu exited with status " + strconv.Itoa(st.ExitCode())
}

// watchAdopted watches the process of a VM another process started. Its
// wait status belongs to that process's parent, so the reason is vague.
func (p *Provider) watchAdopted(m *machine) {
	m.mu.Lock()
	proc := m.proc
	m.mu.Unlock()
	if !proc.alive() {
		return
	}
	stop, err := pidwatch.Watch(proc.PID, func() { p.processExited(m, "qemu exited (adopted: status unknown)") })
	if err != nil {
		p.log.Warn("cannot watch adopted vm for exits", "id", m.id, "pid", proc.PID, "err", err)
		return
	}
	// The pidfd now pins whatever process has the PID: ours only if the
	// start time still matches.
	if !proc.alive() {
		stop()
		p.processExited(m, "qemu exited (adopted: status unknown)")
		return
	}
	m.mu.Lock()
	m.stopWatch = stop
	m.mu.Unlock()
}

// watchQMP remembers why the guest shut down, from the SHUTDOWN event QEMU
// sends just before it exits, so the exit can say so. The caller stores
// the channel it returns, closed once the connection's events are all
// read, in m.qmpDrained under m.mu.
func (p *Provider) watchQMP(m *machine, c *qmp.Conn) (drained chan struct{}) {
	events, stop := c.Subscribe()
	drained = make(chan struct{})
	go func() {
		defer close(drained)
		defer stop()
		for ev := range events {
			var reason string
			switch ev.Name {
			case "SHUTDOWN":
				var d struct {
					Guest  bool   `json:"guest"`
					Reason string `json:"reason"`
				}
				if json.Unmarshal(ev.Data, &d) != nil || !d.Guest {
					continue // host-requested: quit, or our own Stop
				}
				reason = "guest powered off: " + d.Reason
			case "GUEST_PANICKED":
				reason = "guest panicked"
			default:
				continue
			}
			m.mu.Lock()
			if m.guestReason == "" || ev.Name == "GUEST_PANICKED" {
				m.guestReason = reason
			}
			m.mu.Unlock()
		}
	}()
	return drained
}
