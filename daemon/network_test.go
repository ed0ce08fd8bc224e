package daemon

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/warmpool/warmpool/api"
	"github.com/warmpool/warmpool/network"
	"github.com/warmpool/warmpool/provider/fake"
	"github.com/warmpool/warmpool/vm"
)

func TestParseConfigRejectsBadNetworks(t *testing.T) {
	for _, tc := range []struct{ yaml, want string }{
		{"network: {cidr: 10.9.0.0/31}\n", "too small"},
		{"network: {cidr: 10.9.0.1/24}\n", "host bits"},
		{"network: {cidr: fe80::/64}\n", "IPv4"},
		{"network: {cidr: 169.254.0.0/16}\n", "guests' own subnet"},
		{"network: {cidr: 10.9.0.0/28, slots: 5}\n", "holds 4"},
		{"network: {slots: 5}\n", "need network.cidr"},
		{"network: {cidr: 10.9.0.0/28}\npools:\n  py: {template: base, max: 1, network: open}\n", "none, isolated or egress"},
		{"pools:\n  py: {template: base, max: 1, network: isolated}\n", "network.cidr"},
		{"network: {cidr: 10.9.0.0/28}\npools:\n  py: {template: base, max: 1, egress_allow: [10.0.0.0/8]}\n", "needs network: egress"},
		{"network: {cidr: 10.9.0.0/28}\npools:\n  py: {template: base, max: 1, network: egress, egress_allow: [10.0.0.0/8:0]}\n", "port"},
		{"network: {cidr: 10.9.0.0/28}\nmachines:\n  dev: {network: wide}\n", "none, isolated or egress"},
	} {
		_, err := ParseConfig(strings.NewReader(tc.yaml))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("ParseConfig(%q) = %v, want an error naming %q", tc.yaml, err, tc.want)
		}
	}
}

// networked is the fake provider advertising networking, so the daemon
// binds slots to its VMs (the fake ignores Spec.NIC).
type networked struct{ *fake.Provider }

func (n networked) Capabilities() vm.Capabilities {
	c := vm.Capabilities{vm.CapNetwork: true, vm.CapNetworkUnattached: true}
	for k, v := range n.Provider.Capabilities() {
		c[k] = v
	}
	return c
}

func needNetRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("network slots need root")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("ip is not installed")
	}
}

func slotNamespaces(t *testing.T, dir string) []string {
	t.Helper()
	out, err := exec.Command("ip", "netns", "list").CombinedOutput()
	if err != nil {
		t.Fatalf("ip netns list: %v: %s", err, out)
	}
	var ours []string
	for line := range strings.SplitSeq(string(out), "\n") {
		if strings.HasPrefix(line, "wp-"+network.TagFor(dir)+"-") {
			ours = append(ours, strings.Fields(line)[0])
		}
	}
	return ours
}

// A range that overlaps one of the host's addresses stops the daemon at
// start, before it creates anything.
func TestNetworkOverlappingTheHostRefusedAtStart(t *testing.T) {
	needNetRoot(t)
	dir := t.TempDir()
	cfg := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(cfg, []byte("network: {cidr: 127.0.0.0/28}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	err := Run(context.Background(), Options{StateDir: dir, Provider: "fake", ConfigFile: cfg, Logger: testLogger(t), provider: networked{fake.New(fake.Options{})}})
	if err == nil || !strings.Contains(err.Error(), "overlaps the host's address") {
		t.Fatalf("start with network.cidr over lo = %v, want the overlap named", err)
	}
	if ns := slotNamespaces(t, dir); len(ns) > 0 {
		t.Errorf("a refused start left namespaces %v", ns)
	}
}

// Pool VMs get a slot each and its address; a policy the daemon cannot
// give is refused and changes nothing; release and shutdown leave nothing.
func TestPoolVMsGetSlots(t *testing.T) {
	needNetRoot(t)
	dir := t.TempDir()
	prov := newFakeProvider()
	r := startWrapped(t, dir, prov, networked{prov}, "network: {cidr: 10.251.7.0/28, warm: 1}\n")
	ctx := ctxT(t)
	if _, err := r.client.BuildTemplate(ctx, api.TemplateRequest{Name: "base"}, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := r.client.SetPool(ctx, "iso", api.PoolRequest{Template: "base", Min: 1, Max: 1, Network: "egress", EgressAllow: []string{"10.0.0.0/8:99999"}}); err == nil {
		t.Error("pool with an egress_allow port of 99999 was accepted")
	}
	if ps, _ := r.client.Pools(ctx); len(ps) != 0 {
		t.Errorf("a refused pool set left pools %+v", ps)
	}
	if _, err := r.client.SetPool(ctx, "iso", api.PoolRequest{Template: "base", Min: 1, Max: 1}); err != nil {
		t.Fatal(err)
	}
	waitReady(t, r.client, "iso", 1)
	l, err := r.client.Acquire(ctx, "iso", 10*time.Second, api.AcquireRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if l.Address == nil || !strings.HasPrefix(*l.Address, "10.251.7.") {
		t.Fatalf("lease address %v, want one of 10.251.7.0/28", l.Address)
	}
	if err := r.client.Release(ctx, l.ID); err != nil {
		t.Fatal(err)
	}
	if err := r.client.DeletePool(ctx, "iso"); err != nil {
		t.Fatal(err)
	}
	r.stop(t)
	if ns := slotNamespaces(t, dir); len(ns) > 0 {
		t.Errorf("after release and shutdown, namespaces %v are left", ns)
	}
}

// With network.cidr set but without root, the daemon starts, says that
// networking needs root (in its status and in every refusal), runs pools
// and machines whose policy is none, refuses the others, and makes no
// namespace.
func TestNetworkOffWithoutRoot(t *testing.T) {
	dir := t.TempDir()
	prov := newFakeProvider()
	r := startWrappedWith(t, dir, prov, networked{prov}, "network: {cidr: 10.251.9.0/28, warm: 1}\n", func(o *Options) { o.notRoot = true })
	ctx := ctxT(t)
	st, err := r.client.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(st.Network, "off: ") || !strings.Contains(st.Network, "need root") {
		t.Errorf("status network %q, want off because it needs root", st.Network)
	}
	if _, err := r.client.BuildTemplate(ctx, api.TemplateRequest{Name: "base"}, nil); err != nil {
		t.Fatal(err)
	}
	for _, net := range []string{"", "isolated", "egress"} {
		if _, err := r.client.SetPool(ctx, "p"+net, api.PoolRequest{Template: "base", Min: 1, Max: 1, Network: net}); err == nil || !strings.Contains(err.Error(), "need root") {
			t.Errorf("pool with network %q = %v, want a refusal saying networking needs root", net, err)
		}
	}
	if _, err := r.client.PutMachine(ctx, "dev", api.MachineRequest{VCPUs: 1, MemoryMiB: 256, Network: "isolated"}); err == nil || !strings.Contains(err.Error(), "need root") {
		t.Errorf("machine with network isolated = %v, want a refusal saying networking needs root", err)
	}
	if _, err := r.client.SetPool(ctx, "off", api.PoolRequest{Template: "base", Min: 1, Max: 1, Network: "none"}); err != nil {
		t.Fatal(err)
	}
	waitReady(t, r.client, "off", 1)
	l, err := r.client.Acquire(ctx, "off", 10*time.Second, api.AcquireRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if l.Address != nil {
		t.Errorf("a lease of a none pool has address %s", *l.Address)
	}
	if os.Geteuid() == 0 {
		if ns := slotNamespaces(t, dir); len(ns) > 0 {
			t.Errorf("a daemon without networking made namespaces %v", ns)
		}
	}
}
