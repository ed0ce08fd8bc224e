package api

import (
	"context"
	"io"

	"github.com/warmpool/warmpool/events"
)

// Backend is what the daemon implements and the server exposes. The server
// has already validated every name, id and request (vm.ValidateName and the
// requests' Validate methods) before it calls a method, so a backend may use
// them in paths.
//
// Errors map to HTTP statuses by what they wrap:
//
//	vm.ErrNotFound                     404 not_found
//	vm.ErrInvalid, *vm.FieldError      400 invalid_argument (the message names the field)
//	vm.ErrInvalidState                 409 conflict
//	vm.ErrExhausted                    409 exhausted
//	vm.ErrUnsupported                  501 unsupported
//	ErrNothingReady                    503 nothing_ready with Retry-After
//	ErrShuttingDown                    503 unavailable
//	anything else                      500 internal
//
// A nothing-ready error may implement interface{ RetryAfter() time.Duration }
// to choose the Retry-After hint; the default is one second.
//
// Every method must be safe for concurrent use and return when ctx ends.
type Backend interface {
	Templates(ctx context.Context) ([]Template, error)
	// BuildTemplate builds or rebuilds a template. progress receives short
	// human-readable step descriptions; it may be called from any goroutine
	// until BuildTemplate returns, never after.
	BuildTemplate(ctx context.Context, req TemplateRequest, progress func(step string)) (Template, error)

	Pools(ctx context.Context) ([]Pool, error)
	// SetPool creates or replaces the pool name; the change persists.
	SetPool(ctx context.Context, name string, req PoolRequest) (Pool, error)
	// DeletePool destroys the pool's warm VMs; leases taken from it stay.
	DeletePool(ctx context.Context, name string) error

	// Acquire hands out a ready VM of pool, waiting up to req.Wait for one.
	// ctx ends when the client goes away.
	Acquire(ctx context.Context, pool string, req AcquireRequest) (Lease, error)
	// Release destroys the lease's VM. Releasing an unknown or already
	// released lease returns nil: release is idempotent.
	Release(ctx context.Context, leaseID string) error
	Leases(ctx context.Context) ([]Lease, error)
	// SetLeaseTTL makes the lease expire ttl from now, or never for 0.
	SetLeaseTTL(ctx context.Context, leaseID string, req LeaseTTLRequest) (Lease, error)
	// Exec runs a command in the lease's VM, copying its output to stdout and
	// stderr as it comes (each Write is flushed to the client), and returns
	// the command's exit code. err is for failures to run it at all.
	Exec(ctx context.Context, leaseID string, req ExecRequest, stdout, stderr io.Writer) (exitCode int, err error)

	Machines(ctx context.Context) ([]Machine, error)
	// PutMachine records the desired spec of a machine without starting it;
	// a running machine whose spec drifted is recreated by its next ensure.
	PutMachine(ctx context.Context, name string, req MachineRequest) (Machine, error)
	// EnsureMachine merges req into the machine's recorded spec (a machine
	// never recorded starts from the default shape), records the result and
	// returns once the machine runs it and its agent answers. Concurrent
	// ensures of one machine each merge into what the one before recorded.
	EnsureMachine(ctx context.Context, name string, req MachineEnsureRequest) (Machine, error)
	StopMachine(ctx context.Context, name string, force bool) error
	HoldMachine(ctx context.Context, name string, req HoldRequest) (Hold, error)
	// ReleaseHold ends a hold; an unknown hold id returns nil.
	ReleaseHold(ctx context.Context, name, holdID string) error

	// Subscribe returns a subscription to events matching filter (nil: all).
	// The server closes it when the client goes away.
	Subscribe(filter func(events.Event) bool) *events.Subscription

	Status(ctx context.Context) (Status, error)
}
