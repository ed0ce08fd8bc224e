// Package firecrackertest gives tests outside provider/firecracker the fake
// Firecracker binary that provider/firecracker's own tests run against: a
// process that takes Firecracker's command line, serves its API checked
// against Firecracker's API description, and serves the warmpool guest
// agent (running commands on the host) behind the vsock socket.
package firecrackertest

import (
	"fmt"
	"os"

	"github.com/warmpool/warmpool/provider/firecracker/internal/fakefirecracker"
)

// BuildFake compiles the fake firecracker into dir and returns its path.
// It also points the fake processes at Firecracker's API description through
// the environment, which they inherit from the test process (and from any
// daemon subprocess the test starts).
func BuildFake(dir string) (string, error) {
	spec, err := fakefirecracker.SpecPath()
	if err != nil {
		return "", err
	}
	if err := os.Setenv(fakefirecracker.SpecEnv, spec); err != nil {
		return "", fmt.Errorf("set %s: %w", fakefirecracker.SpecEnv, err)
	}
	return fakefirecracker.Build(dir)
}

// BuildFakeJailer compiles a fake of Firecracker's jailer into dir and
// returns its path. It really chroots and changes user, so it must run as
// root; it copies the API description BuildFake points at into each jail,
// and lets only FAKE_FIRECRACKER_* through the environment it clears.
func BuildFakeJailer(dir string) (string, error) {
	return fakefirecracker.BuildJailer(dir)
}
