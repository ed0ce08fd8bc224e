package firecracker

import (
	"os"
	"strconv"
	"syscall"
	"time"

	"github.com/warmpool/warmpool/internal/pidwatch"
	"github.com/warmpool/warmpool/vm"
	"golang.org/x/sys/unix"
)

var _ vm.ExitNotifier = (*Provider)(nil)

// exitState is what decides whether a VM's exit is news. Guarded by p.mu.
type exitState struct {
	// handedOver: Create or Restore returned the VM, or it was found
	// running from an earlier process; exits before that are the failed
	// call's own business.
	handedOver bool
	expected   bool   // Stop, Destroy or a failed start ends the process
	stopWatch  func() // ends the pidfd watch of an adopted VM
}

// OnExit implements vm.ExitNotifier. The process is waited for when this
// provider started it, else watched through a pidfd; a guest that shuts
// down (reboot=k) ends the process too.
func (p *Provider) OnExit(fn func(vm.Exit)) (stop func()) { return p.exits.OnExit(fn) }

// Alive implements vm.ExitNotifier.
func (p *Provider) Alive(id string) bool {
	in, err := p.load(id)
	if err != nil {
		return false
	}
	pid := p.alivePID(in)
	return pid != 0 && !pidwatch.Exiting(pid)
}

func (p *Provider) exitStateOf(id string) *exitState {
	st := p.exitStates[id]
	if st == nil {
		st = &exitState{}
		p.exitStates[id] = st
	}
	return st
}

// handOver marks a new VM as known to the caller.
func (p *Provider) handOver(id string) {
	p.mu.Lock()
	p.exitStateOf(id).handedOver = true
	p.mu.Unlock()
}

// expectExit marks the VM's coming exit as the caller's own. undo takes
// the mark back if the process still runs (a Stop that failed).
func (p *Provider) expectExit(in *instance) (undo func()) {
	p.mu.Lock()
	p.exitStateOf(in.ID).expected = true
	p.mu.Unlock()
	return func() {
		if p.alivePID(in) == 0 {
			return
		}
		p.mu.Lock()
		if st := p.exitStates[in.ID]; st != nil {
			st.expected = false
		}
		p.mu.Unlock()
	}
}

// forgetExits drops the exit bookkeeping of a destroyed VM.
func (p *Provider) forgetExits(id string) {
	p.mu.Lock()
	st := p.exitStates[id]
	delete(p.exitStates, id)
	p.mu.Unlock()
	if st != nil && st.stopWatch != nil {
		st.stopWatch()
	}
}

func (p *Provider) processExited(id, how string) {
	p.mu.Lock()
	st := p.exitStates[id]
	report := st != nil && st.handedOver && !st.expected
	p.mu.Unlock()
	if !report {
		return
	}
	p.log.Warn("vm exited", "vm", id, "reason", how)
	p.exits.Notify(vm.Exit{ID: id, At: time.Now(), Reason: how})
}

func describeExit(st *os.ProcessState) string {
	if st == nil {
		return "firecracker exited"
	}
	if ws, ok := st.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return "firecracker killed by signal " + strconv.Itoa(int(ws.Signal())) + " (" + unix.SignalName(ws.Signal()) + ")"
	}
	return "firecracker exited with status " + strconv.Itoa(st.ExitCode())
}

// watchAdopted watches the process pid of a VM an earlier process started,
// once: its wait status belongs to someone else, so a pidfd tells us when
// it ends.
func (p *Provider) watchAdopted(in *instance, pid int) {
	p.mu.Lock()
	_, child := p.children[in.ID]
	_, known := p.exitStates[in.ID]
	if child || known {
		p.mu.Unlock()
		return
	}
	st := p.exitStateOf(in.ID)
	st.handedOver = true
	p.mu.Unlock()
	const how = "firecracker exited (adopted: status unknown)"
	stop, err := pidwatch.Watch(pid, func() { p.processExited(in.ID, how) })
	if err != nil {
		p.log.Warn("cannot watch adopted vm for exits", "vm", in.ID, "pid", pid, "err", err)
		return
	}
	// The pidfd pins whatever process had the PID: ours only if it is
	// still the VM's.
	if p.alivePID(in) != pid {
		stop()
		p.processExited(in.ID, how)
		return
	}
	p.mu.Lock()
	if p.exitStates[in.ID] == st {
		st.stopWatch = stop
		stop = nil
	}
	p.mu.Unlock()
	if stop != nil { // destroyed meanwhile
		stop()
	}
}
