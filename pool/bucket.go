package pool

import (
	"context"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/warmpool/warmpool/events"
	"github.com/warmpool/warmpool/vm"
)

// readyCapacity bounds a bucket's ready queue: Max of the largest pool plus
// room for a restore that lands while a smaller Max is being applied.
const readyCapacity = MaxSize + 64

// A bucket is one stack's warm VMs. Its owner goroutine (run) alone writes
// the fields below "owner state" and alone sends on ready; the rest is safe
// to use from any goroutine.
type bucket struct {
	p    *Pool
	name string
	m    bucketMetrics

	// ready holds validated VMs in hand-out order: oldest first, those past
	// MaxAge last. Acquirers receive from it, with their context while they
	// wait; only the owner sends, and takes entries back out.
	ready chan *entry
	// expired counts entries in ready past MaxAge; whoever takes one out
	// decrements it.
	expired atomic.Int64
	// floor is the target depth, for an acquirer's decision to wake the
	// owner.
	floor atomic.Int64
	// arrivals counts Acquire calls, missed those that found nothing
	// ready; an adaptive bucket's owner feeds their increase to its
	// controller.
	arrivals, missed atomic.Int64
	// allowed is what the host's memory budget lets the bucket hold; -1
	// until the budget has looked at it.
	allowed atomic.Int64
	// idleNanos sums the time entries that left ready had waited in it;
	// readyClock packs the number of entries in ready (top readyCountBits
	// bits) with the sum of the instants they entered it (milliseconds
	// since the pool started), so that one atomic add keeps both in step
	// with the hit path.
	idleNanos  atomic.Int64
	readyClock atomic.Uint64
	// handoff passes an entry straight to a waiting acquirer; the owner
	// counts that acquirer out of waiting as the send succeeds, so the
	// target never counts a waiter that was served.
	handoff chan *entry
	// waiting counts acquirers waiting for an entry; the owner fills
	// towards Min plus that many.
	waiting atomic.Int64
	// restoreEWMA and retryAt (Unix ns) estimate, for an acquirer that
	// gives up, when a VM will be ready.
	restoreEWMA, retryAt atomic.Int64
	counters             counters

	inbox   chan func()   // messages, run by the owner in order
	wake    chan struct{} // coalescing wake-up
	gone    chan struct{} // closed when unregistered
	stopped chan struct{} // closed when the owner returns

	// want is how many more restores the owner would start now; granted
	// how many slots the allocator gave it that it has not taken yet. held
	// (guarded by the allocator's mutex) counts the slots it holds.
	want, granted atomic.Int64
	held          int

	// Owner state.
	spec StackSpec
	gen  uint64
	// lastBorn is the birth of the youngest entry pushed in order: one that
	// is older must be sorted in.
	lastBorn time.Time
	// nextExpiry is when the oldest fresh entry passes MaxAge; zero means
	// unknown (look at the entries).
	nextExpiry time.Time
	// round is the start of the health round in progress; zero when none.
	round time.Time
	// checking counts entries out of ready for a health check (at most one).
	checking int
	// restoring counts restores in flight; restoringCur those of the
	// current generation, which are all that count towards the target.
	restoring, restoringCur int
	failures                int
	retryAtTime             time.Time
	ewma                    time.Duration
	// lastError is the current generation's latest refill failure, until a
	// restore of it succeeds.
	lastError string
	removed   bool

	// Adaptive state: ctrl is nil for a fixed-depth pool. seen* are the
	// counters the controller has been given; est is its latest estimate;
	// hitRate weighs recent hits, the pool's value to the budget.
	ctrl                               *controller
	seenArrivals, seenMissed, seenHits int64
	seenAllowed                        int64
	nextStep, shrinkAt                 time.Time
	est                                estimate
	hitRate                            demand
	lastClaim                          budgetClaim
	claimed                            bool
}

