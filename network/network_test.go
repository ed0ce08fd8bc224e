package network

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// The tests' ranges (a second daemon's in otherCIDR) and the "outside"
// network stand-in; needRoot skips when one is in use on the host.
const (
	testCIDR    = "172.20.213.0/26"
	otherCIDR   = "172.20.214.0/30"
	outsideCIDR = "198.51.100.0/24"
)

var (
	outsideIP     = netip.MustParseAddr("198.51.100.1")
	outsideHostIP = netip.MustParseAddr("198.51.100.254")
)

// needRoot skips unless the test can make namespaces and nftables rules.
func needRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("network slots need root (namespaces, veths, nftables)")
	}
	for _, tool := range []string{"ip", "nft"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s is not installed (scripts/deps.sh installs it); the tests check what it lists", tool)
		}
	}
	c, err := nftables.New()
	if err == nil {
		_, err = c.ListTables()
	}
	if err != nil {
		t.Skipf("nftables is not usable here: %v", err)
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		t.Skipf("no /dev/net/tun: %v", err)
	}
	for _, r := range []string{testCIDR, otherCIDR, outsideCIDR} {
		if err := checkHost(netip.MustParsePrefix(r), "wp-no-such-prefix"); err != nil {
			t.Skipf("the tests' ranges must be free on this host: %v", err)
		}
	}
}

func randomTag(t testing.TB) string {
	b := make([]byte, tagLen/2)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// leftovers lists what ip netns, ip link and nft show of tag.
func leftovers(t testing.TB, tag string) []string {
	t.Helper()
	var out []string
	for _, cmd := range [][]string{{"ip", "netns", "list"}, {"ip", "-o", "link"}, {"nft", "list", "ruleset"}} {
		b, err := exec.Command(cmd[0], cmd[1:]...).CombinedOutput()
		if err != nil {
			t.Fatalf("%s: %v: %s", strings.Join(cmd, " "), err, b)
		}
		for _, line := range strings.Split(string(b), "\n") {
			if strings.Contains(line, "wp-"+tag) || strings.Contains(line, hostVethPrefix(tag)) {
				out = append(out, strings.Join(cmd, " ")+": "+strings.TrimSpace(line))
			}
		}
	}
	return out
}

func assertNothingLeft(t testing.TB, tag string) {
	t.Helper()
	if left := leftovers(t, tag); len(left) > 0 {
		t.Errorf("left behind:\n%s", strings.Join(left, "\n"))
	}
}

// testEnv is a manager whose slots hold a stand-in guest instead of a VM:
// TAPName in the slot is a veth whose peer, in a namespace of its own,
// holds the guest address (the same in every slot) and serves HTTP.
type testEnv struct {
	t      *testing.T
	tag    string
	m      *Manager
	guests atomic.Int32
	// guestNS maps a slot's namespace name to its guest's namespace.
	guestNS map[string]netns.NsHandle
}

func newTestEnv(t *testing.T, warm int) *testEnv {
	t.Helper()
	needRoot(t)
	tag := randomTag(t)
	m, err := New(Config{CIDR: testCIDR, Tag: tag, Warm: warm})
	if err != nil {
		t.Fatal(err)
	}
	env := &testEnv{t: t, tag: tag, m: m, guestNS: map[string]netns.NsHandle{}}
	m.guestLink = env.makeGuest
	restoreForwarding(t)
	t.Cleanup(func() {
		ctx := context.Background()
		m.Close(ctx)
		for _, s := range m.List() {
			m.Destroy(ctx, s.ID)
		}
		for name, ns := range env.guestNS {
			ns.Close()
			netns.DeleteNamed(name)
		}
		m.Reconcile(ctx, nil)
		assertNothingLeft(t, tag)
	})
	return env
}

// restoreForwarding puts the host's ip_forward back as it was: egress
// tests turn it on.
func restoreForwarding(t testing.TB) {
	const p = "/proc/sys/net/ipv4/ip_forward"
	was, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.WriteFile(p, was, 0o644) })
}

