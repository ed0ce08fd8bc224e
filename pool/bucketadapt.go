package pool

import (
	"slices"
	"time"

	"github.com/warmpool/warmpool/events"
)

// readyCountBits is the width of readyClock's count of entries in ready:
// enough for readyCapacity, leaving 51 bits for the sum of their instants
// (in milliseconds, room for thousands of entries over years).
const readyCountBits = 13

const readyCountOne = uint64(1) << (64 - readyCountBits)

func (b *bucket) sinceEpochMillis(t time.Time) int64 {
	return max(0, t.Sub(b.p.epoch).Milliseconds())
}

// enteredReady starts e's idle time; push calls it.
func (b *bucket) enteredReady(e *entry) {
	e.readyAt = b.sinceEpochMillis(time.Now())
	b.readyClock.Add(readyCountOne + uint64(e.readyAt))
}

// leftReady ends e's idle time; whoever takes e out of ready calls it.
func (b *bucket) leftReady(e *entry) {
	now := b.sinceEpochMillis(time.Now())
	b.idleNanos.Add((now - e.readyAt) * int64(time.Millisecond))
	b.readyClock.Add(^(readyCountOne + uint64(e.readyAt)) + 1) // subtract
}

// idleSeconds sums the time VMs have waited ready in b, until now.
func (b *bucket) idleSeconds(now time.Time) float64 {
	rc := b.readyClock.Load()
	n := int64(rc >> (64 - readyCountBits))
	sum := int64(rc & (readyCountOne - 1))
	open := max(0, n*b.sinceEpochMillis(now)-sum)
	return float64(b.idleNanos.Load())/1e9 + float64(open)/1e3
}

// adapt steps an adaptive bucket's controller when acquires arrived, the
// budget changed or its tick is due, and records a change of its target.
// Every bucket's claim on the host's budget is kept up to date here.
func (b *bucket) adapt(now time.Time, eff *effects) {
	if b.ctrl == nil {
		b.publishClaim(now)
		return
	}
	arrivals, missed, allowed := b.arrivals.Load(), b.missed.Load(), b.allowed.Load()
	if arrivals == b.seenArrivals && missed == b.seenMissed && allowed == b.seenAllowed && now.Before(b.nextStep) {
		return
	}
	hits := int64(b.counters.hits.Load())
	b.hitRate.arrive(now, int(hits-b.seenHits))
	o := observation{
		Arrivals: int(arrivals - b.seenArrivals),
		Missed:   int(missed - b.seenMissed),
		Min:      b.spec.Min,
		Max:      b.spec.Max,
		Allowed:  -1,
	}
	if b.p.budget.mib > 0 && allowed >= 0 {
		o.Allowed = int(allowed)
	}
	b.seenArrivals, b.seenMissed, b.seenHits, b.seenAllowed = arrivals, missed, hits, allowed
	previous := b.ctrl.target
	est, changed := b.ctrl.step(now, o)
	b.est = est
	b.nextStep = now.Add(b.ctrl.tick())
	b.floor.Store(int64(b.ctrl.target))
	if changed {
		b.shrinkAt = time.Time{}
		reason := b.ctrl.reason
		b.m.targetChanged(reason)
		eff.publish(events.Event{Kind: EventTarget, Subject: b.name, Detail: map[string]any{
			"target": b.ctrl.target, "previous": previous, "reason": reason,
			"rate": est.Rate, "refill_ms": est.Refill.Milliseconds(), "allowed": o.Allowed,
		}})
		b.p.log.Debug("pool target changed", "pool", b.name, "target", b.ctrl.target, "previous", previous,
			"reason", reason, "rate", est.Rate, "refill", est.Refill)
	}
	b.publishClaim(now)
}

// publishClaim tells the budget what b holds and wants, when that changed.
func (b *bucket) publishClaim(now time.Time) {
	if b.p.budget.mib <= 0 || b.removed {
		return
	}
	c := budgetClaim{name: b.name, memMiB: b.spec.Key.MemoryMiB, floor: b.spec.Min, want: b.spec.Min}
	if b.ctrl != nil {
		c.want = max(b.spec.Min, min(b.spec.Max, max(b.est.Want, b.ctrl.target)))
		c.value = b.hitRate.rateAtTime(now)
	}
	if b.claimed && c == b.lastClaim {
		return
	}
	b.claimed, b.lastClaim = true, c
	b.p.budget.update(b, c)
}

// shrink destroys ready VMs beyond an adaptive bucket's target, oldest
// first, once they have waited MinIdle (at once when the budget cut the
// target), and never while an acquirer waits. It returns when the next one
// may go, or zero.
func (b *bucket) shrink(now time.Time, eff *effects) time.Time {
	if b.ctrl == nil || b.removed || b.waiting.Load() > 0 {
		return time.Time{}
	}
	if now.Before(b.shrinkAt) {
		return b.shrinkAt
	}
	excess := min(b.fresh()-b.depth(), b.readyLen()-int(b.expired.Load()))
	if excess <= 0 {
		return time.Time{}
	}
	es := b.drain()
	slices.SortStableFunc(es, func(x, y *entry) int { return x.born.Compare(y.born) })
	born := make([]time.Time, 0, len(es))
	for _, e := range es {
		if !e.expired {
			born = append(born, e.born)
		}
	}
	evict, next := shrinkPlan(now, born, excess, int(b.waiting.Load()), b.ctrl.cfg.MinIdle, b.ctrl.reason == TargetBudget)
	kept := es[:0]
	fresh := 0
	for _, e := range es {
		if !e.expired {
			if fresh < len(evict) && evict[fresh] {
				fresh++
				b.evictRecorded(e.vm.ID, ReasonScaledDown, eff)
				continue
			}
			fresh++
		}
		kept = append(kept, e)
	}
	b.putBack(kept)
	b.shrinkAt = next
	return next
}

// shrinkPlan picks, among ready VMs born at born (oldest first), up to
// excess to destroy: those that have waited minIdle, or any when the
// budget cut the target. While an acquirer waits it picks none: a VM is
// never destroyed to shrink a pool someone is waiting on. It returns which
// to destroy (by index) and when the next one could go (zero: none).
func shrinkPlan(now time.Time, born []time.Time, excess, waiting int, minIdle time.Duration, cut bool) ([]bool, time.Time) {
	evict := make([]bool, len(born))
	var next time.Time
	if waiting > 0 {
		return evict, next
	}
	for i, t := range born {
		if excess <= 0 {
			break
		}
		if cut || now.Sub(t) >= minIdle {
			evict[i] = true
			excess--
			continue
		}
		if at := t.Add(minIdle); next.IsZero() || at.Before(next) {
			next = at
		}
	}
	return evict, next
}
