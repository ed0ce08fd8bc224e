package lifecycle

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"reflect"
	"sync"
	"time"

	"github.com/warmpool/warmpool/events"
	"github.com/warmpool/warmpool/vm"
)

type cmdKind int

const (
	cmdEnsure cmdKind = iota
	cmdStop
	cmdHold
	cmdUnhold
	cmdTouch
	cmdSetIdle
	cmdExited // the provider reported that a VM exited
)

type command struct {
	kind   cmdKind
	spec   MachineSpec
	force  bool
	owner  string
	ttl    time.Duration
	holdID string
	idle   *IdlePolicy
	exit   vm.Exit
	reply  chan reply // buffered: the machine goroutine never blocks on it
}

type reply struct {
	machine Machine
	hold    Hold
	err     error
}

type opKind string

const (
	opCreate  opKind = "create"
	opBoot    opKind = "boot"
	opResume  opKind = "resume"
	opStop    opKind = "stop"
	opShrink  opKind = "shrink"
	opWake    opKind = "wake"
	opSuspend opKind = "suspend"
)

type runningOp struct {
	seq    uint64
	kind   opKind
	force  bool
	cancel context.CancelFunc
}

type opResult struct {
	seq          uint64
	kind         opKind
	vm           *vm.VM
	fp           Fingerprint
	destroyedOld bool
	vanished     bool
	forced       bool // a graceful stop did not finish in time
	keptVM       bool // a stop powered the VM off but could not destroy it
	balloon      *int
	usedMiB      int
	reserveMiB   int
	snap         *vm.Snapshot
	err          error
}

type healthResult struct {
	vmID     string
	err      error
	gone     bool // the VM process is not running
	vanished bool // the provider no longer knows the VM
}

// initial is a machine's starting point: NotExist for a new machine, or
// what Restore derived from reality.
type initial struct {
	state   State
	want    Desired
	spec    MachineSpec
	cur     *vm.VM
	curFP   Fingerprint
	snap    *vm.Snapshot
	balloon *int
	holds   []Hold
}

// machine is one named machine. Everything below "owned by run" is touched
// only by its goroutine; view is what everyone else reads.
type machine struct {
	mgr        *Manager
	cfg        *Config
	name       string
	cmds       chan command
	opDone     chan opResult
	healthDone chan healthResult
	quit       chan struct{}
	exited     chan struct{}

	mu        sync.Mutex
	view      Machine
	persisted Machine // last one given to OnChange

	// owned by run
	state        State
	since        time.Time
	want         Desired
	spec         MachineSpec
	cur          *vm.VM      // the machine's VM, running or not; nil when none
	curFP        Fingerprint // what cur (or snap) was created from
	snap         *vm.Snapshot
	balloon      *int
	lastErr      *string
	attempts     int
	vanishes     int
	gaveUp       bool
	recovering   bool
	retryAt      time.Time
	holds        []Hold
	lastActivity time.Time
	shrinkTried  bool
	suspendTried bool
	wake         bool
	stopForce    bool
	stopFailed   bool
	healthFails  int
	nextHealth   time.Time
	pinging      bool
	lastAnswer   time.Time // when the agent last answered (ready or a health ping)
	exitedVM     *vm.Exit  // an exit of cur not acted on yet (an operation was in flight)
	announcedFP  *Fingerprint
	op           *runningOp
	opSeq        uint64
	waiters      []chan reply
	stopWaiters  []chan reply
}

func newMachine(mgr *Manager, name string, in initial) *machine {
	now := mgr.cfg.Clock.Now()
	mc := &machine{
		mgr:          mgr,
		cfg:          &mgr.cfg,
		name:         name,
		cmds:         make(chan command, 16),
		opDone:       make(chan opResult, 1),
		healthDone:   make(chan healthResult, 1),
		quit:         make(chan struct{}),
		exited:       make(chan struct{}),
		state:        in.state,
		since:        now,
		want:         in.want,
		spec:         in.spec,
		cur:          in.cur,
		curFP:        in.curFP,
		snap:         in.snap,
		balloon:      in.balloon,
		holds:        in.holds,
		lastActivity: now,
		nextHealth:   now.Add(mgr.cfg.HealthInterval),
	}
	if mc.spec.Name == "" {
		mc.spec.Name = name
	}
	if mc.holds == nil {
		mc.holds = []Hold{}
	}
	// A machine found broken at restore is being recovered.
	mc.recovering = in.state == Failed
	mc.view = mc.buildView()
	mc.persisted = mc.view
	return mc
}