func (env *testEnv) makeGuest(slotNS netns.NsHandle) error {
	name := fmt.Sprintf("wp-%s-g%d", env.tag, env.guests.Add(1))
	gns, err := newNamedNetns(name)
	if err != nil {
		return err
	}
	env.guestNS[name] = gns
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "wpg" + env.tag, HardwareAddr: TAPMAC, Namespace: netlink.NsFd(slotNS)},
		PeerName: "eth0", PeerHardwareAddr: GuestMAC, PeerNamespace: netlink.NsFd(gns)}
	if err := netlink.LinkAdd(veth); err != nil {
		return fmt.Errorf("guest veth: %w", err)
	}
	sh, err := netlink.NewHandleAt(slotNS)
	if err != nil {
		return err
	}
	defer sh.Close()
	l, err := sh.LinkByName("wpg" + env.tag)
	if err != nil {
		return err
	}
	if err := sh.LinkSetName(l, TAPName); err != nil {
		return err
	}
	gh, err := netlink.NewHandleAt(gns)
	if err != nil {
		return err
	}
	defer gh.Close()
	for _, n := range []string{"lo", "eth0"} {
		l, err := gh.LinkByName(n)
		if err != nil {
			return err
		}
		if n == "eth0" {
			if err := gh.AddrAdd(l, &netlink.Addr{IPNet: ipnet(GuestIP, GuestPrefix.Bits())}); err != nil {
				return err
			}
		}
		if err := gh.LinkSetUp(l); err != nil {
			return err
		}
	}
	if err := gh.RouteAdd(&netlink.Route{Gw: GatewayIP.AsSlice()}); err != nil {
		return err
	}
	return serveIn(env.t, gns, netip.AddrPortFrom(GuestIP, 8080), name)
}

// serveIn serves HTTP answering with answer on addr inside namespace ns.
func serveIn(t testing.TB, ns netns.NsHandle, addr netip.AddrPort, answer string) error {
	var ln net.Listener
	err := inNetns(ns, func() error {
		var err error
		ln, err = net.Listen("tcp", addr.String())
		return err
	})
	if err != nil {
		return fmt.Errorf("listening on %s: %w", addr, err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, answer) })}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return nil
}

// get fetches http://addr/ from inside ns (the host's when ns is None):
// the body, or an error when nothing answers within timeout.
func get(ns netns.NsHandle, addr netip.AddrPort, timeout time.Duration) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	dial := func(ctx context.Context, network, a string) (net.Conn, error) {
		var d net.Dialer
		if ns == netns.None() {
			return d.DialContext(ctx, network, a)
		}
		var c net.Conn
		err := inNetns(ns, func() error {
			var err error
			c, err = d.DialContext(ctx, network, a)
			return err
		})
		return c, err
	}
	client := &http.Client{Transport: &http.Transport{DialContext: dial, DisableKeepAlives: true}}
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr.String()+"/", nil)
	resp, err := client.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}

// guestOf is the guest namespace of s and its name, which its server
// answers with. makeGuest numbers guests in the order build makes them,
// which is slot order in these tests.
func (env *testEnv) guestOf(s Slot) (netns.NsHandle, string) {
	name := fmt.Sprintf("wp-%s-g%d", env.tag, s.Index+1)
	return env.guestNS[name], name
}

func mustReach(t *testing.T, what string, ns netns.NsHandle, addr netip.AddrPort, want string) {
	t.Helper()
	got, err := get(ns, addr, 15*time.Second) // generous: the machine is shared
	if err != nil {
		t.Errorf("%s: %s does not answer: %v", what, addr, err)
	} else if want != "" && got != want {
		t.Errorf("%s: %s answered %q, want %q", what, addr, got, want)
	}
}

func mustNotReach(t *testing.T, what string, ns netns.NsHandle, addr netip.AddrPort) {
	t.Helper()
	// A dropped connection can only be told by waiting; one that would be
	// let through is answered at once on this machine, in well under this.
	if got, err := get(ns, addr, time.Second); err == nil {
		t.Errorf("%s: %s answered %q, want no connection", what, addr, got)
	}
}

// hostServer serves on every host address and returns the addresses a
// guest must not reach it at: the host's own (besides loopback).
func hostServer(t *testing.T) []netip.AddrPort {
	ln, err := net.Listen("tcp", "0.0.0.0:0")
	if err != nil {
		t.Fatal(err)
	}
	port := uint16(ln.Addr().(*net.TCPAddr).Port)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "host") })}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	addrs, err := netlink.AddrList(nil, netlink.FAMILY_V4)
	if err != nil {
		t.Fatal(err)
	}
	var out []netip.AddrPort
	for _, a := range addrs {
		ip, _ := netip.AddrFromSlice(a.IP)
		if !ip.Unmap().IsLoopback() {
			out = append(out, netip.AddrPortFrom(ip.Unmap(), port))
		}
	}
	if len(out) == 0 {
		t.Fatal("the host has no address besides loopback")
	}
	return out
}

