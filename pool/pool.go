// Package pool keeps warm VMs restored from template snapshots and hands them
// out in microseconds.
//
// Each registered stack has a bucket: a FIFO of validated, paused VMs plus
// the acquirers waiting for one. One dispatcher goroutine starts restores
// whenever a bucket is below its target, round-robin over the buckets that
// need one and bounded by Config.Parallelism; it is woken by every event that
// changes a bucket (acquire, eviction, registration, a finished restore) and
// by timers for back-off and max-age, so no acquirer ever waits for the
// periodic sweep. A finished restore goes straight to the oldest waiting
// acquirer, or into the bucket.
//
// The acquire hit path takes no lock the rest of the pool holds: it finds
// the bucket through an immutable map behind an atomic pointer, receives a
// VM from the bucket's ready channel, calls Validate, Resume and Handoff, and
// counts with atomics. So a goroutine (or an OS thread) descheduled inside
// the pool's mutex, or inside another acquire, stalls no acquirer. Only an
// empty bucket takes the mutex, to queue a waiter; everything slow happens in
// the background.
package pool

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"runtime"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/warmpool/warmpool/events"
	"github.com/warmpool/warmpool/vm"
)

// Config configures a Pool. Only Provider is required.
type Config struct {
	// Provider restores and destroys the VMs; it must implement vm.Snapshotter.
	Provider vm.Provider
	// Parallelism bounds restores in flight across all buckets; default
	// runtime.NumCPU().
	Parallelism int
	// SweepInterval is how often the dispatcher looks at every bucket even
	// when nothing woke it (a safety net; refill is event-driven). Default 10s.
	SweepInterval time.Duration
	// HealthInterval is how often each waiting VM is validated again.
	// Default 30s.
	HealthInterval time.Duration
	// Validate checks a restored (still paused) VM before it enters a bucket,
	// in health checks and again before hand-out. Default: Inspect reports it
	// paused or running.
	Validate func(ctx context.Context, v vm.VM) error
	// Handoff runs at acquire after Resume and gives the VM the tenant
	// identity the acquirer passed (real code: agent handoff + ping); nil
	// means none. An error destroys the VM and tries the next one.
	Handoff func(ctx context.Context, v vm.VM, id Identity) error
	// Registry receives the pool's metrics; nil means they are not exported.
	Registry prometheus.Registerer
	// Logger defaults to discarding.
	Logger *slog.Logger
	// Events receives pool events: evictions, refill errors, generation
	// changes. Default: discarded.
	Events events.Publisher
	// OnVMCreated and OnVMDestroyed let the daemon persist every VM the pool
	// owns. OnVMCreated runs as soon as a restore returns a VM (before it is
	// validated); OnVMDestroyed after the pool destroyed one it owned (never
	// for a handed-out VM: that is its owner's to destroy). They run outside
	// the pool's lock and may call Status.
	OnVMCreated   func(pool string, v vm.VM)
	OnVMDestroyed func(pool string, id string)

	// RestoreTimeout bounds one restore plus its validation; default 2m.
	RestoreTimeout time.Duration
	// DestroyTimeout bounds one background destroy; default 30s.
	DestroyTimeout time.Duration
	// BackoffBase and BackoffMax shape the per-bucket exponential back-off
	// (with jitter) after failed restores; defaults 100ms and 30s.
	BackoffBase, BackoffMax time.Duration
}