// call sends c and waits for its answer, ctx, or the machine's end.
func (mc *machine) call(ctx context.Context, c command) (reply, error) {
	c.reply = make(chan reply, 1)
	select {
	case mc.cmds <- c:
	case <-mc.exited:
		return reply{}, ErrClosed
	case <-ctx.Done():
		return reply{}, ctx.Err()
	}
	select {
	case r := <-c.reply:
		return r, r.err
	case <-mc.exited:
		return reply{}, ErrClosed
	case <-ctx.Done():
		return reply{}, ctx.Err()
	}
}

func (mc *machine) current() Machine {
	mc.mu.Lock()
	defer mc.mu.Unlock()
	return mc.view
}

func (mc *machine) run() {
	defer close(mc.exited)
	for {
		mc.reconcile()
		mc.publish()
		var timer Timer
		var timeout <-chan time.Time
		if at, ok := mc.nextDeadline(); ok {
			timer = timerAt(mc.cfg.Clock, at)
			timeout = timer.C()
		}
		select {
		case c := <-mc.cmds:
			mc.handle(c)
		case r := <-mc.opDone:
			mc.finish(r)
		case h := <-mc.healthDone:
			mc.onHealth(h)
		case <-timeout:
			// reconcile looks at the clock and does what is due
		case <-mc.quit:
			if timer != nil {
				timer.Stop()
			}
			mc.failWaiters(ErrClosed)
			mc.resolveStop(ErrClosed)
			return
		}
		if timer != nil {
			timer.Stop()
		}
	}
}

func (mc *machine) now() time.Time { return mc.cfg.Clock.Now() }

func (mc *machine) handle(c command) {
	now := mc.now()
	switch c.kind {
	case cmdEnsure:
		mc.activity(now)
		mc.want = DesiredRunning
		mc.stopForce = false
		oldIdle := mc.idle()
		mc.spec = c.spec
		if p := mc.idle(); p != oldIdle {
			mc.emitIdlePolicy(c.spec.Idle == nil)
		}
		if mc.gaveUp {
			// A caller asking again is a reason to try again.
			mc.gaveUp, mc.attempts, mc.retryAt = false, 0, time.Time{}
		}
		if fields := mc.drift(); len(fields) > 0 {
			fp := mc.spec.Fingerprint()
			if mc.announcedFP == nil || *mc.announcedFP != fp {
				mc.announcedFP = &fp
				mc.emit("machine.drift", map[string]any{"fields": fields, "vm_id": mc.vmID()})
				mc.log().Info("machine spec drifted, recreating", "fields", fields)
			}
		}
		if mc.state == Running && mc.op == nil && len(mc.drift()) == 0 && mc.live(now) {
			c.reply <- reply{machine: mc.publish()}
			return
		}
		// reconcile answers once the machine is running and its agent is
		// known to answer.
		mc.waiters = append(mc.waiters, c.reply)
	case cmdStop:
		mc.activity(now)
		mc.want = DesiredStopped
		mc.stopFailed = false
		if c.force {
			mc.stopForce = true
		}
		mc.failWaiters(ErrStopped)
		mc.emit("machine.stop_requested", map[string]any{"force": c.force})
		if (mc.state == NotExist || mc.state == Stopped) && mc.op == nil {
			c.reply <- reply{machine: mc.publish()}
			return
		}
		mc.stopWaiters = append(mc.stopWaiters, c.reply)
		if op := mc.op; op != nil {
			switch op.kind {
			case opCreate, opBoot, opResume:
				op.cancel() // starting is pointless now; finish turns it into a stop
			case opStop:
				if c.force && !op.force {
					// The graceful stop may be stuck in a call that ignores
					// its context: cancel it and stop waiting for it.
					op.cancel()
					mc.op = nil
					mc.emit("machine.stop_forced", map[string]any{"reason": "forced stop requested"})
				}
			}
		}
	case cmdHold:
		mc.activity(now)
		h := Hold{ID: newHoldID(), Owner: c.owner, CreatedAt: now}
		if c.ttl > 0 {
			exp := now.Add(c.ttl)
			h.ExpiresAt = &exp
		}
		mc.holds = append(mc.holds, h)
		mc.emit("machine.hold", map[string]any{"hold": h.ID, "owner": h.Owner, "holds": len(mc.holds)})
		c.reply <- reply{machine: mc.publish(), hold: h}
	case cmdUnhold:
		i := mc.holdIndex(c.holdID)
		if i < 0 {
			c.reply <- reply{err: fmt.Errorf("hold %s: %w", c.holdID, vm.ErrNotFound)}
			return
		}
		mc.holds = append(mc.holds[:i:i], mc.holds[i+1:]...)
		mc.activity(now)
		mc.emit("machine.unhold", map[string]any{"hold": c.holdID, "holds": len(mc.holds)})
		c.reply <- reply{machine: mc.publish()}
	case cmdTouch:
		mc.activity(now)
	case cmdExited:
		if mc.cur != nil && mc.cur.ID == c.exit.ID {
			e := c.exit
			mc.exitedVM = &e
		}
	case cmdSetIdle:
		// Not a drift: the idle steps are rescheduled from now on, the VM
		// stays. Changing the policy is a call about the machine, so it
		// counts as activity like any other.
		mc.spec.Idle = c.idle
		mc.activity(now)
		mc.emitIdlePolicy(c.idle == nil)
		c.reply <- reply{machine: mc.publish()}
	}
}

