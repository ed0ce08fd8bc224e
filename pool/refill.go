package pool

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"time"

	"github.com/warmpool/warmpool/events"
	"github.com/warmpool/warmpool/vm"
)

// effects collects what a locked section decided to publish, so that events
// go out after the lock is released.
type effects struct {
	events []events.Event
}

func (eff *effects) publish(e events.Event) { eff.events = append(eff.events, e) }

func (p *Pool) publish(eff effects) {
	for _, e := range eff.events {
		p.cfg.Events.Publish(e)
	}
}

// dispatch is the refill loop: it runs schedule whenever something changed,
// a back-off or max-age deadline passed, or the sweep interval elapsed.
func (p *Pool) dispatch() {
	defer p.wg.Done()
	sweep := time.NewTicker(p.cfg.SweepInterval)
	defer sweep.Stop()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		if next := p.schedule(); next.IsZero() {
			timer.Stop()
		} else {
			timer.Reset(time.Until(next))
		}
		select {
		case <-p.ctx.Done():
			return
		case <-p.wake:
		case <-sweep.C:
		case <-timer.C:
		}
	}
}

// slotLimitLocked is how many restores one bucket may have in flight: all
// slots when it is alone, otherwise one fewer per other bucket down to half
// of them, so a stack whose restores hang cannot take every slot from the
// others.
func (p *Pool) slotLimitLocked() int {
	reserve := min(len(p.order)-1, p.cfg.Parallelism/2)
	return max(1, p.cfg.Parallelism-reserve)
}

// schedule replaces expired entries and starts restores, one bucket at a
// time in round-robin order, until the slots are used up or no bucket needs
// one. It returns the next time something will be due without a wake-up.
func (p *Pool) schedule() time.Time {
	var eff effects
	defer func() { p.publish(eff) }()
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed.Load() {
		return time.Time{}
	}
	now := time.Now()
	var next time.Time
	soonest := func(t time.Time) {
		if !t.IsZero() && (next.IsZero() || t.Before(next)) {
			next = t
		}
	}
	for _, b := range p.order {
		soonest(p.ageLocked(b, now, &eff))
	}
	for p.inflight < p.cfg.Parallelism {
		b := p.pickLocked(now, soonest)
		if b == nil {
			break
		}
		p.startRestoreLocked(b)
	}
	return next
}

// pickLocked returns the next bucket in round-robin order that needs a
// restore and may start one now, or nil. Back-off deadlines of the buckets
// it passes over go to soonest.
func (p *Pool) pickLocked(now time.Time, soonest func(time.Time)) *bucket {
	n := len(p.order)
	limit := p.slotLimitLocked()
	for range n {
		p.rr %= n
		b := p.order[p.rr]
		p.rr++
		if b.need() <= 0 || b.restoring >= limit {
			continue
		}
		if b.retryAt.After(now) {
			soonest(b.retryAt)
			continue
		}
		return b
	}
	return nil
}

// ageLocked marks entries past MaxAge and destroys expired ones as long as
// the bucket stays at or above its floor; the rest wait for their
// replacements (make before break). It returns the next expiry. It looks at
// the entries only when one is due or an expired one may now go, since that
// takes them all out of ready for a moment.
func (p *Pool) ageLocked(b *bucket, now time.Time, eff *effects) time.Time {
	if b.spec.MaxAge <= 0 {
		return time.Time{}
	}
	due := b.nextExpiry.IsZero() || !now.Before(b.nextExpiry)
	removable := b.expired.Load() > 0 && b.readyLen()+b.checking > b.spec.Min
	if !due && !removable {
		return b.nextExpiry
	}
	es := b.drainLocked()
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
			p.evictLocked(b, e.vm.ID, ReasonMaxAge, eff)
			continue
		}
		kept = append(kept, e)
	}
	b.nextExpiry = time.Time{}
	p.putBackLocked(b, kept)
	b.nextExpiry = next
	return next
}

func (p *Pool) startRestoreLocked(b *bucket) {
	p.claimLocked(b)
	p.wg.Add(1)
	go p.restoreWorker(b, b.gen, b.spec.Snapshot)
}

func (p *Pool) claimLocked(b *bucket) {
	b.restoring++
	b.restoringCur++
	p.inflight++
}

// restoreWorker holds one restore slot: it restores for b and then, instead
// of handing the slot back to the dispatcher, goes straight on with the next
// bucket in round-robin order that needs a VM, until none does.
func (p *Pool) restoreWorker(b *bucket, gen uint64, snap vm.Snapshot) {
	defer p.wg.Done()
	for b != nil {
		b, gen, snap = p.restore(b, gen, snap)
	}
	p.kick() // the dispatcher may have back-off or age deadlines to re-arm
}