func newBucket(p *Pool, spec StackSpec, m bucketMetrics) *bucket {
	b := &bucket{
		p: p, name: spec.Name, m: m, spec: spec, gen: 1,
		ready:   make(chan *entry, readyCapacity),
		handoff: make(chan *entry),
		inbox:   make(chan func(), 64),
		wake:    make(chan struct{}, 1),
		gone:    make(chan struct{}),
		stopped: make(chan struct{}),
	}
	b.floor.Store(int64(spec.Min))
	b.allowed.Store(-1)
	b.seenAllowed = -1
	a := p.adaptiveConfig()
	b.hitRate = demand{halfLife: a.RateHalfLife, window: a.BurstWindow}
	b.setAdaptive()
	return b
}

// setAdaptive starts or stops the controller as the spec says.
func (b *bucket) setAdaptive() {
	switch {
	case b.spec.Adaptive && b.ctrl == nil:
		b.ctrl = newController(b.p.adaptiveConfig())
		if b.ewma > 0 {
			b.ctrl.demand.restored(b.ewma)
		}
		b.nextStep = time.Time{}
	case !b.spec.Adaptive:
		b.ctrl = nil
		b.est = estimate{}
	}
}

// kick wakes the owner without blocking; wakes coalesce.
func (b *bucket) kick() {
	select {
	case b.wake <- struct{}{}:
	default:
	}
}

// kickIfLow wakes the owner when b is below its floor. Acquire calls it
// after a hand-out rather than when it takes a ready entry: on a small
// host the replacement's restore (a hypervisor starting, then warming up)
// competes with the hand-off for CPU, and a restore started at the same
// moment doubled a QEMU/TCG hand-off on 2 cores. Refill starts a few
// milliseconds later instead.
func (b *bucket) kickIfLow() {
	if int64(len(b.ready))-b.expired.Load() < b.floor.Load() {
		b.kick()
	}
}

// send queues f for the owner; false when the owner has returned.
func (b *bucket) send(f func()) bool {
	select {
	case b.inbox <- f:
		return true
	case <-b.stopped:
		return false
	}
}

// call runs f on the owner and waits for it; false when the owner has
// returned (f did not run).
func (b *bucket) call(f func()) bool {
	done := make(chan struct{})
	if !b.send(func() { f(); close(done) }) {
		return false
	}
	select {
	case <-done:
		return true
	case <-b.stopped:
		select {
		case <-done:
			return true
		default:
			return false
		}
	}
}

// run is the owner goroutine.
func (b *bucket) run() {
	p := b.p
	defer p.wg.Done()
	defer close(b.stopped)
	sweep := time.NewTicker(p.cfg.SweepInterval)
	defer sweep.Stop()
	health := time.NewTicker(p.cfg.HealthInterval)
	defer health.Stop()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		if b.removed && b.restoring == 0 && b.checking == 0 {
			return
		}
		if next := b.settle(); next.IsZero() {
			timer.Stop()
		} else {
			timer.Reset(time.Until(next))
		}
		select {
		case <-p.ctx.Done():
			return
		case f := <-b.inbox:
			f()
		case <-b.wake:
		case <-sweep.C:
		case <-timer.C:
		case now := <-health.C:
			if b.round.IsZero() {
				b.round = now
			}
		}
	}
}

// depth is how many current-generation VMs b keeps ready or in flight:
// Min, or an adaptive pool's target.
func (b *bucket) depth() int {
	if b.ctrl != nil {
		return b.ctrl.target
	}
	return b.spec.Min
}

// target adds a restore for every waiting acquirer to the depth, beyond
// Max too: those VMs go to tenants as soon as they are ready, so the
// waiters are served at the speed of the restore slots.
func (b *bucket) target() int {
	return b.depth() + int(b.waiting.Load())
}

func (b *bucket) readyLen() int { return len(b.ready) }

// fresh counts current-generation VMs that are ready, being checked or on
// their way, leaving out those past MaxAge.
func (b *bucket) fresh() int {
	return b.readyLen() - int(b.expired.Load()) + b.checking + b.restoringCur
}

func (b *bucket) need() int { return b.target() - b.fresh() }

