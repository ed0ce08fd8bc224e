package network

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"

	"github.com/vishvananda/netlink"
)

// maxSlots bounds the index so a host veth name (wp + tag + index) fits the
// 15 bytes of an interface name.
const maxSlots = 99999

// plan is the address plan of network.cidr: slot index i owns the /30 at
// offset 4*i.
type plan struct {
	cidr  netip.Prefix
	slots int // how many slots the manager may have at once
}

func newPlan(cidr string, slots int) (plan, error) {
	if cidr == "" {
		return plan{}, errors.New("network.cidr is not set")
	}
	pfx, err := netip.ParsePrefix(cidr)
	if err != nil {
		return plan{}, fmt.Errorf("network.cidr %q: %w", cidr, err)
	}
	if !pfx.Addr().Is4() {
		return plan{}, fmt.Errorf("network.cidr %q: only IPv4 is supported", cidr)
	}
	if pfx != pfx.Masked() {
		return plan{}, fmt.Errorf("network.cidr %q: host bits set, did you mean %s?", cidr, pfx.Masked())
	}
	if pfx.Bits() > 30 {
		return plan{}, fmt.Errorf("network.cidr %q is too small: a slot takes a /30", cidr)
	}
	if pfx.Overlaps(GuestPrefix) {
		return plan{}, fmt.Errorf("network.cidr %q overlaps the guests' own subnet %s", cidr, GuestPrefix)
	}
	capacity := 1 << min(30-pfx.Bits(), 20)
	capacity = min(capacity, maxSlots)
	switch {
	case slots < 0:
		return plan{}, fmt.Errorf("network slots %d: want 0 (as many as network.cidr holds) or more", slots)
	case slots == 0:
		slots = capacity
	case slots > capacity:
		return plan{}, fmt.Errorf("network.cidr %q is too small for %d slots: it holds %d (a slot takes a /30)", cidr, slots, capacity)
	}
	return plan{cidr: pfx, slots: slots}, nil
}

// slot is the record of slot index of tag, before any policy.
func (p plan) slot(tag string, index int) Slot {
	base := p.cidr.Addr().As4()
	n := uint32(base[0])<<24 | uint32(base[1])<<16 | uint32(base[2])<<8 | uint32(base[3])
	n += uint32(index) * 4
	at := func(off uint32) netip.Addr {
		v := n + off
		return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
	}
	return Slot{
		ID:          slotName(tag, index),
		Tag:         tag,
		Index:       index,
		Address:     at(2),
		HostAddress: at(1),
		Subnet:      netip.PrefixFrom(at(0), 30),
		HostVeth:    hostVethName(tag, index),
	}
}

// checkHost refuses a range that overlaps an address or a route of the
// host, other than those of our own slots (a restarted daemon finds its
// slots' routes still there).
func checkHost(cidr netip.Prefix, ownPrefix string) error {
	links, err := netlink.LinkList()
	if err != nil {
		return fmt.Errorf("listing the host's links: %w", err)
	}
	names := map[int]string{}
	for _, l := range links {
		names[l.Attrs().Index] = l.Attrs().Name
	}
	ours := func(index int) bool { return strings.HasPrefix(names[index], ownPrefix) }
	addrs, err := netlink.AddrList(nil, netlink.FAMILY_V4)
	if err != nil {
		return fmt.Errorf("listing the host's addresses: %w", err)
	}
	for _, a := range addrs {
		if ours(a.LinkIndex) {
			continue
		}
		if p, ok := prefixOf(a.IPNet); ok && p.Overlaps(cidr) {
			return fmt.Errorf("network.cidr %s overlaps the host's address %s on %s", cidr, p, names[a.LinkIndex])
		}
	}
	routes, err := netlink.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: 0}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return fmt.Errorf("listing the host's routes: %w", err)
	}
	for _, r := range routes {
		if r.Dst == nil || ours(r.LinkIndex) {
			continue // a default route covers every range, it is no overlap
		}
		p, ok := prefixOf(r.Dst)
		if !ok || p.Bits() == 0 {
			continue
		}
		if p.Overlaps(cidr) {
			return fmt.Errorf("network.cidr %s overlaps the host's route to %s (dev %s, table %d)", cidr, p, names[r.LinkIndex], r.Table)
		}
	}
	return nil
}

func prefixOf(n *net.IPNet) (netip.Prefix, bool) {
	if n == nil {
		return netip.Prefix{}, false
	}
	a, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	a = a.Unmap()
	if !a.Is4() {
		return netip.Prefix{}, false
	}
	ones, _ := n.Mask.Size()
	return netip.PrefixFrom(a, ones).Masked(), true
}