// restore makes one VM for b and delivers it, or records the failure and
// backs the bucket off. It returns the next bucket to restore for, if any.
func (p *Pool) restore(b *bucket, gen uint64, snap vm.Snapshot) (*bucket, uint64, vm.Snapshot) {
	ctx, cancel := context.WithTimeout(p.ctx, p.cfg.RestoreTimeout)
	defer cancel()
	start := time.Now()
	v, err := p.snap.Restore(ctx, snap)
	made, invalid := err == nil, false
	own := &ownership{pool: b.name}
	if made {
		p.owned.Store(v.ID, own)
		if p.cfg.OnVMCreated != nil {
			p.cfg.OnVMCreated(b.name, v)
		}
		if verr := p.cfg.Validate(ctx, v); verr != nil {
			invalid = true
			err = fmt.Errorf("validate %s restored from %s: %w", v.ID, snap.ID, verr)
		}
	} else {
		err = fmt.Errorf("restore pool %q from %s: %w", b.name, snap.ID, err)
	}
	now := time.Now()
	elapsed := now.Sub(start)

	var eff effects
	defer func() { p.publish(eff) }() // runs after the unlock below
	p.mu.Lock()
	defer p.mu.Unlock()
	b.restoring--
	p.inflight--
	current := gen == b.gen && !b.removed
	if current {
		b.restoringCur--
	}
	switch {
	case p.closed.Load():
		// Shutdown destroys everything in owned once this returns.
		return nil, 0, vm.Snapshot{}
	case err != nil:
		if invalid {
			b.counters.validationFailures.Add(1)
			b.m.validation.Inc()
			p.goDestroyLocked(b.name, v.ID)
		}
		if current {
			delay := p.backoffLocked(b, now)
			b.lastError = err.Error()
			b.m.refillErrors.Inc()
			eff.publish(events.Event{Kind: EventRefillErr, Subject: b.name, Detail: map[string]any{
				"error": err.Error(), "failures": b.failures, "retry_in_ms": delay.Milliseconds(),
			}})
			p.log.Warn("pool refill failed", "pool", b.name, "err", err, "failures", b.failures, "retry_in", delay)
		}
	case !current:
		reason := ReasonGeneration
		if b.removed {
			reason = ReasonRemoved
		}
		p.evictLocked(b, v.ID, reason, &eff)
	case own.exited.Load():
		p.evictLocked(b, v.ID, ReasonExited, &eff)
	default:
		b.failures, b.retryAt, b.lastError = 0, time.Time{}, ""
		if b.restoreEWMA == 0 {
			b.restoreEWMA = elapsed
		} else {
			b.restoreEWMA = (3*b.restoreEWMA + elapsed) / 4
		}
		b.m.restoreDuration.Observe(elapsed.Seconds())
		p.deliverLocked(b, &entry{vm: v, own: own, gen: gen, born: now, checked: now})
		if b.expired.Load() > 0 {
			p.kick() // a replacement arrived: an expired entry can go
		}
	}
	next := p.pickLocked(now, func(time.Time) {})
	if next == nil {
		return nil, 0, vm.Snapshot{}
	}
	p.claimLocked(next)
	return next, next.gen, next.spec.Snapshot
}

// backoffLocked records a failure and returns how long b now waits before
// its next restore: exponential with full jitter over its upper half.
func (p *Pool) backoffLocked(b *bucket, now time.Time) time.Duration {
	b.failures++
	d := p.cfg.BackoffMax
	if shift := b.failures - 1; shift < 30 {
		if s := p.cfg.BackoffBase << shift; s > 0 && s < d {
			d = s
		}
	}
	d = d/2 + rand.N(d/2+1)
	b.retryAt = now.Add(d)
	return d
}

// evictLocked counts, announces and destroys (in the background) a VM the
// pool no longer wants.
func (p *Pool) evictLocked(b *bucket, id, reason string, eff *effects) {
	p.recordEvictionLocked(b, id, reason, eff)
	p.goDestroyLocked(b.name, id)
}

func (p *Pool) recordEvictionLocked(b *bucket, id, reason string, eff *effects) {
	b.counters.evicted.Add(1)
	b.m.evicted(reason)
	eff.publish(events.Event{Kind: EventEvicted, Subject: b.name, Detail: map[string]any{
		"vm": id, "reason": reason, "generation": b.gen,
	}})
	p.log.Info("evicting warm VM", "pool", b.name, "vm", id, "reason", reason)
}

