package daemon

import (
	"testing"
	"time"

	"github.com/warmpool/warmpool/api"
)

// BenchmarkAcquireRelease is the daemon's own part of a lease on the fake
// provider: the pool hit, the hand-off's record, the lease's record, and
// the release that destroys the VM and removes both records.
func BenchmarkAcquireRelease(b *testing.B) {
	r := startFake(b, b.TempDir(), newFakeProvider(), "")
	setupPool(b, r.client, 4, 8)
	ctx := b.Context()
	b.ResetTimer()
	for b.Loop() {
		l, err := r.d.Acquire(ctx, "py", api.AcquireRequest{Wait: 10 * time.Second})
		if err != nil {
			b.Fatal(err)
		}
		if err := r.d.Release(ctx, l.ID); err != nil {
			b.Fatal(err)
		}
	}
}
