//go:build !linux

package server

import (
	"fmt"
	"runtime"

	"github.com/warmpool/warmpool/agent/proto"
	"github.com/warmpool/warmpool/vm"
)

func kernelRelease() string { return "" }

// SystemOptions has no real effects outside Linux: the guest agent only runs
// in Linux guests, but hosts on other systems still use this package for the
// fake provider.
func SystemOptions() Options { return Options{Stats: ReadProcStats} }

// ReadProcStats is only available on Linux.
func ReadProcStats() (proto.Stats, error) {
	return proto.Stats{}, fmt.Errorf("guest stats on %s: %w", runtime.GOOS, vm.ErrUnsupported)
}
