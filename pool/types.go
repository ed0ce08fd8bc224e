package pool

import (
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/warmpool/warmpool/vm"
)

// MaxSize bounds StackSpec.Max so that a typo cannot ask a host for a
// million VMs.
const MaxSize = 4096

// StackSpec is what a pool keeps warm: VMs restored from Snapshot, shaped as
// Key, at least Min and at most Max of them ready.
type StackSpec struct {
	Name     string      `json:"name"`
	Key      vm.StackKey `json:"key"`
	Snapshot vm.Snapshot `json:"snapshot"`
	Min      int         `json:"min"`
	Max      int         `json:"max"`
	// MaxAge replaces entries that have waited this long; zero keeps them
	// until they are handed out or fail a health check.
	MaxAge time.Duration `json:"max_age"`
	// Adaptive sizes the pool from its demand between Min and Max (see
	// AdaptiveConfig) instead of keeping Min ready.
	Adaptive bool `json:"adaptive,omitempty"`
}

// Validate reports the first field of s that a pool cannot honour, as a
// *vm.FieldError naming it.
func (s StackSpec) Validate() error {
	if err := vm.ValidateName("name", s.Name); err != nil {
		return err
	}
	if err := s.Key.Validate(); err != nil {
		return err
	}
	if s.Snapshot.ID == "" {
		return &vm.FieldError{Field: "snapshot", Value: s.Snapshot.ID, Reason: "must name the snapshot to restore from"}
	}
	if s.Min < 0 {
		return &vm.FieldError{Field: "min", Value: s.Min, Reason: "must not be negative"}
	}
	if err := vm.ValidateRange("max", s.Max, 1, MaxSize); err != nil {
		return err
	}
	if s.Min > s.Max {
		return &vm.FieldError{Field: "min", Value: s.Min, Reason: fmt.Sprintf("must not exceed max (%d)", s.Max)}
	}
	if s.MaxAge < 0 {
		return &vm.FieldError{Field: "max_age", Value: s.MaxAge, Reason: "must not be negative"}
	}
	return nil
}

// ErrNothingReady is matched (errors.Is) by the error Acquire returns when
// its context ends before a VM is ready. The concrete error is a
// *NothingReadyError, which also matches the context's own error.
var ErrNothingReady = errors.New("no warm VM ready")

// ErrClosed is returned by every call after Shutdown.
var ErrClosed = errors.New("pool is shut down")

// NothingReadyError says how long Acquire waited and when trying again is
// likely to succeed (the API turns it into 503 + Retry-After).
type NothingReadyError struct {
	Pool   string
	Waited time.Duration
	// RetryAfter estimates when a VM will be ready: the stack's recent
	// restore time, or the rest of its back-off when its restores fail.
	RetryAfter time.Duration
	// Err is the context's error.
	Err error
}

func (e *NothingReadyError) Error() string {
	return fmt.Sprintf("no warm VM ready in pool %q after %v (retry in %v): %v",
		e.Pool, e.Waited.Round(time.Millisecond), e.RetryAfter.Round(time.Millisecond), e.Err)
}

// Is makes errors.Is(err, ErrNothingReady) true.
func (e *NothingReadyError) Is(target error) bool { return target == ErrNothingReady }

// Unwrap exposes the context's error.
func (e *NothingReadyError) Unwrap() error { return e.Err }

// Identity is the tenant identity the hand-off gives a VM at Acquire. The
// caller chooses it, so the records it keeps name the lease before the VM
// is touched; the network identity will join it as fields.
type Identity struct {
	// LeaseID names the lease; it must be a valid name (vm.ValidateName)
	// since it becomes the guest's hostname.
	LeaseID string
}

// Lease is a VM handed out by Acquire. The VM belongs to the caller from then
// on: the pool forgets it, and the caller destroys it through the provider.
type Lease struct {
	ID        string    `json:"id"`
	Pool      string    `json:"pool"`
	VM        vm.VM     `json:"vm"`
	CreatedAt time.Time `json:"created_at"`
	Timings   Timings   `json:"timings"`
}

// Timings break down how long Acquire took.
type Timings struct {
	// Wait is the time spent waiting for a ready VM (zero on a hit).
	Wait time.Duration
	// Handoff is the time spent validating, resuming and handing off the VM
	// that was leased.
	Handoff time.Duration
	// Total is the whole Acquire call.
	Total time.Duration
}

