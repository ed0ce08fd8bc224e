// Package pool keeps warm VMs restored from template snapshots and hands them
// out in microseconds.
//
// Each registered stack has a bucket, and each bucket one owner goroutine
// that alone changes its state: it fills the bucket's ready queue (a FIFO
// of validated, paused VMs), takes entries out of it for health checks,
// max-age replacement, eviction and a new generation, counts restores in
// flight and backs off after failures. Other calls (Register, Status,
// Adopt, VMExited, the results of restores and checks) reach it as
// messages. Restores across all buckets are bounded by Config.Parallelism:
// an allocator goroutine grants free slots round-robin to the buckets that
// want one, and a finished restore returns its slot to it at once, so the
// next restore starts without waiting for any sweep.
//
// The acquire hit path takes no lock the rest of the pool holds: it finds
// the bucket through an immutable map behind an atomic pointer, receives a
// VM from the bucket's ready queue (a buffered channel), calls Validate,
// Resume and Handoff, and counts with atomics. An acquirer that finds the
// queue empty tells the owner it waits and then receives, with its
// context, from the queue or from the owner directly: the owner's next VM
// goes to the oldest waiting acquirer, and one that gave up has received
// nothing, so no VM is ever delivered twice or lost. A VM that arrives just
// as its acquirer's context ends goes back to the owner.
package pool

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"runtime"
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
	// SweepInterval is how often each bucket's owner looks at its bucket
	// even when nothing woke it (a safety net; refill is event-driven).
	// Default 10s.
	SweepInterval time.Duration
	// HealthInterval is how often each waiting VM is validated again.
	// Default 30s.
	HealthInterval time.Duration
	// Validate checks a restored (still paused) VM before it enters a bucket,
	// in health checks and again before hand-out. Default: Inspect reports it
	// paused or running.
	// A VM restored while an acquirer waits goes to that acquirer without
	// it: its hand-off is its check, and it skips work (a warm-up) that
	// only pays off for a VM that sits ready. Validate runs on it when no
	// acquirer is left to take it.
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
	// every bucket's owner goroutine and may call Status.
	OnVMCreated   func(pool string, v vm.VM)
	OnVMDestroyed func(pool string, id string)

	// RestoreTimeout bounds one restore plus its validation; default 2m.
	RestoreTimeout time.Duration
	// DestroyTimeout bounds one background destroy; default 30s.
	DestroyTimeout time.Duration
	// BackoffBase and BackoffMax shape the per-bucket exponential back-off
	// (with jitter) after failed restores; defaults 100ms and 30s.
	BackoffBase, BackoffMax time.Duration

	// Adaptive tunes the pools whose spec is Adaptive.
	Adaptive AdaptiveConfig
	// MemoryBudgetMiB is the guest memory all pools' targets may hold
	// together (each VM counted at its stack's MemoryMiB); 0 means no
	// budget. Every pool keeps its Min (a fixed pool its whole depth);
	// beyond that the adaptive pools whose warm memory earned the fewest
	// hits recently give way first.
	MemoryBudgetMiB int
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
	if err := c.Adaptive.setDefaults(); err != nil {
		return err
	}
	if c.MemoryBudgetMiB < 0 {
		return &vm.FieldError{Field: "memory_budget_mib", Value: c.MemoryBudgetMiB, Reason: "must not be negative"}
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

	ctx    context.Context // cancelled by Shutdown: stops owners and in-flight restores
	cancel context.CancelFunc
	wg     sync.WaitGroup // every owner and background goroutine

	// closed is set once by Shutdown, holding closing for writing, which
	// also closes closedCh. A hand-out holds closing for reading while it
	// checks closed and takes its VM out of owned, so that Shutdown either
	// sees the VM leased or destroys it, never both nor neither; a goroutine
	// outside the wait group does the same before it joins it.
	closed   atomic.Bool
	closing  sync.RWMutex
	closedCh chan struct{}

	mu      sync.Mutex // guards buckets; never taken on the hit path
	buckets map[string]*bucket
	lookup  atomic.Pointer[map[string]*bucket] // copy of buckets for the hit path, replaced under mu

	slots slotAllocator

	// owned maps the ID of every VM the pool is responsible for (restored
	// and not yet destroyed or handed out) to its *ownership. It is a
	// sync.Map so that a hand-out removes its VM without any owner.
	owned sync.Map

	// adaptive is the tuning of controllers started from now on (Config's,
	// or SetAdaptive's).
	adaptive atomic.Pointer[AdaptiveConfig]
	// epoch is when the pool started; idle accounting counts from it.
	epoch time.Time
	// budget shares limits.memory_mib among the buckets.
	budget budget
}

