package kube

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-logr/logr"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/rest"
	"k8s.io/klog/v2"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	ctrllog "sigs.k8s.io/controller-runtime/pkg/log"

	"github.com/warmpool/warmpool/api"
	"github.com/warmpool/warmpool/daemon"
	"github.com/warmpool/warmpool/kube/v1alpha1"
)

// The package's tests share one real API server (etcd and kube-apiserver
// built by scripts/k8s-assets.sh) started by TestMain; each test works in
// a namespace of its own with its own controller and node agents.
var (
	testEnv *envtest.Environment
	testCfg *rest.Config
	// skipReason says why there is no API server.
	skipReason string
)

func TestMain(m *testing.M) {
	os.Exit(runMain(m))
}

func runMain(m *testing.M) int {
	ctrllog.SetLogger(logr.Discard())
	klog.SetLogger(logr.Discard())
	assets := os.Getenv("KUBEBUILDER_ASSETS")
	if assets == "" {
		out, err := exec.Command("../scripts/k8s-assets.sh").Output()
		if err != nil {
			msg := err.Error()
			if ee, ok := err.(*exec.ExitError); ok {
				msg += ": " + lastLine(string(ee.Stderr))
			}
			skipReason = "no kube-apiserver and etcd: scripts/k8s-assets.sh could not build them: " + msg
			return m.Run()
		}
		assets = strings.TrimSpace(string(out))
	}
	testEnv = &envtest.Environment{
		CRDDirectoryPaths:     []string{"../deploy/warmpool.dev_warmpools.yaml", "../deploy/warmpool.dev_vmclaims.yaml"},
		ErrorIfCRDPathMissing: true,
		BinaryAssetsDirectory: assets,
	}
	cfg, err := testEnv.Start()
	if err != nil {
		fmt.Fprintln(os.Stderr, "start the API server:", err)
		return 1
	}
	testCfg = cfg
	binDir, err := os.MkdirTemp("", "wp-kube-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(binDir)
	warmpoolBin.dir = binDir
	code := m.Run()
	if err := testEnv.Stop(); err != nil {
		fmt.Fprintln(os.Stderr, "stop the API server:", err)
		return 1
	}
	return code
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}

// testCluster is a namespace, a controller and node agents, each agent next
// to an in-process daemon on the fake provider.
type testCluster struct {
	t     *testing.T
	ns    string
	c     client.Client
	log   *slog.Logger
	logs  *lockedBuffer
	nodes map[string]*testNode
	stop  func()
}

type testNode struct {
	name string
	// daemon is the in-process daemon; view reaches it, or the daemon of
	// a node run as a `warmpool serve --kubernetes` process (proc).
	daemon *daemon.Local
	view   nodeDaemon
	proc   *nodeProcess
	cancel context.CancelFunc
	done   chan error
	opts   AgentOptions
}

// nodeDaemon is what the tests read of a node's daemon, in-process or
// over its socket.
type nodeDaemon interface {
	Leases(ctx context.Context) ([]api.Lease, error)
	Pools(ctx context.Context) ([]api.Pool, error)
	Templates(ctx context.Context) ([]api.Template, error)
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

var nsCounter sync.Mutex
var nsNext int

// newCluster starts a controller in a fresh namespace.
func newCluster(t *testing.T) *testCluster {
	t.Helper()
	if testCfg == nil {
		t.Skip(skipReason)
	}
	nsCounter.Lock()
	nsNext++
	ns := fmt.Sprintf("t%d-%s", nsNext, strings.ToLower(strings.ReplaceAll(t.Name(), "/", "-")))
	nsCounter.Unlock()
	if len(ns) > 40 {
		ns = ns[:40]
	}
	ns = strings.Trim(ns, "-")
	scheme, err := NewScheme()
	if err != nil {
		t.Fatal(err)
	}
	c, err := client.New(clientConfig(testCfg), client.Options{Scheme: scheme})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Create(context.Background(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}); err != nil {
		t.Fatal(err)
	}
	logs := &lockedBuffer{}
	tc := &testCluster{t: t, ns: ns, c: c, logs: logs, nodes: map[string]*testNode{},
		log: slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))}
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		done <- RunController(ctx, ControllerOptions{Config: testCfg, Namespace: ns, Logger: tc.log.With("who", "controller"),
			ready: func() { close(ready) }, WatchNamespace: ns})
	}()
	tc.stop = func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("controller: %v", err)
		}
	}
	t.Cleanup(tc.close)
	select {
	case <-ready:
	case err := <-done:
		t.Fatalf("controller stopped: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatal("controller did not start in 30s")
	}
	return tc
}

