package bench

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/warmpool/warmpool/api"
	"github.com/warmpool/warmpool/events"
	"github.com/warmpool/warmpool/vm"
)

// suspendAfter is the idle time after which benchmark machines suspend. A
// machine is idle from its last ensure on; the cold and suspended samples
// end when it answers, and the running samples come one after the other on
// a machine whose suspension was turned off first, so no measurement sees
// a machine suspend.
const suspendAfter = time.Second

// machineEnsure is scenario 6: `machine ensure` on a machine that does not
// exist (cold start, the baseline), on one that runs, and on one the idle
// policy suspended to a snapshot, all through the daemon.
func machineEnsure(ctx context.Context, e *env) ([]Scenario, error) {
	var names []string
	var namesMu sync.Mutex
	stopAll := func(ctx context.Context) error {
		ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Minute)
		defer cancel()
		namesMu.Lock()
		defer namesMu.Unlock()
		var errs []error
		for _, n := range names {
			if err := e.d.StopMachine(ctx, n, true); err != nil && !errors.Is(err, vm.ErrNotFound) {
				errs = append(errs, err)
			}
		}
		names = nil
		return errors.Join(errs...)
	}
	e.onCleanup("machines", stopAll)
	ensure := func(ctx context.Context, name string, req api.MachineEnsureRequest) (time.Duration, error) {
		ctx, cancel := context.WithTimeout(ctx, readyTimeout)
		defer cancel()
		start := time.Now()
		if _, err := e.d.EnsureMachine(ctx, name, req); err != nil {
			return 0, err
		}
		return time.Since(start), nil
	}
	vcpus, mem, suspend := e.opts.VCPUs, e.opts.MemoryMiB, api.Duration(suspendAfter)
	create := api.MachineEnsureRequest{VCPUs: &vcpus, MemoryMiB: &mem, SuspendAfter: &suspend}

	// Cold starts: a new machine each time, suspended before the next one
	// boots so that it costs no CPU meanwhile. Each machine is suspended
	// once and restored once: the same machine is not suspended a second
	// time (see the report of issue 6 on re-suspending a restored machine).
	machines := max(e.opts.ColdSamples, e.opts.SuspendSamples)
	cold := make([]time.Duration, 0, machines)
	for i := 0; i < machines; i++ {
		name := fmt.Sprintf("bench-machine-%d", i)
		namesMu.Lock()
		names = append(names, name)
		namesMu.Unlock()
		d, err := ensure(ctx, name, create)
		if err != nil {
			return nil, err
		}
		cold = append(cold, d)
		e.progress("  ensure %s from nothing: %s", name, formatMillis(millis1(d)))
		if err := e.waitMachine(ctx, name, api.MachineSuspended); err != nil {
			return nil, err
		}
	}

	// The first machine stays up for the ensure-on-running measurement:
	// its suspension goes off now, while it is suspended (an idle policy
	// change applies at once and wakes nothing).
	const kept = "bench-machine-0"
	off := api.Duration(0)
	if _, err := e.d.PutMachine(ctx, kept, api.MachineSpec{VCPUs: vcpus, MemoryMiB: mem, SuspendAfter: &off}); err != nil {
		return nil, fmt.Errorf("turn off suspension of %s: %w", kept, err)
	}
	// From suspended: every machine once.
	suspended := make([]time.Duration, 0, e.opts.SuspendSamples)
	for i := 0; i < e.opts.SuspendSamples; i++ {
		name := fmt.Sprintf("bench-machine-%d", i)
		d, err := ensure(ctx, name, api.MachineEnsureRequest{})
		if err != nil {
			return nil, err
		}
		suspended = append(suspended, d)
		e.progress("  ensure %s from suspended: %s", name, formatMillis(millis1(d)))
		if i > 0 {
			if err := e.d.StopMachine(ctx, name, true); err != nil {
				return nil, err
			}
		}
	}

	running, err := measure(ctx, e.opts.WarmupRuns, e.opts.EnsureSamples, func(ctx context.Context) (time.Duration, error) {
		return ensure(ctx, kept, api.MachineEnsureRequest{})
	})
	if err != nil {
		return nil, err
	}
	if err := stopAll(ctx); err != nil {
		return nil, fmt.Errorf("stop benchmark machines: %w", err)
	}
	return []Scenario{
		latencyRow("ensure-cold", 6, "machine ensure from nothing (cold start)", cold, 0, "ensure-cold"),
		latencyRow("ensure-running", 6, "machine ensure, already running", running, e.opts.WarmupRuns, "ensure-cold"),
		latencyRow("ensure-suspended", 6, "machine ensure from suspended", suspended, 0, "ensure-cold"),
	}, nil
}

// waitMachine polls until the machine is in state, failing early when its
// idle policy reports a failure.
func (e *env) waitMachine(ctx context.Context, name, state string) error {
	ctx, cancel := context.WithTimeout(ctx, readyTimeout)
	defer cancel()
	failures := e.d.Subscribe(func(ev events.Event) bool { return ev.Kind == "machine.idle_failed" && ev.Subject == name })
	defer failures.Close()
	t := time.NewTicker(2 * time.Millisecond)
	defer t.Stop()
	for {
		m, err := e.machine(ctx, name)
		if err != nil {
			return err
		}
		if m.State == state {
			return nil
		}
		select {
		case ev := <-failures.C:
			return fmt.Errorf("machine %s on its way to %s: %v", name, state, ev.Detail)
		case <-ctx.Done():
			return fmt.Errorf("machine %s still %s, want %s: %w", name, m.State, state, ctx.Err())
		case <-t.C:
		}
	}
}

func (e *env) machine(ctx context.Context, name string) (api.Machine, error) {
	ms, err := e.d.Machines(ctx)
	if err != nil {
		return api.Machine{}, err
	}
	for _, m := range ms {
		if m.Name == name {
			return m, nil
		}
	}
	return api.Machine{}, fmt.Errorf("machine %s: %w", name, vm.ErrNotFound)
}
