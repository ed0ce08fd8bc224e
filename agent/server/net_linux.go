package server

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/warmpool/warmpool/agent/proto"
)

// The guest's side of every network slot, the same in every clone (package
// network's GuestIP, GatewayIP, GuestPrefix and TAPMAC).
var (
	guestAddr   = netip.MustParsePrefix("169.254.0.21/30")
	gatewayAddr = netip.MustParseAddr("169.254.0.22")
	gatewayMAC  = net.HardwareAddr{0x02, 0x77, 0x70, 0x00, 0x00, 0x01}
)

// virtioNetLinks are the guest's virtio-net interfaces (virtioNetNames),
// as netlink links.
func virtioNetLinks() ([]netlink.Link, error) {
	names, err := virtioNetNames()
	if err != nil {
		return nil, err
	}
	out := make([]netlink.Link, 0, len(names))
	for _, name := range names {
		l, err := netlink.LinkByName(name)
		if err != nil {
			return nil, fmt.Errorf("interface %s: %w", name, err)
		}
		out = append(out, l)
	}
	return out, nil
}

// ConfigureNetwork gives the guest's virtio-net interface, when it has
// one, the slot address and a default route via the slot's gateway. The
// init process calls it at boot; a guest without an interface has nothing
// to do.
func ConfigureNetwork() error {
	links, err := virtioNetLinks()
	if err != nil || len(links) == 0 {
		return err
	}
	l := links[0]
	name := l.Attrs().Name
	addr := &netlink.Addr{IPNet: &net.IPNet{IP: guestAddr.Addr().AsSlice(), Mask: net.CIDRMask(guestAddr.Bits(), 32)}}
	if err := netlink.AddrReplace(l, addr); err != nil {
		return fmt.Errorf("addressing %s: %w", name, err)
	}
	if err := netlink.LinkSetUp(l); err != nil {
		return fmt.Errorf("bringing up %s: %w", name, err)
	}
	route := &netlink.Route{LinkIndex: l.Attrs().Index, Gw: gatewayAddr.AsSlice()}
	if err := netlink.RouteReplace(route); err != nil {
		return fmt.Errorf("default route via %s on %s: %w", gatewayAddr, name, err)
	}
	// The gateway has the same MAC in every slot, and the slot knows the
	// guest's for good: a clone's first packet needs no ARP, nor its
	// hand-off a neighbour refresh.
	gw := &netlink.Neigh{LinkIndex: l.Attrs().Index, Family: netlink.FAMILY_V4, State: netlink.NUD_PERMANENT,
		IP: gatewayAddr.AsSlice(), HardwareAddr: gatewayMAC}
	if err := netlink.NeighSet(gw); err != nil {
		return fmt.Errorf("gateway %s's address on %s: %w", gatewayAddr, name, err)
	}
	return nil
}

// gatewayPinned reports whether the guest holds the gateway's MAC for good
// (set at boot by ConfigureNetwork, so in every clone of a template built
// since): /proc/net/arp, one read, lists it complete and permanent.
func gatewayPinned() bool {
	b, err := os.ReadFile("/proc/net/arp")
	if err != nil {
		return false
	}
	const atfCom, atfPerm = 0x02, 0x04
	for line := range strings.SplitSeq(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 4 || f[0] != gatewayAddr.String() || !strings.EqualFold(f[3], gatewayMAC.String()) {
			continue
		}
		flags, err := strconv.ParseUint(strings.TrimPrefix(f[2], "0x"), 16, 8)
		return err == nil && flags&(atfCom|atfPerm) == atfCom|atfPerm
	}
	return false
}

