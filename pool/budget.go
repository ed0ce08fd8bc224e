package pool

import (
	"cmp"
	"slices"
	"sync"
)

// budgetClaim is what one pool asks of the host's memory budget.
type budgetClaim struct {
	name string
	// memMiB is the guest memory of one of its VMs.
	memMiB int
	// floor is what it keeps whatever the budget (its min, or a fixed
	// pool's whole depth): the daemon admitted those when the pool was set.
	floor int
	// want is its target before the budget (at least floor).
	want int
	// value is its recent hits per second: what its warm VMs earn.
	value float64
}

// arbitrate shares budgetMiB among claims and returns, in claims' order,
// how many VMs each may hold. Floors come first; the rest goes to the
// pools whose warm memory earns the most hits per MiB, so the pools with
// the lowest recent hit value give way first. Ties go by name, so that two
// steps with the same claims agree.
func arbitrate(budgetMiB int, claims []budgetClaim) []int {
	out := make([]int, len(claims))
	left := budgetMiB
	for i, c := range claims {
		out[i] = c.floor
		left -= c.floor * max(c.memMiB, 0)
	}
	order := make([]int, len(claims))
	for i := range order {
		order[i] = i
	}
	slices.SortStableFunc(order, func(a, b int) int {
		ca, cb := claims[a], claims[b]
		if d := cmp.Compare(valuePerMiB(cb), valuePerMiB(ca)); d != 0 {
			return d
		}
		return cmp.Compare(ca.name, cb.name)
	})
	for _, i := range order {
		c := claims[i]
		extra := c.want - c.floor
		if extra <= 0 {
			continue
		}
		if c.memMiB > 0 {
			extra = max(0, min(extra, left/c.memMiB))
		}
		out[i] += extra
		left -= extra * max(c.memMiB, 0)
	}
	return out
}

func valuePerMiB(c budgetClaim) float64 { return c.value / float64(max(c.memMiB, 1)) }

// budget holds the claims of every pool and what arbitrate allows each;
// adaptive buckets' owners update their claim at each step. It is never
// used on the acquire path.
type budget struct {
	mib int // 0: no budget

	mu     sync.Mutex
	claims map[*bucket]budgetClaim
}

// update records b's claim and re-shares the budget. Each bucket's
// allowance is stored in its allowed; the buckets (other than b) whose
// allowance changed are woken.
func (bu *budget) update(b *bucket, c budgetClaim) {
	if bu.mib <= 0 {
		return
	}
	bu.mu.Lock()
	if bu.claims == nil {
		bu.claims = make(map[*bucket]budgetClaim)
	}
	bu.claims[b] = c
	var woken []*bucket
	bs := make([]*bucket, 0, len(bu.claims))
	cs := make([]budgetClaim, 0, len(bu.claims))
	for ob, oc := range bu.claims {
		bs = append(bs, ob)
		cs = append(cs, oc)
	}
	for i, n := range arbitrate(bu.mib, cs) {
		if bs[i].allowed.Swap(int64(n)) != int64(n) {
			woken = append(woken, bs[i])
		}
	}
	bu.mu.Unlock()
	for _, ob := range woken {
		ob.kick()
	}
}

// forget drops b's claim (the pool was removed) and gives what it held to
// the others.
func (bu *budget) forget(b *bucket) {
	if bu.mib <= 0 {
		return
	}
	bu.mu.Lock()
	_, had := bu.claims[b]
	delete(bu.claims, b)
	var rest []*bucket
	for ob := range bu.claims {
		rest = append(rest, ob)
	}
	bu.mu.Unlock()
	if had {
		for _, ob := range rest {
			ob.kick()
		}
	}
}