// outside makes a namespace standing for the internet: routed from the
// host through a veth, serving on outsideIP ports 80 and 81.
func outside(t *testing.T, tag string) {
	name := "wp-" + tag + "-out"
	ns, err := newNamedNetns(name)
	if err != nil {
		t.Fatal(err)
	}
	hostEnd := "wpo" + tag
	t.Cleanup(func() {
		if l, err := netlink.LinkByName(hostEnd); err == nil {
			netlink.LinkDel(l)
		}
		ns.Close()
		netns.DeleteNamed(name)
	})
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: hostEnd}, PeerName: "eth0", PeerNamespace: netlink.NsFd(ns)}
	if err := netlink.LinkAdd(veth); err != nil {
		t.Fatal(err)
	}
	l, _ := netlink.LinkByName(hostEnd)
	if err := netlink.AddrAdd(l, &netlink.Addr{IPNet: ipnet(outsideHostIP, 24)}); err != nil {
		t.Fatal(err)
	}
	if err := netlink.LinkSetUp(l); err != nil {
		t.Fatal(err)
	}
	h, _ := netlink.NewHandleAt(ns)
	defer h.Close()
	for _, n := range []string{"lo", "eth0"} {
		l, _ := h.LinkByName(n)
		if n == "eth0" {
			if err := h.AddrAdd(l, &netlink.Addr{IPNet: ipnet(outsideIP, 24)}); err != nil {
				t.Fatal(err)
			}
		}
		h.LinkSetUp(l)
	}
	for _, port := range []uint16{80, 81} {
		if err := serveIn(t, ns, netip.AddrPortFrom(outsideIP, port), fmt.Sprintf("outside:%d", port)); err != nil {
			t.Fatal(err)
		}
	}
}

func TestIsolatedSlotsShareTheGuestAddressAndReachNothing(t *testing.T) {
	env := newTestEnv(t, 0)
	ctx := context.Background()
	hostAddrs := hostServer(t)
	outside(t, env.tag)
	// The host forwards (it does once any slot has egress, or for other
	// reasons): isolation must not depend on it not forwarding.
	if err := enableHostForwarding(); err != nil {
		t.Fatal(err)
	}
	a, err := env.m.Create(ctx, PolicyIsolated, nil)
	if err != nil {
		t.Fatal(err)
	}
	b, err := env.m.Create(ctx, PolicyIsolated, nil)
	if err != nil {
		t.Fatal(err)
	}
	if a.Address == b.Address {
		t.Fatalf("two slots share the address %s", a.Address)
	}
	for _, s := range []Slot{a, b} {
		_, guest := env.guestOf(s)
		mustReach(t, "host to "+s.ID, netns.None(), netip.AddrPortFrom(s.Address, 8080), guest)
	}
	for _, pair := range [][2]Slot{{a, b}, {b, a}} {
		from, to := pair[0], pair[1]
		gns, _ := env.guestOf(from)
		what := "guest of " + from.ID
		mustNotReach(t, what+" to "+to.ID, gns, netip.AddrPortFrom(to.Address, 8080))
		mustNotReach(t, what+" to its own slot's host end", gns, netip.AddrPortFrom(from.HostAddress, hostAddrs[0].Port()))
		for _, h := range hostAddrs {
			mustNotReach(t, what+" to the host", gns, h)
		}
		mustNotReach(t, what+" to the outside", gns, netip.AddrPortFrom(outsideIP, 80))
	}
	for _, s := range []Slot{a, b} {
		if err := env.m.Destroy(ctx, s.ID); err != nil {
			t.Fatal(err)
		}
	}
	if left := leftovers(t, env.tag); len(left) > 0 {
		// Only the test's own guest and outside namespaces may remain.
		for _, l := range left {
			if !strings.Contains(l, "wp-"+env.tag+"-g") && !strings.Contains(l, "wp-"+env.tag+"-out") {
				t.Errorf("left behind after Destroy: %s", l)
			}
		}
	}
}