// settle brings b up to date after any event: it ages entries, starts the
// restores it has slots for, asks for more, and goes on with a health round.
// It returns when it next needs to run without a wake-up.
func (b *bucket) settle() time.Time {
	if b.removed {
		b.want.Store(0)
		for n := b.granted.Swap(0); n > 0; n-- {
			b.p.slots.release(b)
		}
		return time.Time{}
	}
	var eff effects
	defer func() { b.p.publish(eff) }()
	now := time.Now()
	b.adapt(now, &eff)
	next := b.age(now, &eff)
	if at := b.shrink(now, &eff); !at.IsZero() && (next.IsZero() || at.Before(next)) {
		next = at
	}
	if b.ctrl != nil && (next.IsZero() || b.nextStep.Before(next)) {
		next = b.nextStep
	}
	want := 0
	if b.retryAtTime.After(now) {
		if next.IsZero() || b.retryAtTime.Before(next) {
			next = b.retryAtTime
		}
	} else {
		want = max(0, b.need())
	}
	granted := int(b.granted.Swap(0))
	start := min(granted, want)
	for range start {
		b.startRestore()
	}
	b.want.Store(int64(want - start))
	for range granted - start {
		b.p.slots.release(b)
	}
	if want > start {
		b.p.slots.kick()
	}
	b.checkNext()
	return next
}

// push appends e to ready.
func (b *bucket) push(e *entry) {
	if e.expired {
		b.expired.Add(1)
	}
	if b.spec.MaxAge > 0 {
		if exp := e.born.Add(b.spec.MaxAge); !e.expired && (b.nextExpiry.IsZero() || exp.Before(b.nextExpiry)) {
			b.nextExpiry = exp
		}
	}
	b.enteredReady(e)
	select {
	case b.ready <- e:
	default:
		// Cannot happen while Max <= MaxSize.
		b.leftReady(e)
		if e.expired {
			b.expired.Add(-1)
		}
		b.p.log.Error("pool bucket overflow: destroying warm VM", "pool", b.name, "vm", e.vm.ID, "capacity", cap(b.ready))
		b.counters.evicted.Add(1)
		b.m.evicted(ReasonResized)
		b.goDestroy(e.vm.ID)
	}
}

// tryPop takes the front entry of ready, or returns nil when it is empty.
func (b *bucket) tryPop() *entry {
	select {
	case e := <-b.ready:
		b.leftReady(e)
		if e.expired {
			b.expired.Add(-1)
		}
		return e
	default:
		return nil
	}
}

// drain takes every entry out of ready, in hand-out order. Acquirers that
// find it empty meanwhile wait, and get the entries put back first.
func (b *bucket) drain() []*entry {
	var out []*entry
	for {
		e := b.tryPop()
		if e == nil {
			return out
		}
		out = append(out, e)
	}
}

// putBack fills the (drained) ready with es in hand-out order: by age,
// entries past MaxAge last.
func (b *bucket) putBack(es []*entry) {
	slices.SortStableFunc(es, func(x, y *entry) int {
		if x.expired != y.expired {
			if x.expired {
				return 1
			}
			return -1
		}
		return x.born.Compare(y.born)
	})
	b.lastBorn = time.Time{}
	for _, e := range es {
		if !e.expired {
			b.lastBorn = e.born
		}
	}
	for _, e := range es {
		b.push(e)
	}
}

// toWaiter gives e to the oldest waiting acquirer, if one is waiting.
func (b *bucket) toWaiter(e *entry) bool {
	if b.waiting.Load() == 0 {
		return false
	}
	select {
	case b.handoff <- e:
		b.waiting.Add(-1)
		return true
	default:
		return false
	}
}

// deliver gives a ready entry to the oldest waiting acquirer or puts it in
// the bucket, keeping the bucket ordered by age.
func (b *bucket) deliver(e *entry) {
	if b.toWaiter(e) {
		return
	}
	if e.unchecked {
		b.check(e)
		return
	}
	if e.expired || b.expired.Load() > 0 || e.born.Before(b.lastBorn) {
		// Rare (adopted VMs, entries past MaxAge, given back): rebuild the
		// order.
		b.putBack(append(b.drain(), e))
		return
	}
	b.lastBorn = e.born
	b.push(e)
}

