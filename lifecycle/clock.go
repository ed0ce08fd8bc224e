package lifecycle

import (
	"sync"
	"time"
)

// Clock is the time source for everything the manager schedules on its own:
// idle and suspend deadlines, hold expiry, health ticks and retry delays.
// Tests inject a fake one to step through hours in microseconds. Per-call
// timeouts (StartTimeout, PingTimeout, StopTimeout) use real time because
// they bound real work.
type Clock interface {
	Now() time.Time
	NewTimer(d time.Duration) Timer
}

// Timer is the part of *time.Timer the manager uses.
type Timer interface {
	C() <-chan time.Time
	Stop() bool
}

// AbsoluteClock is an optional Clock extension: a timer that fires at an
// instant rather than after a duration. Fake clocks implement it so a test
// that moves time between the manager's Now and NewTimer calls cannot push a
// deadline later.
type AbsoluteClock interface {
	NewTimerAt(at time.Time) Timer
}

// RealClock is the wall clock.
func RealClock() Clock { return realClock{} }

type realClock struct{}

func (realClock) Now() time.Time { return time.Now() }

func (realClock) NewTimer(d time.Duration) Timer { return realTimer{time.NewTimer(d)} }

type realTimer struct{ t *time.Timer }

func (t realTimer) C() <-chan time.Time { return t.t.C }
func (t realTimer) Stop() bool          { return t.t.Stop() }

func timerAt(c Clock, at time.Time) Timer {
	if ac, ok := c.(AbsoluteClock); ok {
		return ac.NewTimerAt(at)
	}
	return c.NewTimer(at.Sub(c.Now()))
}

// ManualClock is a Clock that moves only when Advance is called; its timers
// fire at absolute instants (it is an AbsoluteClock). Tests drive idle
// deadlines, hold expiries and retries through it without waiting for them,
// which keeps them right on a loaded machine. It is safe for concurrent use.
type ManualClock struct {
	mu     sync.Mutex
	now    time.Time
	timers map[*manualTimer]struct{}
}

type manualTimer struct {
	c     chan time.Time
	at    time.Time
	clock *ManualClock
}

// NewManualClock returns a clock standing at start.
func NewManualClock(start time.Time) *ManualClock {
	return &ManualClock{now: start, timers: map[*manualTimer]struct{}{}}
}

// Now implements Clock.
func (c *ManualClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

// NewTimer implements Clock.
func (c *ManualClock) NewTimer(d time.Duration) Timer { return c.NewTimerAt(c.Now().Add(d)) }

// NewTimerAt implements AbsoluteClock. A timer at or before the clock's
// time fires at once.
func (c *ManualClock) NewTimerAt(at time.Time) Timer {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := &manualTimer{c: make(chan time.Time, 1), at: at, clock: c}
	if !at.After(c.now) {
		t.c <- c.now
		return t
	}
	c.timers[t] = struct{}{}
	return t
}

func (t *manualTimer) C() <-chan time.Time { return t.c }

func (t *manualTimer) Stop() bool {
	t.clock.mu.Lock()
	defer t.clock.mu.Unlock()
	_, ok := t.clock.timers[t]
	delete(t.clock.timers, t)
	return ok
}

// Advance moves the clock d forward and fires every timer due by then.
func (c *ManualClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
	for t := range c.timers {
		if !t.at.After(c.now) {
			t.c <- c.now
			delete(c.timers, t)
		}
	}
}
