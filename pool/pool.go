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
// The acquire hit path takes one mutex twice and calls only Validate, Resume
// and Handoff; everything slow happens in the background.
package pool

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"runtime"
	"slices"
	"sort"
	"sync"
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
	// Handoff runs at acquire after Resume (real code: agent handoff + ping);
	// nil means none. An error destroys the VM and tries the next one.
	Handoff func(ctx context.Context, v vm.VM) error
	// Registry receives the pool's metrics; nil means they are not exported.
	Registry prometheus.Registerer
	// Logger defaults to discarding.
	Logger *slog.Logger
	// Events receives pool events: evictions, refill errors, generation
	// changes. Default: discarded.
	Events events.Publisher
	// OnVMCreated and OnVMDestroyed let the daemon persist every VM the pool
	// owns. OnVMCreated runs as soon as a restore returns a VM (before it is
	// validated); OnVMDestroyed after the pool or Release destroyed one. They
	// run outside the pool's lock and may call Status.
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
	if _, ok := c.Provider.(vm.Snapshotter); !ok {
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

	mu       sync.Mutex
	closed   bool
	buckets  map[string]*bucket
	order    []*bucket // round-robin order for refills
	rr       int
	inflight int
	// owned maps every VM the pool is responsible for (restored and not yet
	// destroyed or handed out) to its pool name.
	owned map[string]string
}

type bucket struct {
	name string
	spec StackSpec
	gen  uint64
	// ready is oldest first; entries past MaxAge stay at the front.
	ready   []*entry
	expired int // entries in ready past MaxAge
	// checking counts entries taken out of ready for a health check.
	checking int
	// restoring counts restores in flight; restoringCur those of the
	// current generation, which are all that count towards the target.
	restoring, restoringCur int
	waiters                 []*waiter

	failures    int
	retryAt     time.Time
	restoreEWMA time.Duration

	removed  bool
	counters Counters
	m        bucketMetrics
}