// ownership is what the pool knows about a VM it owns beyond its entry.
type ownership struct {
	pool string
	// exited is set by VMExited before it asks the owner to look for the
	// VM in the ready queue; whoever holds the entry outside the queue (a
	// health check, a restore, a hand-out) reads it when done with it.
	exited atomic.Bool
}

// counters are a bucket's Counters, updated without its owner.
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

// An entry's fields are written only while it is outside the ready queue
// (the channel orders those writes before the receiver's reads).
type entry struct {
	vm      vm.VM
	own     *ownership
	gen     uint64
	born    time.Time
	checked time.Time
	expired bool
	// unchecked marks a VM restored for a waiting acquirer and not
	// validated: it goes to a waiter, or through Validate before ready.
	unchecked bool
	// slot, when set, releases the restore slot an unchecked VM still
	// holds (safe to call more than once).
	slot func()
	// readyAt is when it last entered ready, in milliseconds since the
	// pool started (idle accounting).
	readyAt int64
}

// releaseSlot frees the restore slot e holds, if any.
func (e *entry) releaseSlot() {
	if e.slot != nil {
		e.slot()
	}
}

// New starts a pool with no stacks.
func New(cfg Config) (*Pool, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, fmt.Errorf("pool config: %w", err)
	}
	snap, _ := vm.As[vm.Snapshotter](cfg.Provider, vm.CapSnapshot)
	ctx, cancel := context.WithCancel(context.Background())
	p := &Pool{
		cfg:      cfg,
		snap:     snap,
		log:      cfg.Logger,
		ctx:      ctx,
		cancel:   cancel,
		closedCh: make(chan struct{}),
		buckets:  make(map[string]*bucket),
		epoch:    time.Now(),
	}
	p.budget.mib = cfg.MemoryBudgetMiB
	p.adaptive.Store(&cfg.Adaptive)
	p.slots.parallelism = cfg.Parallelism
	p.slots.wake = make(chan struct{}, 1)
	p.publishLookupLocked()
	p.metrics = newMetrics(p)
	if cfg.Registry != nil {
		if err := p.metrics.register(cfg.Registry); err != nil {
			cancel()
			return nil, err
		}
	}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		p.slots.run(ctx)
	}()
	return p, nil
}

// SetAdaptive replaces the tuning of adaptive pools. Pools that become
// adaptive later use it; those adaptive already keep theirs until they
// are registered as fixed and adaptive again.
func (p *Pool) SetAdaptive(c AdaptiveConfig) error {
	if err := c.setDefaults(); err != nil {
		return fmt.Errorf("pool adaptive config: %w", err)
	}
	p.adaptive.Store(&c)
	return nil
}

func (p *Pool) adaptiveConfig() AdaptiveConfig { return *p.adaptive.Load() }

// publishLookupLocked gives the hit path a copy of the bucket map.
func (p *Pool) publishLookupLocked() {
	m := make(map[string]*bucket, len(p.buckets))
	for name, b := range p.buckets {
		m[name] = b
	}
	p.lookup.Store(&m)
}

// bucketNamed returns the registered bucket name, or nil.
func (p *Pool) bucketNamed(name string) *bucket {
	return (*p.lookup.Load())[name]
}

