package vm

import (
	"sync"
	"time"
)

// CapExitEvents: the provider implements ExitNotifier.
const CapExitEvents Capability = "exit-events"

// Exit tells that a VM's hypervisor process ended (or its guest powered
// off) without the provider's caller asking for it: a crash, a kill from
// outside, a guest that shut itself down or panicked. Exits that the
// provider's own Stop, Destroy or a failed Create/Restore caused are not
// reported; whoever called those already knows.
type Exit struct {
	ID string
	At time.Time
	// Reason is what the provider saw, for people: "killed by signal 9",
	// "exited with status 1", "guest powered off".
	Reason string
}

// ExitNotifier reports VM exits as they happen, so that owners of VMs need
// not poll to notice a crash.
type ExitNotifier interface {
	// OnExit calls fn for every exit from now on, until stop is called.
	// Each subscriber gets every exit, in order, on a goroutine of its own
	// (fn may call the provider); a slow fn delays only its own later
	// calls. A call already under way may finish after stop returns.
	OnExit(fn func(Exit)) (stop func())
	// Alive reports, without waiting on anything, whether the VM's process
	// still runs: false once it exited (reported or not) and for IDs the
	// provider does not know. It is the synchronous twin of OnExit, for a
	// caller that must not answer from a stale view in the moment between
	// an exit and its notification.
	Alive(id string) bool
}

// ExitFeed is the subscriber list behind an ExitNotifier, for providers to
// embed: Notify fans an Exit out to every subscriber without blocking.
// The zero value is ready to use.
type ExitFeed struct {
	mu   sync.Mutex
	subs map[*exitSub]struct{}
}

type exitSub struct {
	fn      func(Exit)
	mu      sync.Mutex
	queue   []Exit
	running bool // a goroutine drains queue
	stopped bool
}

// OnExit implements ExitNotifier.OnExit.
func (f *ExitFeed) OnExit(fn func(Exit)) (stop func()) {
	s := &exitSub{fn: fn}
	f.mu.Lock()
	if f.subs == nil {
		f.subs = make(map[*exitSub]struct{})
	}
	f.subs[s] = struct{}{}
	f.mu.Unlock()
	return func() {
		f.mu.Lock()
		delete(f.subs, s)
		f.mu.Unlock()
		s.mu.Lock()
		s.stopped, s.queue = true, nil
		s.mu.Unlock()
	}
}

// Notify delivers e to every subscriber. It never blocks on a subscriber.
func (f *ExitFeed) Notify(e Exit) {
	if e.At.IsZero() {
		e.At = time.Now()
	}
	f.mu.Lock()
	subs := make([]*exitSub, 0, len(f.subs))
	for s := range f.subs {
		subs = append(subs, s)
	}
	f.mu.Unlock()
	for _, s := range subs {
		s.deliver(e)
	}
}

// deliver queues e and starts the subscriber's goroutine unless one is
// already draining: exits reach fn in order, one call at a time, and an
// idle subscriber costs no goroutine.
func (s *exitSub) deliver(e Exit) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopped {
		return
	}
	s.queue = append(s.queue, e)
	if s.running {
		return
	}
	s.running = true
	go s.drain()
}

func (s *exitSub) drain() {
	for {
		s.mu.Lock()
		if s.stopped || len(s.queue) == 0 {
			s.running = false
			s.mu.Unlock()
			return
		}
		e := s.queue[0]
		s.queue = s.queue[1:]
		s.mu.Unlock()
		s.fn(e)
	}
}