func TestEgressReachesTheOutsideOnlyAsAllowed(t *testing.T) {
	env := newTestEnv(t, 0)
	ctx := context.Background()
	hostAddrs := hostServer(t)
	outside(t, env.tag)
	open, err := env.m.Create(ctx, PolicyEgress, nil)
	if err != nil {
		t.Fatal(err)
	}
	allow, err := ParseAllow([]string{outsideIP.String() + ":80"})
	if err != nil {
		t.Fatal(err)
	}
	limited, err := env.m.Create(ctx, PolicyEgress, allow)
	if err != nil {
		t.Fatal(err)
	}
	openNS, openName := env.guestOf(open)
	limitedNS, limitedName := env.guestOf(limited)
	mustReach(t, "host to the open slot", netns.None(), netip.AddrPortFrom(open.Address, 8080), openName)
	mustReach(t, "host to the limited slot", netns.None(), netip.AddrPortFrom(limited.Address, 8080), limitedName)
	mustReach(t, "open guest to outside:80", openNS, netip.AddrPortFrom(outsideIP, 80), "outside:80")
	mustReach(t, "open guest to outside:81", openNS, netip.AddrPortFrom(outsideIP, 81), "outside:81")
	mustReach(t, "limited guest to outside:80", limitedNS, netip.AddrPortFrom(outsideIP, 80), "outside:80")
	mustNotReach(t, "limited guest to outside:81", limitedNS, netip.AddrPortFrom(outsideIP, 81))
	mustNotReach(t, "open guest to the other slot", openNS, netip.AddrPortFrom(limited.Address, 8080))
	mustNotReach(t, "limited guest to the other slot", limitedNS, netip.AddrPortFrom(open.Address, 8080))
	for _, h := range hostAddrs {
		mustNotReach(t, "open guest to the host", openNS, h)
	}
	mustNotReach(t, "open guest to its slot's host end", openNS, netip.AddrPortFrom(open.HostAddress, hostAddrs[0].Port()))
	// What runs in the slot's namespace beside the guest (the VMM) starts
	// nothing through the host, whatever the guest's policy.
	sns, err := netns.GetFromName(open.ID)
	if err != nil {
		t.Fatal(err)
	}
	defer sns.Close()
	mustNotReach(t, "open slot's namespace to the outside", sns, netip.AddrPortFrom(outsideIP, 80))
	mustNotReach(t, "open slot's namespace to the host", sns, hostAddrs[0])
}

func TestReleasedSlotIsReusedWhenCleanAndDestroyedWhenNot(t *testing.T) {
	env := newTestEnv(t, 1)
	ctx := context.Background()
	if err := env.m.Fill(ctx); err != nil {
		t.Fatal(err)
	}
	idle := env.m.List()
	if len(idle) != 1 {
		t.Fatalf("after Fill with Warm 1: %d slots, want 1", len(idle))
	}
	s, err := env.m.Acquire(ctx, PolicyEgress, nil)
	if err != nil {
		t.Fatal(err)
	}
	if s.ID != idle[0].ID || s.Policy != PolicyEgress {
		t.Fatalf("Acquire got %s (%s), want the idle %s with egress", s.ID, s.Policy, idle[0].ID)
	}
	_, guest := env.guestOf(s)
	mustReach(t, "host to the acquired slot", netns.None(), netip.AddrPortFrom(s.Address, 8080), guest)
	if err := env.m.Release(ctx, s.ID); err != nil {
		t.Fatal(err)
	}
	ns, err := netns.GetFromName(s.ID)
	if err != nil {
		t.Fatalf("a clean released slot was not kept: %v", err)
	}
	defer ns.Close()
	h, _ := netlink.NewHandleAt(ns)
	defer h.Close()
	if flows, _ := h.ConntrackTableList(netlink.ConntrackTable, netlink.FAMILY_V4); len(flows) > 0 {
		t.Errorf("released slot still tracks %d connections", len(flows))
	}
	c, _ := nftables.New(nftables.WithNetNSFd(int(ns)))
	if err := checkSlotRules(c, Slot{Policy: PolicyIsolated}); err != nil {
		t.Errorf("released slot kept its egress rules: %v", err)
	}
	again, err := env.m.Acquire(ctx, PolicyIsolated, nil)
	if err != nil {
		t.Fatal(err)
	}
	if again.ID != s.ID {
		t.Errorf("second Acquire got %s, want the recycled %s", again.ID, s.ID)
	}
	// Something a VM left behind: the slot must not be handed out again.
	if err := h.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "leftover"}, PeerName: "leftover1"}); err != nil {
		t.Fatal(err)
	}
	if err := env.m.Release(ctx, again.ID); err != nil {
		t.Fatal(err)
	}
	if len(env.m.List()) != 0 {
		t.Errorf("a dirty released slot is still listed: %v", env.m.List())
	}
	if _, err := os.Stat(again.NetnsPath()); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a dirty released slot's namespace still exists: %v", err)
	}
}