// wait receives an entry as the owner delivers it, until ctx ends or the
// bucket or pool goes away. Nothing is delivered to an acquirer that is no
// longer receiving, so giving up needs no clean-up.
func (b *bucket) wait(ctx context.Context) (*entry, error) {
	b.waiting.Add(1)
	b.kick()
	select {
	case e := <-b.handoff:
		return e, nil // the owner counted this acquirer out
	case e := <-b.ready: // put in ready before this acquirer was listening
		b.leftReady(e)
		b.waiting.Add(-1)
		if e.expired {
			b.expired.Add(-1)
		}
		return e, nil
	case <-ctx.Done():
		b.waiting.Add(-1)
		return nil, ctx.Err()
	case <-b.gone:
		b.waiting.Add(-1)
		return nil, fmt.Errorf("pool %q was removed: %w", b.name, vm.ErrNotFound)
	case <-b.p.closedCh:
		b.waiting.Add(-1)
		return nil, ErrClosed
	}
}

// giveBack returns an entry an acquirer received but will not hand out.
func (b *bucket) giveBack(e *entry) {
	if !b.send(func() {
		if reason := b.unwanted(e); reason != "" {
			b.evict(e.vm.ID, reason)
			return
		}
		b.deliver(e)
	}) {
		b.p.destroyOutside(b.name, e.vm.ID)
	}
}

// evictLater evicts an entry an acquirer holds, through the owner.
func (b *bucket) evictLater(e *entry, reason string) {
	if !b.send(func() { b.evict(e.vm.ID, reason) }) {
		b.p.destroyOutside(b.name, e.vm.ID)
	}
}

// destroyOutside destroys, in the background, a VM that an acquirer held
// when its bucket's owner returned (the bucket was removed, or the pool
// shut down: then the VM is still in owned and Shutdown destroys it).
func (p *Pool) destroyOutside(pool, id string) {
	p.closing.RLock()
	defer p.closing.RUnlock()
	if p.closed.Load() {
		return
	}
	p.wg.Add(1) // Shutdown has not closed the pool, so it is not in Wait
	go func() {
		defer p.wg.Done()
		_ = p.destroy(context.Background(), pool, id)
	}()
}

// unwanted says why e, back from outside the bucket, may not return to it;
// "" when it may.
func (b *bucket) unwanted(e *entry) string {
	switch {
	case b.removed:
		return ReasonRemoved
	case e.gen != b.gen:
		return ReasonGeneration
	case e.own.exited.Load():
		return ReasonExited
	}
	return ""
}

func (b *bucket) nothingReady(ctx context.Context, waited time.Duration) error {
	b.counters.timeouts.Add(1)
	b.m.timeout.Inc()
	retry := time.Duration(b.restoreEWMA.Load())
	if until := time.Until(time.Unix(0, b.retryAt.Load())); until > retry {
		retry = until
	}
	if retry <= 0 {
		retry = time.Second
	}
	return &NothingReadyError{Pool: b.name, Waited: waited, RetryAfter: retry, Err: ctx.Err()}
}

func (b *bucket) status() Status {
	var s Status
	if !b.call(func() {
		s = Status{
			Name:       b.name,
			Template:   b.spec.Key.Template,
			Min:        b.spec.Min,
			Max:        b.spec.Max,
			Ready:      b.readyLen() + b.checking,
			Restoring:  b.restoring,
			Generation: b.gen,
			LastError:  b.lastError,
			Waiting:    int(b.waiting.Load()),
			Target:     b.depth(),
			Adaptive:   b.ctrl != nil,
			Allowed:    -1,
			Restore:    b.ewma,
		}
		if b.p.budget.mib > 0 {
			s.Allowed = int(b.allowed.Load())
		}
		if b.ctrl != nil {
			s.Rate, s.Refill = b.est.Rate, b.est.Refill
			s.TargetReason, s.TargetChanged = b.ctrl.reason, b.ctrl.changed
		}
	}) {
		// The pool shut down: what is left is being destroyed.
		s = Status{Name: b.name}
	}
	s.Counters = b.counters.snapshot()
	s.IdleVMSeconds = b.idleSeconds(time.Now())
	return s
}