func (c *Config) setDefaults() error {
	if c.Provider == nil {
		return &vm.FieldError{Field: "provider", Value: nil, Reason: "is required"}
	}
	if _, ok := vm.As[vm.Snapshotter](c.Provider, vm.CapSnapshot); !ok {
		return fmt.Errorf("provider %s cannot restore snapshots: %w", c.Provider.Name(), vm.ErrUnsupported)
	}
	durations := []struct {
		field string
		v     *time.Duration
		def   time.Duration
	}{
		{"sweep_interval", &c.SweepInterval, 10 * time.Second},
		{"health_interval", &c.HealthInterval, 30 * time.Second},
		{"restore_timeout", &c.RestoreTimeout, 2 * time.Minute},
		{"destroy_timeout", &c.DestroyTimeout, 30 * time.Second},
		{"backoff_base", &c.BackoffBase, 100 * time.Millisecond},
		{"backoff_max", &c.BackoffMax, 30 * time.Second},
	}
	for _, d := range durations {
		if *d.v < 0 {
			return &vm.FieldError{Field: d.field, Value: *d.v, Reason: "must not be negative"}
		}
		if *d.v == 0 {
			*d.v = d.def
		}
	}
	if c.Parallelism < 0 {
		return &vm.FieldError{Field: "parallelism", Value: c.Parallelism, Reason: "must not be negative"}
	}
	if c.Parallelism == 0 {
		c.Parallelism = runtime.NumCPU()
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Events == nil {
		c.Events = events.Discard
	}
	if c.Validate == nil {
		prov := c.Provider
		c.Validate = func(ctx context.Context, v vm.VM) error {
			got, err := prov.Inspect(ctx, v.ID)
			if err != nil {
				return err
			}
			if got.Status != vm.StatusPaused && got.Status != vm.StatusRunning {
				return fmt.Errorf("VM %s is %s: %w", v.ID, got.Status, vm.ErrInvalidState)
			}
			return nil
		}
	}
	return nil
}

// Pool keeps the warm VMs of every registered stack.
type Pool struct {
	cfg     Config
	snap    vm.Snapshotter
	log     *slog.Logger
	metrics *metrics

	ctx    context.Context // cancelled by Shutdown: stops refills and in-flight restores
	cancel context.CancelFunc
	wg     sync.WaitGroup // every background goroutine
	wake   chan struct{}

	mu sync.Mutex
	// closed is set once by Shutdown, holding mu and closing; the hit path
	// reads it without mu.
	closed atomic.Bool
	// closing is held for reading by a hand-out while it checks closed and
	// takes its VM out of owned, so that Shutdown (the only writer) either
	// sees the VM leased or destroys it, never both nor neither.
	closing  sync.RWMutex
	buckets  map[string]*bucket
	lookup   atomic.Pointer[map[string]*bucket] // copy of buckets for the hit path, replaced under mu
	order    []*bucket                          // round-robin order for refills
	rr       int
	inflight int
	// owned maps the ID of every VM the pool is responsible for (restored
	// and not yet destroyed or handed out) to its *ownership. It is a
	// sync.Map so that a hand-out removes its VM without the pool's mutex.
	owned sync.Map
}

// ownership is what the pool knows about a VM it owns beyond its entry.
type ownership struct {
	pool string
	// exited is set by VMExited. It is set before VMExited looks for the
	// VM's entry in ready, and every path that puts an entry into ready or
	// hands it out reads it afterwards, so a dead VM is caught by one or
	// the other wherever it was at that moment.
	exited atomic.Bool
}

// readyCapacity bounds a bucket's ready channel: Max of the largest pool plus
// room for a restore that lands while a smaller Max is being applied.
const readyCapacity = MaxSize + 64

// A bucket's fields are guarded by Pool.mu, except ready, expired, floor and
// counters, which the hit path uses without it.
type bucket struct {
	name string
	spec StackSpec
	gen  uint64
	// ready holds validated VMs in hand-out order: oldest first, those past
	// MaxAge last. Acquire receives from it without a lock; everything else
	// that adds entries or takes them out holds Pool.mu. While waiters is
	// not empty, ready is empty: deliverLocked serves waiters first, and an
	// acquirer looks at ready again under Pool.mu before it queues.
	ready chan *entry
	// expired counts entries in ready past MaxAge (pushLocked and tryPop
	// keep it).
	expired atomic.Int64
	// floor is spec.Min, for the hit path's decision to wake the refiller.
	floor atomic.Int64
	// lastBorn is the birth of the youngest entry pushed in order: one that
	// is older must be sorted in.
	lastBorn time.Time
	// nextExpiry is when the oldest fresh entry passes MaxAge; zero means
	// unknown (look at the entries).
	nextExpiry time.Time
	// checking counts entries taken out of ready for a health check.
	checking int
	// restoring counts restores in flight; restoringCur those of the
	// current generation, which are all that count towards the target.
	restoring, restoringCur int
	waiters                 []*waiter

	failures    int
	retryAt     time.Time
	restoreEWMA time.Duration
	// lastError is the current generation's latest refill failure, until a
	// restore of it succeeds.
	lastError string

	removed  bool
	counters counters
	m        bucketMetrics
}

// counters are a bucket's Counters, updated without the pool's mutex.
type counters struct {
	acquired, hits, waits, timeouts, evicted, validationFailures atomic.Uint64
}

func (c *counters) snapshot() Counters {
	return Counters{
		Acquired:           c.acquired.Load(),
		Hits:               c.hits.Load(),
		Waits:              c.waits.Load(),
		Timeouts:           c.timeouts.Load(),
		Evicted:            c.evicted.Load(),
		ValidationFailures: c.validationFailures.Load(),
	}
}

func newBucket(spec StackSpec, m bucketMetrics) *bucket {
	b := &bucket{name: spec.Name, spec: spec, gen: 1, m: m, ready: make(chan *entry, readyCapacity)}
	b.floor.Store(int64(spec.Min))
	return b
}

// An entry's fields are written only while it is outside ready (the channel
// orders those writes before the receiver's reads).
type entry struct {
	vm      vm.VM
	own     *ownership
	gen     uint64
	born    time.Time
	checked time.Time
	expired bool
}

type waiter struct {
	ch chan delivery // buffered: deliveries never block the pool
}

type delivery struct {
	e   *entry
	err error
}

// New starts a pool with no stacks.
func New(cfg Config) (*Pool, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, fmt.Errorf("pool config: %w", err)
	}
	snap, _ := vm.As[vm.Snapshotter](cfg.Provider, vm.CapSnapshot)
	ctx, cancel := context.WithCancel(context.Background())
	p := &Pool{
		cfg:     cfg,
		snap:    snap,
		log:     cfg.Logger,
		ctx:     ctx,
		cancel:  cancel,
		wake:    make(chan struct{}, 1),
		buckets: make(map[string]*bucket),
	}
	p.publishLookupLocked()
	p.metrics = newMetrics(p)
	if cfg.Registry != nil {
		if err := p.metrics.register(cfg.Registry); err != nil {
			cancel()
			return nil, err
		}
	}
	p.wg.Add(2)
	go p.dispatch()
	go p.healthLoop()
	return p, nil
}