func TestSlotHasTheFixedTAP(t *testing.T) {
	needRoot(t)
	tag := randomTag(t)
	m, err := New(Config{CIDR: testCIDR, Tag: tag, Warm: 1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Reconcile(context.Background(), nil); assertNothingLeft(t, tag) })
	ctx := context.Background()
	s, err := m.Create(ctx, PolicyIsolated, nil)
	if err != nil {
		t.Fatal(err)
	}
	ns, err := netns.GetFromPath(s.NetnsPath())
	if err != nil {
		t.Fatalf("slot namespace %s: %v", s.NetnsPath(), err)
	}
	defer ns.Close()
	h, _ := netlink.NewHandleAt(ns)
	defer h.Close()
	l, err := h.LinkByName(s.TAP())
	if err != nil {
		t.Fatalf("no %s in the slot: %v", s.TAP(), err)
	}
	if _, ok := l.(*netlink.Tuntap); !ok {
		t.Errorf("%s is a %s, want a TAP", s.TAP(), l.Type())
	}
	if l.Attrs().HardwareAddr.String() != TAPMAC.String() {
		t.Errorf("%s has MAC %s, want %s", s.TAP(), l.Attrs().HardwareAddr, TAPMAC)
	}
	// A TAP with nobody attached is clean: the slot is recycled.
	if err := m.Release(ctx, s.ID); err != nil {
		t.Fatal(err)
	}
	if got := m.List(); len(got) != 1 || got[0].ID != s.ID {
		t.Errorf("after Release: %v, want %s kept idle", got, s.ID)
	}
	if err := m.Close(ctx); err != nil {
		t.Fatal(err)
	}
	assertNothingLeft(t, tag)
}

func TestReconcileAdoptsKnownAndRemovesTheRest(t *testing.T) {
	needRoot(t)
	ctx := context.Background()
	tag, otherTag := randomTag(t), randomTag(t)
	restoreForwarding(t)
	m, err := New(Config{CIDR: testCIDR, Tag: tag})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Reconcile(ctx, nil); assertNothingLeft(t, tag) })
	// Another daemon's slot, in its own range: never ours to remove.
	other, err := New(Config{CIDR: otherCIDR, Tag: otherTag})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { other.Reconcile(ctx, nil); assertNothingLeft(t, otherTag) })
	if _, err := other.Create(ctx, PolicyIsolated, nil); err != nil {
		t.Fatal(err)
	}
	keep, err := m.Create(ctx, PolicyEgress, []Allow{{Prefix: netip.MustParsePrefix(outsideCIDR), Port: 443}})
	if err != nil {
		t.Fatal(err)
	}
	gone, err := m.Create(ctx, PolicyIsolated, nil)
	if err != nil {
		t.Fatal(err)
	}

	// A restarted daemon: a new manager on the same tag.
	m2, err := New(Config{CIDR: testCIDR, Tag: tag})
	if err != nil {
		t.Fatalf("the range of a daemon's own slots must not count as overlapping: %v", err)
	}
	// The caller keeps the record as JSON in its state database.
	record, err := json.Marshal(keep)
	if err != nil {
		t.Fatal(err)
	}
	var restored Slot
	if err := json.Unmarshal(record, &restored); err != nil {
		t.Fatal(err)
	}
	adopted, err := m2.Reconcile(ctx, []Slot{restored})
	if err != nil {
		t.Fatal(err)
	}
	if len(adopted) != 1 || adopted[0].ID != keep.ID || len(m2.List()) != 1 {
		t.Fatalf("adopted %v, want only %s", adopted, keep.ID)
	}
	if _, err := os.Stat(gone.NetnsPath()); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("unknown slot %s still exists: %v", gone.ID, err)
	}
	if _, err := netlink.LinkByName(gone.HostVeth); err == nil {
		t.Errorf("unknown slot's veth %s still exists", gone.HostVeth)
	}
	ns, err := netns.GetFromName(keep.ID)
	if err != nil {
		t.Fatalf("known slot %s was removed: %v", keep.ID, err)
	}
	c, _ := nftables.New(nftables.WithNetNSFd(int(ns)))
	if err := checkSlotRules(c, keep); err != nil {
		t.Errorf("adopted slot: %v", err)
	}
	ns.Close()
	// Its address is taken: a new slot gets another one.
	fresh, err := m2.Create(ctx, PolicyIsolated, nil)
	if err != nil {
		t.Fatal(err)
	}
	if fresh.Address == keep.Address {
		t.Errorf("a new slot got the adopted slot's address %s", keep.Address)
	}
	if _, err := m2.Reconcile(ctx, nil); err != nil {
		t.Fatal(err)
	}
	assertNothingLeft(t, tag)
	if len(leftovers(t, otherTag)) == 0 {
		t.Errorf("Reconcile of tag %s removed the slot of tag %s", tag, otherTag)
	}
}