// respec applies a new spec for the stack (Register of a known name).
func (b *bucket) respec(spec StackSpec) {
	var eff effects
	defer func() { b.p.publish(eff) }()
	old := b.spec
	b.spec = spec
	b.floor.Store(int64(spec.Min))
	b.nextExpiry = time.Time{}
	b.setAdaptive()
	if b.ctrl != nil {
		// New bounds apply at the next step, which is now.
		b.nextStep, b.shrinkAt = time.Time{}, time.Time{}
		b.floor.Store(int64(b.ctrl.target))
	}
	if old.Snapshot.ID != spec.Snapshot.ID || old.Key != spec.Key {
		b.gen++
		for _, e := range b.drain() {
			b.evictRecorded(e.vm.ID, ReasonGeneration, &eff)
		}
		b.restoringCur, b.lastBorn = 0, time.Time{}
		b.failures, b.retryAtTime, b.lastError = 0, time.Time{}, ""
		b.retryAt.Store(0)
		eff.publish(events.Event{Kind: EventGeneration, Subject: b.name, Detail: map[string]any{
			"generation": b.gen, "snapshot": spec.Snapshot.ID, "previous_snapshot": old.Snapshot.ID,
		}})
		b.p.log.Info("pool generation changed", "pool", b.name, "generation", b.gen, "snapshot", spec.Snapshot.ID)
	}
	b.age(time.Now(), &eff) // MaxAge may have changed
	// Trim to the new Max, oldest first.
	if b.readyLen() > b.spec.Max {
		es := b.drain()
		slices.SortStableFunc(es, func(x, y *entry) int { return x.born.Compare(y.born) })
		cut := max(0, len(es)-b.spec.Max)
		for _, e := range es[:cut] {
			b.evictRecorded(e.vm.ID, ReasonResized, &eff)
		}
		b.putBack(es[cut:])
	}
}

// remove ends the bucket (Unregister): waiters fail, ready VMs are counted
// as evicted and returned for the caller to destroy; restores and checks
// in flight are destroyed when they report.
func (b *bucket) remove() []string {
	var eff effects
	defer func() { b.p.publish(eff) }()
	b.removed = true
	close(b.gone)
	b.p.budget.forget(b)
	var ids []string
	for _, e := range b.drain() {
		b.recordEviction(e.vm.ID, ReasonRemoved, &eff)
		ids = append(ids, e.vm.ID)
	}
	return ids
}

func (b *bucket) adoptable(v vm.VM) error {
	if b.removed {
		return fmt.Errorf("adopt %s: pool %q: %w", v.ID, b.name, vm.ErrNotFound)
	}
	if v.Snapshot != b.spec.Snapshot.ID {
		return fmt.Errorf("adopt %s into pool %q: restored from snapshot %q, the pool now uses %q: %w",
			v.ID, b.name, v.Snapshot, b.spec.Snapshot.ID, vm.ErrInvalidState)
	}
	if v.Status != vm.StatusPaused {
		return fmt.Errorf("adopt %s into pool %q: VM is %s, want paused: %w", v.ID, b.name, v.Status, vm.ErrInvalidState)
	}
	if _, dup := b.p.owned.Load(v.ID); dup {
		return fmt.Errorf("adopt %s into pool %q: already in a pool: %w", v.ID, b.name, vm.ErrInvalidState)
	}
	if b.spec.MaxAge > 0 && !v.CreatedAt.IsZero() && time.Since(v.CreatedAt) >= b.spec.MaxAge {
		return fmt.Errorf("adopt %s into pool %q: older than max_age %v: %w", v.ID, b.name, b.spec.MaxAge, vm.ErrInvalidState)
	}
	if have := b.readyLen() + b.checking + b.restoringCur; have >= b.spec.Max {
		return fmt.Errorf("adopt %s into pool %q: already %d of max %d: %w", v.ID, b.name, have, b.spec.Max, vm.ErrExhausted)
	}
	return nil
}