type entry struct {
	vm      vm.VM
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
	ctx, cancel := context.WithCancel(context.Background())
	p := &Pool{
		cfg:     cfg,
		snap:    cfg.Provider.(vm.Snapshotter),
		log:     cfg.Logger,
		ctx:     ctx,
		cancel:  cancel,
		wake:    make(chan struct{}, 1),
		buckets: make(map[string]*bucket),
		owned:   make(map[string]string),
	}
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

// target is how many current-generation VMs b should have ready or in flight.
func (b *bucket) target() int {
	return min(b.spec.Max, b.spec.Min+len(b.waiters))
}

// fresh counts current-generation VMs that are ready, being checked or on
// their way, leaving out those past MaxAge.
func (b *bucket) fresh() int {
	return len(b.ready) - b.expired + b.checking + b.restoringCur
}

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
	if p.closed {
		p.mu.Unlock()
		return ErrClosed
	}
	b, ok := p.buckets[spec.Name]
	if !ok {
		b = &bucket{name: spec.Name, spec: spec, gen: 1, m: p.metrics.forBucket(spec.Name)}
		p.buckets[spec.Name] = b
		p.order = append(p.order, b)
		p.log.Info("pool registered", "pool", spec.Name, "snapshot", spec.Snapshot.ID, "min", spec.Min, "max", spec.Max)
	} else {
		old := b.spec
		b.spec = spec
		if old.Snapshot.ID != spec.Snapshot.ID || old.Key != spec.Key {
			b.gen++
			for _, e := range b.ready {
				p.evictLocked(b, e.vm.ID, ReasonGeneration, &eff)
			}
			b.ready, b.expired, b.restoringCur = nil, 0, 0
			b.failures, b.retryAt = 0, time.Time{}
			eff.publish(events.Event{Kind: EventGeneration, Subject: b.name, Detail: map[string]any{
				"generation": b.gen, "snapshot": spec.Snapshot.ID, "previous_snapshot": old.Snapshot.ID,
			}})
			p.log.Info("pool generation changed", "pool", b.name, "generation", b.gen, "snapshot", spec.Snapshot.ID)
		}
		// Trim to the new Max, oldest first.
		for len(b.ready) > b.spec.Max {
			e := b.removeAt(0)
			p.evictLocked(b, e.vm.ID, ReasonResized, &eff)
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
	p.order = slices.DeleteFunc(p.order, func(o *bucket) bool { return o == b })
	b.removed = true
	ids := make([]string, 0, len(b.ready))
	for _, e := range b.ready {
		p.recordEvictionLocked(b, e.vm.ID, ReasonRemoved, &eff)
		ids = append(ids, e.vm.ID)
	}
	b.ready, b.expired = nil, 0
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
	p.owned[v.ID] = name
	p.deliverLocked(b, &entry{vm: v, gen: b.gen, born: born, checked: time.Now()})
	return nil
}

func (p *Pool) adoptableLocked(name string, v vm.VM) (*bucket, error) {
	if p.closed {
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
	if _, dup := p.owned[v.ID]; dup {
		return nil, fmt.Errorf("adopt %s into pool %q: already in a pool: %w", v.ID, name, vm.ErrInvalidState)
	}
	if b.spec.MaxAge > 0 && !v.CreatedAt.IsZero() && time.Since(v.CreatedAt) >= b.spec.MaxAge {
		return nil, fmt.Errorf("adopt %s into pool %q: older than max_age %v: %w", v.ID, name, b.spec.MaxAge, vm.ErrInvalidState)
	}
	if len(b.ready)+b.checking+b.restoringCur >= b.spec.Max {
		return nil, fmt.Errorf("adopt %s into pool %q: already %d of max %d: %w", v.ID, name, len(b.ready)+b.checking+b.restoringCur, b.spec.Max, vm.ErrExhausted)
	}
	return b, nil
}

// deliverLocked gives a ready entry to the oldest waiting acquirer or puts
// it in the bucket, keeping the bucket ordered by age.
func (p *Pool) deliverLocked(b *bucket, e *entry) {
	if len(b.waiters) > 0 {
		w := b.waiters[0]
		b.waiters[0] = nil
		b.waiters = b.waiters[1:]
		w.ch <- delivery{e: e}
		return
	}
	i := len(b.ready)
	for i > 0 && b.ready[i-1].born.After(e.born) {
		i--
	}
	b.ready = slices.Insert(b.ready, i, e)
	if e.expired {
		b.expired++
	}
}

// removeAt takes the entry at i out of the bucket.
func (b *bucket) removeAt(i int) *entry {
	e := b.ready[i]
	if i == 0 {
		// O(1) for the common FIFO case.
		b.ready[0] = nil
		b.ready = b.ready[1:]
	} else {
		b.ready = slices.Delete(b.ready, i, i+1)
	}
	if e.expired {
		b.expired--
	}
	return e
}

// popLocked hands out the oldest entry that is not past MaxAge, or an
// expired one when that is all there is (it is still valid: make-before-break
// keeps it until its replacement is ready).
func (b *bucket) popLocked() *entry {
	if len(b.ready) == 0 {
		return nil
	}
	i := 0
	if b.expired > 0 {
		for i < len(b.ready) && b.ready[i].expired {
			i++
		}
		if i == len(b.ready) {
			i = 0
		}
	}
	return b.removeAt(i)
}

// Acquire leases a validated, resumed VM of pool name. When none is ready it
// wakes the refiller and waits until one is or ctx ends; then it returns a
// *NothingReadyError (errors.Is(err, ErrNothingReady)). An unknown pool gives
// vm.ErrNotFound.
func (p *Pool) Acquire(ctx context.Context, name string) (*Lease, error) {
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
		v, err := p.handOut(ctx, b, e, hit)
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
			ID:        newLeaseID(),
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

// take pops a ready entry or, when there is none, queues a waiter, and wakes
// the dispatcher when the bucket is now below its target.
func (p *Pool) take(name string) (*bucket, *entry, *waiter, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil, nil, nil, ErrClosed
	}
	b, ok := p.buckets[name]
	if !ok {
		return nil, nil, nil, vm.ErrNotFound
	}
	if e := b.popLocked(); e != nil {
		if b.need() > 0 {
			p.kick()
		}
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
				if d.e != nil && !b.removed && !p.closed && d.e.gen == b.gen {
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
	b.counters.Timeouts++
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
func (p *Pool) handOut(ctx context.Context, b *bucket, e *entry, hit bool) (vm.VM, error) {
	v := e.vm
	if err := p.cfg.Validate(ctx, v); err != nil {
		p.mu.Lock()
		b.counters.ValidationFailures++
		p.mu.Unlock()
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
		if err := p.cfg.Handoff(ctx, v); err != nil {
			p.log.Warn("handoff of warm VM failed", "pool", b.name, "vm", v.ID, "err", err)
			p.evictNow(b, v.ID, ReasonHandoff)
			return vm.VM{}, err
		}
	}
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		p.evictNow(b, v.ID, ReasonShutdown)
		return vm.VM{}, ErrClosed
	}
	delete(p.owned, v.ID)
	b.counters.Acquired++
	if hit {
		b.counters.Hits++
	} else {
		b.counters.Waits++
	}
	p.mu.Unlock()
	return v, nil
}

// Release destroys a leased VM. It is idempotent: a VM that is already gone
// is not an error.
func (p *Pool) Release(ctx context.Context, l *Lease) error {
	if l == nil || l.VM.ID == "" {
		return fmt.Errorf("release: %w", &vm.FieldError{Field: "lease", Value: "", Reason: "has no VM"})
	}
	err := p.cfg.Provider.Destroy(ctx, l.VM.ID)
	if errors.Is(err, vm.ErrNotFound) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("release lease %s: destroy %s: %w", l.ID, l.VM.ID, err)
	}
	if p.cfg.OnVMDestroyed != nil {
		p.cfg.OnVMDestroyed(l.Pool, l.VM.ID)
	}
	return nil
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
		Ready:      len(b.ready) + b.checking,
		Restoring:  b.restoring,
		Generation: b.gen,
		Counters:   b.counters,
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
		out = append(out, gaugeState{name: b.name, ready: len(b.ready) + b.checking, target: b.target(), restoring: b.restoring})
	}
	return out
}

// Shutdown stops refills and health checks, cancels restores in flight,
// destroys every VM the pool owns and returns once the provider lists none
// of them, or when ctx ends. Leased VMs are not the pool's and are left alone.
func (p *Pool) Shutdown(ctx context.Context) error {
	p.mu.Lock()
	if !p.closed {
		p.closed = true
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
	ids := make(map[string]string, len(p.owned))
	for id, name := range p.owned {
		ids[id] = name
	}
	for _, b := range p.buckets {
		b.ready, b.expired = nil, 0
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

func newLeaseID() string {
	var b [8]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails on Linux
	return "lease-" + hex.EncodeToString(b[:])
}