// kick wakes the dispatcher without blocking; wakes coalesce.
func (p *Pool) kick() {
	select {
	case p.wake <- struct{}{}:
	default:
	}
}

// publishLookupLocked gives the hit path a copy of the bucket map.
func (p *Pool) publishLookupLocked() {
	m := make(map[string]*bucket, len(p.buckets))
	for name, b := range p.buckets {
		m[name] = b
	}
	p.lookup.Store(&m)
}

// target is how many current-generation VMs b should have ready or in flight.
func (b *bucket) target() int {
	return min(b.spec.Max, b.spec.Min+len(b.waiters))
}

// fresh counts current-generation VMs that are ready, being checked or on
// their way, leaving out those past MaxAge.
func (b *bucket) fresh() int {
	return b.readyLen() - int(b.expired.Load()) + b.checking + b.restoringCur
}

// readyLen counts the entries in ready; acquirers may be taking some.
func (b *bucket) readyLen() int { return len(b.ready) }

func (b *bucket) need() int { return b.target() - b.fresh() }

// Register adds a stack or updates it. A new snapshot (or stack key) starts
// a new generation: VMs of the old one are destroyed and replaced, and never
// handed out again.
func (p *Pool) Register(spec StackSpec) error {
	if err := spec.Validate(); err != nil {
		return fmt.Errorf("register pool %q: %w", spec.Name, err)
	}
	var eff effects
	p.mu.Lock()
	if p.closed.Load() {
		p.mu.Unlock()
		return ErrClosed
	}
	b, ok := p.buckets[spec.Name]
	if !ok {
		b = newBucket(spec, p.metrics.forBucket(spec.Name))
		p.buckets[spec.Name] = b
		p.publishLookupLocked()
		p.order = append(p.order, b)
		p.log.Info("pool registered", "pool", spec.Name, "snapshot", spec.Snapshot.ID, "min", spec.Min, "max", spec.Max)
	} else {
		old := b.spec
		b.spec = spec
		b.floor.Store(int64(spec.Min))
		b.nextExpiry = time.Time{}
		if old.Snapshot.ID != spec.Snapshot.ID || old.Key != spec.Key {
			b.gen++
			for _, e := range b.drainLocked() {
				p.evictLocked(b, e.vm.ID, ReasonGeneration, &eff)
			}
			b.restoringCur, b.lastBorn = 0, time.Time{}
			b.failures, b.retryAt, b.lastError = 0, time.Time{}, ""
			eff.publish(events.Event{Kind: EventGeneration, Subject: b.name, Detail: map[string]any{
				"generation": b.gen, "snapshot": spec.Snapshot.ID, "previous_snapshot": old.Snapshot.ID,
			}})
			p.log.Info("pool generation changed", "pool", b.name, "generation", b.gen, "snapshot", spec.Snapshot.ID)
		}
		p.ageLocked(b, time.Now(), &eff) // MaxAge may have changed
		// Trim to the new Max, oldest first.
		if b.readyLen() > b.spec.Max {
			es := b.drainLocked()
			slices.SortStableFunc(es, func(x, y *entry) int { return x.born.Compare(y.born) })
			cut := max(0, len(es)-b.spec.Max)
			for _, e := range es[:cut] {
				p.evictLocked(b, e.vm.ID, ReasonResized, &eff)
			}
			p.putBackLocked(b, es[cut:])
		}
	}
	p.mu.Unlock()
	p.publish(eff)
	p.kick()
	return nil
}

