package network

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"strings"
	"sync"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/warmpool/warmpool/internal/tap"
)

// ErrNoFreeSlot: every slot the range holds exists already.
var ErrNoFreeSlot = errors.New("no free network slot")

// Config configures a Manager.
type Config struct {
	// CIDR is network.cidr, the range slots take their /30s from. It must
	// not overlap the host's addresses or routes.
	CIDR string
	// Tag tells this daemon's slots from other daemons' (TagFor).
	Tag string
	// MaxSlots caps the slots that exist at once; 0: as many as CIDR holds.
	MaxSlots int
	// Warm is how many clean slots Fill keeps ready for Acquire.
	Warm   int
	Logger *slog.Logger
}

// Manager creates, recycles and removes the slots of one daemon. Its
// methods are safe for concurrent use.
type Manager struct {
	cfg  Config
	plan plan
	log  *slog.Logger

	// guestLink puts the guest's device into a new slot, TAPName in the
	// slot namespace; tests replace the TAP with a veth whose peer stands
	// for the guest.
	guestLink func(slotNS netns.NsHandle) error

	// hostMu orders installing the host table against removing it with
	// the last slot, so a slot being made never loses it.
	hostMu sync.Mutex

	mu        sync.Mutex
	slots     map[int]*entry // every slot that exists or is being made
	idle      []int          // clean, unleased slots, oldest first
	hostReady bool
}

type entry struct {
	slot   Slot
	leased bool
	ready  bool // false while being created or destroyed
}

// CheckConfig checks what of cfg can be checked without looking at the
// host (the range, the slot counts); New checks the rest.
func CheckConfig(cfg Config) error {
	_, err := checkConfig(cfg)
	return err
}

func checkConfig(cfg Config) (plan, error) {
	p, err := newPlan(cfg.CIDR, cfg.MaxSlots)
	if err != nil {
		return p, err
	}
	if cfg.Warm < 0 || cfg.Warm > p.slots {
		return p, fmt.Errorf("network warm slots %d: want 0 to %d (the slots network.cidr %s holds)", cfg.Warm, p.slots, p.cidr)
	}
	return p, nil
}

// Capacity is how many slots may exist at once with range cidr and at most
// maxSlots (0: no bound but the range's).
func Capacity(cidr string, maxSlots int) (int, error) {
	p, err := newPlan(cidr, maxSlots)
	return p.slots, err
}