func (mc *machine) holdIndex(id string) int {
	for i, h := range mc.holds {
		if h.ID == id {
			return i
		}
	}
	return -1
}

// activity restarts the idle clock and wakes an idle machine.
func (mc *machine) activity(now time.Time) {
	mc.lastActivity = now
	mc.shrinkTried, mc.suspendTried = false, false
	if mc.state == Idle || (mc.op != nil && mc.op.kind == opShrink) {
		mc.wake = true
	}
}

// drift names the fields in which the desired spec differs from the one the
// existing VM or snapshot was made from.
func (mc *machine) drift() []string {
	if mc.cur == nil && mc.snap == nil {
		return nil
	}
	return Diff(mc.curFP, mc.spec.Fingerprint())
}

// reconcile starts whatever step brings the machine closer to what its
// callers want, unless a step is already running.
func (mc *machine) reconcile() {
	now := mc.now()
	mc.expireHolds(now)
	if mc.op != nil {
		return
	}
	if e := mc.exitedVM; e != nil {
		mc.exitedVM = nil
		if mc.cur != nil && mc.cur.ID == e.ID && (mc.state == Running || mc.state == Idle) {
			mc.crash(*e)
		}
	}
	if mc.want == DesiredStopped {
		switch mc.state {
		case NotExist, Stopped:
			mc.stopForce = false
			mc.resolveStop(nil)
		case Stopping:
			// Only after a graceful stop was abandoned for a forced one.
			mc.launchStop(true)
		case Failed:
			if !mc.stopFailed {
				mc.startStop(mc.stopForce, "requested")
			}
		default:
			mc.startStop(mc.stopForce, "requested")
		}
		return
	}
	switch mc.state {
	case NotExist, Stopped:
		mc.startCreate("ensure")
	case Failed:
		if !mc.gaveUp && !now.Before(mc.retryAt) {
			mc.startCreate("recovery")
		}
	case Created:
		mc.startBoot()
	case Running, Idle:
		if len(mc.drift()) > 0 {
			mc.startStop(false, "drift")
			return
		}
		if mc.state == Idle && (len(mc.waiters) > 0 || mc.wake) {
			mc.startWake()
			return
		}
		if mc.state == Running && len(mc.waiters) > 0 {
			switch {
			case !mc.mgr.vmAlive(mc.cur.ID):
				// The exit is on its way; do not answer from before it.
				mc.crash(vm.Exit{ID: mc.cur.ID, At: time.Now(), Reason: "process not running (seen by ensure)"})
				return
			case mc.live(now):
				mc.resolveWaiters()
			case !mc.pinging && mc.healthFails == 0:
				mc.startProbe()
				return
			}
			// Else a ping is out, or the last one failed and the health
			// loop's next ping decides: not a burst of them, which would
			// turn one slow moment into a recreate.
		}
		if at, ok := mc.suspendAt(); ok && !now.Before(at) {
			mc.startSuspend()
			return
		}
		if at, ok := mc.shrinkAt(); ok && !now.Before(at) {
			mc.startShrink()
			return
		}
		if !mc.pinging && !now.Before(mc.nextHealth) {
			mc.startProbe()
		}
	case Suspended:
		if len(mc.waiters) > 0 {
			if len(mc.drift()) > 0 {
				mc.startStop(false, "drift")
			} else {
				mc.startResume()
			}
		}
	}
}

