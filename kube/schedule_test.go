package kube

import (
	"slices"
	"strings"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/warmpool/warmpool/api"
	"github.com/warmpool/warmpool/kube/v1alpha1"
	"github.com/warmpool/warmpool/vm"
)

func TestChooseNode(t *testing.T) {
	for _, tc := range []struct {
		name  string
		cands []candidate
		want  string
	}{
		{"most ready first", []candidate{{Node: "a", Ready: 1}, {Node: "b", Ready: 3}, {Node: "c", Ready: 2}}, "b"},
		{"in-flight claims count against ready", []candidate{{Node: "a", Ready: 3, Inflight: 2}, {Node: "b", Ready: 2}}, "b"},
		{"ties go to the node serving fewest", []candidate{{Node: "a", Ready: 2, Serving: 5}, {Node: "b", Ready: 2, Serving: 1}}, "b"},
		{"then by name", []candidate{{Node: "b", Ready: 2}, {Node: "a", Ready: 2}}, "a"},
		{"none with a VM left", []candidate{{Node: "a", Ready: 1, Inflight: 1}, {Node: "b"}}, ""},
	} {
		got, ok := chooseNode(tc.cands)
		if got != tc.want || ok != (tc.want != "") {
			t.Errorf("%s: chose %q %v, want %q", tc.name, got, ok, tc.want)
		}
	}
}

func TestSplitReplicas(t *testing.T) {
	got := splitReplicas(7, []string{"c", "a", "b"})
	if got["a"] != 3 || got["b"] != 2 || got["c"] != 2 {
		t.Errorf("7 over a, b, c: %v", got)
	}
	if len(splitReplicas(5, nil)) != 0 {
		t.Error("shares for no nodes")
	}
	r := int32(10)
	spec := v1alpha1.WarmPoolSpec{Min: 2, Max: 3, Replicas: &r}
	for assigned, want := range map[int32]int32{0: 2, 1: 2, 3: 3, 5: 3} {
		if got := nodeTarget(spec, assigned); got != want {
			t.Errorf("share %d with min 2 max 3: target %d, want %d", assigned, got, want)
		}
	}
	if got := nodeTarget(v1alpha1.WarmPoolSpec{Min: 2, Max: 5}, 4); got != 2 {
		t.Errorf("without replicas the target is min: %d", got)
	}
	if req := localPoolRequest(v1alpha1.WarmPoolSpec{}, "t", 0); req.Max != 1 || req.Min != 0 {
		t.Errorf("empty spec: %+v (the daemon needs max >= 1)", req)
	}
}

func TestCheckSpec(t *testing.T) {
	for _, tc := range []struct {
		spec   v1alpha1.WarmPoolSpec
		reason string
		says   string
	}{
		{v1alpha1.WarmPoolSpec{Min: 2}, "", ""},
		{v1alpha1.WarmPoolSpec{Image: "busybox", Min: 2, Max: 2}, "", ""},
		{v1alpha1.WarmPoolSpec{Image: "alpine:3"}, ReasonUnknownImageSource, "unknown kind"},
		{v1alpha1.WarmPoolSpec{Image: "dir:rel/path"}, ReasonUnknownImageSource, "absolute"},
		{v1alpha1.WarmPoolSpec{Image: "debian:bookworm", Packages: []string{"python3"}}, "", ""},
		{v1alpha1.WarmPoolSpec{Image: "oci-archive:/srv/app.tar", Template: v1alpha1.TemplateShape{DiskMiB: 64}}, "", ""},
		{v1alpha1.WarmPoolSpec{Image: "dir:/srv/tree", Packages: []string{"curl"}}, ReasonInvalidSpec, "spec.packages needs a debian:SUITE image"},
		{v1alpha1.WarmPoolSpec{Image: "debian:bookworm", Packages: []string{"a b"}}, ReasonInvalidSpec, "spec.packages"},
		{v1alpha1.WarmPoolSpec{Min: 3, Max: 2}, ReasonInvalidSpec, "spec.min (3) exceeds spec.max (2)"},
		{v1alpha1.WarmPoolSpec{Template: v1alpha1.TemplateShape{MemoryMiB: 1}}, ReasonInvalidSpec, "memoryMiB"},
		{v1alpha1.WarmPoolSpec{Template: v1alpha1.TemplateShape{DiskMiB: 64}}, ReasonInvalidSpec, "busybox has none"},
		{v1alpha1.WarmPoolSpec{Image: "tar:/a.tar", Template: v1alpha1.TemplateShape{DiskMiB: 8}}, ReasonInvalidSpec, "diskMiB"},
		{v1alpha1.WarmPoolSpec{Network: "egress", EgressAllow: []string{"10.0.0.0/8:443"}}, "", ""},
		{v1alpha1.WarmPoolSpec{Network: "isolated", EgressAllow: []string{"10.0.0.0/8"}}, ReasonInvalidSpec, "spec.egressAllow \"10.0.0.0/8\": needs network: egress"},
		{v1alpha1.WarmPoolSpec{Network: "egress", EgressAllow: []string{"nowhere"}}, ReasonInvalidSpec, "spec.egressAllow"},
		{v1alpha1.WarmPoolSpec{Adaptive: true, Min: 1, Max: 4}, "", ""},
		{v1alpha1.WarmPoolSpec{Adaptive: true}, ReasonInvalidSpec, "spec.adaptive needs spec.max"},
		{v1alpha1.WarmPoolSpec{Adaptive: true, Max: 4, Replicas: new(int32)}, ReasonInvalidSpec, "exclude each other"},
		{v1alpha1.WarmPoolSpec{MaxAge: &metav1.Duration{Duration: -1}}, ReasonInvalidSpec, "maxAge"},
	} {
		p := checkSpec(tc.spec)
		switch {
		case tc.reason == "" && p != nil:
			t.Errorf("%+v: refused: %v", tc.spec, p)
		case tc.reason != "" && (p == nil || p.Reason != tc.reason || !strings.Contains(p.Message, tc.says)):
			t.Errorf("%+v: got %+v, want %s saying %q", tc.spec, p, tc.reason, tc.says)
		}
	}
}

