package e2etest

import (
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
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/warmpool/warmpool/network"
)

// netLease is the part of a lease the network tests read.
type netLease struct {
	ID      string  `json:"id"`
	VMID    string  `json:"vm_id"`
	Address *string `json:"address"`
}

func acquireNet(t *testing.T, state, pool string) netLease {
	t.Helper()
	var l netLease
	if err := json.Unmarshal([]byte(mustCLI(t, state, 2*time.Minute, "acquire", pool, "--wait", "60s", "-o", "json")), &l); err != nil || l.ID == "" {
		t.Fatalf("acquire output: %v", err)
	}
	return l
}

func leaseAddresses(t *testing.T, state string) map[string]string {
	t.Helper()
	var ls []netLease
	if err := json.Unmarshal([]byte(mustCLI(t, state, time.Minute, "lease", "ls", "-o", "json")), &ls); err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, l := range ls {
		if l.Address != nil {
			out[l.ID] = *l.Address
		}
	}
	return out
}

// guestGet has the guest of lease send an HTTP request to addr (host:port)
// with nc, which gives up after two seconds; it returns the status line,
// empty when nothing answered.
func guestGet(t *testing.T, state, lease, addr string) string {
	t.Helper()
	host, port, _ := net.SplitHostPort(addr)
	out, _ := cli(t, state, time.Minute, "exec", lease, "--", "sh", "-c",
		fmt.Sprintf(`printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 2 %s %s | head -1`, host, port))
	return strings.TrimSpace(out)
}

func hostGet(addr string) (string, error) {
	c := http.Client{Timeout: 10 * time.Second}
	resp, err := c.Get("http://" + addr + "/")
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return strings.TrimSpace(string(b)), err
}