// close stops the agents, checks that the daemons hold no lease the
// cluster does not know of, then stops the controller and the daemons.
func (tc *testCluster) close() {
	for _, n := range tc.nodes {
		if n.proc != nil {
			n.proc.stop(tc.t)
			continue
		}
		tc.stopAgent(n.name)
	}
	tc.stop()
	for _, n := range tc.nodes {
		if n.daemon != nil {
			n.daemon.Close(context.Background())
		}
	}
	if tc.t.Failed() {
		tc.t.Logf("logs of the controller and agents:\n%s", tail(tc.logs.String(), 200))
	}
}

func tail(s string, n int) string {
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// addNode starts a daemon and a node agent for node name (a Node object
// with labels is created first).
func (tc *testCluster) addNode(name string, labels map[string]string, latency map[string]time.Duration) *testNode {
	return tc.addNodeWith(name, labels, latency, nil)
}

// addNodeWith is addNode with more changes to the agent's options.
func (tc *testCluster) addNodeWith(name string, labels map[string]string, latency map[string]time.Duration, more func(*AgentOptions)) *testNode {
	tc.t.Helper()
	tc.createNode(name, labels)
	d, err := daemon.Open(context.Background(), daemon.Options{StateDir: tc.t.TempDir(), Provider: "fake", StopAll: true,
		FakeLatency: latency, Logger: tc.log.With("who", "daemon-"+name)})
	if err != nil {
		tc.t.Fatal(err)
	}
	n := &testNode{name: name, daemon: d, view: d, opts: AgentOptions{
		Config: testCfg, Backend: d, Node: name, Namespace: tc.ns,
		HeartbeatInterval: 250 * time.Millisecond, HeartbeatTimeout: 2 * time.Second,
		ReportInterval: 100 * time.Millisecond, AcquireWait: 5 * time.Second,
		Logger: tc.log.With("who", "agent-"+name), WatchNamespace: tc.ns,
	}}
	if more != nil {
		more(&n.opts)
	}
	tc.nodes[name] = n
	tc.startAgent(name)
	return n
}

// createNode creates the Node object name with labels, deleted at the end.
func (tc *testCluster) createNode(name string, labels map[string]string) {
	tc.t.Helper()
	node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}}
	if err := tc.c.Create(context.Background(), node); err != nil && !apierrors.IsAlreadyExists(err) {
		tc.t.Fatal(err)
	}
	tc.t.Cleanup(func() { _ = tc.c.Delete(context.Background(), node) })
}

func (tc *testCluster) startAgent(name string) {
	n := tc.nodes[name]
	ctx, cancel := context.WithCancel(context.Background())
	n.cancel, n.done = cancel, make(chan error, 1)
	go func() { n.done <- RunAgent(ctx, n.opts) }()
}

// stopAgent ends a node agent at once, as kill -9 would: no goodbye, no
// release; its daemon (and the VMs it holds) stays.
func (tc *testCluster) stopAgent(name string) {
	n := tc.nodes[name]
	if n.cancel == nil {
		return
	}
	n.cancel()
	if err := <-n.done; err != nil {
		tc.t.Errorf("agent %s: %v", name, err)
	}
	n.cancel = nil
}

func (tc *testCluster) ctx() context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	tc.t.Cleanup(cancel)
	return ctx
}

func (tc *testCluster) createPool(name string, spec v1alpha1.WarmPoolSpec) {
	tc.t.Helper()
	wp := &v1alpha1.WarmPool{ObjectMeta: metav1.ObjectMeta{Namespace: tc.ns, Name: name}, Spec: spec}
	if err := tc.c.Create(tc.ctx(), wp); err != nil {
		tc.t.Fatalf("create WarmPool %s: %v", name, err)
	}
}

func (tc *testCluster) createClaim(name, pool string, ttl time.Duration) *v1alpha1.VMClaim {
	tc.t.Helper()
	c := &v1alpha1.VMClaim{ObjectMeta: metav1.ObjectMeta{Namespace: tc.ns, Name: name}, Spec: v1alpha1.VMClaimSpec{PoolRef: v1alpha1.PoolReference{Name: pool}}}
	if ttl > 0 {
		c.Spec.TTL = &metav1.Duration{Duration: ttl}
	}
	if err := tc.c.Create(tc.ctx(), c); err != nil {
		tc.t.Fatalf("create VMClaim %s: %v", name, err)
	}
	return c
}

func (tc *testCluster) claim(name string) (*v1alpha1.VMClaim, error) {
	var c v1alpha1.VMClaim
	err := tc.c.Get(context.Background(), types.NamespacedName{Namespace: tc.ns, Name: name}, &c)
	return &c, err
}

func (tc *testCluster) pool(name string) *v1alpha1.WarmPool {
	tc.t.Helper()
	var wp v1alpha1.WarmPool
	if err := tc.c.Get(context.Background(), types.NamespacedName{Namespace: tc.ns, Name: name}, &wp); err != nil {
		tc.t.Fatal(err)
	}
	return &wp
}