// Unregister removes a stack and destroys its warm VMs; restores in flight
// are destroyed when they finish. Acquirers waiting on it get vm.ErrNotFound.
func (p *Pool) Unregister(name string) error {
	var eff effects
	p.mu.Lock()
	b, ok := p.buckets[name]
	if !ok {
		p.mu.Unlock()
		return fmt.Errorf("unregister pool %q: %w", name, vm.ErrNotFound)
	}
	delete(p.buckets, name)
	p.publishLookupLocked()
	p.order = slices.DeleteFunc(p.order, func(o *bucket) bool { return o == b })
	b.removed = true
	drained := b.drainLocked()
	ids := make([]string, 0, len(drained))
	for _, e := range drained {
		p.recordEvictionLocked(b, e.vm.ID, ReasonRemoved, &eff)
		ids = append(ids, e.vm.ID)
	}
	for _, w := range b.waiters {
		w.ch <- delivery{err: fmt.Errorf("pool %q was removed: %w", name, vm.ErrNotFound)}
	}
	b.waiters = nil
	p.mu.Unlock()
	p.publish(eff)
	ctx, cancel := context.WithTimeout(context.Background(), p.cfg.DestroyTimeout)
	defer cancel()
	err := p.destroyAll(ctx, name, ids)
	p.metrics.forget(name)
	p.log.Info("pool unregistered", "pool", name)
	return err
}

