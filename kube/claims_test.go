package kube

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/warmpool/warmpool/kube/v1alpha1"
)

// TestThreeNodes runs three node agents and the controller: the pools come
// up on the selected nodes, claims spread and become Ready with their lease
// on the node they name, deletion and TTL release, a node whose `warmpool
// serve --kubernetes` process is killed with SIGKILL has its claims turn
// Lost and new claims avoid it, and its return leaks nothing.
func TestThreeNodes(t *testing.T) {
	tc := newCluster(t)
	nodes := []string{tc.ns + "-a", tc.ns + "-b", tc.ns + "-c"}
	for i, n := range nodes {
		labels := map[string]string{"warmpool.dev/test": "yes"}
		if i == 2 {
			labels["zone"] = "z2"
			tc.addProcessNode(n, labels)
			continue
		}
		tc.addNode(n, labels, nil)
	}
	a, b, c := nodes[0], nodes[1], nodes[2]
	tc.createPool("busy", v1alpha1.WarmPoolSpec{Image: "busybox", Min: 2, Max: 4, NodeSelector: map[string]string{"warmpool.dev/test": "yes"}})
	tc.createPool("only-c", v1alpha1.WarmPoolSpec{Min: 1, NodeSelector: map[string]string{"zone": "z2"}})

	took := tc.eventually(20*time.Second, "min 2 ready on every selected node", func() string {
		wp := tc.pool("busy")
		for _, n := range nodes {
			if ready, ok := tc.readyOn(n, "busy"); !ok || ready < 2 {
				return fmt.Sprintf("node %s: daemon pool %v ready %d", n, ok, ready)
			}
			if e := wp.Status.NodeStatus[n]; e.Ready < 2 || e.Target != 2 {
				return fmt.Sprintf("status of node %s: %+v", n, e)
			}
		}
		if r := condition(wp.Status.Conditions, CondPoolReady); r.Status != metav1.ConditionTrue || wp.Status.Replicas != 6 || wp.Status.Nodes != 3 {
			return fmt.Sprintf("pool status: replicas %d nodes %d ready %+v", wp.Status.Replicas, wp.Status.Nodes, r)
		}
		return ""
	})
	t.Logf("WarmPool min 2 ready on 3 nodes %s after its creation", took.Round(time.Millisecond))
	tc.eventually(10*time.Second, "only-c only on node c", func() string {
		if ready, ok := tc.readyOn(c, "only-c"); !ok || ready < 1 {
			return fmt.Sprintf("node c: %v %d", ok, ready)
		}
		for _, n := range []string{a, b} {
			if _, ok := tc.readyOn(n, "only-c"); ok {
				return "node " + n + " keeps only-c, which does not select it"
			}
		}
		return ""
	})

	// 20 claims: Ready, spread, each with its lease where its status says.
	start := time.Now()
	for i := range 20 {
		tc.createClaim(fmt.Sprintf("c%02d", i), "busy", 0)
	}
	perNode := map[string]int{}
	for i := range 20 {
		cl := tc.waitPhase(fmt.Sprintf("c%02d", i), v1alpha1.ClaimReady, 20*time.Second)
		perNode[cl.Status.Node]++
		if cl.Status.LeaseID == "" || cl.Status.VMID == "" || cl.Status.ReadyTime == nil || cl.Status.Timings == nil {
			t.Errorf("claim %s Ready without lease, VM or timings: %+v", cl.Name, cl.Status)
		}
	}
	t.Logf("20 claims Ready %s after the first was created; per node %v", time.Since(start).Round(time.Millisecond), perNode)
	for _, n := range nodes {
		if perNode[n] == 0 {
			t.Errorf("no claim on node %s: %v", n, perNode)
		}
	}
	if p := tc.checkLeases(); p != "" {
		t.Fatalf("leases after 20 claims: %s", p)
	}

	// Deleting a claim releases its VM.
	victim, _ := tc.claim("c00")
	if err := tc.c.Delete(tc.ctx(), victim); err != nil {
		t.Fatal(err)
	}
	tc.eventually(5*time.Second, "deleted claim's lease released", func() string {
		if _, err := tc.claim("c00"); err == nil {
			return "claim still there"
		}
		for _, l := range tc.leases()[victim.Status.Node] {
			if l.ID == victim.Status.LeaseID {
				return "lease " + l.ID + " still held"
			}
		}
		return ""
	})

	// A TTL releases one.
	tc.createClaim("short", "busy", time.Second)
	tc.waitPhase("short", v1alpha1.ClaimReady, 10*time.Second)
	short := tc.waitPhase("short", v1alpha1.ClaimReleased, 5*time.Second)
	if r := condition(short.Status.Conditions, CondReady); r.Reason != "TTLExpired" {
		t.Errorf("TTL claim's Ready condition: %+v", r)
	}
	if p := tc.checkLeases(); p != "" {
		t.Fatalf("leases after the TTL: %s", p)
	}

	// kill -9 node c's process (daemon and agent): its claims turn Lost
	// within the heartbeat timeout; new claims go to a and b only.
	var onC []string
	var claims v1alpha1.VMClaimList
	if err := tc.c.List(tc.ctx(), &claims, client.InNamespace(tc.ns)); err != nil {
		t.Fatal(err)
	}
	for _, cl := range claims.Items {
		if cl.Status.Node == c && cl.Status.Phase == v1alpha1.ClaimReady {
			onC = append(onC, cl.Name)
		}
	}
	if len(onC) < 2 {
		t.Fatalf("want at least 2 claims on node c to lose, have %v", onC)
	}
	tc.nodes[c].proc.kill(t)
	lost := tc.eventually(tc.nodes[c].opts.HeartbeatTimeout+2*time.Second, "node c's claims Lost", func() string {
		for _, name := range onC {
			cl, err := tc.claim(name)
			if err != nil {
				return err.Error()
			}
			if cl.Status.Phase != v1alpha1.ClaimLost {
				return name + " is " + string(cl.Status.Phase)
			}
			if r := condition(cl.Status.Conditions, CondReady); r.Reason != "NodeLost" || !strings.Contains(r.Message, c) {
				return fmt.Sprintf("%s: Ready condition %+v", name, r)
			}
		}
		return ""
	})
	t.Logf("%d claims of the killed agent Lost %s after the kill (heartbeat timeout %s)", len(onC), lost.Round(time.Millisecond), tc.nodes[c].opts.HeartbeatTimeout)
	for i := range 6 {
		tc.createClaim(fmt.Sprintf("after%d", i), "busy", 0)
	}
	for i := range 6 {
		cl := tc.waitPhase(fmt.Sprintf("after%d", i), v1alpha1.ClaimReady, 20*time.Second)
		if cl.Status.Node == c {
			t.Errorf("claim %s bound to the lost node %s", cl.Name, c)
		}
	}
	// A lost claim deleted while its node is away goes at once.
	if err := tc.c.Delete(tc.ctx(), &v1alpha1.VMClaim{ObjectMeta: metav1.ObjectMeta{Namespace: tc.ns, Name: onC[0]}}); err != nil {
		t.Fatal(err)
	}
	tc.eventually(5*time.Second, "lost claim deleted", func() string {
		if _, err := tc.claim(onC[0]); err == nil {
			return "still there"
		}
		return ""
	})

	// The process comes back on its state: its daemon drops the leases
	// whose VMs died with it (the fake provider's VMs live in the process),
	// the agent releases whatever its lost (and gone) claims still hold,
	// serves no VM twice, and takes claims again.
	tc.nodes[c].proc.start(t)
	tc.waitDaemon(tc.nodes[c])
	tc.eventually(10*time.Second, "node c reconciled", func() string {
		if n := len(tc.leases()[c]); n != 0 {
			return fmt.Sprintf("node c still holds %d leases", n)
		}
		return tc.checkLeases()
	})
	for _, name := range onC[1:] {
		if cl, _ := tc.claim(name); cl.Status.Phase != v1alpha1.ClaimLost {
			t.Errorf("lost claim %s is %s after its node came back", name, cl.Status.Phase)
		}
	}
	tc.eventually(10*time.Second, "node c counted again", func() string {
		wp := tc.pool("busy")
		if wp.Status.Nodes != 3 || wp.Status.NodeStatus[c].Ready < 2 {
			return fmt.Sprintf("nodes %d, c %+v", wp.Status.Nodes, wp.Status.NodeStatus[c])
		}
		return ""
	})
	// Node c now has the most ready VMs (a and b refill their two more
	// slowly than c just did, or equal): a new claim may go there again.
	tc.createClaim("back", "busy", 0)
	tc.waitPhase("back", v1alpha1.ClaimReady, 10*time.Second)
	if p := tc.checkLeases(); p != "" {
		t.Fatalf("leases after the agent's return: %s", p)
	}

	tc.deleteClaims()
	tc.eventually(5*time.Second, "no lease left", func() string {
		for n, ls := range tc.leases() {
			if len(ls) > 0 {
				return fmt.Sprintf("node %s holds %d", n, len(ls))
			}
		}
		return ""
	})
}