func (mc *machine) emitIdlePolicy(isDefault bool) {
	p := mc.idle()
	mc.emit("machine.idle_policy", map[string]any{
		"shrink_after": p.ShrinkAfter.String(), "suspend_after": p.SuspendAfter.String(),
		"reserve_mib": p.ReserveMiB, "default": isDefault,
	})
}

// idle is the machine's own idle policy, else the manager's default.
func (mc *machine) idle() IdlePolicy {
	if mc.spec.Idle != nil {
		return *mc.spec.Idle
	}
	return mc.cfg.Idle
}

func (mc *machine) idleEligible() bool {
	return mc.want == DesiredRunning && len(mc.holds) == 0 && len(mc.waiters) == 0
}

func (mc *machine) shrinkAt() (time.Time, bool) {
	if mc.state != Running || mc.idle().ShrinkAfter <= 0 || mc.shrinkTried || !mc.idleEligible() {
		return time.Time{}, false
	}
	return mc.lastActivity.Add(mc.idle().ShrinkAfter), true
}

func (mc *machine) suspendAt() (time.Time, bool) {
	if (mc.state != Running && mc.state != Idle) || mc.idle().SuspendAfter <= 0 || mc.suspendTried || !mc.idleEligible() {
		return time.Time{}, false
	}
	if !mc.mgr.canSuspend(mc.curFP.DataDiskMiB > 0) {
		return time.Time{}, false
	}
	return mc.lastActivity.Add(mc.idle().SuspendAfter), true
}

// nextDeadline is the earliest instant at which reconcile would do something
// it cannot do now. It must agree with reconcile, or the loop spins.
func (mc *machine) nextDeadline() (time.Time, bool) {
	var at time.Time
	set := func(t time.Time) {
		if at.IsZero() || t.Before(at) {
			at = t
		}
	}
	for _, h := range mc.holds {
		if h.ExpiresAt != nil {
			set(*h.ExpiresAt)
		}
	}
	if mc.op == nil && mc.want == DesiredRunning {
		switch mc.state {
		case Failed:
			if !mc.gaveUp {
				set(mc.retryAt)
			}
		case Running, Idle:
			if t, ok := mc.suspendAt(); ok {
				set(t)
			}
			if t, ok := mc.shrinkAt(); ok {
				set(t)
			}
			if !mc.pinging {
				set(mc.nextHealth)
			}
		}
	}
	return at, !at.IsZero()
}

func (mc *machine) expireHolds(now time.Time) {
	kept := mc.holds[:0]
	expired := false
	for _, h := range mc.holds {
		if h.ExpiresAt != nil && !now.Before(*h.ExpiresAt) {
			expired = true
			mc.emit("machine.hold_expired", map[string]any{"hold": h.ID, "owner": h.Owner})
			continue
		}
		kept = append(kept, h)
	}
	mc.holds = kept
	if expired && len(kept) == 0 {
		// The idle clock starts when the last hold goes, not at the last call.
		mc.lastActivity = now
		mc.shrinkTried, mc.suspendTried = false, false
	}
}