// Adopt puts a warm VM back into its pool after a daemon restart. The VM must
// have been restored from the pool's current snapshot, be paused, pass
// Validate and fit under Max. On error the VM is left alone: the caller
// destroys it.
func (p *Pool) Adopt(name string, v vm.VM) error {
	p.mu.Lock()
	b, err := p.adoptableLocked(name, v)
	p.mu.Unlock()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(p.ctx, p.cfg.RestoreTimeout)
	defer cancel()
	if err := p.cfg.Validate(ctx, v); err != nil {
		return fmt.Errorf("adopt %s into pool %q: %w", v.ID, name, err)
	}
	born := v.CreatedAt
	if born.IsZero() {
		born = time.Now()
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if b2, err := p.adoptableLocked(name, v); err != nil {
		return err
	} else if b2 != b {
		return fmt.Errorf("adopt %s: pool %q was replaced meanwhile: %w", v.ID, name, vm.ErrInvalidState)
	}
	own := &ownership{pool: name}
	p.owned.Store(v.ID, own)
	p.deliverLocked(b, &entry{vm: v, own: own, gen: b.gen, born: born, checked: time.Now()})
	return nil
}

func (p *Pool) adoptableLocked(name string, v vm.VM) (*bucket, error) {
	if p.closed.Load() {
		return nil, ErrClosed
	}
	b, ok := p.buckets[name]
	if !ok {
		return nil, fmt.Errorf("adopt %s: pool %q: %w", v.ID, name, vm.ErrNotFound)
	}
	if v.Snapshot != b.spec.Snapshot.ID {
		return nil, fmt.Errorf("adopt %s into pool %q: restored from snapshot %q, the pool now uses %q: %w",
			v.ID, name, v.Snapshot, b.spec.Snapshot.ID, vm.ErrInvalidState)
	}
	if v.Status != vm.StatusPaused {
		return nil, fmt.Errorf("adopt %s into pool %q: VM is %s, want paused: %w", v.ID, name, v.Status, vm.ErrInvalidState)
	}
	if _, dup := p.owned.Load(v.ID); dup {
		return nil, fmt.Errorf("adopt %s into pool %q: already in a pool: %w", v.ID, name, vm.ErrInvalidState)
	}
	if b.spec.MaxAge > 0 && !v.CreatedAt.IsZero() && time.Since(v.CreatedAt) >= b.spec.MaxAge {
		return nil, fmt.Errorf("adopt %s into pool %q: older than max_age %v: %w", v.ID, name, b.spec.MaxAge, vm.ErrInvalidState)
	}
	if have := b.readyLen() + b.checking + b.restoringCur; have >= b.spec.Max {
		return nil, fmt.Errorf("adopt %s into pool %q: already %d of max %d: %w", v.ID, name, have, b.spec.Max, vm.ErrExhausted)
	}
	return b, nil
}

// deliverLocked gives a ready entry to the oldest waiting acquirer or puts
// it in the bucket, keeping the bucket ordered by age.
func (p *Pool) deliverLocked(b *bucket, e *entry) {
	if p.handToWaiterLocked(b, e) {
		return
	}
	if e.expired || b.expired.Load() > 0 || e.born.Before(b.lastBorn) {
		// Rare (adopted VMs, entries past MaxAge): rebuild the order.
		p.putBackLocked(b, append(b.drainLocked(), e))
		return
	}
	b.lastBorn = e.born
	p.pushLocked(b, e)
}

// requeueLocked puts back an entry that passed a health check. It goes to
// the back: a health round takes entries from the front, so a whole round
// keeps their order without re-sorting the bucket for every check.
func (p *Pool) requeueLocked(b *bucket, e *entry) {
	if p.handToWaiterLocked(b, e) {
		return
	}
	if e.expired || b.expired.Load() > 0 {
		p.putBackLocked(b, append(b.drainLocked(), e))
		return
	}
	p.pushLocked(b, e)
}

func (p *Pool) handToWaiterLocked(b *bucket, e *entry) bool {
	if len(b.waiters) == 0 {
		return false
	}
	w := b.waiters[0]
	b.waiters[0] = nil
	b.waiters = b.waiters[1:]
	w.ch <- delivery{e: e}
	return true
}

// pushLocked appends e to ready.
func (p *Pool) pushLocked(b *bucket, e *entry) {
	if e.expired {
		b.expired.Add(1)
	}
	if b.spec.MaxAge > 0 {
		if exp := e.born.Add(b.spec.MaxAge); !e.expired && (b.nextExpiry.IsZero() || exp.Before(b.nextExpiry)) {
			b.nextExpiry = exp
		}
	}
	select {
	case b.ready <- e:
	default:
		// Cannot happen while Max <= MaxSize; never block under the lock.
		if e.expired {
			b.expired.Add(-1)
		}
		p.log.Error("pool bucket overflow: destroying warm VM", "pool", b.name, "vm", e.vm.ID, "capacity", cap(b.ready))
		b.counters.evicted.Add(1)
		b.m.evicted(ReasonResized)
		p.goDestroyLocked(b.name, e.vm.ID)
	}
}

// tryPop takes the front entry of ready, or returns nil when it is empty.
// It needs no lock.
func (b *bucket) tryPop() *entry {
	select {
	case e := <-b.ready:
		if e.expired {
			b.expired.Add(-1)
		}
		return e
	default:
		return nil
	}
}

// drainLocked takes every entry out of ready, in hand-out order. Acquirers
// that find ready empty meanwhile queue up on Pool.mu and look again.
func (b *bucket) drainLocked() []*entry {
	var out []*entry
	for {
		e := b.tryPop()
		if e == nil {
			return out
		}
		out = append(out, e)
	}
}

// putBackLocked fills the (drained) ready with es in hand-out order: by age,
// entries past MaxAge last.
func (p *Pool) putBackLocked(b *bucket, es []*entry) {
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
		p.pushLocked(b, e)
	}
}