// SetNetwork applies a hand-off's network mode: NetworkUp forgets the
// neighbours a restored snapshot remembered and asks for the gateway, so
// the slot learns the guest at once and the guest's first packet need not
// wait for a stale entry to time out; NetworkNone unbinds the interface
// from its driver, so the guest has no interface at all.
func SetNetwork(mode string) error {
	if mode == proto.NetworkUp && gatewayPinned() {
		// Nothing a restore can have made stale (see ConfigureNetwork).
		return nil
	}
	if mode == proto.NetworkNone {
		names, err := virtioNetNames()
		if err != nil {
			return err
		}
		return unbindAll(names)
	}
	links, err := virtioNetLinks()
	if err != nil {
		return err
	}
	var errs []error
	for _, l := range links {
		errs = append(errs, refreshNeighbours(l))
	}
	return errors.Join(errs...)
}

// virtioNetNames lists the guest's virtio-net interfaces from sysfs. A
// clone runs the hand-off's code for the first time, translated anew under
// TCG: a directory read is far less of it than a netlink dump, and most
// VMs have no interface at all.
func virtioNetNames() ([]string, error) {
	entries, err := os.ReadDir("/sys/class/net")
	if err != nil {
		return nil, fmt.Errorf("listing interfaces: %w", err)
	}
	var out []string
	for _, e := range entries {
		driver, err := os.Readlink(filepath.Join("/sys/class/net", e.Name(), "device", "driver"))
		if err == nil && filepath.Base(driver) == "virtio_net" {
			out = append(out, e.Name())
		}
	}
	return out, nil
}

func unbindAll(names []string) error {
	var errs []error
	for _, name := range names {
		errs = append(errs, unbind(name))
	}
	return errors.Join(errs...)
}

func unbind(name string) error {
	dev, err := os.Readlink(filepath.Join("/sys/class/net", name, "device"))
	if err != nil {
		return fmt.Errorf("device of %s: %w", name, err)
	}
	unbindFile := filepath.Join("/sys/class/net", name, "device", "driver", "unbind")
	if err := os.WriteFile(unbindFile, []byte(filepath.Base(dev)), 0o200); err != nil {
		return fmt.Errorf("unbinding %s (%s): %w", name, filepath.Base(dev), err)
	}
	return nil
}

func refreshNeighbours(l netlink.Link) error {
	name := l.Attrs().Name
	neighs, err := netlink.NeighList(l.Attrs().Index, netlink.FAMILY_V4)
	if err != nil {
		return fmt.Errorf("listing the neighbours on %s: %w", name, err)
	}
	for _, n := range neighs {
		if n.State&netlink.NUD_PERMANENT != 0 {
			continue
		}
		if err := netlink.NeighDel(&n); err != nil && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("forgetting neighbour %s on %s: %w", n.IP, name, err)
		}
	}
	return arpRequest(l, gatewayAddr)
}

// arpRequest broadcasts who-has target from the guest's address: the
// gateway answers and, being asked, records the guest's MAC.
func arpRequest(l netlink.Link, target netip.Addr) error {
	attrs := l.Attrs()
	if len(attrs.HardwareAddr) != 6 {
		return fmt.Errorf("%s has no Ethernet address", attrs.Name)
	}
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ARP)))
	if err != nil {
		return fmt.Errorf("ARP socket: %w", err)
	}
	defer unix.Close(fd)
	pkt := make([]byte, 28)
	binary.BigEndian.PutUint16(pkt[0:], 1)      // Ethernet
	binary.BigEndian.PutUint16(pkt[2:], 0x0800) // IPv4
	pkt[4], pkt[5] = 6, 4
	binary.BigEndian.PutUint16(pkt[6:], 1) // request
	copy(pkt[8:], attrs.HardwareAddr)
	src, dst := guestAddr.Addr().As4(), target.As4()
	copy(pkt[14:], src[:])
	copy(pkt[24:], dst[:])
	to := &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ARP), Ifindex: attrs.Index, Halen: 6,
		Addr: [8]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}}
	if err := unix.Sendto(fd, pkt, 0, to); err != nil {
		return fmt.Errorf("sending an ARP request on %s: %w", attrs.Name, err)
	}
	return nil
}

// htons is v in network byte order as a little-endian host (the guest is
// x86) stores it.
func htons(v uint16) uint16 { return v<<8 | v>>8 }