// transition applies ev through the pure state machine and reports it.
func (mc *machine) transition(ev Event, reason string) {
	next, err := Transition(mc.state, ev)
	if err != nil {
		// A bug in the machine goroutine, not a caller's mistake: report it
		// loudly and stay put rather than invent a state.
		mc.log().Error("illegal machine transition", "err", err, "reason", reason)
		mc.emit("machine.error", map[string]any{"error": err.Error(), "reason": reason})
		return
	}
	from := mc.state
	mc.state, mc.since = next, mc.now()
	detail := map[string]any{"from": string(from), "to": string(next), "event": string(ev)}
	if reason != "" {
		detail["reason"] = reason
	}
	if id := mc.vmID(); id != "" {
		detail["vm_id"] = id
	}
	mc.emit("machine.state", detail)
	mc.log().Info("machine state", "from", from, "to", next, "event", ev, "reason", reason)
}

func (mc *machine) vmID() string {
	if mc.cur == nil {
		return ""
	}
	return mc.cur.ID
}

func (mc *machine) emit(kind string, detail map[string]any) {
	mc.cfg.Events.Publish(events.Event{Time: mc.now(), Kind: kind, Subject: mc.name, Detail: detail})
}

func (mc *machine) log() *slog.Logger { return mc.cfg.Logger.With("machine", mc.name) }

func (mc *machine) buildView() Machine {
	holds := make([]Hold, len(mc.holds))
	copy(holds, mc.holds)
	spec := mc.spec
	if spec.Idle != nil {
		p := *spec.Idle
		spec.Idle = &p
	}
	v := Machine{
		Name:         mc.name,
		State:        mc.state,
		Spec:         spec,
		Desired:      mc.want,
		VMID:         mc.vmID(),
		Since:        mc.since,
		Holds:        holds,
		Attempts:     mc.attempts,
		LastActivity: mc.lastActivity,
	}
	if mc.lastErr != nil {
		s := *mc.lastErr
		v.LastError = &s
	}
	if mc.balloon != nil && mc.state != Suspended {
		b := *mc.balloon
		v.BalloonMiB = &b
	}
	if mc.snap != nil {
		s := *mc.snap
		v.Snapshot = &s
	}
	return v
}

// refresh updates what Get sees and returns it.
func (mc *machine) refresh() Machine {
	v := mc.buildView()
	mc.mu.Lock()
	mc.view = v
	mc.mu.Unlock()
	return v
}

// publish refreshes the view and tells the daemon when something worth
// persisting changed (activity alone is not). Answers to callers go out
// after it, so what a caller was told is already persisted.
func (mc *machine) publish() Machine {
	v := mc.refresh()
	if mc.cfg.OnChange == nil {
		return v
	}
	old := mc.persisted
	old.LastActivity = v.LastActivity
	if !reflect.DeepEqual(old, v) {
		mc.persisted = v
		mc.cfg.OnChange(v)
	}
	return v
}

func (mc *machine) resolveWaiters() {
	if len(mc.waiters) == 0 {
		return
	}
	v := mc.publish()
	for _, w := range mc.waiters {
		w <- reply{machine: v}
	}
	mc.waiters = nil
}

func (mc *machine) failWaiters(err error) {
	if len(mc.waiters) == 0 {
		return
	}
	v := mc.publish()
	for _, w := range mc.waiters {
		w <- reply{machine: v, err: err}
	}
	mc.waiters = nil
}

func (mc *machine) resolveStop(err error) {
	if len(mc.stopWaiters) == 0 {
		return
	}
	v := mc.publish()
	for _, w := range mc.stopWaiters {
		w <- reply{machine: v, err: err}
	}
	mc.stopWaiters = nil
}

// launch runs fn as the machine's one operation in flight. Its result comes
// back through opDone unless the machine ends first.
func (mc *machine) launch(kind opKind, force bool, fn func(ctx context.Context) opResult) {
	mc.opSeq++
	ctx, cancel := context.WithCancel(mc.mgr.ctx)
	op := &runningOp{seq: mc.opSeq, kind: kind, force: force, cancel: cancel}
	mc.op = op
	mc.mgr.wg.Add(1)
	go func() {
		defer mc.mgr.wg.Done()
		defer cancel()
		r := fn(ctx)
		r.seq, r.kind = op.seq, kind
		select {
		case mc.opDone <- r:
		case <-mc.quit:
		}
	}()
}