func (b *bucket) adopt(v vm.VM, born time.Time) error {
	if b.p.closed.Load() {
		return ErrClosed
	}
	if err := b.adoptable(v); err != nil {
		return err
	}
	own := &ownership{pool: b.name}
	b.p.owned.Store(v.ID, own)
	b.deliver(&entry{vm: v, own: own, gen: b.gen, born: born, checked: time.Now()})
	return nil
}

// exited evicts the entry of own if it is in ready. Elsewhere, whoever
// holds it sees own.exited when done with it.
func (b *bucket) exited(own *ownership, id string) {
	if b.removed {
		return
	}
	es := b.drain()
	if i := slices.IndexFunc(es, func(e *entry) bool { return e.own == own }); i >= 0 {
		es = slices.Delete(es, i, i+1)
		b.evict(id, ReasonExited)
	}
	b.putBack(es)
}

// age marks entries past MaxAge and destroys expired ones as long as the
// bucket stays at or above its floor; the rest wait for their replacements
// (make before break). It returns the next expiry. It looks at the entries
// only when one is due or an expired one may now go, since that takes them
// all out of ready for a moment.
func (b *bucket) age(now time.Time, eff *effects) time.Time {
	if b.spec.MaxAge <= 0 {
		return time.Time{}
	}
	due := b.nextExpiry.IsZero() || !now.Before(b.nextExpiry)
	removable := b.expired.Load() > 0 && b.readyLen()+b.checking > b.spec.Min
	if !due && !removable {
		return b.nextExpiry
	}
	es := b.drain()
	var next time.Time
	for _, e := range es {
		if e.expired {
			continue
		}
		exp := e.born.Add(b.spec.MaxAge)
		if !now.Before(exp) {
			e.expired = true
		} else if next.IsZero() || exp.Before(next) {
			next = exp
		}
	}
	// Oldest expired first, while the bucket stays at or above its floor.
	slices.SortStableFunc(es, func(x, y *entry) int { return x.born.Compare(y.born) })
	kept := es[:0]
	ready := len(es)
	for _, e := range es {
		if e.expired && ready+b.checking > b.spec.Min {
			ready--
			b.evictRecorded(e.vm.ID, ReasonMaxAge, eff)
			continue
		}
		kept = append(kept, e)
	}
	b.nextExpiry = time.Time{}
	b.putBack(kept)
	b.nextExpiry = next
	return next
}

// startRestore restores one VM for b in the background, on a slot b holds.
func (b *bucket) startRestore() {
	b.restoring++
	b.restoringCur++
	gen, snap := b.gen, b.spec.Snapshot
	p := b.p
	p.wg.Add(1) // the owner is in the wait group, so Shutdown is not past Wait
	go func() {
		defer p.wg.Done()
		r := p.restoreOne(b.name, snap, func() bool { return b.waiting.Load() > 0 })
		if r.unchecked {
			// The slot stays taken until the waiter's hand-off is done:
			// under TCG that hand-off, a new guest's first, costs more
			// than the restore, and with the slot held the waiters are
			// served in turn at the configured parallelism instead of
			// all at once, each slowed by all the others.
			r.slot = sync.OnceFunc(func() { p.slots.release(b) })
		} else {
			p.slots.release(b)
		}
		// If the owner has returned the pool shut down: the VM is in owned
		// and Shutdown destroys it.
		if !b.send(func() { b.restored(gen, r) }) && r.slot != nil {
			r.slot()
		}
	}()
}