func TestNames(t *testing.T) {
	if got := localName("default", "busybox"); got != "k8s.default.busybox" {
		t.Errorf("localName: %s", got)
	}
	long := localName(strings.Repeat("n", 63), strings.Repeat("p", 63))
	if vm.ValidateName("pool", long) != nil || long == localName(strings.Repeat("n", 63), strings.Repeat("p", 62)+"q") {
		t.Errorf("long names: %q is invalid or not unique", long)
	}
	l := api.Lease{Labels: leaseLabels("ns", "claim", "uid-1")}
	if ns, name, uid, ok := claimOfLease(l); !ok || ns != "ns" || name != "claim" || uid != "uid-1" {
		t.Errorf("claimOfLease: %s %s %s %v", ns, name, uid, ok)
	}
	if _, _, _, ok := claimOfLease(api.Lease{Owner: "someone"}); ok {
		t.Error("a lease without the claim labels is taken for a claim's")
	}
}

// TestSpecToDaemon: the WarmPool fields reach the daemon's image build,
// template and pool as `image build`, `template build` and `pool set`
// would take them.
func TestSpecToDaemon(t *testing.T) {
	spec := v1alpha1.WarmPoolSpec{
		Image: "debian:bookworm", Packages: []string{"python3", "curl", "python3"},
		Template: v1alpha1.TemplateShape{VCPUs: 2, MemoryMiB: 512, DiskMiB: 2048},
		Network:  "egress", EgressAllow: []string{"10.1.0.0/16:443"},
		Adaptive: true, Min: 1, Max: 6,
	}
	img, ok := imageOf(spec)
	if !ok || img.Source != "debian:bookworm" || !slices.Equal(img.Packages, []string{"curl", "python3"}) {
		t.Errorf("image build: %+v %v", img, ok)
	}
	if _, ok := imageOf(v1alpha1.WarmPoolSpec{Image: "busybox"}); ok {
		t.Error("the busybox image is built by the node agent, not the daemon")
	}
	tr := localTemplateRequest(spec, "k8s.ns.p", "/cache/img")
	if tr != (api.TemplateRequest{Name: "k8s.ns.p", Image: "/cache/img", VCPUs: 2, MemoryMiB: 512, DiskMiB: 2048}) {
		t.Errorf("template: %+v", tr)
	}
	pr := localPoolRequest(spec, "k8s.ns.p", nodeTarget(spec, 0))
	want := api.PoolRequest{Template: "k8s.ns.p", Min: 1, Max: 6, Adaptive: true, Network: "egress", EgressAllow: []string{"10.1.0.0/16:443"}}
	if !pr.Equal(want) {
		t.Errorf("pool: %+v, want %+v", pr, want)
	}
	if err := pr.Validate(); err != nil {
		t.Errorf("the daemon refuses the pool: %v", err)
	}
}