func (mc *machine) finish(r opResult) {
	if mc.op == nil || mc.op.seq != r.seq {
		return // an abandoned operation
	}
	mc.op = nil
	switch r.kind {
	case opCreate:
		mc.finishCreate(r)
	case opBoot, opResume:
		mc.finishStart(r)
	case opStop:
		mc.finishStop(r)
	case opShrink:
		mc.finishShrink(r)
	case opWake:
		mc.finishWake(r)
	case opSuspend:
		mc.finishSuspend(r)
	}
}

func (mc *machine) startCreate(reason string) {
	old := mc.cur
	spec := mc.spec
	mc.transition(EvCreate, reason)
	mc.launch(opCreate, false, func(ctx context.Context) opResult {
		return mc.mgr.createVM(ctx, spec, old)
	})
}

func (mc *machine) finishCreate(r opResult) {
	if r.destroyedOld {
		mc.cur = nil
	}
	if r.err == nil {
		mc.cur, mc.curFP, mc.balloon, mc.announcedFP = r.vm, r.fp, nil, nil
		mc.transition(EvCreated, "")
		return
	}
	if mc.want == DesiredStopped {
		mc.startStop(mc.stopForce, "stopped while creating")
		return
	}
	mc.startFailed(r.err)
}

func (mc *machine) startBoot() {
	v := *mc.cur
	mc.transition(EvStart, "")
	mc.launch(opBoot, false, func(ctx context.Context) opResult {
		return mc.mgr.bootVM(ctx, v)
	})
}

func (mc *machine) startResume() {
	snap := *mc.snap
	restoreBalloon := mc.balloon != nil
	mem := mc.curFP.MemoryMiB
	mc.transition(EvResume, "")
	mc.launch(opResume, false, func(ctx context.Context) opResult {
		return mc.mgr.resumeVM(ctx, snap, mem, restoreBalloon)
	})
}

// finishStart ends a boot or a resume: the agent answered or it did not.
func (mc *machine) finishStart(r opResult) {
	if r.kind == opResume {
		// A failed resume has discarded its snapshot (unless it was only
		// cancelled): the machine restarts cold rather than never.
		switch {
		case r.err == nil:
			mc.emit("machine.resumed", map[string]any{"vm_id": r.vm.ID})
		case r.snap == nil:
			mc.emit("machine.snapshot_discarded", map[string]any{"error": r.err.Error()})
		}
		mc.snap = r.snap
		if r.snap == nil {
			mc.balloon = nil
		}
		if r.vm != nil {
			mc.cur = r.vm
		}
	}
	if r.err == nil {
		mc.ready()
		return
	}
	if mc.want == DesiredStopped {
		mc.startStop(mc.stopForce, "stopped while starting")
		return
	}
	if r.vanished {
		mc.vanish()
		return
	}
	mc.startFailed(r.err)
}

// maxVanishes bounds how often a VM may disappear during start before that
// counts as a failed attempt, so a provider that loses every VM cannot keep
// the machine recreating forever.
const maxVanishes = 3

func (mc *machine) vanish() {
	mc.vanishes++
	if mc.vanishes > maxVanishes {
		mc.startFailed(fmt.Errorf("vm %s vanished %d times in a row", mc.vmID(), mc.vanishes))
		return
	}
	id := mc.vmID()
	mc.emit("machine.vanished", map[string]any{"vm_id": id})
	mc.transition(EvVanish, "vm "+id+" vanished")
	mc.cur = nil
}

func (mc *machine) ready() {
	now := mc.now()
	mc.transition(EvReady, "")
	mc.lastAnswer = now
	recovered, attempts := mc.recovering, mc.attempts
	mc.recovering = false
	mc.attempts, mc.vanishes, mc.gaveUp, mc.lastErr = 0, 0, false, nil
	mc.healthFails, mc.nextHealth = 0, now.Add(mc.cfg.HealthInterval)
	mc.lastActivity, mc.shrinkTried, mc.suspendTried, mc.wake = now, false, false, false
	mc.resolveWaiters()
	if recovered {
		// Published first: whoever hears of the recovery and asks finds
		// the machine running on its new VM.
		mc.publish()
		mc.emit("machine.recovered", map[string]any{"vm_id": mc.vmID(), "attempts": attempts})
	}
}

