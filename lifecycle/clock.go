package lifecycle

import "time"

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