// Acquire hands out a validated, resumed VM of pool name, handed off with
// id; from then on the VM is the caller's, who destroys it through the
// provider. When none is ready it wakes the refiller and waits until one is
// or ctx ends; then it returns a *NothingReadyError (errors.Is(err,
// ErrNothingReady)). An unknown pool gives vm.ErrNotFound; an invalid id a
// *vm.FieldError.
func (p *Pool) Acquire(ctx context.Context, name string, id Identity) (*Lease, error) {
	if err := vm.ValidateName("lease_id", id.LeaseID); err != nil {
		return nil, fmt.Errorf("acquire from pool %q: %w", name, err)
	}
	start := time.Now()
	var waited time.Duration
	hit := true
	for {
		b, e, w, err := p.take(name)
		if err != nil {
			return nil, fmt.Errorf("acquire from pool %q: %w", name, err)
		}
		if e == nil {
			hit = false
			waitStart := time.Now()
			select {
			case d := <-w.ch:
				waited += time.Since(waitStart)
				if d.err != nil {
					return nil, fmt.Errorf("acquire from pool %q: %w", name, d.err)
				}
				e = d.e
			case <-ctx.Done():
				waited += time.Since(waitStart)
				return nil, p.giveUp(ctx, b, w, waited)
			}
		}
		handoffStart := time.Now()
		v, err := p.handOut(ctx, b, e, id, hit)
		p.kickIfLow(b)
		if err != nil {
			if errors.Is(err, ErrClosed) {
				return nil, fmt.Errorf("acquire from pool %q: %w", name, err)
			}
			if ctx.Err() != nil {
				return nil, p.giveUp(ctx, b, nil, waited)
			}
			continue
		}
		now := time.Now()
		l := &Lease{
			ID:        id.LeaseID,
			Pool:      name,
			VM:        v,
			CreatedAt: now,
			Timings:   Timings{Wait: waited, Handoff: now.Sub(handoffStart), Total: now.Sub(start)},
		}
		if hit {
			b.m.hit.Inc()
		} else {
			b.m.waited.Inc()
		}
		b.m.acquireLatency.Observe(l.Timings.Total.Seconds())
		return l, nil
	}
}

// take pops a ready entry or, when there is none, queues a waiter and wakes
// the dispatcher. A hit takes no lock; Acquire wakes the dispatcher after
// handing the entry out (see kickIfLow).
func (p *Pool) take(name string) (*bucket, *entry, *waiter, error) {
	if p.closed.Load() {
		return nil, nil, nil, ErrClosed
	}
	b := (*p.lookup.Load())[name]
	if b == nil {
		return nil, nil, nil, vm.ErrNotFound
	}
	if e := b.tryPop(); e != nil {
		return b, e, nil, nil // Acquire kicks after the hand-out
	}

	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed.Load() {
		return nil, nil, nil, ErrClosed
	}
	b, ok := p.buckets[name] // it may have been replaced meanwhile
	if !ok {
		return nil, nil, nil, vm.ErrNotFound
	}
	if e := b.tryPop(); e != nil {
		return b, e, nil, nil
	}
	w := &waiter{ch: make(chan delivery, 1)}
	b.waiters = append(b.waiters, w)
	p.kick()
	return b, nil, w, nil
}