// live reports whether the machine's VM is known to work: its process runs
// (as far as the provider can tell without waiting) and its agent answered
// within the liveness window, with no failed ping since.
func (mc *machine) live(now time.Time) bool {
	return mc.cur != nil && mc.healthFails == 0 && !mc.lastAnswer.IsZero() &&
		now.Sub(mc.lastAnswer) <= mc.cfg.LivenessWindow && mc.mgr.vmAlive(mc.cur.ID)
}

// crash handles the exit of a running machine's VM: the machine fails and
// recovery starts at once (later crashes in a row back off as failed
// starts do). The dead VM stays in cur so the recovery destroys it.
func (mc *machine) crash(e vm.Exit) {
	mc.emit("machine.crashed", map[string]any{"vm_id": e.ID, "reason": e.Reason, "exited_at": e.At.UTC().Format(time.RFC3339Nano)})
	mc.log().Warn("machine crashed", "vm_id", e.ID, "reason", e.Reason)
	mc.healthFails = 0
	mc.fail(EvCrash, fmt.Errorf("vm %s exited: %s", e.ID, e.Reason), true)
}

// startFailed records a failed start (or a VM that broke) and schedules the
// next attempt with backoff, or gives up.
func (mc *machine) startFailed(err error) { mc.fail(EvFail, err, false) }

// fail moves the machine to Failed on ev and schedules the next attempt:
// with backoff, or at once when immediate and this is the first failure in
// a row.
func (mc *machine) fail(ev Event, err error, immediate bool) {
	msg := err.Error()
	mc.lastErr = &msg
	mc.attempts++
	mc.recovering = true
	mc.transition(ev, msg)
	mc.emit("machine.failed", map[string]any{"error": msg, "attempt": mc.attempts})
	mc.log().Warn("machine failed", "err", err, "attempt", mc.attempts)
	if mc.want != DesiredRunning {
		return
	}
	if mc.attempts >= mc.cfg.Backoff.MaxAttempts {
		mc.gaveUp = true
		mc.emit("machine.gave_up", map[string]any{"attempts": mc.attempts, "error": msg})
		mc.failWaiters(fmt.Errorf("%w after %d attempts: %s", ErrGaveUp, mc.attempts, msg))
		return
	}
	delay := mc.cfg.Backoff.Delay(mc.attempts, mc.cfg.Rand())
	if immediate && mc.attempts == 1 {
		delay = 0
	}
	mc.retryAt = mc.now().Add(delay)
	mc.emit("machine.recovering", map[string]any{
		"attempt": mc.attempts + 1, "delay_ms": delay.Milliseconds(), "delay": delay.String(), "counted": true,
	})
}

func (mc *machine) startStop(force bool, reason string) {
	mc.transition(EvStop, reason)
	mc.launchStop(force)
}

func (mc *machine) launchStop(force bool) {
	var cur *vm.VM
	if mc.cur != nil {
		c := *mc.cur
		cur = &c
	}
	snap := mc.snap
	mc.launch(opStop, force, func(ctx context.Context) opResult {
		return mc.mgr.stopVM(ctx, cur, snap, force)
	})
}

func (mc *machine) finishStop(r opResult) {
	if r.forced {
		mc.emit("machine.stop_forced", map[string]any{"reason": "graceful stop did not finish within " + mc.cfg.StopTimeout.String()})
	}
	if r.err != nil {
		msg := r.err.Error()
		mc.lastErr = &msg
		mc.stopFailed = true
		mc.transition(EvFail, "stop failed: "+msg)
		mc.resolveStop(r.err)
		return
	}
	if !r.keptVM {
		mc.cur = nil
	}
	mc.snap, mc.balloon = nil, nil
	mc.transition(EvStopped, "")
	if mc.want == DesiredStopped {
		mc.stopForce = false
		mc.resolveStop(nil)
	}
}

func (mc *machine) startShrink() {
	v := *mc.cur
	mem := mc.curFP.MemoryMiB
	reserve := mc.idle().ReserveMiB
	mc.launch(opShrink, false, func(ctx context.Context) opResult {
		return mc.mgr.shrinkVM(ctx, v, mem, reserve)
	})
}