// New checks the configuration against the host; it creates nothing.
func New(cfg Config) (*Manager, error) {
	if err := validTag(cfg.Tag); err != nil {
		return nil, err
	}
	p, err := checkConfig(cfg)
	if err != nil {
		return nil, err
	}
	if err := checkHost(p.cidr, hostVethPrefix(cfg.Tag)); err != nil {
		return nil, err
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	m := &Manager{cfg: cfg, plan: p, log: log.With("component", "network"), slots: map[int]*entry{}}
	m.guestLink = m.createTAP
	return m, nil
}

// Capacity is how many slots may exist at once.
func (m *Manager) Capacity() int { return m.plan.slots }

// List returns every slot, leased or idle.
func (m *Manager) List() []Slot {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []Slot
	for _, e := range m.slots {
		if e.ready {
			out = append(out, e.slot)
		}
	}
	slices.SortFunc(out, func(a, b Slot) int { return a.Index - b.Index })
	return out
}

func (m *Manager) reserve() (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for i := range m.plan.slots {
		if _, used := m.slots[i]; !used {
			m.slots[i] = &entry{slot: m.plan.slot(m.cfg.Tag, i)}
			return i, nil
		}
	}
	return 0, fmt.Errorf("%w: all %d of network.cidr %s are in use", ErrNoFreeSlot, m.plan.slots, m.plan.cidr)
}

func withPolicy(s Slot, policy Policy, allow []Allow) (Slot, error) {
	switch policy {
	case PolicyIsolated, PolicyEgress:
	case PolicyNone:
		return s, errors.New("network policy none needs no slot")
	default:
		return s, fmt.Errorf("network policy %q: want isolated or egress", policy)
	}
	if policy != PolicyEgress && len(allow) > 0 {
		return s, fmt.Errorf("egress_allow with network policy %s: only egress allows anything", policy)
	}
	s.Policy, s.Allow = policy, slices.Clone(allow)
	return s, nil
}

// Create makes a new slot with policy and leases it to the caller.
func (m *Manager) Create(ctx context.Context, policy Policy, allow []Allow) (Slot, error) {
	if _, err := withPolicy(Slot{}, policy, allow); err != nil {
		return Slot{}, err
	}
	s, err := m.create(ctx, policy, allow)
	if err != nil {
		return Slot{}, err
	}
	m.mu.Lock()
	e := m.slots[s.Index]
	e.leased, e.ready = true, true
	m.mu.Unlock()
	return s, nil
}

func (m *Manager) create(ctx context.Context, policy Policy, allow []Allow) (Slot, error) {
	if err := ctx.Err(); err != nil {
		return Slot{}, err
	}
	i, err := m.reserve()
	if err != nil {
		return Slot{}, err
	}
	m.mu.Lock()
	s := m.slots[i].slot
	m.mu.Unlock()
	s, err = withPolicy(s, policy, allow)
	if err == nil {
		err = m.build(s)
	}
	if err != nil {
		m.teardown(s)
		m.mu.Lock()
		delete(m.slots, i)
		m.mu.Unlock()
		return Slot{}, fmt.Errorf("creating network slot %s: %w", s.ID, err)
	}
	m.mu.Lock()
	m.slots[i].slot = s
	m.mu.Unlock()
	m.log.Debug("network slot created", "slot", s.ID, "address", s.Address, "policy", s.Policy)
	return s, nil
}

// ensureHost installs the host table once per manager (again after the
// last slot took it away).
func (m *Manager) ensureHost() error {
	m.hostMu.Lock()
	defer m.hostMu.Unlock()
	m.mu.Lock()
	ready := m.hostReady
	m.mu.Unlock()
	if ready {
		return nil
	}
	c, err := nftables.New()
	if err != nil {
		return fmt.Errorf("opening nftables in the host namespace: %w", err)
	}
	addHostRules(c, m.cfg.Tag, m.plan.cidr)
	if err := c.Flush(); err != nil {
		return fmt.Errorf("installing nftables table %s in the host namespace: %w", hostTableName(m.cfg.Tag), err)
	}
	m.mu.Lock()
	m.hostReady = true
	m.mu.Unlock()
	return nil
}

// build makes slot s from nothing: namespace, devices, addresses, routes,
// rules.
func (m *Manager) build(s Slot) error {
	if err := m.ensureHost(); err != nil {
		return err
	}
	ns, err := newNamedNetns(s.ID)
	if err != nil {
		return err
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return fmt.Errorf("netlink in namespace %s: %w", s.ID, err)
	}
	defer h.Close()

	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: s.HostVeth}, PeerName: slotVeth, PeerNamespace: netlink.NsFd(ns)}
	if err := netlink.LinkAdd(veth); err != nil {
		return fmt.Errorf("adding veth %s: %w", s.HostVeth, err)
	}
	host, err := netlink.LinkByName(s.HostVeth)
	if err != nil {
		return fmt.Errorf("finding veth %s: %w", s.HostVeth, err)
	}
	if err := netlink.AddrAdd(host, &netlink.Addr{IPNet: ipnet(s.HostAddress, 30)}); err != nil {
		return fmt.Errorf("addressing veth %s: %w", s.HostVeth, err)
	}
	if err := netlink.LinkSetUp(host); err != nil {
		return fmt.Errorf("bringing up veth %s: %w", s.HostVeth, err)
	}
	if err := m.guestLink(ns); err != nil {
		return err
	}
	for _, name := range []string{"lo", slotVeth, TAPName} {
		l, err := h.LinkByName(name)
		if err != nil {
			return fmt.Errorf("finding %s in namespace %s: %w", name, s.ID, err)
		}
		switch name {
		case slotVeth:
			err = h.AddrAdd(l, &netlink.Addr{IPNet: ipnet(s.Address, 30)})
		case TAPName:
			err = h.AddrAdd(l, &netlink.Addr{IPNet: ipnet(GatewayIP, GuestPrefix.Bits())})
		}
		if err != nil {
			return fmt.Errorf("addressing %s in namespace %s: %w", name, s.ID, err)
		}
		if err := h.LinkSetUp(l); err != nil {
			return fmt.Errorf("bringing up %s in namespace %s: %w", name, s.ID, err)
		}
		if name == TAPName {
			// Every guest has the same MAC: the first packet to a clone
			// needs no ARP.
			guest := &netlink.Neigh{LinkIndex: l.Attrs().Index, Family: netlink.FAMILY_V4, State: netlink.NUD_PERMANENT,
				IP: GuestIP.AsSlice(), HardwareAddr: GuestMAC}
			if err := h.NeighSet(guest); err != nil {
				return fmt.Errorf("the guest's neighbour entry in namespace %s: %w", s.ID, err)
			}
		}
	}
	if err := h.RouteAdd(&netlink.Route{Gw: s.HostAddress.AsSlice()}); err != nil {
		return fmt.Errorf("default route in namespace %s: %w", s.ID, err)
	}
	if err := inNetns(ns, func() error { return os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1"), 0o644) }); err != nil {
		return fmt.Errorf("enabling forwarding in namespace %s: %w", s.ID, err)
	}
	c, err := nftables.New(nftables.WithNetNSFd(int(ns)))
	if err != nil {
		return fmt.Errorf("nftables in namespace %s: %w", s.ID, err)
	}
	addSlotRules(c, s)
	if err := c.Flush(); err != nil {
		return fmt.Errorf("installing nftables rules in namespace %s: %w", s.ID, err)
	}
	if s.Policy == PolicyEgress {
		if err := enableHostForwarding(); err != nil {
			return err
		}
	}
	return nil
}