type restoreResult struct {
	v       vm.VM
	own     *ownership
	err     error
	invalid bool // v was made but failed Validate
	// unchecked: v was restored while an acquirer waited and was not
	// validated.
	unchecked bool
	slot      func() // releases the restore slot an unchecked VM holds
	elapsed   time.Duration
	done      time.Time
}

// restoreOne restores and validates one VM; it runs outside the owner. When
// forWaiter says an acquirer waits once the VM exists, it skips Validate:
// the waiter's hand-off checks the VM, and the owner validates it if the
// waiter is gone by then.
func (p *Pool) restoreOne(pool string, snap vm.Snapshot, forWaiter func() bool) restoreResult {
	ctx, cancel := context.WithTimeout(p.ctx, p.cfg.RestoreTimeout)
	defer cancel()
	start := time.Now()
	r := restoreResult{own: &ownership{pool: pool}}
	r.v, r.err = p.snap.Restore(ctx, snap)
	if r.err == nil {
		r.unchecked = forWaiter()
		p.owned.Store(r.v.ID, r.own)
		if p.cfg.OnVMCreated != nil {
			p.cfg.OnVMCreated(pool, r.v)
		}
		if r.unchecked {
			// The waiter's hand-off checks it.
		} else if verr := p.cfg.Validate(ctx, r.v); verr != nil {
			r.invalid = true
			r.err = fmt.Errorf("validate %s restored from %s: %w", r.v.ID, snap.ID, verr)
		}
	} else {
		r.err = fmt.Errorf("restore pool %q from %s: %w", pool, snap.ID, r.err)
	}
	r.done = time.Now()
	r.elapsed = r.done.Sub(start)
	return r
}

// restored takes in the result of a restore of generation gen.
func (b *bucket) restored(gen uint64, r restoreResult) {
	var eff effects
	defer func() { b.p.publish(eff) }()
	b.restoring--
	delivered := false
	defer func() {
		if !delivered && r.slot != nil {
			r.slot()
		}
	}()
	current := gen == b.gen && !b.removed
	if current {
		b.restoringCur--
	}
	switch {
	case b.p.closed.Load():
		// Shutdown destroys everything in owned.
	case r.err != nil:
		if r.invalid {
			b.counters.validationFailures.Add(1)
			b.m.validation.Inc()
			b.goDestroy(r.v.ID)
		}
		if current {
			delay := b.backoff(r.done)
			b.lastError = r.err.Error()
			b.m.refillErrors.Inc()
			eff.publish(events.Event{Kind: EventRefillErr, Subject: b.name, Detail: map[string]any{
				"error": r.err.Error(), "failures": b.failures, "retry_in_ms": delay.Milliseconds(),
			}})
			b.p.log.Warn("pool refill failed", "pool", b.name, "err", r.err, "failures", b.failures, "retry_in", delay)
		}
	case !current:
		reason := ReasonGeneration
		if b.removed {
			reason = ReasonRemoved
		}
		b.evictRecorded(r.v.ID, reason, &eff)
	case r.own.exited.Load():
		b.evictRecorded(r.v.ID, ReasonExited, &eff)
	default:
		b.failures, b.retryAtTime, b.lastError = 0, time.Time{}, ""
		b.retryAt.Store(0)
		if b.ewma == 0 {
			b.ewma = r.elapsed
		} else {
			b.ewma = (3*b.ewma + r.elapsed) / 4
		}
		b.restoreEWMA.Store(int64(b.ewma))
		if b.ctrl != nil {
			b.ctrl.demand.restored(r.elapsed)
		}
		b.m.restoreDuration.Observe(r.elapsed.Seconds())
		delivered = true
		b.deliver(&entry{vm: r.v, own: r.own, gen: gen, born: r.done, checked: r.done, unchecked: r.unchecked, slot: r.slot})
	}
}

// backoff records a failure and returns how long b now waits before its
// next restore: exponential with full jitter over its upper half.
func (b *bucket) backoff(now time.Time) time.Duration {
	b.failures++
	d := b.p.cfg.BackoffMax
	if shift := b.failures - 1; shift < 30 {
		if s := b.p.cfg.BackoffBase << shift; s > 0 && s < d {
			d = s
		}
	}
	d = d/2 + rand.N(d/2+1)
	b.retryAtTime = now.Add(d)
	b.retryAt.Store(b.retryAtTime.UnixNano())
	return d
}