// MarshalJSON writes the lease JSON shape's timings: wait_ms, handoff_ms,
// total_ms, as fractional milliseconds.
func (t Timings) MarshalJSON() ([]byte, error) {
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	return json.Marshal(struct {
		Wait    float64 `json:"wait_ms"`
		Handoff float64 `json:"handoff_ms"`
		Total   float64 `json:"total_ms"`
	}{ms(t.Wait), ms(t.Handoff), ms(t.Total)})
}

// UnmarshalJSON reads what MarshalJSON writes.
func (t *Timings) UnmarshalJSON(data []byte) error {
	var raw struct {
		Wait    float64 `json:"wait_ms"`
		Handoff float64 `json:"handoff_ms"`
		Total   float64 `json:"total_ms"`
	}
	if err := json.Unmarshal(data, &raw); err != nil {
		return err
	}
	d := func(ms float64) time.Duration { return time.Duration(ms * float64(time.Millisecond)) }
	*t = Timings{Wait: d(raw.Wait), Handoff: d(raw.Handoff), Total: d(raw.Total)}
	return nil
}

// Status is one pool as reported by Pools and Status; its JSON is the API's
// pool shape.
type Status struct {
	Name     string `json:"name"`
	Template string `json:"template"`
	Min      int    `json:"min"`
	Max      int    `json:"max"`
	// Ready counts VMs waiting in the bucket (including one being
	// health-checked); Restoring counts restores in flight.
	Ready      int      `json:"ready"`
	Restoring  int      `json:"restoring"`
	Generation uint64   `json:"generation"`
	Counters   Counters `json:"counters"`
	// LastError is why the latest restore or validation of a new VM for
	// the current generation failed; empty once one succeeds. It tells a
	// pool that keeps failing (and the acquirers waiting on it) why.
	LastError string `json:"last_error,omitempty"`
	// Waiting counts acquirers waiting for a VM.
	Waiting int `json:"waiting"`
	// Target is the depth the pool fills towards (Min for a fixed pool);
	// acquirers waiting get restores on top of it.
	Target   int  `json:"target"`
	Adaptive bool `json:"adaptive"`
	// Rate is an adaptive pool's estimated acquire arrival rate, per
	// second; Refill the restore time its target covers.
	Rate   float64       `json:"rate"`
	Refill time.Duration `json:"refill"`
	// TargetReason says why an adaptive pool's target last changed (one of
	// the Target* constants), at TargetChanged.
	TargetReason  string    `json:"target_reason,omitempty"`
	TargetChanged time.Time `json:"target_changed,omitempty"`
	// Allowed is what the host's memory budget grants the pool now: what
	// it asks for, or less when the pools together ask for more; -1 when
	// no budget applies.
	Allowed int `json:"allowed"`
	// Restore is the recent restore-to-ready time (weighted average).
	Restore time.Duration `json:"restore"`
	// IdleVMSeconds sums the time VMs have waited ready in the pool.
	IdleVMSeconds float64 `json:"idle_vm_seconds"`
}

// Counters count what happened to a pool since it was registered.
type Counters struct {
	// Acquired counts leases handed out; Hits those that found a VM ready,
	// Waits those that waited for one. Timeouts counts acquires that gave up.
	Acquired uint64 `json:"acquired"`
	Hits     uint64 `json:"hits"`
	Waits    uint64 `json:"waits"`
	Timeouts uint64 `json:"timeouts"`
	// Evicted counts VMs the pool destroyed without handing them out.
	Evicted uint64 `json:"evicted"`
	// ValidationFailures counts VMs that failed Validate, at restore, in a
	// health check or at hand-out.
	ValidationFailures uint64 `json:"validation_failures"`
}

// Eviction reasons, used in events and the evictions metric.
const (
	ReasonMaxAge     = "max_age"     // older than the stack's MaxAge
	ReasonUnhealthy  = "unhealthy"   // failed Validate in a health check or at hand-out
	ReasonHandoff    = "handoff"     // Resume or Handoff failed at acquire
	ReasonGeneration = "generation"  // restored from a snapshot the pool no longer uses
	ReasonResized    = "resized"     // more ready than the new Max
	ReasonRemoved    = "removed"     // the pool was unregistered
	ReasonShutdown   = "shutdown"    // the pool shut down
	ReasonExited     = "exited"      // its process exited (VMExited)
	ReasonScaledDown = "scaled_down" // more ready than an adaptive pool's lowered target
)

// Event kinds the pool publishes.
const (
	EventEvicted    = "pool.evicted"
	EventRefillErr  = "pool.refill_error"
	EventGeneration = "pool.generation"
)