// createTAP makes the persistent TAP inside the slot's namespace: the
// device is made in whatever namespace the thread opening /dev/net/tun is
// in.
func (m *Manager) createTAP(ns netns.NsHandle) error {
	return inNetns(ns, func() error {
		tap := &netlink.Tuntap{
			LinkAttrs: netlink.LinkAttrs{Name: TAPName, HardwareAddr: TAPMAC},
			Mode:      netlink.TUNTAP_MODE_TAP,
			Flags:     netlink.TUNTAP_NO_PI | netlink.TUNTAP_VNET_HDR | netlink.TUNTAP_ONE_QUEUE,
		}
		if err := netlink.LinkAdd(tap); err != nil {
			return fmt.Errorf("adding TAP %s: %w", TAPName, err)
		}
		l, err := netlink.LinkByName(TAPName)
		if err != nil {
			return fmt.Errorf("finding TAP %s: %w", TAPName, err)
		}
		if err := netlink.LinkSetHardwareAddr(l, TAPMAC); err != nil {
			return fmt.Errorf("setting the address of TAP %s: %w", TAPName, err)
		}
		return nil
	})
}

// enableHostForwarding turns on IPv4 forwarding in the host namespace,
// without which nothing an egress slot sends leaves the host.
func enableHostForwarding() error {
	const p = "/proc/sys/net/ipv4/ip_forward"
	b, err := os.ReadFile(p)
	if err == nil && len(b) > 0 && b[0] == '1' {
		return nil
	}
	if err := os.WriteFile(p, []byte("1"), 0o644); err != nil {
		return fmt.Errorf("enabling IPv4 forwarding on the host for egress: %w", err)
	}
	return nil
}

