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
// It is long so that it passes only when the bench advances the manager's
// clock: a machine never suspends in the middle of a measurement.
const idleForSuspend = time.Hour

// machineEnsure is scenario 6: Ensure on a machine that does not exist
// (cold start, the baseline), on one that runs, and on one the idle policy
// suspended to a snapshot.
func machineEnsure(ctx context.Context, e *env) ([]Scenario, error) {
	clock := newShiftClock()
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

	// Cold starts: a new machine each time, suspended right after so that
	// it costs no CPU while the next one boots. Each machine is suspended
	// once and restored once: the same machine is not suspended a second
	// time (see the report of issue 6 on re-suspending a restored machine).
	machines := max(e.opts.ColdSamples, e.opts.SuspendSamples)
	cold := make([]time.Duration, 0, machines)
	for i := 0; i < machines; i++ {
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
		if err := suspendIdle(ctx, mgr, clock, failures, name); err != nil {
			return nil, err
		}
	}

	// From suspended: every machine once. The first one stays up for the
	// ensure-on-running measurement.
	suspended := make([]time.Duration, 0, e.opts.SuspendSamples)
	for i := 0; i < e.opts.SuspendSamples; i++ {
		name := fmt.Sprintf("bench-machine-%d", i)
		d, err := ensure(ctx, name)
		if err != nil {
			return nil, err
		}
		suspended = append(suspended, d)
		e.progress("  ensure %s from suspended: %s", name, formatMillis(millis1(d)))
		if i > 0 {
			if err := mgr.Stop(ctx, name, true); err != nil {
				return nil, err
			}
		}
	}

	const kept = "bench-machine-0"
	running, err := measure(ctx, e.opts.WarmupRuns, e.opts.EnsureSamples, func(ctx context.Context) (time.Duration, error) {
		return ensure(ctx, kept)
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
// until the machine has saved itself to a snapshot. Machines that were
// suspended already stay so.
func suspendIdle(ctx context.Context, mgr *lifecycle.Manager, clock *shiftClock, failures *events.Subscription, name string) error {
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

// shiftClock is a lifecycle.Clock that runs in real time (retry delays and
// health ticks behave as they do in production) but can jump ahead in
// Advance, so that the bench decides when a machine has been idle long
// enough to suspend instead of waiting for it.
type shiftClock struct {
	mu     sync.Mutex
	offset time.Duration
	timers map[*shiftTimer]struct{}
}

func newShiftClock() *shiftClock {
	return &shiftClock{timers: map[*shiftTimer]struct{}{}}
}

func (c *shiftClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.nowLocked()
}

func (c *shiftClock) nowLocked() time.Time { return time.Now().Add(c.offset) }

func (c *shiftClock) NewTimer(d time.Duration) lifecycle.Timer {
	return c.NewTimerAt(c.Now().Add(d))
}

// NewTimerAt implements lifecycle.AbsoluteClock.
func (c *shiftClock) NewTimerAt(at time.Time) lifecycle.Timer {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := &shiftTimer{clock: c, at: at, ch: make(chan time.Time, 1)}
	now := c.nowLocked()
	if !at.After(now) {
		t.ch <- now
		return t
	}
	c.timers[t] = struct{}{}
	t.real = time.AfterFunc(at.Sub(now), func() { c.fire(t) })
	return t
}

// fire delivers t if it is still pending and due; a real timer that went
// off just before an Advance re-armed it is re-armed again.
func (c *shiftClock) fire(t *shiftTimer) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, pending := c.timers[t]; !pending {
		return
	}
	now := c.nowLocked()
	if t.at.After(now) {
		t.real.Reset(t.at.Sub(now))
		return
	}
	delete(c.timers, t)
	t.ch <- now
}

// Advance moves time forward and fires every timer that came due.
func (c *shiftClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.offset += d
	now := c.nowLocked()
	for t := range c.timers {
		if t.at.After(now) {
			t.real.Reset(t.at.Sub(now))
			continue
		}
		t.real.Stop()
		delete(c.timers, t)
		t.ch <- now
	}
}

type shiftTimer struct {
	clock *shiftClock
	at    time.Time
	ch    chan time.Time
	real  *time.Timer
}

func (t *shiftTimer) C() <-chan time.Time { return t.ch }

func (t *shiftTimer) Stop() bool {
	t.clock.mu.Lock()
	defer t.clock.mu.Unlock()
	_, pending := t.clock.timers[t]
	delete(t.clock.timers, t)
	if t.real != nil {
		t.real.Stop()
	}
	return pending
}