func TestBadInputCreatesNothing(t *testing.T) {
	needRoot(t)
	tag := randomTag(t)
	var hostPrefix string
	addrs, _ := netlink.AddrList(nil, netlink.FAMILY_V4)
	for _, a := range addrs {
		if p, ok := prefixOf(a.IPNet); ok && !p.Addr().IsLoopback() {
			hostPrefix = p.String()
		}
	}
	cases := []struct {
		cfg  Config
		want string
	}{
		{Config{CIDR: "", Tag: tag}, "not set"},
		{Config{CIDR: "172.20.213.0/31", Tag: tag}, "too small"},
		{Config{CIDR: "172.20.213.0/29", Tag: tag, MaxSlots: 3}, "too small for 3 slots: it holds 2"},
		{Config{CIDR: "172.20.213.1/24", Tag: tag}, "host bits"},
		{Config{CIDR: "fd00::/64", Tag: tag}, "IPv4"},
		{Config{CIDR: "nonsense", Tag: tag}, "network.cidr"},
		{Config{CIDR: "169.254.0.0/16", Tag: tag}, "guests' own subnet"},
		{Config{CIDR: "127.0.0.0/16", Tag: tag}, "overlaps the host's"},
		{Config{CIDR: testCIDR, Tag: "xyz"}, "tag"},
		{Config{CIDR: "172.20.213.0/30", Tag: tag, Warm: 2}, "warm slots"},
	}
	if hostPrefix != "" {
		cases = append(cases, struct {
			cfg  Config
			want string
		}{Config{CIDR: hostPrefix, Tag: tag}, "overlaps the host's"})
	}
	for _, c := range cases {
		_, err := New(c.cfg)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("New(%+v) = %v, want an error with %q", c.cfg, err, c.want)
		}
	}
	if _, err := ParsePolicy("open"); err == nil || !strings.Contains(err.Error(), "want none, isolated or egress") {
		t.Errorf("ParsePolicy(open) = %v", err)
	}
	for _, e := range []string{"10.0.0.0/8:0", "10.0.0.0/8:70000", "10.0.0.0/33", "example.com", "::1"} {
		if _, err := ParseAllow([]string{e}); err == nil || !strings.Contains(err.Error(), e) {
			t.Errorf("ParseAllow(%q) = %v, want an error naming it", e, err)
		}
	}
	if got, err := ParseAllow([]string{"10.1.2.3", "10.0.0.0/8:443"}); err != nil || got[0].String() != "10.1.2.3/32" || got[1].String() != "10.0.0.0/8:443" {
		t.Errorf("ParseAllow = %v, %v", got, err)
	}

	m, err := New(Config{CIDR: "172.20.213.0/30", Tag: tag})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	t.Cleanup(func() { m.Reconcile(ctx, nil); assertNothingLeft(t, tag) })
	if _, err := m.Create(ctx, "open", nil); err == nil {
		t.Error("Create with an unknown policy succeeded")
	}
	if _, err := m.Create(ctx, PolicyIsolated, []Allow{{Prefix: netip.MustParsePrefix(outsideCIDR)}}); err == nil {
		t.Error("Create isolated with egress_allow succeeded")
	}
	if _, err := m.Create(ctx, PolicyNone, nil); err == nil {
		t.Error("Create with policy none succeeded")
	}
	assertNothingLeft(t, tag)
	if _, err := m.Create(ctx, PolicyIsolated, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Create(ctx, PolicyIsolated, nil); err == nil || !strings.Contains(err.Error(), "no free network slot") {
		t.Errorf("a second slot in a /30: %v, want no free network slot", err)
	}
	if n := len(leftovers(t, tag)); n == 0 {
		t.Error("the first slot is missing")
	}
	if len(m.List()) != 1 {
		t.Errorf("%d slots, want 1", len(m.List()))
	}
}

