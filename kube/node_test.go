package kube

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/warmpool/warmpool/api"
	"github.com/warmpool/warmpool/kube/v1alpha1"
)

// TestAudit: a Ready claim whose lease its node's daemon no longer has
// fails with LeaseGone, and a lease of a claim that does not exist is
// released, both without any event from the API server; a lease that
// serves no claim (an operator's own acquire) is left alone.
func TestAudit(t *testing.T) {
	tc := newCluster(t)
	node := tc.ns + "-a"
	n := tc.addNodeWith(node, nil, nil, func(o *AgentOptions) { o.AuditInterval = 200 * time.Millisecond })
	tc.createPool("p", v1alpha1.WarmPoolSpec{Min: 3})
	tc.eventually(10*time.Second, "pool ready", func() string {
		if r := tc.pool("p").Status.NodeStatus[node].Ready; r < 3 {
			return fmt.Sprintf("%d ready", r)
		}
		return ""
	})
	tc.createClaim("keep", "p", 0)
	tc.createClaim("victim", "p", 0)
	keep := tc.waitPhase("keep", v1alpha1.ClaimReady, 10*time.Second)
	victim := tc.waitPhase("victim", v1alpha1.ClaimReady, 10*time.Second)

	ctx := tc.ctx()
	// The lease goes behind the agent's back (warmpool release on the node).
	if err := n.daemon.Release(ctx, victim.Status.LeaseID); err != nil {
		t.Fatal(err)
	}
	took := tc.eventually(5*time.Second, "claim of the vanished lease failed", func() string {
		c, err := tc.claim("victim")
		if err != nil {
			return err.Error()
		}
		r := condition(c.Status.Conditions, CondReady)
		if c.Status.Phase != v1alpha1.ClaimFailed || r.Reason != "LeaseGone" || !strings.Contains(r.Message, victim.Status.LeaseID) {
			return fmt.Sprintf("%s, Ready %+v", c.Status.Phase, r)
		}
		return ""
	})
	t.Logf("a Ready claim whose lease vanished Failed (LeaseGone) %s later (audit every 200ms)", took.Round(time.Millisecond))

	// A lease whose claim does not exist, and one that is nobody's claim.
	pool := localName(tc.ns, "p")
	ghost, err := n.daemon.Acquire(ctx, pool, api.AcquireRequest{Labels: leaseLabels(tc.ns, "ghost", "uid-of-no-claim")})
	if err != nil {
		t.Fatal(err)
	}
	own, err := n.daemon.Acquire(ctx, pool, api.AcquireRequest{Owner: "operator"})
	if err != nil {
		t.Fatal(err)
	}
	took = tc.eventually(5*time.Second, "lease of no claim released", func() string {
		for _, l := range tc.leases()[node] {
			if l.ID == ghost.ID {
				return "still held"
			}
		}
		return ""
	})
	t.Logf("a lease whose claim is gone released %s after it appeared", took.Round(time.Millisecond))
	var ids []string
	for _, l := range tc.leases()[node] {
		ids = append(ids, l.ID)
	}
	if !slices.Contains(ids, own.ID) || !slices.Contains(ids, keep.Status.LeaseID) || len(ids) != 2 {
		t.Errorf("leases after the audit: %v, want the operator's %s and claim keep's %s", ids, own.ID, keep.Status.LeaseID)
	}
	if c, _ := tc.claim("keep"); c.Status.Phase != v1alpha1.ClaimReady {
		t.Errorf("claim keep is %s after the audit", c.Status.Phase)
	}
	if err := n.daemon.Release(ctx, own.ID); err != nil {
		t.Fatal(err)
	}
	if p := tc.checkLeases(); p != "" {
		t.Errorf("leases: %s", p)
	}
	tc.deleteClaims()
}

// recordingBackend is a daemon that remembers the templates it was asked
// to build.
type recordingBackend struct {
	api.Backend
	mu        sync.Mutex
	templates []api.TemplateRequest
}

func (r *recordingBackend) BuildTemplate(ctx context.Context, req api.TemplateRequest, progress func(string)) (api.Template, error) {
	r.mu.Lock()
	r.templates = append(r.templates, req)
	r.mu.Unlock()
	return r.Backend.BuildTemplate(ctx, req, progress)
}

func (r *recordingBackend) built(name string) []api.TemplateRequest {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []api.TemplateRequest
	for _, t := range r.templates {
		if t.Name == name {
			out = append(out, t)
		}
	}
	return out
}

