package pool

import (
	"context"
	"slices"
	"sync"
)

// slotAllocator bounds restores in flight across all buckets. A bucket's
// owner publishes how many restores it wants (bucket.want); the allocator
// grants free slots one bucket at a time in round-robin order and tells the
// owner through bucket.granted. It never runs on the hit path.
type slotAllocator struct {
	parallelism int
	wake        chan struct{} // coalescing: run grant on the allocator goroutine

	mu       sync.Mutex
	order    []*bucket // round-robin order; each bucket's held is guarded by mu
	rr       int
	inflight int
}

func (s *slotAllocator) add(b *bucket) {
	s.mu.Lock()
	s.order = append(s.order, b)
	s.mu.Unlock()
}

func (s *slotAllocator) remove(b *bucket) {
	s.mu.Lock()
	s.order = slices.DeleteFunc(s.order, func(o *bucket) bool { return o == b })
	s.mu.Unlock()
}

// limitLocked is how many slots one bucket may hold: all of them when it is
// alone, otherwise one fewer per other bucket down to half of them, so a
// stack whose restores hang cannot take every slot from the others.
func (s *slotAllocator) limitLocked() int {
	reserve := min(len(s.order)-1, s.parallelism/2)
	return max(1, s.parallelism-reserve)
}

// kick asks the allocator goroutine to grant slots; wakes coalesce.
func (s *slotAllocator) kick() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// run grants slots whenever kicked, until ctx ends. Granting on its own
// goroutine, rather than in the owner or restore that freed or wanted a
// slot, lets every bucket registered or woken meanwhile be considered.
func (s *slotAllocator) run(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.wake:
			s.grant()
		}
	}
}

// grant hands out free slots to the buckets that want them, one per bucket
// per pass of the round-robin.
func (s *slotAllocator) grant() {
	s.mu.Lock()
	defer s.mu.Unlock()
	limit := s.limitLocked()
	// Slots a bucket holds beyond its limit were taken before the buckets
	// now registered existed; if their restores hang they would starve the
	// newcomers until the restore timeout, so they do not count here.
	over := 0
	for _, b := range s.order {
		over += max(0, b.held-limit)
	}
	for s.inflight-over < s.parallelism {
		var got *bucket
		for range len(s.order) {
			s.rr %= len(s.order)
			b := s.order[s.rr]
			s.rr++
			if b.held < limit && b.want.Load() > 0 {
				got = b
				break
			}
		}
		if got == nil {
			return
		}
		got.want.Add(-1)
		got.held++
		s.inflight++
		got.granted.Add(1)
		got.kick()
	}
}

// release returns a slot b held and gives it to whoever wants one next.
func (s *slotAllocator) release(b *bucket) {
	s.mu.Lock()
	b.held--
	s.inflight--
	s.mu.Unlock()
	s.kick()
}
