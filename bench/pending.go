package bench

import "context"

// TEMPORARY until the lifecycle and qemu packages land.
func setupQEMU(ctx context.Context, e *env, host *Host) error {
	return errNotYet
}

var errNotYet = context.Canceled

func machineEnsure(ctx context.Context, e *env) ([]Scenario, error) { return nil, nil }