// teardown removes whatever exists of slot s, each part on its own so a
// half-made slot goes too: the host veth first (its peer goes with it, at
// once, where a dying namespace frees its devices later), the TAP, the
// namespace, and the host's connection tracking of the slot's address.
func (m *Manager) teardown(s Slot) error {
	var errs []error
	if l, err := netlink.LinkByName(s.HostVeth); err == nil {
		if err := netlink.LinkDel(l); err != nil {
			errs = append(errs, fmt.Errorf("deleting veth %s: %w", s.HostVeth, err))
		}
	}
	if ns, err := netns.GetFromName(s.ID); err == nil {
		if h, err := netlink.NewHandleAt(ns); err == nil {
			links, _ := h.LinkList()
			for _, l := range links {
				if l.Attrs().Name != "lo" {
					// The peer of a veth deleted a moment ago is gone with it.
					if err := h.LinkDel(l); err != nil && !errors.Is(err, unix.ENODEV) {
						errs = append(errs, fmt.Errorf("deleting %s in namespace %s: %w", l.Attrs().Name, s.ID, err))
					}
				}
			}
			h.Close()
		}
		ns.Close()
		if err := netns.DeleteNamed(s.ID); err != nil {
			errs = append(errs, fmt.Errorf("deleting namespace %s: %w", s.ID, err))
		}
	} else if _, statErr := os.Stat(s.NetnsPath()); statErr == nil {
		// A file without a namespace mounted on it: a create that died halfway.
		if err := os.Remove(s.NetnsPath()); err != nil {
			errs = append(errs, fmt.Errorf("removing %s: %w", s.NetnsPath(), err))
		}
	}
	if s.Address.IsValid() {
		if err := flushHostConntrack(s.Address); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func flushHostConntrack(a netip.Addr) error {
	var filters []netlink.CustomConntrackFilter
	for _, tp := range []netlink.ConntrackFilterType{netlink.ConntrackOrigSrcIP, netlink.ConntrackOrigDstIP} {
		f := &netlink.ConntrackFilter{}
		if err := f.AddIP(tp, a.AsSlice()); err != nil {
			return fmt.Errorf("conntrack filter for %s: %w", a, err)
		}
		filters = append(filters, f)
	}
	if _, err := netlink.ConntrackDeleteFilters(netlink.ConntrackTable, unix.AF_INET, filters...); err != nil {
		return fmt.Errorf("flushing the host's connection tracking of %s: %w", a, err)
	}
	return nil
}

// take marks the ready slot id (only a leased one when leased is set) as
// busy, so no other call uses it, and returns it; nil when there is none.
// m.mu must be held.
func (m *Manager) take(id string, leased bool) *entry {
	i, ok := parseSlotName(m.cfg.Tag, id)
	e := m.slots[i]
	if !ok || e == nil || e.slot.ID != id || !e.ready || (leased && !e.leased) {
		return nil
	}
	e.ready = false
	return e
}

// Destroy removes slot id, leased or not.
func (m *Manager) Destroy(ctx context.Context, id string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	m.mu.Lock()
	e := m.take(id, false)
	if e == nil {
		m.mu.Unlock()
		return fmt.Errorf("network slot %q: no such slot", id)
	}
	m.idle = slices.DeleteFunc(m.idle, func(i int) bool { return i == e.slot.Index })
	m.mu.Unlock()
	return m.destroy(e.slot)
}

func (m *Manager) destroy(s Slot) error {
	err := m.teardown(s)
	m.mu.Lock()
	delete(m.slots, s.Index)
	m.mu.Unlock()
	err = errors.Join(err, m.removeHostIfUnused())
	if err != nil {
		return fmt.Errorf("destroying network slot %s: %w", s.ID, err)
	}
	m.log.Debug("network slot destroyed", "slot", s.ID)
	return nil
}

// removeHostIfUnused removes the host table once no slot exists or is
// being made.
func (m *Manager) removeHostIfUnused() error {
	m.hostMu.Lock()
	defer m.hostMu.Unlock()
	m.mu.Lock()
	empty := len(m.slots) == 0
	if empty {
		m.hostReady = false
	}
	m.mu.Unlock()
	if !empty {
		return nil
	}
	return m.removeHostTable()
}

func (m *Manager) removeHostTable() error {
	c, err := nftables.New()
	if err != nil {
		return fmt.Errorf("opening nftables in the host namespace: %w", err)
	}
	return removeTable(c, hostTableName(m.cfg.Tag))
}

// Fill creates idle slots until Warm are ready (or the range is full).
func (m *Manager) Fill(ctx context.Context) error {
	for {
		m.mu.Lock()
		n := len(m.idle)
		m.mu.Unlock()
		if n >= m.cfg.Warm {
			return nil
		}
		s, err := m.create(ctx, PolicyIsolated, nil)
		if errors.Is(err, ErrNoFreeSlot) {
			return nil // every slot is in use: nothing to make ahead
		}
		if err != nil {
			return err
		}
		m.mu.Lock()
		m.slots[s.Index].ready = true
		m.idle = append(m.idle, s.Index)
		m.mu.Unlock()
	}
}

// Acquire leases a slot with policy: an idle one when there is one (its
// policy rules replaced), else a new one. It does not refill; call Fill.
func (m *Manager) Acquire(ctx context.Context, policy Policy, allow []Allow) (Slot, error) {
	if _, err := withPolicy(Slot{}, policy, allow); err != nil {
		return Slot{}, err
	}
	m.mu.Lock()
	if len(m.idle) == 0 {
		m.mu.Unlock()
		return m.Create(ctx, policy, allow)
	}
	i := m.idle[0]
	m.idle = m.idle[1:]
	e := m.slots[i]
	e.leased = true
	m.mu.Unlock()

	s, _ := withPolicy(e.slot, policy, allow)
	// An idle slot is isolated with an empty egress chain (Release saw to
	// it), so isolated needs no change and egress only adds rules: deleting
	// rules waits for an RCU grace period, adding them does not.
	if err := m.applyPolicy(s, false); err != nil {
		m.mu.Lock()
		e.ready = false
		m.mu.Unlock()
		return Slot{}, errors.Join(fmt.Errorf("network slot %s: %w", s.ID, err), m.destroy(s))
	}
	m.mu.Lock()
	e.slot = s
	m.mu.Unlock()
	return s, nil
}

// applyPolicy sets the policy rules of s; flush says whether the egress
// chain may hold rules already.
func (m *Manager) applyPolicy(s Slot, flush bool) error {
	if s.Policy == PolicyEgress {
		if err := enableHostForwarding(); err != nil {
			return err
		}
	}
	if !flush && policyRuleCount(s) == 0 {
		return nil
	}
	ns, err := netns.GetFromName(s.ID)
	if err != nil {
		return fmt.Errorf("opening namespace %s: %w", s.ID, err)
	}
	defer ns.Close()
	c, err := nftables.New(nftables.WithNetNSFd(int(ns)))
	if err != nil {
		return fmt.Errorf("nftables in namespace %s: %w", s.ID, err)
	}
	t := &nftables.Table{Family: nftables.TableFamilyIPv4, Name: slotTable}
	eg := &nftables.Chain{Name: egressChain, Table: t}
	if flush {
		c.FlushChain(eg)
	}
	addPolicyRules(c, t, eg, s)
	if err := c.Flush(); err != nil {
		return fmt.Errorf("setting policy %s: %w", s.Policy, err)
	}
	return nil
}

// Release gives back a leased slot once its VM is gone. The slot goes
// back to the idle ones only when it is verified clean and fewer than Warm
// are idle; otherwise it is destroyed.
func (m *Manager) Release(ctx context.Context, id string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	m.mu.Lock()
	e := m.take(id, true)
	if e == nil {
		m.mu.Unlock()
		return fmt.Errorf("network slot %q: no such leased slot", id)
	}
	keep := len(m.idle) < m.cfg.Warm
	m.mu.Unlock()

	s := e.slot
	if keep {
		s.Policy, s.Allow = PolicyIsolated, nil
		err := m.scrub(s)
		if err == nil {
			m.mu.Lock()
			e.slot, e.leased, e.ready = s, false, true
			m.idle = append(m.idle, s.Index)
			m.mu.Unlock()
			return nil
		}
		m.log.Info("network slot not clean after release, destroying it", "slot", s.ID, "reason", err)
	}
	return m.destroy(e.slot)
}

// scrub resets a released slot to isolated, forgets its connections and
// verifies that nothing but what build made is left.
func (m *Manager) scrub(s Slot) error {
	if err := m.applyPolicy(s, true); err != nil {
		return err
	}
	if err := flushHostConntrack(s.Address); err != nil {
		return err
	}
	ns, err := netns.GetFromName(s.ID)
	if err != nil {
		return fmt.Errorf("opening namespace %s: %w", s.ID, err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return fmt.Errorf("netlink in namespace %s: %w", s.ID, err)
	}
	defer h.Close()
	if err := h.ConntrackTableFlush(netlink.ConntrackTable); err != nil {
		return fmt.Errorf("flushing connection tracking: %w", err)
	}
	// The namespace's count, where a dump would walk the host's whole
	// conntrack hash.
	var count []byte
	if err := inNetns(ns, func() error {
		var err error
		count, err = os.ReadFile("/proc/sys/net/netfilter/nf_conntrack_count")
		return err
	}); err != nil {
		return fmt.Errorf("reading the connection tracking count: %w", err)
	}
	if n := strings.TrimSpace(string(count)); n != "0" {
		return fmt.Errorf("%s tracked connections left after a flush", n)
	}
	return m.verify(s, ns, h)
}

// verify says what differs in slot s from what build made.
func (m *Manager) verify(s Slot, ns netns.NsHandle, h *netlink.Handle) error {
	links, err := h.LinkList()
	if err != nil {
		return fmt.Errorf("listing devices: %w", err)
	}
	want := map[string]netip.Prefix{
		"lo":     {},
		slotVeth: netip.PrefixFrom(s.Address, 30),
		TAPName:  netip.PrefixFrom(GatewayIP, GuestPrefix.Bits()),
	}
	for _, l := range links {
		name := l.Attrs().Name
		addr, ok := want[name]
		if !ok {
			return fmt.Errorf("unexpected device %s", name)
		}
		delete(want, name)
		if _, isTap := l.(*netlink.Tuntap); isTap {
			held, err := tapAttached(ns, name)
			if err != nil {
				return err
			}
			if held {
				return fmt.Errorf("TAP %s is still attached to a process", name)
			}
		}
		if !addr.IsValid() {
			continue
		}
		addrs, err := h.AddrList(l, netlink.FAMILY_V4)
		if err != nil {
			return fmt.Errorf("listing the addresses of %s: %w", name, err)
		}
		if len(addrs) != 1 {
			return fmt.Errorf("%s has %d IPv4 addresses, want 1", name, len(addrs))
		}
		if got, _ := prefixOf(addrs[0].IPNet); got != addr.Masked() || !addrs[0].IP.Equal(addr.Addr().AsSlice()) {
			return fmt.Errorf("%s has address %s, want %s", name, addrs[0].IPNet, addr)
		}
	}
	for name := range want {
		return fmt.Errorf("device %s is missing", name)
	}
	c, err := nftables.New(nftables.WithNetNSFd(int(ns)))
	if err != nil {
		return fmt.Errorf("nftables in namespace %s: %w", s.ID, err)
	}
	return checkSlotRules(c, s)
}

// Reconcile runs once after a restart, before any other call: it adopts
// the slots of known (the records the caller kept, of slots still leased
// to VMs) whose namespace still exists, re-installing their rules, makes
// again the known ones whose namespace is gone (same address), and removes
// every namespace, host veth and rule of this tag that known does not
// name. Slots of other tags are never touched. It returns the slots it
// now holds, all leased.
func (m *Manager) Reconcile(ctx context.Context, known []Slot) ([]Slot, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	keep := map[int]Slot{}
	for _, s := range known {
		if s.Tag != m.cfg.Tag {
			continue
		}
		want := m.plan.slot(m.cfg.Tag, s.Index)
		if s.Index < 0 || s.Index >= m.plan.slots || want.ID != s.ID || want.Address != s.Address {
			return nil, fmt.Errorf("network slot %s (%s) does not fit network.cidr %s: was the range changed?", s.ID, s.Address, m.plan.cidr)
		}
		if _, err := withPolicy(want, s.Policy, s.Allow); err != nil {
			return nil, fmt.Errorf("network slot %s: %w", s.ID, err)
		}
		keep[s.Index] = s
	}
	var errs []error
	// Strays: namespaces and host veths of this tag nobody knows.
	entries, err := os.ReadDir(netnsDir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("listing %s: %w", netnsDir, err)
	}
	for _, d := range entries {
		i, ok := parseSlotName(m.cfg.Tag, d.Name())
		if _, known := keep[i]; ok && !known {
			m.log.Info("removing a network slot nobody knows", "slot", d.Name())
			errs = append(errs, m.teardown(m.plan.slotOrName(m.cfg.Tag, i, d.Name())))
		}
	}
	links, err := netlink.LinkList()
	if err != nil {
		return nil, fmt.Errorf("listing the host's links: %w", err)
	}
	for _, l := range links {
		i, ok := parseVethName(m.cfg.Tag, l.Attrs().Name)
		if _, known := keep[i]; ok && !known {
			if err := netlink.LinkDel(l); err != nil {
				errs = append(errs, fmt.Errorf("deleting veth %s: %w", l.Attrs().Name, err))
			}
		}
	}
	m.mu.Lock()
	m.slots, m.idle, m.hostReady = map[int]*entry{}, nil, false
	for i, s := range keep {
		m.slots[i] = &entry{slot: s}
	}
	m.mu.Unlock()
	if len(keep) == 0 {
		errs = append(errs, m.removeHostTable())
		return nil, errors.Join(errs...)
	}
	if err := m.ensureHost(); err != nil {
		return nil, errors.Join(append(errs, err)...)
	}
	var out []Slot
	for i, s := range keep {
		if err := m.adopt(s); err != nil {
			m.log.Info("network slot broken, making it again", "slot", s.ID, "reason", err)
			m.teardown(s)
			if err := m.build(s); err != nil {
				errs = append(errs, fmt.Errorf("making network slot %s again: %w", s.ID, err))
				m.teardown(s)
				m.mu.Lock()
				delete(m.slots, i)
				m.mu.Unlock()
				continue
			}
		}
		m.mu.Lock()
		m.slots[i].leased, m.slots[i].ready = true, true
		m.mu.Unlock()
		out = append(out, s)
	}
	slices.SortFunc(out, func(a, b Slot) int { return a.Index - b.Index })
	return out, errors.Join(errs...)
}

// adopt re-installs the rules of a known slot and checks its devices.
func (m *Manager) adopt(s Slot) error {
	ns, err := netns.GetFromName(s.ID)
	if err != nil {
		return fmt.Errorf("opening namespace %s: %w", s.ID, err)
	}
	defer ns.Close()
	if _, err := netlink.LinkByName(s.HostVeth); err != nil {
		return fmt.Errorf("veth %s: %w", s.HostVeth, err)
	}
	c, err := nftables.New(nftables.WithNetNSFd(int(ns)))
	if err != nil {
		return fmt.Errorf("nftables in namespace %s: %w", s.ID, err)
	}
	addSlotRules(c, s)
	if err := c.Flush(); err != nil {
		return fmt.Errorf("installing nftables rules in namespace %s: %w", s.ID, err)
	}
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return fmt.Errorf("netlink in namespace %s: %w", s.ID, err)
	}
	defer h.Close()
	links, err := h.LinkList()
	if err != nil {
		return err
	}
	for _, name := range []string{slotVeth, TAPName} {
		if !slices.ContainsFunc(links, func(l netlink.Link) bool { return l.Attrs().Name == name }) {
			return fmt.Errorf("device %s is missing", name)
		}
	}
	if s.Policy == PolicyEgress {
		return enableHostForwarding()
	}
	return nil
}

// Close destroys the idle slots. Leased slots stay: their VMs may outlive
// the daemon, and Reconcile adopts them on the next start.
func (m *Manager) Close(ctx context.Context) error {
	m.mu.Lock()
	idle := m.idle
	m.idle = nil
	var slots []Slot
	for _, i := range idle {
		m.slots[i].ready = false
		slots = append(slots, m.slots[i].slot)
	}
	m.mu.Unlock()
	var errs []error
	for _, s := range slots {
		errs = append(errs, m.destroy(s))
	}
	return errors.Join(errs...)
}

func (p plan) slotOrName(tag string, index int, name string) Slot {
	if index < p.slots {
		return p.slot(tag, index)
	}
	// Made under a larger range: only the names are known.
	return Slot{ID: name, Tag: tag, Index: index, HostVeth: hostVethName(tag, index)}
}

func parseVethName(tag, name string) (int, bool) {
	rest, ok := strings.CutPrefix(name, hostVethPrefix(tag))
	if !ok {
		return 0, false
	}
	return parseSlotName(tag, "wp-"+tag+"-"+rest)
}

func ipnet(a netip.Addr, bits int) *net.IPNet {
	return &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(bits, 32)}
}

// newNamedNetns makes namespace name, bind-mounted under /run/netns as ip
// netns does, and returns a handle to it.
func newNamedNetns(name string) (netns.NsHandle, error) {
	var ns netns.NsHandle
	err := onOwnThread(func() error {
		var err error
		ns, err = netns.NewNamed(name)
		if err != nil {
			return fmt.Errorf("creating namespace %s: %w", name, err)
		}
		return nil
	})
	return ns, err
}

// inNetns runs fn on a thread in namespace ns.
func inNetns(ns netns.NsHandle, fn func() error) error {
	return onOwnThread(func() error {
		if err := netns.Set(ns); err != nil {
			return fmt.Errorf("entering namespace: %w", err)
		}
		return fn()
	})
}

// onOwnThread runs fn on a goroutine locked to its thread, which may leave
// the thread in another namespace: the thread is put back into the
// namespace it started in, or, when that fails, left locked so the runtime
// ends it with the goroutine instead of scheduling other goroutines on it.
func onOwnThread(fn func() error) error {
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			done <- fmt.Errorf("opening the thread's namespace: %w", err)
			return
		}
		defer orig.Close()
		err = fn()
		if rerr := netns.Set(orig); rerr != nil {
			done <- errors.Join(err, fmt.Errorf("returning to the thread's namespace: %w", rerr))
			return
		}
		runtime.UnlockOSThread()
		done <- err
	}()
	return <-done
}

// OpenTAP opens the TAP of slot s for a VMM that is handed the descriptor
// instead of being started inside the namespace (QEMU: -netdev
// tap,fd=N,vhost=off).
func OpenTAP(s Slot) (*os.File, error) {
	f, err := tap.Open(s.NetnsPath(), TAPName)
	if err != nil {
		return nil, fmt.Errorf("network slot %s: %w", s.ID, err)
	}
	return f, nil
}

// SetPolicy changes the policy of leased slot id (a machine whose policy
// changed keeps its slot, and so its address).
func (m *Manager) SetPolicy(ctx context.Context, id string, policy Policy, allow []Allow) (Slot, error) {
	if err := ctx.Err(); err != nil {
		return Slot{}, err
	}
	m.mu.Lock()
	e := m.take(id, true)
	m.mu.Unlock()
	if e == nil {
		return Slot{}, fmt.Errorf("network slot %q: no such leased slot", id)
	}
	s, err := withPolicy(e.slot, policy, allow)
	if err == nil {
		err = m.applyPolicy(s, true)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	e.ready = true
	if err != nil {
		return e.slot, fmt.Errorf("network slot %s: %w", id, err)
	}
	e.slot = s
	return s, nil
}