// checkNext starts the health check of the next entry not checked since
// the round began, or ends the round. An entry under check leaves ready so
// that an acquirer never gets a VM whose agent channel the check is using;
// a waiting acquirer gets it as soon as the check passes.
func (b *bucket) checkNext() {
	if b.round.IsZero() || b.checking > 0 || b.removed || b.p.closed.Load() {
		return
	}
	// Entries already checked go from the front to the back, so a round
	// keeps the bucket's order and finds each entry in O(1) amortised.
	var found *entry
	for range b.readyLen() {
		e := b.tryPop()
		if e == nil {
			break
		}
		if e.checked.Before(b.round) {
			found = e
			break
		}
		b.push(e)
	}
	if b.expired.Load() > 0 { // rotation moved them off the back
		b.putBack(b.drain())
	}
	if found == nil {
		b.round = time.Time{}
		return
	}
	b.check(found)
}

// check validates e outside the owner; checked takes the result. e is out
// of ready meanwhile, counted in checking.
func (b *bucket) check(e *entry) {
	b.checking++
	p := b.p
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		defer e.releaseSlot()
		ctx, cancel := context.WithTimeout(p.ctx, p.cfg.RestoreTimeout)
		err := p.cfg.Validate(ctx, e.vm)
		cancel()
		b.send(func() { b.checked(e, err) })
	}()
}

// checked takes in the result of a health check.
func (b *bucket) checked(e *entry, err error) {
	b.checking--
	switch {
	case b.p.closed.Load():
	case b.unwanted(e) != "":
		b.evict(e.vm.ID, b.unwanted(e))
	case err != nil:
		b.counters.validationFailures.Add(1)
		b.m.validation.Inc()
		b.p.log.Warn("warm VM failed health check", "pool", b.name, "vm", e.vm.ID, "err", err)
		b.evict(e.vm.ID, ReasonUnhealthy)
	default:
		e.checked, e.unchecked = time.Now(), false
		if b.toWaiter(e) {
			return
		}
		// To the back: a health round takes entries from the front, so a
		// whole round keeps their order without re-sorting for every check.
		if e.expired || b.expired.Load() > 0 {
			b.putBack(append(b.drain(), e))
		} else {
			b.push(e)
		}
	}
}

// evict counts, announces and destroys (in the background) a VM the pool
// no longer wants.
func (b *bucket) evict(id, reason string) {
	var eff effects
	b.evictRecorded(id, reason, &eff)
	b.p.publish(eff)
}

func (b *bucket) evictRecorded(id, reason string, eff *effects) {
	b.recordEviction(id, reason, eff)
	b.goDestroy(id)
}

func (b *bucket) recordEviction(id, reason string, eff *effects) {
	b.counters.evicted.Add(1)
	b.m.evicted(reason)
	eff.publish(events.Event{Kind: EventEvicted, Subject: b.name, Detail: map[string]any{
		"vm": id, "reason": reason, "generation": b.gen,
	}})
	b.p.log.Info("evicting warm VM", "pool", b.name, "vm", id, "reason", reason)
}

// goDestroy destroys id in the background; it runs on the owner, which is
// in the wait group. After Shutdown began it does nothing: the VM is still
// in owned and Shutdown destroys it.
func (b *bucket) goDestroy(id string) {
	p := b.p
	if p.closed.Load() {
		return
	}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		_ = p.destroy(context.Background(), b.name, id)
	}()
}

// effects collects events to publish once a step is done.
type effects struct {
	events []events.Event
}

func (eff *effects) publish(e events.Event) { eff.events = append(eff.events, e) }

func (p *Pool) publish(eff effects) {
	for _, e := range eff.events {
		p.cfg.Events.Publish(e)
	}
}
