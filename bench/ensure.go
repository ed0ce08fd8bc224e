package bench

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/warmpool/warmpool/agent"
	"github.com/warmpool/warmpool/events"
	"github.com/warmpool/warmpool/lifecycle"
	"github.com/warmpool/warmpool/vm"
)

// idleForSuspend is the idle time after which benchmark machines suspend.
// The manager runs on a manual clock, so it passes only when the bench
// advances it: the machine never suspends in the middle of a measurement.
const idleForSuspend = time.Hour

// machineEnsure is scenario 6: Ensure on a machine that does not exist
// (cold start, the baseline), on one that runs, and on one the idle policy
// suspended to a snapshot.
func machineEnsure(ctx context.Context, e *env) ([]Scenario, error) {
	clock := newManualClock(time.Now())
	bus := events.NewBus()
	defer bus.Close()
	failures := bus.Subscribe(16, func(ev events.Event) bool { return ev.Kind == "machine.idle_failed" })
	defer failures.Close()
	mgr, err := lifecycle.NewManager(lifecycle.Config{
		Provider:     e.provider,
		StateDir:     e.subdir("machines"),
		Ping:         pingAgent(e.dialer),
		Clock:        clock,
		Events:       bus,
		Logger:       e.opts.Logger,
		StartTimeout: readyTimeout,
		Idle:         lifecycle.IdlePolicy{SuspendAfter: idleForSuspend},
	})
	if err != nil {
		return nil, err
	}
	var names []string
	var namesMu sync.Mutex
	stopAll := func(ctx context.Context) error {
		ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Minute)
		defer cancel()
		namesMu.Lock()
		defer namesMu.Unlock()
		var errs []error
		for _, n := range names {
			if err := mgr.Stop(ctx, n, true); err != nil && !errors.Is(err, vm.ErrNotFound) {
				errs = append(errs, err)
			}
		}
		names = nil
		return errors.Join(errs...)
	}
	e.onCleanup("machine manager", func(ctx context.Context) error {
		err := stopAll(ctx)
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
		defer cancel()
		return errors.Join(err, mgr.Close(cctx))
	})
	spec := func(name string) lifecycle.MachineSpec {
		return lifecycle.MachineSpec{
			Name: name, VCPUs: e.bootSpec.VCPUs, MemoryMiB: e.bootSpec.MemoryMiB,
			Kernel: e.bootSpec.Kernel, Initrd: e.bootSpec.Initrd, Cmdline: e.bootSpec.Cmdline,
		}
	}
	ensure := func(ctx context.Context, name string) (time.Duration, error) {
		ctx, cancel := context.WithTimeout(ctx, readyTimeout)
		defer cancel()
		start := time.Now()
		if _, err := mgr.Ensure(ctx, spec(name)); err != nil {
			return 0, err
		}
		return time.Since(start), nil
	}

	// Cold starts: a new machine each time. Only the first one stays up to
	// be measured further; the others are stopped so they cost no CPU.
	const kept = "bench-machine-0"
	cold := make([]time.Duration, 0, e.opts.ColdSamples)
	for i := 0; i < e.opts.ColdSamples; i++ {
		name := fmt.Sprintf("bench-machine-%d", i)
		namesMu.Lock()
		names = append(names, name)
		namesMu.Unlock()
		d, err := ensure(ctx, name)
		if err != nil {
			return nil, err
		}
		cold = append(cold, d)
		e.progress("  ensure %s from nothing: %s", name, formatMillis(millis1(d)))
		if name != kept {
			if err := mgr.Stop(ctx, name, true); err != nil {
				return nil, err
			}
		}
	}

	running, err := measure(ctx, e.opts.WarmupRuns, e.opts.EnsureSamples, func(ctx context.Context) (time.Duration, error) {
		return ensure(ctx, kept)
	})
	if err != nil {
		return nil, err
	}

	suspended, err := measure(ctx, 0, e.opts.SuspendSamples, func(ctx context.Context) (time.Duration, error) {
		if err := suspendIdle(ctx, mgr, clock, failures, kept); err != nil {
			return 0, err
		}
		d, err := ensure(ctx, kept)
		if err == nil {
			e.progress("  ensure %s from suspended: %s", kept, formatMillis(millis1(d)))
		}
		return d, err
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

// suspendIdle moves the manager's clock past the idle timeout and waits
// until the machine has saved itself to a snapshot.
func suspendIdle(ctx context.Context, mgr *lifecycle.Manager, clock *manualClock, failures *events.Subscription, name string) error {
	ctx, cancel := context.WithTimeout(ctx, readyTimeout)
	defer cancel()
	clock.Advance(idleForSuspend + time.Second)
	t := time.NewTicker(2 * time.Millisecond)
	defer t.Stop()
	for {
		m, err := mgr.Get(name)
		if err != nil {
			return err
		}
		if m.State == lifecycle.Suspended {
			return nil
		}
		select {
		case ev := <-failures.C:
			return fmt.Errorf("suspend machine %s: %v", name, ev.Detail)
		case <-ctx.Done():
			return fmt.Errorf("machine %s still %s after its idle timeout: %w", name, m.State, ctx.Err())
		case <-t.C:
		}
	}
}

// pingAgent is the manager's readiness and health check: a fresh connection
// to the guest agent and one ping.
func pingAgent(d vm.AgentDialer) func(ctx context.Context, v vm.VM) error {
	return func(ctx context.Context, v vm.VM) error {
		c, err := agent.Dial(ctx, d, v.ID)
		if err != nil {
			return err
		}
		defer c.Close()
		return c.Ping(ctx)
	}
}

// manualClock is a lifecycle.Clock whose time moves only in Advance.
type manualClock struct {
	mu     sync.Mutex
	now    time.Time
	timers map[*manualTimer]struct{}
}

func newManualClock(start time.Time) *manualClock {
	return &manualClock{now: start, timers: map[*manualTimer]struct{}{}}
}

func (c *manualClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *manualClock) NewTimer(d time.Duration) lifecycle.Timer {
	return c.NewTimerAt(c.Now().Add(d))
}

// NewTimerAt implements lifecycle.AbsoluteClock.
func (c *manualClock) NewTimerAt(at time.Time) lifecycle.Timer {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := &manualTimer{clock: c, at: at, ch: make(chan time.Time, 1)}
	if !at.After(c.now) {
		t.ch <- c.now
		return t
	}
	c.timers[t] = struct{}{}
	return t
}

// Advance moves time forward and fires every timer that came due.
func (c *manualClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
	for t := range c.timers {
		if !t.at.After(c.now) {
			delete(c.timers, t)
			t.ch <- c.now
		}
	}
}

type manualTimer struct {
	clock *manualClock
	at    time.Time
	ch    chan time.Time
}

func (t *manualTimer) C() <-chan time.Time { return t.ch }

func (t *manualTimer) Stop() bool {
	t.clock.mu.Lock()
	defer t.clock.mu.Unlock()
	_, pending := t.clock.timers[t]
	delete(t.clock.timers, t)
	return pending
}
