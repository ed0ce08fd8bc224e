package pool

// kickIfLow wakes the dispatcher when b is below its floor. Acquire calls
// it after a hand-out rather than when it takes a ready entry: on a small
// host the replacement's restore (a hypervisor starting, then warming up)
// competes with the hand-off for CPU, and a restore started at the same
// moment doubled a QEMU/TCG hand-off (p50 10 -> 20 ms, worst 64 ms, on
// 2 cores). Refill starts a few milliseconds later instead.
//
// Without the lock need() cannot be read; below the floor is the case that
// matters (above it, waiters have kicked already), and a spare kick only
// costs the dispatcher one look.
func (p *Pool) kickIfLow(b *bucket) {
	if int64(b.readyLen())-b.expired.Load() < b.floor.Load() {
		p.kick()
	}
}