// giveUp ends a wait whose context is done. A VM delivered in the meantime
// goes back to the bucket rather than being wasted.
func (p *Pool) giveUp(ctx context.Context, b *bucket, w *waiter, waited time.Duration) error {
	p.mu.Lock()
	if w != nil {
		if i := slices.Index(b.waiters, w); i >= 0 {
			b.waiters = slices.Delete(b.waiters, i, i+1)
		} else {
			select {
			case d := <-w.ch:
				if d.e != nil && !b.removed && !p.closed.Load() && d.e.gen == b.gen && !d.e.own.exited.Load() {
					p.deliverLocked(b, d.e)
				} else if d.e != nil {
					// Pool gone meanwhile: the VM is still in owned, so
					// Unregister's stragglers or Shutdown destroy it.
					p.goDestroyLocked(b.name, d.e.vm.ID)
				}
			default:
			}
		}
	}
	b.counters.timeouts.Add(1)
	retry := b.restoreEWMA
	if now := time.Now(); b.retryAt.After(now) {
		retry = max(retry, b.retryAt.Sub(now))
	}
	if retry <= 0 {
		retry = time.Second
	}
	p.mu.Unlock()
	b.m.timeout.Inc()
	return &NothingReadyError{Pool: b.name, Waited: waited, RetryAfter: retry, Err: ctx.Err()}
}

// handOut validates, resumes and hands off e, then transfers it from the
// pool to the caller. On failure the VM is destroyed.
func (p *Pool) handOut(ctx context.Context, b *bucket, e *entry, id Identity, hit bool) (vm.VM, error) {
	v := e.vm
	if err := p.cfg.Validate(ctx, v); err != nil {
		b.counters.validationFailures.Add(1)
		b.m.validation.Inc()
		p.log.Warn("warm VM failed validation at acquire", "pool", b.name, "vm", v.ID, "err", err)
		p.evictNow(b, v.ID, ReasonUnhealthy)
		return vm.VM{}, err
	}
	if err := p.cfg.Provider.Resume(ctx, v.ID); err != nil {
		p.log.Warn("resume of warm VM failed", "pool", b.name, "vm", v.ID, "err", err)
		p.evictNow(b, v.ID, ReasonHandoff)
		return vm.VM{}, err
	}
	v.Status = vm.StatusRunning
	if p.cfg.Handoff != nil {
		if err := p.cfg.Handoff(ctx, v, id); err != nil {
			p.log.Warn("handoff of warm VM failed", "pool", b.name, "vm", v.ID, "err", err)
			p.evictNow(b, v.ID, ReasonHandoff)
			return vm.VM{}, err
		}
	}
	p.closing.RLock()
	if p.closed.Load() {
		p.closing.RUnlock()
		p.evictNow(b, v.ID, ReasonShutdown)
		return vm.VM{}, ErrClosed
	}
	if e.own.exited.Load() {
		p.closing.RUnlock()
		p.evictNow(b, v.ID, ReasonExited)
		return vm.VM{}, fmt.Errorf("VM %s exited during hand-out: %w", v.ID, vm.ErrInvalidState)
	}
	p.owned.Delete(v.ID)
	p.closing.RUnlock()
	b.counters.acquired.Add(1)
	if hit {
		b.counters.hits.Add(1)
	} else {
		b.counters.waits.Add(1)
	}
	return v, nil
}

