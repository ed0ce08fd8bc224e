// Package lease is the registry of live leases: the only writer of lease
// records. Every lease lives in the store and nowhere else, so a restarted
// daemon serves the leases an earlier one handed out. Releasing a lease
// destroys its VM and removes the lease record in the same transaction
// that removes the VM's record; a lease whose TTL has passed is released by
// the expiry loop.
package lease

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/warmpool/warmpool/store"
	"github.com/warmpool/warmpool/vm"
)

// Config wires a Registry.
type Config struct {
	Store *store.Store
	// DestroyVM destroys the VM of a lease being released and then, in one
	// transaction, removes the VM's record and runs forget, which removes
	// the lease record. A VM that is gone already counts as destroyed.
	// When DestroyVM fails the lease stays, to be released again.
	DestroyVM func(ctx context.Context, vmID string, forget func(*store.Tx) error) error
	// OnRelease, when set, hears of every lease released; expired says the
	// expiry loop released it.
	OnRelease func(l store.Lease, expired bool)
	// Now is the clock leases expire by; time.Now when nil.
	Now func() time.Time
	// Interval is how often the expiry loop looks; a second when zero.
	Interval time.Duration
	Logger   *slog.Logger
}

// Registry serves the leases in a store. It is safe for concurrent use.
type Registry struct {
	cfg Config
	log *slog.Logger

	// releasing holds the releases in flight, by lease ID: what the store
	// cannot hold. A second Release of the same lease waits for the first.
	mu        sync.Mutex
	releasing map[string]chan struct{}
}

// New returns a registry over cfg.Store. The leases recorded there are
// live from the start.
func New(cfg Config) (*Registry, error) {
	if cfg.Store == nil || cfg.DestroyVM == nil {
		return nil, &vm.FieldError{Field: "lease config", Value: nil, Reason: "needs a store and DestroyVM"}
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Interval <= 0 {
		cfg.Interval = time.Second
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Registry{cfg: cfg, log: log, releasing: map[string]chan struct{}{}}, nil
}

// Add records a new lease and, in the same transaction, runs also when it
// is set (the daemon records the lease's VM as leased there, so an acquire
// commits the state once).
func (r *Registry) Add(l store.Lease, also func(*store.Tx) error) error {
	if err := vm.ValidateName("lease id", l.ID); err != nil {
		return err
	}
	if l.VMID == "" {
		return &vm.FieldError{Field: "vm_id", Value: l.VMID, Reason: "a lease needs its VM"}
	}
	err := r.cfg.Store.Update(func(tx *store.Tx) error {
		if err := store.Leases.Put(tx, l); err != nil {
			return err
		}
		if also != nil {
			return also(tx)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("record lease %s: %w", l.ID, err)
	}
	return nil
}

// Get returns the lease id; an unknown one is an error wrapping
// vm.ErrNotFound.
func (r *Registry) Get(id string) (store.Lease, error) {
	l, err := store.Get(r.cfg.Store, store.Leases, id)
	if err != nil {
		return store.Lease{}, fmt.Errorf("lease %s: %w", id, err)
	}
	return l, nil
}

// List returns every live lease in ID order.
func (r *Registry) List() ([]store.Lease, error) {
	return store.List(r.cfg.Store, store.Leases)
}

// Count is the number of live leases.
func (r *Registry) Count() (int, error) {
	n := 0
	err := r.cfg.Store.View(func(tx *store.Tx) error {
		var err error
		n, err = store.Leases.Count(tx)
		return err
	})
	return n, err
}

// SetTTL makes the lease expire ttl from now (never for 0) and returns it
// as recorded. An unknown lease is an error wrapping vm.ErrNotFound; a
// lease being released one wrapping vm.ErrInvalidState.
func (r *Registry) SetTTL(id string, ttl time.Duration) (store.Lease, error) {
	r.mu.Lock()
	_, busy := r.releasing[id]
	r.mu.Unlock()
	if busy {
		return store.Lease{}, fmt.Errorf("set TTL of lease %s: it is being released: %w", id, vm.ErrInvalidState)
	}
	var out store.Lease
	err := r.cfg.Store.Update(func(tx *store.Tx) error {
		l, err := store.Leases.Get(tx, id)
		if err != nil {
			return err
		}
		l.TTL, l.ExpiresAt = ttl, nil
		if ttl > 0 {
			exp := r.cfg.Now().Add(ttl)
			l.ExpiresAt = &exp
		}
		out = l
		return store.Leases.Put(tx, l)
	})
	if err != nil {
		return store.Lease{}, fmt.Errorf("set TTL of lease %s: %w", id, err)
	}
	return out, nil
}

// Drop forgets a lease whose VM is gone without destroying anything: the
// reconciliation at start uses it for leases that did not survive.
func (r *Registry) Drop(id string) error {
	if err := store.Delete(r.cfg.Store, store.Leases, id); err != nil {
		return fmt.Errorf("drop lease %s: %w", id, err)
	}
	return nil
}

// Release destroys the lease's VM and removes the lease. Releasing an
// unknown or already released lease does nothing and reports false.
func (r *Registry) Release(ctx context.Context, id string) (bool, error) {
	return r.release(ctx, id, false)
}

func (r *Registry) release(ctx context.Context, id string, expired bool) (bool, error) {
	for {
		r.mu.Lock()
		inflight, busy := r.releasing[id]
		if !busy {
			done := make(chan struct{})
			r.releasing[id] = done
			r.mu.Unlock()
			defer func() {
				r.mu.Lock()
				delete(r.releasing, id)
				r.mu.Unlock()
				close(done)
			}()
			break
		}
		r.mu.Unlock()
		select {
		case <-inflight:
			// Look again: the first release may have failed.
		case <-ctx.Done():
			return false, fmt.Errorf("release lease %s: %w", id, ctx.Err())
		}
	}
	l, err := store.Get(r.cfg.Store, store.Leases, id)
	if err != nil {
		if errors.Is(err, vm.ErrNotFound) {
			return false, nil
		}
		return false, fmt.Errorf("release lease %s: %w", id, err)
	}
	// The expiry loop listed the lease before a SetTTL moved its deadline.
	if expired && !l.Expired(r.cfg.Now()) {
		return false, nil
	}
	forget := func(tx *store.Tx) error { return store.Leases.Delete(tx, id) }
	if err := r.cfg.DestroyVM(ctx, l.VMID, forget); err != nil {
		return false, fmt.Errorf("release lease %s: destroy VM %s: %w", id, l.VMID, err)
	}
	if r.cfg.OnRelease != nil {
		r.cfg.OnRelease(l, expired)
	}
	return true, nil
}

// Expire releases every lease whose TTL has passed and returns them.
func (r *Registry) Expire(ctx context.Context) []store.Lease {
	leases, err := r.List()
	if err != nil {
		r.log.Error("list leases to expire", "err", err)
		return nil
	}
	now := r.cfg.Now()
	var out []store.Lease
	for _, l := range leases {
		if !l.Expired(now) {
			continue
		}
		r.log.Info("lease expired", "lease", l.ID, "vm", l.VMID)
		released, err := r.release(ctx, l.ID, true)
		if err != nil {
			r.log.Error("destroy expired lease", "lease", l.ID, "err", err)
			continue
		}
		if released {
			out = append(out, l)
		}
	}
	return out
}

// Run expires leases every Interval until ctx ends.
func (r *Registry) Run(ctx context.Context) {
	t := time.NewTicker(r.cfg.Interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			r.Expire(ctx)
		}
	}
}