func (mc *machine) finishShrink(r opResult) {
	mc.shrinkTried = true
	if r.err != nil {
		mc.emit("machine.idle_failed", map[string]any{"step": "shrink", "error": r.err.Error()})
		mc.log().Warn("idle shrink failed", "err", r.err)
		return
	}
	mc.balloon = r.balloon
	detail := map[string]any{"guest_used_mib": r.usedMiB, "reserve_mib": r.reserveMiB}
	if r.balloon != nil {
		detail["balloon_mib"] = *r.balloon
	} else {
		detail["balloon_mib"] = nil
		detail["reason"] = "provider has no balloon"
	}
	mc.emit("machine.idle", detail)
	mc.transition(EvShrink, "no activity for "+mc.idle().ShrinkAfter.String())
}

func (mc *machine) startWake() {
	v := *mc.cur
	shrunk := mc.balloon != nil
	mem := mc.curFP.MemoryMiB
	mc.wake = false
	mc.launch(opWake, false, func(ctx context.Context) opResult {
		return mc.mgr.wakeVM(ctx, v, mem, shrunk)
	})
}

func (mc *machine) finishWake(r opResult) {
	if r.err != nil {
		// The guest still runs, with less memory: better than refusing it.
		mc.emit("machine.wake_failed", map[string]any{"error": r.err.Error()})
		mc.log().Warn("balloon back up failed", "err", r.err)
	} else {
		mc.balloon = nil
	}
	mc.emit("machine.woke", map[string]any{"memory_mib": mc.spec.MemoryMiB})
	mc.transition(EvWake, "activity")
	// Waiters are answered by reconcile, which checks the VM first.
}

func (mc *machine) startSuspend() {
	v := *mc.cur
	mc.launch(opSuspend, false, func(ctx context.Context) opResult {
		return mc.mgr.suspendVM(ctx, mc.name, v)
	})
}

func (mc *machine) finishSuspend(r opResult) {
	mc.suspendTried = true
	if r.err != nil {
		mc.emit("machine.idle_failed", map[string]any{"step": "suspend", "error": r.err.Error()})
		mc.log().Warn("idle suspend failed", "err", r.err)
		return
	}
	id := mc.vmID()
	mc.snap = r.snap
	mc.cur = nil
	mc.emit("machine.suspended", map[string]any{"vm_id": id, "snapshot_dir": r.snap.Dir})
	mc.transition(EvSuspend, "no activity for "+mc.idle().SuspendAfter.String())
}

func (mc *machine) startProbe() {
	v := *mc.cur
	mc.pinging = true
	mc.mgr.wg.Add(1)
	go func() {
		defer mc.mgr.wg.Done()
		r := mc.mgr.probeVM(v)
		select {
		case mc.healthDone <- r:
		case <-mc.quit:
		}
	}()
}

func (mc *machine) onHealth(h healthResult) {
	mc.pinging = false
	mc.nextHealth = mc.now().Add(mc.cfg.HealthInterval)
	if mc.op != nil || mc.cur == nil || mc.cur.ID != h.vmID || (mc.state != Running && mc.state != Idle) {
		return // the machine moved on while the ping was out
	}
	if h.err == nil {
		mc.healthFails = 0
		mc.lastAnswer = mc.now()
		return
	}
	mc.healthFails++
	if !h.gone && mc.healthFails < mc.cfg.HealthFailures {
		mc.emit("machine.ping_failed", map[string]any{"error": h.err.Error(), "failures": mc.healthFails})
		return
	}
	mc.emit("machine.health_failed", map[string]any{
		"error": h.err.Error(), "failures": mc.healthFails, "process_gone": h.gone, "vanished": h.vanished,
	})
	mc.healthFails = 0
	if !h.vanished {
		mc.startFailed(fmt.Errorf("health check: %w", h.err))
		return
	}
	// A VM the provider no longer knows is recreated at once and the
	// attempt is not counted: nothing about the machine's spec is broken.
	msg := h.err.Error()
	mc.lastErr = &msg
	mc.recovering = true
	mc.transition(EvFail, msg)
	mc.cur = nil
	mc.retryAt = mc.now()
	mc.emit("machine.recovering", map[string]any{
		"attempt": mc.attempts + 1, "delay_ms": int64(0), "delay": "0s", "counted": false,
	})
}

var errVanished = errors.New("vm vanished")