// TestImageSources: WarmPools with root filesystem images, Debian
// packages, an adaptive size and a network policy reach the node's image
// builder and daemon as `image build`, `template build` and `pool set`
// would take them; what the node cannot do shows in its status entry. The
// image builder is a stand-in (the fake provider boots nothing);
// TestQEMUClaim builds and boots a real one.
func TestImageSources(t *testing.T) {
	tc := newCluster(t)
	node := tc.ns + "-a"
	imgRoot := t.TempDir()
	var mu sync.Mutex
	var builds []ImageRequest
	images := func(ctx context.Context, req ImageRequest) (string, error) {
		mu.Lock()
		defer mu.Unlock()
		builds = append(builds, req)
		if req.Source == "tar:/nonexistent/root.tar" {
			return "", errors.New("open /nonexistent/root.tar: no such file or directory")
		}
		return filepath.Join(imgRoot, fmt.Sprintf("img-%d", len(builds))), nil
	}
	buildsOf := func(src string) []ImageRequest {
		mu.Lock()
		defer mu.Unlock()
		var out []ImageRequest
		for _, b := range builds {
			if b.Source == src {
				out = append(out, b)
			}
		}
		return out
	}
	var rec *recordingBackend
	tc.addNodeWith(node, nil, nil, func(o *AgentOptions) {
		rec = &recordingBackend{Backend: o.Backend}
		o.Backend, o.Images = rec, images
	})
	tc.createPool("tree", v1alpha1.WarmPoolSpec{Image: "dir:/srv/tree", Adaptive: true, Min: 1, Max: 3, Template: v1alpha1.TemplateShape{VCPUs: 1}})
	tc.createPool("deb", v1alpha1.WarmPoolSpec{Image: "debian:bookworm", Packages: []string{"python3", "curl", "python3"}, Min: 1})
	tc.createPool("broken", v1alpha1.WarmPoolSpec{Image: "tar:/nonexistent/root.tar", Min: 1})
	tc.createPool("net", v1alpha1.WarmPoolSpec{Network: "isolated", Min: 1})

	tc.eventually(10*time.Second, "tree and deb ready", func() string {
		for _, name := range []string{"tree", "deb"} {
			if r, _ := tc.readyOn(node, name); r < 1 {
				return name + " has no ready VM"
			}
		}
		return ""
	})
	tree := localName(tc.ns, "tree")
	if got := rec.built(tree); len(got) != 1 || !strings.HasPrefix(got[0].Image, imgRoot) || got[0].VCPUs != 1 {
		t.Errorf("templates built for tree: %+v, want one booting the built image", got)
	}
	if got := buildsOf("debian:bookworm"); len(got) != 1 || !slices.Equal(got[0].Packages, []string{"curl", "python3"}) {
		t.Errorf("debian image builds: %+v, want one with curl and python3", got)
	}
	pools, err := rec.Pools(tc.ctx())
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range pools {
		if p.Name == tree && (!p.Adaptive || p.Min != 1 || p.Max != 3) {
			t.Errorf("daemon pool of tree: adaptive %v min %d max %d, want adaptive 1..3", p.Adaptive, p.Min, p.Max)
		}
	}
	tc.createClaim("c1", "tree", 0)
	tc.waitPhase("c1", v1alpha1.ClaimReady, 10*time.Second)

	for name, says := range map[string]string{"broken": "no such file", "net": "network isolated"} {
		tc.eventually(10*time.Second, name+" reports the node's error", func() string {
			wp := tc.pool(name)
			e := wp.Status.NodeStatus[node]
			r := condition(wp.Status.Conditions, CondPoolReady)
			if !strings.Contains(e.Error, says) || r.Reason != "NodeError" || condition(wp.Status.Conditions, CondAccepted).Status != metav1.ConditionTrue {
				return fmt.Sprintf("entry %+v, Ready %+v", e, r)
			}
			return ""
		})
		t.Logf("%s: node entry says %q", name, tc.pool(name).Status.NodeStatus[node].Error)
	}
	if got := rec.built(localName(tc.ns, "broken")); len(got) != 0 {
		t.Errorf("a template was built for an image that failed: %+v", got)
	}

	// A new min is a pool change, not a new image or template.
	wp := tc.pool("tree")
	wp.Spec.Min = 2
	if err := tc.c.Update(tc.ctx(), wp); err != nil {
		t.Fatal(err)
	}
	tc.eventually(10*time.Second, "tree at min 2", func() string {
		ps, err := rec.Pools(context.Background())
		if err != nil {
			return err.Error()
		}
		for _, p := range ps {
			if p.Name == tree && p.Min == 2 {
				return ""
			}
		}
		return "not yet"
	})
	if n, m := len(buildsOf("dir:/srv/tree")), len(rec.built(tree)); n != 1 || m != 1 {
		t.Errorf("after a new min: %d image builds and %d template builds of tree, want 1 and 1", n, m)
	}
	tc.deleteClaims()
}