// eventually polls cond until it returns "" (done) or timeout passes, then
// fails with its last answer.
func (tc *testCluster) eventually(timeout time.Duration, what string, cond func() string) time.Duration {
	tc.t.Helper()
	start := time.Now()
	var last string
	for time.Since(start) < timeout {
		if last = cond(); last == "" {
			return time.Since(start)
		}
		time.Sleep(20 * time.Millisecond)
	}
	tc.t.Fatalf("%s: not within %s: %s", what, timeout, last)
	return 0
}

// waitPhase waits for claim name to reach phase.
func (tc *testCluster) waitPhase(name string, phase v1alpha1.ClaimPhase, timeout time.Duration) *v1alpha1.VMClaim {
	tc.t.Helper()
	var c *v1alpha1.VMClaim
	tc.eventually(timeout, "claim "+name+" "+string(phase), func() string {
		var err error
		if c, err = tc.claim(name); err != nil {
			return err.Error()
		}
		if c.Status.Phase != phase {
			return fmt.Sprintf("phase %q, conditions %v", c.Status.Phase, c.Status.Conditions)
		}
		return ""
	})
	return c
}

// leases lists the daemon leases of every node, by node.
func (tc *testCluster) leases() map[string][]api.Lease {
	tc.t.Helper()
	out := map[string][]api.Lease{}
	for name, n := range tc.nodes {
		if n.proc != nil && n.proc.cmd == nil {
			continue // killed
		}
		ls, err := n.view.Leases(context.Background())
		if err != nil {
			tc.t.Fatal(err)
		}
		out[name] = ls
	}
	return out
}

// checkLeases checks that every lease of every daemon serves exactly one
// claim that is Ready on that node with that lease, that every Ready claim
// has its lease, and that no claim in any other phase holds one.
func (tc *testCluster) checkLeases() string {
	var claims v1alpha1.VMClaimList
	if err := tc.c.List(context.Background(), &claims, client.InNamespace(tc.ns)); err != nil {
		return err.Error()
	}
	byUID := map[types.UID]v1alpha1.VMClaim{}
	for _, c := range claims.Items {
		byUID[c.UID] = c
	}
	held := map[types.UID]string{}
	var problems []string
	for node, ls := range tc.leases() {
		for _, l := range ls {
			_, _, uid, ok := claimOfLease(l)
			if !ok {
				problems = append(problems, fmt.Sprintf("node %s: lease %s has labels %v", node, l.ID, l.Labels))
				continue
			}
			if prev, dup := held[uid]; dup {
				problems = append(problems, fmt.Sprintf("claim %s holds leases on %s and %s", uid, prev, node))
			}
			held[uid] = node
			c, ok := byUID[uid]
			switch {
			case !ok:
				problems = append(problems, fmt.Sprintf("node %s: lease %s of a claim that is gone (%v)", node, l.ID, l.Labels))
			case c.Status.Phase != v1alpha1.ClaimReady || c.Status.Node != node || c.Status.LeaseID != l.ID:
				problems = append(problems, fmt.Sprintf("node %s: lease %s of claim %s which is %s on %q with lease %q", node, l.ID, c.Name, c.Status.Phase, c.Status.Node, c.Status.LeaseID))
			}
		}
	}
	for _, c := range claims.Items {
		if c.Status.Phase == v1alpha1.ClaimReady && held[c.UID] != c.Status.Node {
			problems = append(problems, fmt.Sprintf("claim %s is Ready on %s but that node holds no lease for it", c.Name, c.Status.Node))
		}
	}
	slices.Sort(problems)
	return strings.Join(problems, "; ")
}

// readyOn returns how many ready VMs node's daemon has in pool.
func (tc *testCluster) readyOn(node, pool string) (int, bool) {
	ps, err := tc.nodes[node].view.Pools(context.Background())
	if err != nil {
		tc.t.Fatal(err)
	}
	for _, p := range ps {
		if p.Name == localName(tc.ns, pool) {
			return p.Ready, true
		}
	}
	return 0, false
}

func condition(conds []metav1.Condition, typ string) metav1.Condition {
	if c := meta.FindStatusCondition(conds, typ); c != nil {
		return *c
	}
	return metav1.Condition{}
}

// deleteClaims deletes every claim of the namespace and waits until they
// are gone (their finalizers removed).
func (tc *testCluster) deleteClaims() {
	tc.t.Helper()
	if err := tc.c.DeleteAllOf(context.Background(), &v1alpha1.VMClaim{}, client.InNamespace(tc.ns)); err != nil {
		tc.t.Fatal(err)
	}
	tc.eventually(10*time.Second, "all claims gone", func() string {
		var claims v1alpha1.VMClaimList
		if err := tc.c.List(context.Background(), &claims, client.InNamespace(tc.ns)); err != nil {
			return err.Error()
		}
		if len(claims.Items) > 0 {
			return fmt.Sprintf("%d left, first %s %s", len(claims.Items), claims.Items[0].Name, claims.Items[0].Status.Phase)
		}
		return ""
	})
}