// TestBadInput: specs the nodes cannot serve and claims that cannot be
// bound get conditions saying why, and leave nothing behind.
func TestBadInput(t *testing.T) {
	tc := newCluster(t)
	node := tc.ns + "-a"
	// A slow resume keeps a claim Bound long enough to delete it then.
	tc.addNode(node, nil, map[string]time.Duration{"resume": 400 * time.Millisecond})

	tc.createPool("docker", v1alpha1.WarmPoolSpec{Image: "docker.io/library/alpine", Min: 1})
	tc.createPool("upside", v1alpha1.WarmPoolSpec{Min: 3, Max: 2})
	for name, want := range map[string]string{"docker": ReasonUnknownImageSource, "upside": ReasonInvalidSpec} {
		tc.eventually(10*time.Second, name+" not accepted", func() string {
			acc := condition(tc.pool(name).Status.Conditions, CondAccepted)
			if acc.Status != metav1.ConditionFalse || acc.Reason != want || acc.Message == "" {
				return fmt.Sprintf("Accepted %+v", acc)
			}
			return ""
		})
		wp := tc.pool(name)
		t.Logf("%s: Accepted=False %s: %s", name, want, condition(wp.Status.Conditions, CondAccepted).Message)
		if _, ok := tc.readyOn(node, name); ok {
			t.Errorf("node keeps a pool for %s", name)
		}
	}
	ts, err := tc.nodes[node].daemon.Templates(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(ts) != 0 {
		t.Errorf("templates built for pools that were not accepted: %v", ts)
	}

	tc.createClaim("nopool", "missing", 0)
	cl := tc.waitPhase("nopool", v1alpha1.ClaimPending, 10*time.Second)
	if b := condition(cl.Status.Conditions, CondBound); b.Reason != "PoolNotFound" || !strings.Contains(b.Message, "missing") {
		t.Errorf("claim of a missing pool: Bound %+v", b)
	}
	tc.createClaim("badpool", "upside", 0)
	cl = tc.waitPhase("badpool", v1alpha1.ClaimPending, 10*time.Second)
	if b := condition(cl.Status.Conditions, CondBound); b.Reason != "PoolNotAccepted" || !strings.Contains(b.Message, "exceeds") {
		t.Errorf("claim of a pool not accepted: Bound %+v", b)
	}

	// Deleted while its node hands the VM over.
	tc.createPool("slow", v1alpha1.WarmPoolSpec{Min: 1})
	tc.eventually(10*time.Second, "slow pool ready", func() string {
		if tc.pool("slow").Status.NodeStatus[node].Ready < 1 {
			return "not yet"
		}
		return ""
	})
	tc.createClaim("gone", "slow", 0)
	tc.waitPhase("gone", v1alpha1.ClaimBound, 5*time.Second)
	if err := tc.c.Delete(tc.ctx(), &v1alpha1.VMClaim{ObjectMeta: metav1.ObjectMeta{Namespace: tc.ns, Name: "gone"}}); err != nil {
		t.Fatal(err)
	}
	tc.eventually(5*time.Second, "claim deleted while binding is gone with its VM", func() string {
		if _, err := tc.claim("gone"); err == nil {
			return "claim still there"
		}
		if n := len(tc.leases()[node]); n != 0 {
			return fmt.Sprintf("%d leases held", n)
		}
		return ""
	})
	// The pool refills what the deleted claim took.
	tc.eventually(5*time.Second, "slow pool refilled", func() string {
		if r, _ := tc.readyOn(node, "slow"); r < 1 {
			return "not yet"
		}
		return ""
	})
	tc.deleteClaims()
}

// TestClaimLatency measures claim creation to Ready through the real API
// server, controller and node agents, with ready VMs waiting (the fake
// provider: what is measured is the Kubernetes path). It reports; the
// targets are in the README, not asserted here.
func TestClaimLatency(t *testing.T) {
	tc := newCluster(t)
	nodes := []string{tc.ns + "-a", tc.ns + "-b"}
	for _, n := range nodes {
		tc.addNode(n, nil, nil)
	}
	const claims = 50
	tc.createPool("lat", v1alpha1.WarmPoolSpec{Min: claims/2 + 5})
	tc.eventually(20*time.Second, "pool full", func() string {
		if r := tc.pool("lat").Status.Replicas; r < claims+10 {
			return fmt.Sprintf("%d ready", r)
		}
		return ""
	})
	for _, mode := range []struct {
		name  string
		every time.Duration
	}{{"one-by-one", 0}, {"20-per-second", 50 * time.Millisecond}} {
		lat := measureClaims(tc, mode.name, claims, mode.every)
		t.Logf("claim → Ready, %s, %d claims: p50 %s p90 %s p99 %s max %s", mode.name, claims,
			pct(lat, 50), pct(lat, 90), pct(lat, 99), lat[len(lat)-1])
		tc.deleteClaims()
		tc.eventually(20*time.Second, "pool refilled", func() string {
			if r := tc.pool("lat").Status.Replicas; r < claims+10 {
				return fmt.Sprintf("%d ready", r)
			}
			return ""
		})
	}
}

// measureClaims creates n claims (each after the previous is Ready when
// every is 0, else one per every) and returns their creation → Ready
// latencies, sorted, as a watch sees them.
func measureClaims(tc *testCluster, prefix string, n int, every time.Duration) []time.Duration {
	tc.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	w, err := client.NewWithWatch(clientConfig(testCfg), client.Options{Scheme: tc.c.Scheme()})
	if err != nil {
		tc.t.Fatal(err)
	}
	watch, err := w.Watch(ctx, &v1alpha1.VMClaimList{}, client.InNamespace(tc.ns))
	if err != nil {
		tc.t.Fatal(err)
	}
	defer watch.Stop()
	readyAt := make(chan string, n)
	var mu sync.Mutex
	var toBound, boundToReady, acquire, noticed []time.Duration
	created := map[string]time.Time{}
	go func() {
		seen := map[string]bool{}
		for ev := range watch.ResultChan() {
			c, ok := ev.Object.(*v1alpha1.VMClaim)
			if ok && c.Status.Phase == v1alpha1.ClaimReady && !seen[c.Name] {
				seen[c.Name] = true
				mu.Lock()
				toBound = append(toBound, c.Status.BoundTime.Sub(created[c.Name]))
				boundToReady = append(boundToReady, c.Status.ReadyTime.Sub(c.Status.BoundTime.Time))
				acquire = append(acquire, time.Duration(c.Status.Timings.AcquireMS)*time.Millisecond)
				noticed = append(noticed, time.Since(c.Status.ReadyTime.Time))
				mu.Unlock()
				readyAt <- c.Name
			}
		}
	}()
	var lat []time.Duration
	collect := func(block bool) {
		for {
			select {
			case name := <-readyAt:
				mu.Lock()
				lat = append(lat, time.Since(created[name]))
				mu.Unlock()
			case <-ctx.Done():
				tc.t.Fatalf("%s: %d of %d claims Ready", prefix, len(lat), n)
			default:
				mu.Lock()
				all := len(lat) == len(created)
				mu.Unlock()
				if !block || all {
					return
				}
				time.Sleep(time.Millisecond)
			}
		}
	}
	for i := range n {
		name := fmt.Sprintf("%s-%02d", prefix, i)
		mu.Lock()
		created[name] = time.Now()
		mu.Unlock()
		tc.createClaim(name, "lat", 0)
		if every == 0 {
			collect(true)
		} else {
			time.Sleep(every)
			collect(false)
		}
	}
	collect(true)
	slices.Sort(lat)
	mu.Lock()
	defer mu.Unlock()
	for _, part := range []struct {
		name string
		d    []time.Duration
	}{{"created → bound (controller)", toBound}, {"bound → ready written (agent)", boundToReady}, {"daemon acquire", acquire}, {"ready written → seen by a watch", noticed}} {
		slices.Sort(part.d)
		tc.t.Logf("  %s: %s p50 %s p99 %s", prefix, part.name, pct(part.d, 50), pct(part.d, 99))
	}
	return lat
}

func pct(sorted []time.Duration, p int) time.Duration {
	i := (len(sorted)*p + 99) / 100
	return sorted[max(0, min(i, len(sorted))-1)].Round(100 * time.Microsecond)
}