// evictNow is evictLocked for callers that do not hold the lock.
func (p *Pool) evictNow(b *bucket, id, reason string) {
	var eff effects
	p.mu.Lock()
	p.evictLocked(b, id, reason, &eff)
	p.mu.Unlock()
	p.publish(eff)
	p.kick()
}

// goDestroyLocked destroys id in the background. After Shutdown began it
// does nothing: the VM is still in owned and Shutdown destroys it, and no
// goroutine may join the wait group Shutdown is waiting on.
func (p *Pool) goDestroyLocked(pool, id string) {
	if p.closed.Load() {
		return
	}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		_ = p.destroy(context.Background(), pool, id)
	}()
}

// destroy destroys one VM the pool owns; an already-gone VM counts as
// destroyed. A VM that could not be destroyed stays in owned, so Shutdown
// tries again.
func (p *Pool) destroy(ctx context.Context, pool, id string) error {
	ctx, cancel := context.WithTimeout(ctx, p.cfg.DestroyTimeout)
	defer cancel()
	if err := p.cfg.Provider.Destroy(ctx, id); err != nil && !errors.Is(err, vm.ErrNotFound) {
		p.log.Warn("destroying warm VM failed", "pool", pool, "vm", id, "err", err)
		return fmt.Errorf("destroy %s of pool %q: %w", id, pool, err)
	}
	if _, owned := p.owned.LoadAndDelete(id); owned && p.cfg.OnVMDestroyed != nil {
		p.cfg.OnVMDestroyed(pool, id)
	}
	return nil
}

// destroyAll destroys ids of pool in parallel and joins the errors.
func (p *Pool) destroyAll(ctx context.Context, pool string, ids []string) error {
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		errs []error
		sem  = make(chan struct{}, max(p.cfg.Parallelism, 4))
	)
	for _, id := range ids {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			if err := p.destroy(ctx, pool, id); err != nil {
				mu.Lock()
				errs = append(errs, err)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	return errors.Join(errs...)
}

// healthLoop validates every waiting VM once per HealthInterval.
func (p *Pool) healthLoop() {
	defer p.wg.Done()
	t := time.NewTicker(p.cfg.HealthInterval)
	defer t.Stop()
	for {
		select {
		case <-p.ctx.Done():
			return
		case <-t.C:
			p.checkRound(time.Now())
		}
	}
}

// checkRound validates, one at a time, every entry not checked since round.
// An entry under check leaves the bucket so that an acquirer never gets a VM
// whose agent channel the check is using; a waiting acquirer gets it as soon
// as the check passes.
func (p *Pool) checkRound(round time.Time) {
	for p.ctx.Err() == nil {
		b, e := p.nextToCheck(round)
		if e == nil {
			return
		}
		ctx, cancel := context.WithTimeout(p.ctx, p.cfg.RestoreTimeout)
		err := p.cfg.Validate(ctx, e.vm)
		cancel()

		var eff effects
		p.mu.Lock()
		b.checking--
		switch {
		case p.closed.Load():
		case b.removed:
			p.evictLocked(b, e.vm.ID, ReasonRemoved, &eff)
		case e.gen != b.gen:
			p.evictLocked(b, e.vm.ID, ReasonGeneration, &eff)
		case e.own.exited.Load():
			p.evictLocked(b, e.vm.ID, ReasonExited, &eff)
		case err != nil:
			b.counters.validationFailures.Add(1)
			b.m.validation.Inc()
			p.log.Warn("warm VM failed health check", "pool", b.name, "vm", e.vm.ID, "err", err)
			p.evictLocked(b, e.vm.ID, ReasonUnhealthy, &eff)
		default:
			e.checked = time.Now()
			p.requeueLocked(b, e)
		}
		p.mu.Unlock()
		p.publish(eff)
		p.kick()
	}
}

func (p *Pool) nextToCheck(round time.Time) (*bucket, *entry) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed.Load() {
		return nil, nil
	}
	// Entries already checked go from the front to the back, so a round
	// keeps the bucket's order and finds each entry in O(1) amortised.
	for _, b := range p.order {
		for range b.readyLen() {
			e := b.tryPop()
			if e == nil {
				break
			}
			if e.checked.Before(round) {
				b.checking++
				if b.expired.Load() > 0 { // rotation moved them off the back
					p.putBackLocked(b, b.drainLocked())
				}
				return b, e
			}
			p.pushLocked(b, e)
		}
		if b.expired.Load() > 0 {
			p.putBackLocked(b, b.drainLocked())
		}
	}
	return nil, nil
}