// VMExited tells the pool that the process of VM id exited, as its provider
// reports. A warm VM the pool owns (ready, being health-checked or still
// being restored) is evicted at once instead of at the next acquire or
// health check, and its replacement's restore starts. IDs the pool does not
// own (handed-out VMs, unknown IDs) are ignored.
func (p *Pool) VMExited(id string) {
	o, ok := p.owned.Load(id)
	if !ok {
		return
	}
	own := o.(*ownership)
	if own.exited.Swap(true) {
		return // reported already
	}
	var eff effects
	p.mu.Lock()
	// Not found in ready: a health check, restore or hand-out holds the
	// entry and sees exited when it is done with it.
	if b := p.buckets[own.pool]; b != nil && !p.closed.Load() {
		es := b.drainLocked()
		if i := slices.IndexFunc(es, func(e *entry) bool { return e.own == own }); i >= 0 {
			es = slices.Delete(es, i, i+1)
			p.evictLocked(b, id, ReasonExited, &eff)
		}
		p.putBackLocked(b, es)
	}
	p.mu.Unlock()
	p.publish(eff)
	p.kick()
}

// Status reports one pool; vm.ErrNotFound if it is not registered.
func (p *Pool) Status(name string) (Status, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	b, ok := p.buckets[name]
	if !ok {
		return Status{}, fmt.Errorf("pool %q: %w", name, vm.ErrNotFound)
	}
	return b.status(), nil
}

// Pools reports every pool, by name.
func (p *Pool) Pools() []Status {
	p.mu.Lock()
	out := make([]Status, 0, len(p.buckets))
	for _, b := range p.buckets {
		out = append(out, b.status())
	}
	p.mu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

func (b *bucket) status() Status {
	return Status{
		Name:       b.name,
		Template:   b.spec.Key.Template,
		Min:        b.spec.Min,
		Max:        b.spec.Max,
		Ready:      b.readyLen() + b.checking,
		Restoring:  b.restoring,
		Generation: b.gen,
		Counters:   b.counters.snapshot(),
		LastError:  b.lastError,
	}
}

type gaugeState struct {
	name                     string
	ready, target, restoring int
}

func (p *Pool) gauges() []gaugeState {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]gaugeState, 0, len(p.buckets))
	for _, b := range p.buckets {
		out = append(out, gaugeState{name: b.name, ready: b.readyLen() + b.checking, target: b.target(), restoring: b.restoring})
	}
	return out
}

// Shutdown stops refills and health checks, cancels restores in flight,
// destroys every VM the pool owns and returns once the provider lists none
// of them, or when ctx ends. Leased VMs are not the pool's and are left alone.
func (p *Pool) Shutdown(ctx context.Context) error {
	p.mu.Lock()
	if !p.closed.Load() {
		p.closing.Lock()
		p.closed.Store(true)
		p.closing.Unlock()
		for _, b := range p.buckets {
			for _, w := range b.waiters {
				w.ch <- delivery{err: ErrClosed}
			}
			b.waiters = nil
		}
	}
	p.mu.Unlock()
	p.cancel()

	done := make(chan struct{})
	go func() {
		p.wg.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-ctx.Done():
		return fmt.Errorf("shutdown: waiting for restores in flight: %w", ctx.Err())
	}

	// Every restore has returned and destroyed what it made after the pool
	// closed; what is left is in owned.
	p.mu.Lock()
	ids := make(map[string]string)
	p.owned.Range(func(id, own any) bool {
		ids[id.(string)] = own.(*ownership).pool
		return true
	})
	for _, b := range p.buckets {
		b.drainLocked()
	}
	p.mu.Unlock()

	for {
		byPool := make(map[string][]string)
		for id, name := range ids {
			byPool[name] = append(byPool[name], id)
		}
		for name, poolIDs := range byPool {
			_ = p.destroyAll(ctx, name, poolIDs)
		}
		listed, err := p.cfg.Provider.List(ctx)
		if err == nil {
			left := make(map[string]string)
			for _, v := range listed {
				if name, ok := ids[v.ID]; ok {
					left[v.ID] = name
				}
			}
			if len(left) == 0 {
				return nil
			}
			ids = left
		}
		t := time.NewTimer(100 * time.Millisecond)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("shutdown: %d VMs still listed by provider %s (last list error: %v): %w",
				len(ids), p.cfg.Provider.Name(), err, ctx.Err())
		}
	}
}
