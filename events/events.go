// Package events is the one event type warmpool reports and a small
// publish/subscribe bus for it. Pools and machines publish; the daemon streams
// events to API clients as server-sent events.
package events

import (
	"sync"
	"time"
)

// Event is one thing that happened. Its JSON shape is part of the external
// contract: fields may be added, none renamed.
type Event struct {
	Time    time.Time      `json:"time"`
	Kind    string         `json:"kind"`    // e.g. "machine.state", "machine.drift", "pool.evicted"
	Subject string         `json:"subject"` // the machine, pool or lease the event is about
	Detail  map[string]any `json:"detail"`
}

// Publisher is what producers of events depend on.
type Publisher interface {
	Publish(Event)
}

// Bus fans events out to subscribers. A slow subscriber loses events rather
// than blocking producers; it can tell from Subscription.Dropped.
type Bus struct {
	mu     sync.Mutex
	subs   map[*Subscription]struct{}
	closed bool
	now    func() time.Time
}

// NewBus returns an empty bus.
func NewBus() *Bus {
	return &Bus{subs: make(map[*Subscription]struct{}), now: time.Now}
}

// Subscription receives events on C until Close is called or the bus closes.
type Subscription struct {
	C       <-chan Event
	c       chan Event
	bus     *Bus
	filter  func(Event) bool
	mu      sync.Mutex
	dropped int
}

// Subscribe returns a subscription buffering up to buffer events. A nil
// filter accepts every event.
func (b *Bus) Subscribe(buffer int, filter func(Event) bool) *Subscription {
	if buffer < 1 {
		buffer = 1
	}
	c := make(chan Event, buffer)
	s := &Subscription{C: c, c: c, bus: b, filter: filter}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		close(c)
		return s
	}
	b.subs[s] = struct{}{}
	return s
}

// Publish stamps e with the current time when it has none and delivers it to
// every matching subscriber without blocking.
func (b *Bus) Publish(e Event) {
	if e.Time.IsZero() {
		e.Time = b.now()
	}
	if e.Detail == nil {
		e.Detail = map[string]any{}
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	for s := range b.subs {
		if s.filter != nil && !s.filter(e) {
			continue
		}
		select {
		case s.c <- e:
		default:
			s.mu.Lock()
			s.dropped++
			s.mu.Unlock()
		}
	}
}

// Close ends every subscription.
func (b *Bus) Close() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return
	}
	b.closed = true
	for s := range b.subs {
		close(s.c)
		delete(b.subs, s)
	}
}

// Close stops delivery to s and closes s.C.
func (s *Subscription) Close() {
	b := s.bus
	b.mu.Lock()
	defer b.mu.Unlock()
	if _, ok := b.subs[s]; ok {
		delete(b.subs, s)
		close(s.c)
	}
}

// Dropped reports how many events did not fit in the buffer.
func (s *Subscription) Dropped() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.dropped
}

// Discard is a Publisher that drops everything.
var Discard Publisher = discard{}

type discard struct{}

func (discard) Publish(Event) {}