func BenchmarkSlotCreate(b *testing.B) {
	needRoot(b)
	tag := randomTag(b)
	m, err := New(Config{CIDR: testCIDR, Tag: tag})
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	b.Cleanup(func() { m.Reconcile(ctx, nil); assertNothingLeft(b, tag) })
	for b.Loop() {
		s, err := m.Create(ctx, PolicyIsolated, nil)
		if err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		if err := m.Destroy(ctx, s.ID); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
}

// BenchmarkSlotReuse times the two halves of reusing a warm slot apart:
// Acquire (on a lease's path) and Release (scrub and verify, after it).
func BenchmarkSlotReuse(b *testing.B) {
	needRoot(b)
	restoreForwarding(b)
	tag := randomTag(b)
	m, err := New(Config{CIDR: testCIDR, Tag: tag, Warm: 1})
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	b.Cleanup(func() { m.Reconcile(ctx, nil); assertNothingLeft(b, tag) })
	if err := m.Fill(ctx); err != nil {
		b.Fatal(err)
	}
	allow := []Allow{{Prefix: netip.MustParsePrefix(outsideCIDR), Port: 443}}
	for _, c := range []struct {
		name    string
		policy  Policy
		allow   []Allow
		release bool // time Release instead of Acquire
	}{
		{"acquire-isolated", PolicyIsolated, nil, false},
		{"acquire-egress", PolicyEgress, allow, false},
		{"release-isolated", PolicyIsolated, nil, true},
		{"release-egress", PolicyEgress, allow, true},
	} {
		b.Run(c.name, func(b *testing.B) {
			for b.Loop() {
				if c.release {
					b.StopTimer()
				}
				s, err := m.Acquire(ctx, c.policy, c.allow)
				if err != nil {
					b.Fatal(err)
				}
				if c.release {
					b.StartTimer()
				} else {
					b.StopTimer()
				}
				if err := m.Release(ctx, s.ID); err != nil {
					b.Fatal(err)
				}
				if !c.release {
					b.StartTimer()
				}
			}
			if got := m.List(); len(got) != 1 {
				b.Fatalf("%d slots after reuse, want the 1 recycled", len(got))
			}
		})
	}
}

func TestOnlyOurOwnNamesAreOurs(t *testing.T) {
	tag := "a1b2c3"
	for _, c := range []struct {
		name  string
		veth  bool
		index int
		ours  bool
	}{
		{"wp-a1b2c3-7", false, 7, true},
		{"wp-a1b2c3-07", false, 0, false},
		{"wp-a1b2c3-g1", false, 0, false},
		{"wp-a1b2c3-out", false, 0, false},
		{"wp-d4e5f6-7", false, 0, false},
		{"wpa1b2c37", true, 7, true},
		{"wpd4e5f67", true, 0, false},
		{"wpoa1b2c3", true, 0, false},
		{"eth0", true, 0, false},
	} {
		parse := parseSlotName
		if c.veth {
			parse = parseVethName
		}
		i, ok := parse(tag, c.name)
		if ok != c.ours || (ok && i != c.index) {
			t.Errorf("%s: (%d, %v), want (%d, %v)", c.name, i, ok, c.index, c.ours)
		}
	}
	if a, b := TagFor("/var/lib/warmpool"), TagFor("/srv/warmpool"); a == b || validTag(a) != nil {
		t.Errorf("tags %q and %q of two state directories", a, b)
	}
}

func tapHeld(t *testing.T, s Slot) bool {
	t.Helper()
	ns, err := netns.GetFromName(s.ID)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	held, err := tapAttached(ns, TAPName)
	if err != nil {
		t.Fatal(err)
	}
	return held
}

// A VMM handed the slot's TAP holds it; a slot released while it does is
// destroyed, not handed to the next VM, whose VMM could not attach.
func TestReleaseWhileTheTAPIsHeldDestroysTheSlot(t *testing.T) {
	needRoot(t)
	tag := randomTag(t)
	m, err := New(Config{CIDR: testCIDR, Tag: tag, Warm: 1})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	t.Cleanup(func() { m.Reconcile(ctx, nil); assertNothingLeft(t, tag) })
	s, err := m.Acquire(ctx, PolicyIsolated, nil)
	if err != nil {
		t.Fatal(err)
	}
	var holder func() // lets go of the TAP
	if qemu, err := exec.LookPath("qemu-system-x86_64"); err == nil {
		f, err := OpenTAP(s)
		if err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command(qemu, "-M", "none", "-nodefaults", "-display", "none", "-S",
			"-netdev", "tap,id=n0,fd=3,vhost=off")
		cmd.ExtraFiles = []*os.File{f}
		var out strings.Builder
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		f.Close()
		exited := make(chan error, 1)
		go func() { exited <- cmd.Wait() }()
		var once sync.Once
		holder = func() { once.Do(func() { cmd.Process.Kill(); <-exited }) }
		t.Cleanup(holder)
		// QEMU holds the descriptor it was handed from the start; make sure
		// it accepted it before judging the slot.
		select {
		case err := <-exited:
			t.Fatalf("QEMU refused the TAP: %v: %s", err, out.String())
		case <-time.After(2 * time.Second):
		}
	} else {
		f, err := OpenTAP(s)
		if err != nil {
			t.Fatal(err)
		}
		holder = func() { f.Close() }
	}
	if !tapHeld(t, s) {
		t.Fatal("TAP is not up while a VMM holds it")
	}
	if err := m.Release(ctx, s.ID); err != nil {
		t.Fatal(err)
	}
	if len(m.List()) != 0 {
		t.Errorf("a slot released while its TAP is held was kept: %v", m.List())
	}
	holder()
	// With nothing holding it, the next slot's TAP is down and recycled.
	s2, err := m.Acquire(ctx, PolicyIsolated, nil)
	if err != nil {
		t.Fatal(err)
	}
	f, err := OpenTAP(s2)
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
	if tapHeld(t, s2) {
		t.Error("TAP still up after its holder closed it")
	}
	if err := m.Release(ctx, s2.ID); err != nil {
		t.Fatal(err)
	}
	if got := m.List(); len(got) != 1 || got[0].ID != s2.ID {
		t.Errorf("after a clean release: %v, want %s kept", got, s2.ID)
	}
}

// Slots made and destroyed at once by several callers get distinct
// addresses and always have the host table. (The window in which a
// destroy of the last slot could remove the table under a slot being made
// is too narrow for this test to hit; hostMu closes it.)
func TestConcurrentSlots(t *testing.T) {
	needRoot(t)
	tag := randomTag(t)
	m, err := New(Config{CIDR: testCIDR, Tag: tag})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	t.Cleanup(func() { m.Reconcile(ctx, nil); assertNothingLeft(t, tag) })
	const workers, rounds = 4, 5
	var mu sync.Mutex
	inUse := map[netip.Addr]bool{}
	errs := make(chan error, workers)
	for range workers {
		go func() {
			for range rounds {
				s, err := m.Create(ctx, PolicyIsolated, nil)
				if err != nil {
					errs <- err
					return
				}
				mu.Lock()
				clash := inUse[s.Address]
				inUse[s.Address] = true
				mu.Unlock()
				if clash {
					errs <- fmt.Errorf("address %s handed out twice at once", s.Address)
					return
				}
				c, err := nftables.New()
				if err == nil {
					_, err = c.ListTableOfFamily(hostTableName(tag), nftables.TableFamilyIPv4)
				}
				if err != nil {
					errs <- fmt.Errorf("slot %s exists without the host table: %w", s.ID, err)
					return
				}
				mu.Lock()
				delete(inUse, s.Address)
				mu.Unlock()
				if err := m.Destroy(ctx, s.ID); err != nil {
					errs <- err
					return
				}
			}
			errs <- nil
		}()
	}
	for range workers {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
	assertNothingLeft(t, tag)
}
