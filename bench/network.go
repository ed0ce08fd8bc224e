package bench

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"syscall"
	"time"

	"github.com/warmpool/warmpool/network"
	"github.com/warmpool/warmpool/vm"
)

// guestPort is where every warm VM of a run with the network step has a
// listener: listenerWarmExec, the daemon's warm-up command in such a run,
// starts one in each restored VM before it enters its pool, so the first
// connection after an acquire is accepted by a process in the guest,
// through the slot's translation, its TAP and the guest's interface. It is
// busybox nc, which accepts one connection and writes "ok" to it: nothing
// forks per connection (busybox httpd does, and under TCG that fork costs
// more than the network), and each lease is measured once.
const guestPort = "8080"

var listenerWarmExec = []string{"sh", "-c",
	"echo ok > /tmp/listener-ok && busybox nc -l -p " + guestPort + " < /tmp/listener-ok > /dev/null 2>&1 &"}

// tcpRow is the name of the row beside the acquire itself (acquire to a
// handed-off lease, its agent ready).
const tcpRow = "acquire to the guest listener's first answer at the lease's address"

// networkScenarios is scenario 8: what networking costs. A slot made from
// nothing and one reused (scrubbed on release, its policy set on acquire)
// on a manager of the run's own; then, from a pool with policy isolated, a
// warm acquire with networking on, and how long from its start until a
// listener in the guest accepted and answered a connection at the lease's
// address.
func networkScenarios(ctx context.Context, e *env) ([]Scenario, error) {
	const (
		createID, reuseID, acquireID, tcpID = "net-slot-create", "net-slot-reuse", "net-acquire", "net-first-tcp"
	)
	skip := func(why string) []Scenario {
		return []Scenario{
			skippedRow(createID, 8, "network slot made from nothing", "ms", why),
			skippedRow(reuseID, 8, "network slot reused (released, scrubbed, acquired)", "ms", why),
			skippedRow(acquireID, 8, "warm acquire with networking (policy isolated), to agent-ready", "ms", why),
			skippedRow(tcpID, 8, tcpRow, "ms", why),
		}
	}
	switch {
	case os.Geteuid() != 0:
		return skip("network slots need root"), nil
	case !e.provider.Capabilities().Has(vm.CapNetwork) || !e.provider.Capabilities().Has(vm.CapNetworkUnattached):
		return skip("provider " + e.provider.Name() + " gives pool VMs no network"), nil
	}
	create, reuse, err := e.slotTimes(ctx)
	if err != nil {
		return nil, err
	}
	acquires, tcp, handoffs, err := e.networkedAcquires(ctx)
	if err != nil {
		return nil, err
	}
	acq := latencyRow(acquireID, 8, "warm acquire with networking (policy isolated), to agent-ready", acquires, e.opts.WarmupRuns, "warm-acquire")
	// Beside warm-acquire's: the guest's part, where networking adds its
	// step (the interface's neighbours) to the hand-off.
	acq.Metrics = map[string]float64{"handoff_p50_ms": Summarize(millis(handoffs)).P50}
	return []Scenario{
		latencyRow(createID, 8, "network slot made from nothing", create, 0, ""),
		latencyRow(reuseID, 8, "network slot reused (released, scrubbed, acquired)", reuse, 0, createID),
		acq,
		latencyRow(tcpID, 8, tcpRow, tcp, e.opts.WarmupRuns, acquireID),
	}, nil
}

// slotTimes measures slots on a manager of its own, in the upper half of
// --network-cidr (the daemon has the lower half).
func (e *env) slotTimes(ctx context.Context) (create, reuse []time.Duration, err error) {
	_, half, err := halves(e.opts.NetworkCIDR)
	if err != nil {
		return nil, nil, err
	}
	mgr, err := network.New(network.Config{CIDR: half, Tag: network.TagFor(e.subdir("slots")), MaxSlots: 2, Warm: 1})
	if err != nil {
		return nil, nil, fmt.Errorf("network slots: %w", err)
	}
	defer mgr.Close(context.WithoutCancel(ctx)) //nolint:errcheck // nothing else to do with it
	n := e.opts.Samples
	for range n {
		start := time.Now()
		s, err := mgr.Create(ctx, network.PolicyIsolated, nil)
		if err != nil {
			return nil, nil, err
		}
		create = append(create, time.Since(start))
		if err := mgr.Destroy(ctx, s.ID); err != nil {
			return nil, nil, err
		}
	}
	if err := mgr.Fill(ctx); err != nil {
		return nil, nil, err
	}
	for range n {
		start := time.Now()
		s, err := mgr.Acquire(ctx, network.PolicyIsolated, nil)
		if err != nil {
			return nil, nil, err
		}
		if err := mgr.Release(ctx, s.ID); err != nil {
			return nil, nil, err
		}
		reuse = append(reuse, time.Since(start))
		if len(mgr.List()) != 1 {
			return nil, nil, errors.New("a released slot was not kept for reuse")
		}
	}
	return create, reuse, nil
}

