// Package network manages network slots: one network namespace per VM
// holding its TAP device, so every clone of a snapshot keeps the one guest
// address it was built with while the host reaches each at an address of
// its own.
//
// A slot is a namespace named wp-<tag>-<index> with three devices: lo, the
// TAP (TAPName, TAPMAC, gateway GatewayIP of the guest at GuestIP) and
// veth0, the slot end of a veth pair whose host end is wp<tag><index>. Slot
// index i owns the /30 at offset 4*i of the configured range: the host end
// holds its first address, veth0 the second, which is the slot's address,
// the one the host reaches the VM at. nftables inside the namespace
// translates the slot's address to the guest's on the way in and back on
// the way out, and filters what the guest starts by the slot's Policy; a
// table in the host namespace keeps guests off the host's own addresses and
// off each other, and masquerades egress to the uplink.
//
// The tag (TagFor) is derived from the daemon's state directory, so two
// daemons on one host never take or remove each other's slots.
package network

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"strconv"
	"strings"
)

// The guest side, the same in every slot so a restored clone finds the
// network its snapshot was taken with, neighbour cache included.
var (
	GuestIP   = netip.MustParseAddr("169.254.0.21")
	GatewayIP = netip.MustParseAddr("169.254.0.22")
	// GuestPrefix is the guest's subnet: the guest and its gateway only.
	GuestPrefix = netip.MustParsePrefix("169.254.0.20/30")
	// TAPMAC is the TAP's (the gateway's) hardware address; GuestMAC the one
	// the VMM gives the guest's NIC.
	TAPMAC   = net.HardwareAddr{0x02, 0x77, 0x70, 0x00, 0x00, 0x01}
	GuestMAC = net.HardwareAddr{0x02, 0x77, 0x70, 0x00, 0x00, 0x02}
)

const (
	// TAPName is the TAP device in every slot; the VMM opens it by name
	// from inside the slot's namespace.
	TAPName = "tap0"
	// slotVeth is the slot end of the veth pair, inside the namespace.
	slotVeth = "veth0"
	// netnsDir is where named namespaces are bind-mounted, as ip netns does.
	netnsDir = "/run/netns"
	// tagLen is the tag's length in hex digits; fixed, so the host veth
	// prefix wp<tag> of one daemon is never a prefix of another's.
	tagLen = 6
)

// Policy is what a slot's guest may reach.
type Policy string

const (
	// PolicyNone: the VM gets no network at all; no slot is needed.
	PolicyNone Policy = "none"
	// PolicyIsolated: the host reaches the VM at the slot's address, the VM
	// starts no connection anywhere.
	PolicyIsolated Policy = "isolated"
	// PolicyEgress: as isolated, and the VM may also reach what is beyond
	// the host's uplink (only what EgressAllow names, when it names
	// anything), never the host's own addresses nor another slot.
	PolicyEgress Policy = "egress"
)

// ParsePolicy accepts none, isolated and egress; "" is isolated, the default.
func ParsePolicy(s string) (Policy, error) {
	switch Policy(s) {
	case "":
		return PolicyIsolated, nil
	case PolicyNone, PolicyIsolated, PolicyEgress:
		return Policy(s), nil
	}
	return "", fmt.Errorf("network policy %q: want none, isolated or egress", s)
}

// Allow is one egress_allow entry: a destination range and, when Port is
// not 0, that TCP or UDP port only.
type Allow struct {
	Prefix netip.Prefix `json:"prefix"`
	Port   uint16       `json:"port,omitempty"`
}

func (a Allow) String() string {
	if a.Port == 0 {
		return a.Prefix.String()
	}
	return a.Prefix.String() + ":" + strconv.Itoa(int(a.Port))
}