func randomHex(t *testing.T, n int) string {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// outside is a network namespace standing for the internet: the host routes
// to its subnet over a veth, and HTTP servers listen on its address.
type outside struct {
	ns, addr string
}

func newOutside(t *testing.T, ports ...int) outside {
	t.Helper()
	id := randomHex(t, 2)
	var sub [1]byte
	rand.Read(sub[:])
	// 198.18.0.0/15 is for benchmarks between networks: never routed
	// anywhere, so nothing here can leave this machine.
	o := outside{ns: "wpe2e-out-" + id, addr: fmt.Sprintf("198.18.%d.1", sub[0])}
	hostEnd, hostAddr := "wpe2eo"+id, fmt.Sprintf("198.18.%d.254/24", sub[0])
	run := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	run("netns", "add", o.ns)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", o.ns).Run() })
	run("link", "add", hostEnd, "type", "veth", "peer", "name", "eth0", "netns", o.ns)
	t.Cleanup(func() { exec.Command("ip", "link", "del", hostEnd).Run() })
	run("addr", "add", hostAddr, "dev", hostEnd)
	run("link", "set", hostEnd, "up")
	run("-n", o.ns, "addr", "add", o.addr+"/24", "dev", "eth0")
	run("-n", o.ns, "link", "set", "eth0", "up")
	run("-n", o.ns, "link", "set", "lo", "up")
	run("-n", o.ns, "route", "add", "default", "via", strings.TrimSuffix(hostAddr, "/24"))
	for _, p := range ports {
		dir := t.TempDir()
		if err := os.WriteFile(filepath.Join(dir, "index.html"), []byte(fmt.Sprintf("outside-%d\n", p)), 0o644); err != nil {
			t.Fatal(err)
		}
		srv := exec.Command("ip", "netns", "exec", o.ns, "python3", "-m", "http.server", fmt.Sprint(p), "--bind", o.addr, "--directory", dir)
		if err := srv.Start(); err != nil {
			t.Fatalf("outside server: %v", err)
		}
		t.Cleanup(func() { srv.Process.Kill(); srv.Wait() })
		waitFor(t, "the outside server on port "+fmt.Sprint(p), func() bool {
			got, err := hostGet(net.JoinHostPort(o.addr, fmt.Sprint(p)))
			return err == nil && got == fmt.Sprintf("outside-%d", p)
		})
	}
	return o
}

func waitFor(t *testing.T, what string, ok func() bool) {
	t.Helper()
	for range 100 {
		if ok() {
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatalf("timed out waiting for %s", what)
}

// hostServer serves HTTP on every address of the host, as a host service a
// guest must not reach; it returns the host's IPv4 addresses with its port.
func hostServer(t *testing.T) []string {
	t.Helper()
	l, err := net.Listen("tcp4", ":0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "host-secret\n") })}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	port := l.Addr().(*net.TCPAddr).Port
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, a := range addrs {
		if ipn, ok := a.(*net.IPNet); ok && ipn.IP.To4() != nil {
			out = append(out, net.JoinHostPort(ipn.IP.String(), fmt.Sprint(port)))
		}
	}
	return out
}

// ours lists what of the daemon with state's tag the host shows: namespaces,
// links and nftables tables.
func ours(t *testing.T, state string) []string {
	t.Helper()
	tag := network.TagFor(state)
	var left []string
	for _, c := range [][]string{{"ip", "netns", "list"}, {"ip", "-o", "link"}, {"nft", "list", "ruleset"}} {
		out, err := exec.Command(c[0], c[1:]...).CombinedOutput()
		if err != nil {
			t.Fatalf("%s: %v: %s", strings.Join(c, " "), err, out)
		}
		for line := range strings.SplitSeq(string(out), "\n") {
			if strings.Contains(line, "wp-"+tag) || strings.Contains(line, "wp"+tag) {
				left = append(left, strings.Join(c, " ")+": "+strings.TrimSpace(line))
			}
		}
	}
	return left
}

// nothingLeft fails the test if anything of state's network is left, and
// removes it, so a failed test does not leave the host with it.
func nothingLeft(t *testing.T, state string) {
	t.Helper()
	left := ours(t, state)
	if len(left) == 0 {
		return
	}
	t.Errorf("left behind:\n%s", strings.Join(left, "\n"))
	tag := network.TagFor(state)
	names, _ := os.ReadDir("/run/netns")
	for _, n := range names {
		if strings.HasPrefix(n.Name(), "wp-"+tag+"-") {
			exec.Command("ip", "netns", "del", n.Name()).Run()
		}
	}
	if links, err := net.Interfaces(); err == nil {
		for _, l := range links {
			if strings.HasPrefix(l.Name, "wp"+tag) {
				exec.Command("ip", "link", "del", l.Name).Run()
			}
		}
	}
	exec.Command("nft", "delete", "table", "ip", "wp-"+tag).Run()
}

// testCIDR is a range of its own for one test run: a /27 (eight slots) at
// a random place in 10.0.0.0/8, unlikely to meet another run's.
func testCIDR(t *testing.T) string {
	t.Helper()
	var b [2]byte
	rand.Read(b[:])
	return fmt.Sprintf("10.%d.%d.%d/27", 200+int(b[0])%50, b[1], 32*(int(b[0])%8))
}

func needNetworkRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("SKIPPING the network tests: they need root (namespaces, TAP devices, nftables)")
	}
	for _, tool := range []string{"ip", "nft", "python3"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("SKIPPING the network tests: %s is not installed", tool)
		}
	}
}

func writeNetConfig(t *testing.T, state, cidr string) string {
	t.Helper()
	cfg := filepath.Join(state, "config.yaml")
	if err := os.WriteFile(cfg, []byte("network:\n  cidr: "+cidr+"\n  warm: 1\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return cfg
}

// Two clones of one template each serve HTTP at an address of their own;
// neither reaches the other or the host; an egress clone reaches the
// outside only as its allow-list says (one without an allow-list reaches
// it but still not the host); a clone with network none has no
// interface; after kill -9 of the daemon the leases keep their addresses
// and connectivity; after release and shutdown nothing of ours is left.
func TestQEMUNetwork(t *testing.T) {
	needNetworkRoot(t)
	state := qemuState(t, "real-VM network test", "wp-e2e-net-")
	t.Cleanup(func() { nothingLeft(t, state) })
	out := newOutside(t, 8080, 8081)
	hostAddrs := hostServer(t)
	cfg := writeNetConfig(t, state, testCIDR(t))

	useTemplate(t, state, "base", busybox256)
	d := startDaemon(t, state, "--config", cfg)
	mustCLI(t, state, time.Minute, "pool", "set", "iso", "--template", "base", "--min", "2", "--max", "2")
	mustCLI(t, state, time.Minute, "pool", "set", "eg", "--template", "base", "--min", "1", "--max", "1",
		"--network", "egress", "--egress-allow", out.addr+":8080")
	mustCLI(t, state, time.Minute, "pool", "set", "off", "--template", "base", "--min", "1", "--max", "1", "--network", "none")
	// Egress with no allow-list: only the host's own rules keep it off
	// the host.
	mustCLI(t, state, time.Minute, "pool", "set", "open", "--template", "base", "--min", "1", "--max", "1", "--network", "egress")
	waitPool(t, state, "iso", 2)
	waitPool(t, state, "eg", 1)
	waitPool(t, state, "off", 1)
	waitPool(t, state, "open", 1)
	a, b := acquireNet(t, state, "iso"), acquireNet(t, state, "iso")
	c, off := acquireNet(t, state, "eg"), acquireNet(t, state, "off")
	open := acquireNet(t, state, "open")
	// No refills: the test needs no more VMs.
	mustCLI(t, state, time.Minute, "pool", "set", "iso", "--template", "base", "--min", "0", "--max", "1")
	mustCLI(t, state, time.Minute, "pool", "set", "eg", "--template", "base", "--min", "0", "--max", "1",
		"--network", "egress", "--egress-allow", out.addr+":8080")
	mustCLI(t, state, time.Minute, "pool", "set", "off", "--template", "base", "--min", "0", "--max", "1", "--network", "none")
	mustCLI(t, state, time.Minute, "pool", "set", "open", "--template", "base", "--min", "0", "--max", "1", "--network", "egress")
	if a.Address == nil || b.Address == nil || c.Address == nil || open.Address == nil || *a.Address == *b.Address {
		t.Fatalf("leases' addresses: %v %v %v %v, want two different ones and two for egress", a.Address, b.Address, c.Address, open.Address)
	}
	if off.Address != nil {
		t.Errorf("a lease of a network: none pool has address %s", *off.Address)
	}
	for _, l := range []netLease{a, b, c} {
		mustCLI(t, state, time.Minute, "exec", l.ID, "--", "sh", "-c",
			"mkdir -p /www && echo hello-"+l.ID+" > /www/index.html && busybox httpd -p 80 -h /www")
	}
	served := func(when string) {
		t.Helper()
		for _, l := range []netLease{a, b, c} {
			got, err := hostGet(*l.Address + ":80")
			if err != nil || got != "hello-"+l.ID {
				t.Errorf("%s: GET http://%s/ of lease %s: %q, %v; want hello-%s", when, *l.Address, l.ID, got, err, l.ID)
			}
		}
	}
	served("after acquire")

	for _, from := range []netLease{a, c, open} {
		peer := b
		if got := guestGet(t, state, from.ID, *peer.Address+":80"); got != "" {
			t.Errorf("lease %s reached lease %s at %s: %q", from.ID, peer.ID, *peer.Address, got)
		}
		port := strings.Split(hostAddrs[0], ":")[1]
		// Besides the host's addresses from before the slots: the host end
		// of the lease's own veth, the address before the slot's.
		hostEnd := netip.MustParseAddr(*from.Address).Prev().String()
		for _, h := range append(hostAddrs, net.JoinHostPort(network.GatewayIP.String(), port), net.JoinHostPort(hostEnd, port)) {
			if got := guestGet(t, state, from.ID, h); got != "" {
				t.Errorf("lease %s reached the host's server at %s: %q", from.ID, h, got)
			}
		}
	}
	if got := guestGet(t, state, a.ID, out.addr+":8080"); got != "" {
		t.Errorf("isolated lease %s reached the outside: %q", a.ID, got)
	}
	egress := func(when string) {
		t.Helper()
		if got := guestGet(t, state, c.ID, out.addr+":8080"); !strings.HasPrefix(got, "HTTP/1.0 200") {
			t.Errorf("%s: egress lease did not reach the allowed %s:8080: %q", when, out.addr, got)
		}
		if got := guestGet(t, state, c.ID, out.addr+":8081"); got != "" {
			t.Errorf("%s: egress lease reached %s:8081, which its allow-list leaves out: %q", when, out.addr, got)
		}
		if got := guestGet(t, state, open.ID, out.addr+":8081"); !strings.HasPrefix(got, "HTTP/1.0 200") {
			t.Errorf("%s: egress lease without an allow-list did not reach %s:8081: %q", when, out.addr, got)
		}
	}
	egress("after acquire")
	if links := mustCLI(t, state, time.Minute, "exec", off.ID, "--", "ls", "/sys/class/net"); strings.TrimSpace(links) != "lo" {
		t.Errorf("a network: none guest has interfaces %q, want lo only", links)
	}

	before := leaseAddresses(t, state)
	d.kill()
	start := time.Now()
	d = startDaemon(t, state, "--config", cfg)
	t.Logf("restart after kill -9 answered after %s", time.Since(start).Round(time.Millisecond))
	if after := leaseAddresses(t, state); fmt.Sprint(after) != fmt.Sprint(before) {
		t.Errorf("lease addresses after kill -9 and restart: %v, before: %v", after, before)
	}
	served("after kill -9 and restart")
	egress("after kill -9 and restart")
	if got := guestGet(t, state, a.ID, *b.Address+":80"); got != "" {
		t.Errorf("after restart lease %s reached lease %s: %q", a.ID, b.ID, got)
	}

	for _, l := range []netLease{a, b, c, off, open} {
		mustCLI(t, state, time.Minute, "release", l.ID)
	}
	d.term(t)
	if left := ours(t, state); len(left) > 0 {
		t.Errorf("after release and shutdown, left behind:\n%s", strings.Join(left, "\n"))
	}
}

type netMachine struct {
	Name    string  `json:"name"`
	State   string  `json:"state"`
	VMID    string  `json:"vm_id"`
	Address *string `json:"address"`
}

func ensureNet(t *testing.T, state string, args ...string) netMachine {
	t.Helper()
	var m netMachine
	if err := json.Unmarshal([]byte(mustCLI(t, state, 5*time.Minute, append([]string{"machine", "ensure"}, append(args, "-o", "json")...)...)), &m); err != nil {
		t.Fatal(err)
	}
	return m
}

// answers reports whether the guest at addr answers TCP: a connection to a
// port nothing listens on is reset by the guest's kernel, so no service in
// the guest is needed (and no ping on the host).
func answers(addr string) bool {
	for range 10 {
		c, err := net.DialTimeout("tcp", net.JoinHostPort(addr, "1"), time.Second)
		if err == nil {
			c.Close()
			return true
		}
		if errors.Is(err, syscall.ECONNREFUSED) {
			return true
		}
	}
	return false
}

// A machine keeps its address, and is reached at it, across machine stop +
// ensure and across suspend + resume.
func TestQEMUNetworkMachineKeepsItsAddress(t *testing.T) {
	needNetworkRoot(t)
	state := qemuState(t, "real-VM machine network test", "wp-e2e-netm-")
	t.Cleanup(func() { nothingLeft(t, state) })
	d := startDaemon(t, state, "--config", writeNetConfig(t, state, testCIDR(t)), "--stop-all")
	m := ensureNet(t, state, "box", "--network", "isolated", "--mem", "256")
	if m.Address == nil {
		t.Fatalf("machine box has no address: %+v", m)
	}
	addr := *m.Address
	check := func(when string, m netMachine) {
		t.Helper()
		if m.Address == nil || *m.Address != addr {
			t.Errorf("%s: machine address %v, want %s", when, m.Address, addr)
		}
		if !answers(addr) {
			t.Errorf("%s: machine does not answer at %s", when, addr)
		}
	}
	check("first ensure", m)

	mustCLI(t, state, 2*time.Minute, "machine", "stop", "box")
	m = ensureNet(t, state, "box")
	check("stop + ensure", m)

	firstVM := m.VMID
	ensureNet(t, state, "box", "--suspend-after", "1s")
	waitFor(t, "machine box to suspend", func() bool { return machineState(t, state, "box").State == "suspended" })
	// The resuming ensure turns the suspend off, or box would suspend again
	// before the ping.
	m = ensureNet(t, state, "box", "--suspend-after", "0s")
	if m.VMID == firstVM {
		t.Errorf("machine box kept VM %s across suspend and resume: was it suspended?", firstVM)
	}
	check("suspend + resume", m)
	d.term(t)
}
