package bench

import "context"

// TEMPORARY until the pool, lifecycle and qemu packages land.
func setupQEMU(ctx context.Context, e *env, host *Host) error {
	return errNotYet
}

var errNotYet = context.Canceled

func warmAcquire(ctx context.Context, e *env) ([]Scenario, error) {
	return []Scenario{skippedRow("warm-acquire", 3, "warm acquire", "ms", "pending")}, nil
}
func burst(ctx context.Context, e *env) ([]Scenario, error)         { return nil, nil }
func memory(ctx context.Context, e *env) ([]Scenario, error)        { return nil, nil }
func machineEnsure(ctx context.Context, e *env) ([]Scenario, error) { return nil, nil }
func poolOverhead(ctx context.Context, e *env) ([]Scenario, error)  { return nil, nil }