// ParseAllow parses egress_allow entries, CIDR[:PORT] (a bare address is a
// /32).
func ParseAllow(entries []string) ([]Allow, error) {
	var out []Allow
	for _, e := range entries {
		a, err := parseAllowEntry(e)
		if err != nil {
			return nil, fmt.Errorf("egress_allow %q: %w", e, err)
		}
		out = append(out, a)
	}
	return out, nil
}

func parseAllowEntry(e string) (Allow, error) {
	var a Allow
	addr, port := e, ""
	if i := strings.LastIndexByte(e, ':'); i >= 0 {
		addr, port = e[:i], e[i+1:]
		p, err := strconv.ParseUint(port, 10, 16)
		if err != nil || p == 0 {
			return a, fmt.Errorf("port %q: want 1-65535", port)
		}
		a.Port = uint16(p)
	}
	if !strings.Contains(addr, "/") {
		addr += "/32"
	}
	pfx, err := netip.ParsePrefix(addr)
	if err != nil {
		return a, fmt.Errorf("want CIDR[:PORT]: %w", err)
	}
	if !pfx.Addr().Is4() {
		return a, fmt.Errorf("only IPv4 is supported")
	}
	a.Prefix = pfx.Masked()
	return a, nil
}

// TagFor derives the tag of the daemon whose state lives in stateDir.
func TagFor(stateDir string) string {
	abs, err := filepath.Abs(stateDir)
	if err != nil {
		abs = stateDir
	}
	sum := sha256.Sum256([]byte(abs))
	return hex.EncodeToString(sum[:])[:tagLen]
}

func validTag(tag string) error {
	if len(tag) != tagLen {
		return fmt.Errorf("network tag %q: want %d hex digits", tag, tagLen)
	}
	if _, err := hex.DecodeString(tag); err != nil {
		return fmt.Errorf("network tag %q: want %d hex digits", tag, tagLen)
	}
	return nil
}

// Slot is the record of one slot: everything needed to hand it to a VMM,
// and to adopt or remove it after a restart. Callers persist it as is.
type Slot struct {
	ID    string `json:"id"`  // wp-<tag>-<index>, also the namespace's name
	Tag   string `json:"tag"` // the owning daemon's tag
	Index int    `json:"index"`
	// Address is the slot's own address, the one the host reaches the VM at.
	Address netip.Addr `json:"address"`
	// HostAddress is the host end of the veth pair, the slot's next hop.
	HostAddress netip.Addr `json:"host_address"`
	// Subnet is the slot's /30 transit subnet.
	Subnet   netip.Prefix `json:"subnet"`
	HostVeth string       `json:"host_veth"`
	Policy   Policy       `json:"policy"`
	Allow    []Allow      `json:"egress_allow,omitempty"`
}

// NetnsPath is the slot's namespace file: QEMU is started inside it
// (setns on an fd of this path) and Firecracker's jailer gets it as --netns.
func (s Slot) NetnsPath() string { return filepath.Join(netnsDir, s.ID) }

// TAP is the TAP device the VMM opens inside the namespace: QEMU's
// -netdev tap,ifname=tap0,script=no,downscript=no, Firecracker's
// network-interfaces host_dev_name.
func (s Slot) TAP() string { return TAPName }

// slotName is the namespace name of slot index of tag.
func slotName(tag string, index int) string {
	return "wp-" + tag + "-" + strconv.Itoa(index)
}

// hostVethName is the host end of slot index of tag: at most 15 bytes
// (2 + 6 + 5 digits) as interface names must be.
func hostVethName(tag string, index int) string {
	return hostVethPrefix(tag) + strconv.Itoa(index)
}

func hostVethPrefix(tag string) string { return "wp" + tag }

// parseSlotName returns the index of a namespace name of tag's.
func parseSlotName(tag, name string) (int, bool) {
	rest, ok := strings.CutPrefix(name, "wp-"+tag+"-")
	if !ok {
		return 0, false
	}
	i, err := strconv.Atoi(rest)
	if err != nil || i < 0 || strconv.Itoa(i) != rest {
		return 0, false
	}
	return i, true
}
