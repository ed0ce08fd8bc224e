package vm

import (
	"errors"
	"fmt"
)

var (
	// ErrNotFound: no VM, snapshot, pool or machine has that name or ID.
	ErrNotFound = errors.New("not found")
	// ErrExhausted: the host or a pool cannot hold more.
	ErrExhausted = errors.New("capacity exhausted")
	// ErrInvalidState: the operation does not apply in the current state
	// (snapshot of a running VM, resume of a stopped one).
	ErrInvalidState = errors.New("invalid state")
	// ErrUnsupported: the provider lacks the capability.
	ErrUnsupported = errors.New("not supported by provider")
	// ErrInvalid: bad input. FieldError wraps it.
	ErrInvalid = errors.New("invalid input")
	// ErrIncompatible: the snapshot cannot be restored by this provider as
	// it is now: it was taken by another hypervisor version or build, with
	// a device set the provider no longer allows, or files it needs (its
	// guest image, its state) are gone. Retrying cannot help; building the
	// template again from its image does.
	ErrIncompatible = errors.New("snapshot cannot be restored by this provider; rebuild the template")
)

// FieldError names the input field that was rejected and why.
type FieldError struct {
	Field  string
	Value  any
	Reason string
}

func (e *FieldError) Error() string {
	return fmt.Sprintf("invalid %s %q: %s", e.Field, fmt.Sprint(e.Value), e.Reason)
}

// Unwrap lets errors.Is(err, ErrInvalid) match every FieldError.
func (e *FieldError) Unwrap() error { return ErrInvalid }