// networkedAcquires measures warm acquires from a pool of depth 1 with
// policy isolated, and for each the time from its start until the guest's
// listener answered at the lease's address.
func (e *env) networkedAcquires(ctx context.Context) (acquires, tcp, handoffs []time.Duration, err error) {
	bp, err := e.newPool(ctx, "net", 1)
	if err != nil {
		return nil, nil, nil, err
	}
	defer bp.shutdown(ctx) //nolint:errcheck // the run's cleanup reports it
	var firstTCP []time.Duration
	acquires, err = measure(ctx, e.opts.WarmupRuns, e.opts.Samples, func(ctx context.Context) (time.Duration, error) {
		if err := bp.waitFull(ctx); err != nil {
			return 0, err
		}
		actx, cancel := context.WithTimeout(ctx, readyTimeout)
		defer cancel()
		start := time.Now()
		l, err := bp.acquire(actx)
		d := time.Since(start)
		if err != nil {
			return 0, err
		}
		defer bp.release(ctx, l) //nolint:errcheck // the next waitFull notices a pool that does not refill
		if l.Address == nil {
			return 0, fmt.Errorf("lease %s of a networked pool has no address", l.ID)
		}
		if err := waitListener(actx, net.JoinHostPort(*l.Address, guestPort)); err != nil {
			return 0, fmt.Errorf("lease %s: %w", l.ID, err)
		}
		firstTCP = append(firstTCP, time.Since(start))
		handoffs = append(handoffs, time.Duration(l.Timings.HandoffMS)*time.Millisecond)
		return d, nil
	})
	if err != nil {
		return nil, nil, nil, err
	}
	return acquires, firstTCP[e.opts.WarmupRuns:], handoffs[e.opts.WarmupRuns:], nil
}

// waitListener connects to addr until the listener accepted the
// connection and wrote its line: the line needs the guest's process, where
// a completed handshake needs only its kernel. A timeout (nothing arrived
// yet) is retried; a reset is not, since it means nothing listens.
func waitListener(ctx context.Context, addr string) error {
	for {
		err := askListener(ctx, addr)
		if err == nil {
			return nil
		}
		if errors.Is(err, syscall.ECONNREFUSED) {
			return fmt.Errorf("nothing listens at %s (the warm-up starts busybox nc there): %w", addr, err)
		}
		if ctx.Err() != nil {
			return fmt.Errorf("no answer from the listener at %s: %w (last: %v)", addr, ctx.Err(), err)
		}
	}
}

func askListener(ctx context.Context, addr string) error {
	dctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancel()
	c, err := (&net.Dialer{}).DialContext(dctx, "tcp", addr)
	if err != nil {
		return err
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return fmt.Errorf("reading the listener's line: %w", err)
	}
	if line != "ok\n" {
		return fmt.Errorf("the listener wrote %q, want ok", line)
	}
	return nil
}

// halves splits cidr into its lower half (the run's daemon's network.cidr)
// and its upper half (slotTimes' own manager), so neither's slots overlap
// the other's.
func halves(cidr string) (lower, upper string, err error) {
	p, err := netip.ParsePrefix(cidr)
	if err != nil || !p.Addr().Is4() || p.Bits() > 28 {
		return "", "", fmt.Errorf("--network-cidr %q: want an IPv4 range of at least a /28", cidr)
	}
	p = p.Masked()
	a := p.Addr().As4()
	v := uint32(a[0])<<24 | uint32(a[1])<<16 | uint32(a[2])<<8 | uint32(a[3])
	v += 1 << (32 - p.Bits() - 1)
	hi := netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
	return netip.PrefixFrom(p.Addr(), p.Bits()+1).String(), netip.PrefixFrom(hi, p.Bits()+1).String(), nil
}