// Register adds a stack or updates it. A new snapshot (or stack key) starts
// a new generation: VMs of the old one are destroyed and replaced, and never
// handed out again.
func (p *Pool) Register(spec StackSpec) error {
	if err := spec.Validate(); err != nil {
		return fmt.Errorf("register pool %q: %w", spec.Name, err)
	}
	p.mu.Lock()
	if p.closed.Load() {
		p.mu.Unlock()
		return ErrClosed
	}
	b, ok := p.buckets[spec.Name]
	if !ok {
		b = newBucket(p, spec, p.metrics.forBucket(spec.Name))
		p.buckets[spec.Name] = b
		p.publishLookupLocked()
		p.slots.add(b)
		p.wg.Add(1)
		go b.run()
		p.mu.Unlock()
		p.log.Info("pool registered", "pool", spec.Name, "snapshot", spec.Snapshot.ID, "min", spec.Min, "max", spec.Max)
		return nil
	}
	p.mu.Unlock()
	if !b.call(func() { b.respec(spec) }) {
		return ErrClosed
	}
	return nil
}

// Unregister removes a stack and destroys its warm VMs; restores in flight
// are destroyed when they finish. Acquirers waiting on it get vm.ErrNotFound.
func (p *Pool) Unregister(name string) error {
	p.mu.Lock()
	b, ok := p.buckets[name]
	if !ok {
		p.mu.Unlock()
		return fmt.Errorf("unregister pool %q: %w", name, vm.ErrNotFound)
	}
	delete(p.buckets, name)
	p.publishLookupLocked()
	p.mu.Unlock()
	p.slots.remove(b)
	var ids []string
	if !b.call(func() { ids = b.remove() }) {
		return ErrClosed // Shutdown destroys them
	}
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
	b := p.bucketNamed(name)
	if p.closed.Load() {
		return ErrClosed
	}
	if b == nil {
		return fmt.Errorf("adopt %s: pool %q: %w", v.ID, name, vm.ErrNotFound)
	}
	var err error
	if !b.call(func() { err = b.adoptable(v) }) {
		return ErrClosed
	}
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
	if !b.call(func() { err = b.adopt(v, born) }) {
		return ErrClosed
	}
	return err
}

// Acquire hands out a validated, resumed VM of pool name, handed off with
// id; from then on the VM is the caller's, who destroys it through the
// provider. When none is ready it wakes the bucket's owner and waits until
// one is or ctx ends; then it returns a *NothingReadyError (errors.Is(err,
// ErrNothingReady)). An unknown pool gives vm.ErrNotFound; an invalid id a
// *vm.FieldError.
func (p *Pool) Acquire(ctx context.Context, name string, id Identity) (*Lease, error) {
	if err := vm.ValidateName("lease_id", id.LeaseID); err != nil {
		return nil, fmt.Errorf("acquire from pool %q: %w", name, err)
	}
	start := time.Now()
	var waited time.Duration
	hit, arrived := true, false
	for {
		if p.closed.Load() {
			return nil, fmt.Errorf("acquire from pool %q: %w", name, ErrClosed)
		}
		b := p.bucketNamed(name)
		if b == nil {
			return nil, fmt.Errorf("acquire from pool %q: %w", name, vm.ErrNotFound)
		}
		e := b.tryPop()
		if !arrived {
			arrived = true
			b.arrivals.Add(1)
			if e == nil {
				b.missed.Add(1)
			}
		}
		if e == nil {
			hit = false
			waitStart := time.Now()
			var err error
			e, err = b.wait(ctx)
			waited += time.Since(waitStart)
			if err != nil {
				if ctx.Err() != nil {
					return nil, b.nothingReady(ctx, waited)
				}
				return nil, fmt.Errorf("acquire from pool %q: %w", name, err)
			}
		}
		handoffStart := time.Now()
		v, err := p.handOut(ctx, b, e, id, hit)
		e.releaseSlot()
		b.kickIfLow()
		if err != nil {
			if errors.Is(err, ErrClosed) {
				return nil, fmt.Errorf("acquire from pool %q: %w", name, err)
			}
			if ctx.Err() != nil {
				return nil, b.nothingReady(ctx, waited)
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

// handOut validates, resumes and hands off e, then transfers it from the
// pool to the caller. On failure the VM is evicted.
func (p *Pool) handOut(ctx context.Context, b *bucket, e *entry, id Identity, hit bool) (vm.VM, error) {
	v := e.vm
	if err := ctx.Err(); err != nil {
		// It arrived as the wait ended: back to the owner, unharmed.
		b.giveBack(e)
		return vm.VM{}, err
	}
	if e.unchecked {
		// Straight from its restore: the hand-off below is its check.
	} else if err := p.cfg.Validate(ctx, v); err != nil {
		b.counters.validationFailures.Add(1)
		b.m.validation.Inc()
		p.log.Warn("warm VM failed validation at acquire", "pool", b.name, "vm", v.ID, "err", err)
		b.evictLater(e, ReasonUnhealthy)
		return vm.VM{}, err
	}
	if err := p.cfg.Provider.Resume(ctx, v.ID); err != nil {
		p.log.Warn("resume of warm VM failed", "pool", b.name, "vm", v.ID, "err", err)
		b.evictLater(e, ReasonHandoff)
		return vm.VM{}, err
	}
	v.Status = vm.StatusRunning
	if p.cfg.Handoff != nil {
		if err := p.cfg.Handoff(ctx, v, id); err != nil {
			p.log.Warn("handoff of warm VM failed", "pool", b.name, "vm", v.ID, "err", err)
			b.evictLater(e, ReasonHandoff)
			return vm.VM{}, err
		}
	}
	p.closing.RLock()
	if p.closed.Load() {
		p.closing.RUnlock()
		return vm.VM{}, ErrClosed // still in owned: Shutdown destroys it
	}
	if e.own.exited.Load() {
		p.closing.RUnlock()
		b.evictLater(e, ReasonExited)
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
	if b := p.bucketNamed(own.pool); b != nil {
		b.call(func() { b.exited(own, id) })
	}
}

// Status reports one pool; vm.ErrNotFound if it is not registered.
func (p *Pool) Status(name string) (Status, error) {
	b := p.bucketNamed(name)
	if b == nil {
		return Status{}, fmt.Errorf("pool %q: %w", name, vm.ErrNotFound)
	}
	return b.status(), nil
}

// Pools reports every pool, by name.
func (p *Pool) Pools() []Status {
	m := *p.lookup.Load()
	out := make([]Status, 0, len(m))
	for _, b := range m {
		out = append(out, b.status())
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

type gaugeState struct {
	name                     string
	ready, target, restoring int
	rate, idle               float64
}

func (p *Pool) gauges() []gaugeState {
	m := *p.lookup.Load()
	out := make([]gaugeState, 0, len(m))
	for _, b := range m {
		var g gaugeState
		if b.call(func() {
			g = gaugeState{name: b.name, ready: b.readyLen() + b.checking, target: b.depth(), restoring: b.restoring, rate: b.est.Rate}
		}) {
			g.idle = b.idleSeconds(time.Now())
			out = append(out, g)
		}
	}
	return out
}

// Shutdown stops refills and health checks, cancels restores in flight,
// destroys every VM the pool owns and returns once the provider lists none
// of them, or when ctx ends. Leased VMs are not the pool's and are left alone.
func (p *Pool) Shutdown(ctx context.Context) error {
	p.mu.Lock()
	p.closing.Lock()
	if !p.closed.Swap(true) {
		close(p.closedCh)
	}
	p.closing.Unlock()
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

	// Every owner and restore has returned; what is left is in owned.
	ids := make(map[string]string)
	p.owned.Range(func(id, own any) bool {
		ids[id.(string)] = own.(*ownership).pool
		return true
	})
	for _, b := range *p.lookup.Load() {
		b.drain()
	}

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
