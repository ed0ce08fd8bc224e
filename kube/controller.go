package kube

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"
	"sigs.k8s.io/controller-runtime/pkg/event"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/manager"
	"sigs.k8s.io/controller-runtime/pkg/predicate"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	"github.com/warmpool/warmpool/kube/v1alpha1"
)

// ControllerOptions configure the controller.
type ControllerOptions struct {
	// Config reaches the API server.
	Config *rest.Config
	// Namespace holds the node agents' Leases and the leader election
	// Lease (default warmpool-system).
	Namespace string
	// NoLeaderElection runs without electing a leader: only for a single
	// controller (tests).
	NoLeaderElection bool
	Logger           *slog.Logger
	// ready, when set, is called once the controller leads and its caches
	// are in.
	ready func()
	// WatchNamespace, when set, limits the WarmPools and VMClaims seen
	// to that namespace (a cluster shared with other warmpool
	// installations, or tests sharing one API server).
	WatchNamespace string
}

// controllerState is what the controller keeps between reconciles: only
// caches of what it wrote and has not seen back yet.
type controllerState struct {
	c client.Client
	// r reads past the cache, after a conflict.
	r   client.Reader
	ns  string
	log *slog.Logger

	mu sync.Mutex
	// assumed holds the claims bound but not yet seen bound in the cache,
	// so that the next binding counts them against their node.
	assumed map[types.UID]assumption
	// countsWritten is when each pool's sums were last written.
	countsWritten map[types.NamespacedName]time.Time
}

// countsEvery spaces the writes of a WarmPool's sums (status.replicas).
const countsEvery = 500 * time.Millisecond

type assumption struct {
	node string
	pool types.NamespacedName
}

// RunController runs the controller until ctx ends.
func RunController(ctx context.Context, opts ControllerOptions) error {
	if opts.Config == nil {
		return errors.New("controller: Config is required")
	}
	opts.Namespace = cmp.Or(opts.Namespace, DefaultNamespace)
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	mopts, err := managerOptions(opts.Logger, func(o *manager.Options) {
		o.LeaderElection = !opts.NoLeaderElection
		o.LeaderElectionID = "warmpool-controller"
		o.LeaderElectionNamespace = opts.Namespace
		o.LeaderElectionReleaseOnCancel = true
		o.Cache.ByObject = map[client.Object]cache.ByObject{
			&coordinationv1.Lease{}: {Namespaces: map[string]cache.Config{opts.Namespace: {}}},
		}
		if opts.WatchNamespace != "" {
			o.Cache.DefaultNamespaces = map[string]cache.Config{opts.WatchNamespace: {}}
		}
	})
	if err != nil {
		return err
	}
	mgr, err := manager.New(clientConfig(opts.Config), mopts)
	if err != nil {
		return fmt.Errorf("controller: %w", err)
	}
	s := &controllerState{c: mgr.GetClient(), r: mgr.GetAPIReader(), ns: opts.Namespace, log: opts.Logger.With("component", "kube-controller"), assumed: map[types.UID]assumption{}, countsWritten: map[types.NamespacedName]time.Time{}}
	agentLeases := predicate.NewPredicateFuncs(func(o client.Object) bool {
		return o.GetNamespace() == opts.Namespace && o.GetLabels()[ComponentLabel] == componentAgent
	})
	err = builder.ControllerManagedBy(mgr).Named("claims").
		For(&v1alpha1.VMClaim{}).
		Watches(&v1alpha1.WarmPool{}, handler.EnqueueRequestsFromMapFunc(s.pendingClaimsOf)).
		WithOptions(controller.Options{MaxConcurrentReconciles: 4}).
		Complete(reconcile.Func(s.reconcileClaim))
	if err != nil {
		return fmt.Errorf("controller: %w", err)
	}
	err = builder.ControllerManagedBy(mgr).Named("pools").
		For(&v1alpha1.WarmPool{}).
		Watches(&coordinationv1.Lease{}, handler.EnqueueRequestsFromMapFunc(allPools(s.c)), builder.WithPredicates(agentLeases, livenessChanged)).
		Watches(&corev1.Node{}, handler.EnqueueRequestsFromMapFunc(allPools(s.c))).
		WithOptions(controller.Options{MaxConcurrentReconciles: 2}).
		Complete(reconcile.Func(s.reconcilePool))
	if err != nil {
		return fmt.Errorf("controller: %w", err)
	}
	err = builder.ControllerManagedBy(mgr).Named("nodes").
		For(&coordinationv1.Lease{}, builder.WithPredicates(agentLeases, livenessChanged)).
		Complete(reconcile.Func(s.reconcileNode))
	if err != nil {
		return fmt.Errorf("controller: %w", err)
	}
	if opts.ready != nil {
		err := mgr.Add(manager.RunnableFunc(func(ctx context.Context) error {
			if mgr.GetCache().WaitForCacheSync(ctx) {
				opts.ready()
			}
			return nil
		}))
		if err != nil {
			return fmt.Errorf("controller: %w", err)
		}
	}
	s.log.Info("controller starting", "namespace", opts.Namespace, "leader_election", !opts.NoLeaderElection)
	if err := mgr.Start(ctx); err != nil {
		return fmt.Errorf("controller: %w", err)
	}
	return nil
}

// livenessChanged passes the heartbeat Lease events that change which
// nodes are live: a renewal of a current heartbeat changes nothing the
// pools or the lost-node check act on (each reconcile requeues itself for
// the expiry it saw, and then reads the renewed Lease), and would otherwise
// reconcile every pool at every renewal of every node.
var livenessChanged = predicate.Funcs{UpdateFunc: func(e event.UpdateEvent) bool {
	o, ok1 := e.ObjectOld.(*coordinationv1.Lease)
	n, ok2 := e.ObjectNew.(*coordinationv1.Lease)
	if !ok1 || !ok2 {
		return true
	}
	ol, okOld := livenessOf(o)
	nl, okNew := livenessOf(n)
	if !okOld || !okNew || ol.Node != nl.Node {
		return true
	}
	return !ol.live(n.Spec.RenewTime.Time) || nl.Expires.Before(ol.Expires)
}}

// liveness reads every node agent's heartbeat, by node.
func (s *controllerState) liveness(ctx context.Context) (map[string]nodeLiveness, error) {
	var leases coordinationv1.LeaseList
	if err := s.c.List(ctx, &leases, client.InNamespace(s.ns), client.MatchingLabels{ComponentLabel: componentAgent}, client.UnsafeDisableDeepCopy); err != nil {
		return nil, fmt.Errorf("list node agent Leases: %w", err)
	}
	out := map[string]nodeLiveness{}
	for i := range leases.Items {
		if n, ok := livenessOf(&leases.Items[i]); ok {
			out[n.Node] = n
		}
	}
	return out, nil
}

// freshLiveness reads one node agent's heartbeat from the API server,
// past the cache.
func (s *controllerState) freshLiveness(ctx context.Context, key types.NamespacedName) (nodeLiveness, bool, error) {
	var l coordinationv1.Lease
	if err := s.r.Get(ctx, key, &l); err != nil {
		if apierrors.IsNotFound(err) {
			return nodeLiveness{}, false, nil
		}
		return nodeLiveness{}, false, fmt.Errorf("get Lease %s: %w", key, err)
	}
	n, ok := livenessOf(&l)
	return n, ok, nil
}

// selectedLiveNodes are the live nodes a pool selects, in name order, and
// when the first of their heartbeats runs out.
func (s *controllerState) selectedLiveNodes(ctx context.Context, wp *v1alpha1.WarmPool, now time.Time) ([]string, time.Time, error) {
	live, err := s.liveness(ctx)
	if err != nil {
		return nil, time.Time{}, err
	}
	var nodes []string
	var soonest time.Time
	for name, n := range live {
		if !n.live(now) {
			continue
		}
		if len(wp.Spec.NodeSelector) > 0 {
			var node corev1.Node
			if err := s.c.Get(ctx, types.NamespacedName{Name: name}, &node); err != nil {
				if apierrors.IsNotFound(err) {
					continue
				}
				return nil, time.Time{}, fmt.Errorf("get node %s: %w", name, err)
			}
			if !selects(wp.Spec.NodeSelector, node.Labels) {
				continue
			}
		}
		nodes = append(nodes, name)
		if soonest.IsZero() || n.Expires.Before(soonest) {
			soonest = n.Expires
		}
	}
	slices.Sort(nodes)
	return nodes, soonest, nil
}

// pendingClaimsOf maps a WarmPool to the claims waiting for it.
func (s *controllerState) pendingClaimsOf(ctx context.Context, o client.Object) []reconcile.Request {
	var claims v1alpha1.VMClaimList
	if err := s.c.List(ctx, &claims, client.InNamespace(o.GetNamespace()), client.UnsafeDisableDeepCopy); err != nil {
		return nil
	}
	var reqs []reconcile.Request
	for _, c := range claims.Items {
		if c.Spec.PoolRef.Name == o.GetName() && c.Status.Node == "" && !c.Status.Phase.Terminal() {
			reqs = append(reqs, reconcile.Request{NamespacedName: types.NamespacedName{Namespace: c.Namespace, Name: c.Name}})
		}
	}
	return reqs
}

// reconcilePool judges a WarmPool's spec, gives each selected live node its
// target, and sums up what the nodes report.
func (s *controllerState) reconcilePool(ctx context.Context, req reconcile.Request) (reconcile.Result, error) {
	var wp v1alpha1.WarmPool
	if err := s.c.Get(ctx, req.NamespacedName, &wp); err != nil {
		return reconcile.Result{}, client.IgnoreNotFound(err)
	}
	now := time.Now()
	nodes, soonest, err := s.selectedLiveNodes(ctx, &wp, now)
	if err != nil {
		return reconcile.Result{}, err
	}
	problem := checkSpec(wp.Spec)
	targets := map[string]int32{}
	if problem == nil {
		var shares map[string]int32
		if wp.Spec.Replicas != nil {
			shares = splitReplicas(*wp.Spec.Replicas, nodes)
		}
		for _, n := range nodes {
			targets[n] = nodeTarget(wp.Spec, shares[n])
		}
	}
	st := wp.Status.DeepCopy()
	entries := map[string]any{}
	for name, e := range st.NodeStatus {
		if _, ok := targets[name]; !ok {
			entries[name] = nil // dead or no longer selected: counts for nothing
		} else if e.Target != targets[name] {
			entries[name] = map[string]any{"target": targets[name]}
		}
	}
	var replicas int32
	var filling, failing []string
	if problem != nil {
		nodes = nil
	}
	for _, n := range nodes {
		e, reported := st.NodeStatus[n]
		if !reported || e.Target != targets[n] {
			entries[n] = map[string]any{"target": targets[n]}
		}
		replicas += e.Ready
		switch {
		case e.Error != "":
			failing = append(failing, fmt.Sprintf("node %s: %s", n, e.Error))
		case e.Ready < targets[n]:
			filling = append(filling, fmt.Sprintf("%s %d/%d", n, e.Ready, targets[n]))
		}
	}
	conds := slices.Clone(st.Conditions)
	gen := wp.Generation
	if problem != nil {
		meta.SetStatusCondition(&conds, metav1.Condition{Type: CondAccepted, Status: metav1.ConditionFalse, Reason: problem.Reason, Message: problem.Message, ObservedGeneration: gen})
		meta.SetStatusCondition(&conds, metav1.Condition{Type: CondPoolReady, Status: metav1.ConditionFalse, Reason: "NotAccepted", Message: problem.Message, ObservedGeneration: gen})
	} else {
		meta.SetStatusCondition(&conds, metav1.Condition{Type: CondAccepted, Status: metav1.ConditionTrue, Reason: ReasonAccepted, Message: "the spec is valid", ObservedGeneration: gen})
		ready := metav1.Condition{Type: CondPoolReady, ObservedGeneration: gen, Status: metav1.ConditionFalse}
		switch {
		case len(nodes) == 0:
			ready.Reason, ready.Message = "NoNodes", "no live node agent on a node the pool selects"
		case len(failing) > 0:
			ready.Reason, ready.Message = "NodeError", strings.Join(failing, "; ")
		case len(filling) > 0:
			ready.Reason, ready.Message = "Filling", "ready/target: "+strings.Join(filling, ", ")
		default:
			ready.Status, ready.Reason, ready.Message = metav1.ConditionTrue, "AllNodesReady", fmt.Sprintf("%d ready VMs on %d nodes", replicas, len(nodes))
		}
		meta.SetStatusCondition(&conds, ready)
	}
	changed := len(entries) > 0 || st.ObservedGeneration != gen || st.Replicas != replicas || st.Nodes != int32(len(nodes)) || !sameConditions(st.Conditions, conds)
	var res reconcile.Result
	if !soonest.IsZero() {
		// The pool changes when the first heartbeat runs out; nothing else
		// would wake this reconcile then.
		res.RequeueAfter = soonest.Sub(now) + 50*time.Millisecond
	}
	if !changed {
		return res, nil
	}
	if len(entries) == 0 && st.ObservedGeneration == gen {
		// Only the sums and the Ready condition changed, which nothing
		// here acts on: while claims stream in, at most one such write per
		// pool every countsEvery, so the API server's writes go to claims.
		s.mu.Lock()
		wait := countsEvery - time.Since(s.countsWritten[req.NamespacedName])
		if wait <= 0 {
			s.countsWritten[req.NamespacedName] = time.Now()
		}
		s.mu.Unlock()
		if wait > 0 {
			return reconcile.Result{RequeueAfter: wait}, nil
		}
	}
	status := map[string]any{"observedGeneration": gen, "replicas": replicas, "nodes": len(nodes), "conditions": conds}
	if len(entries) > 0 {
		status["nodeStatus"] = entries
	}
	p, err := jsonMergePatch(map[string]any{"status": status})
	if err != nil {
		return reconcile.Result{}, err
	}
	if err := s.c.Status().Patch(ctx, &wp, p); err != nil {
		return reconcile.Result{}, client.IgnoreNotFound(fmt.Errorf("patch WarmPool %s status: %w", req.NamespacedName, err))
	}
	return res, nil
}

func sameConditions(a, b []metav1.Condition) bool {
	return slices.EqualFunc(a, b, func(x, y metav1.Condition) bool {
		return x.Type == y.Type && x.Status == y.Status && x.Reason == y.Reason && x.Message == y.Message && x.ObservedGeneration == y.ObservedGeneration
	})
}

// reconcileNode watches one node agent's heartbeat: when it runs out, the
// node's claims are Lost.
func (s *controllerState) reconcileNode(ctx context.Context, req reconcile.Request) (reconcile.Result, error) {
	var l coordinationv1.Lease
	err := s.c.Get(ctx, req.NamespacedName, &l)
	node := strings.TrimPrefix(req.Name, heartbeatPrefix)
	now := time.Now()
	expired := "its heartbeat Lease was deleted"
	if err == nil {
		n, ok := livenessOf(&l)
		if !ok {
			return reconcile.Result{}, nil
		}
		node = n.Node
		if n.live(now) {
			return reconcile.Result{RequeueAfter: n.Expires.Sub(now) + 50*time.Millisecond}, nil
		}
		// The cache may lag behind renewals on a busy API server: only
		// what the API server itself says declares a node lost.
		if fresh, ok, err := s.freshLiveness(ctx, req.NamespacedName); err != nil {
			return reconcile.Result{}, err
		} else if ok && fresh.live(now) {
			return reconcile.Result{RequeueAfter: fresh.Expires.Sub(now) + 50*time.Millisecond}, nil
		}
		expired = fmt.Sprintf("its heartbeat expired at %s (renewed %s, timeout %ds)",
			n.Expires.UTC().Format(time.RFC3339Nano), l.Spec.RenewTime.UTC().Format(time.RFC3339Nano), *l.Spec.LeaseDurationSeconds)
	} else if !apierrors.IsNotFound(err) {
		return reconcile.Result{}, err
	}
	return reconcile.Result{}, s.markLost(ctx, node, expired)
}

// markLost turns the Bound and Ready claims of node Lost.
func (s *controllerState) markLost(ctx context.Context, node, why string) error {
	var claims v1alpha1.VMClaimList
	if err := s.c.List(ctx, &claims); err != nil {
		return fmt.Errorf("list claims: %w", err)
	}
	var errs []error
	for i := range claims.Items {
		c := &claims.Items[i]
		if c.Status.Node != node || (c.Status.Phase != v1alpha1.ClaimBound && c.Status.Phase != v1alpha1.ClaimReady) {
			continue
		}
		errs = append(errs, s.setLost(ctx, c, why))
	}
	return errors.Join(errs...)
}

func (s *controllerState) setLost(ctx context.Context, c *v1alpha1.VMClaim, why string) error {
	node := c.Status.Node
	err := updateClaim(ctx, s.c, s.r, c, func(c *v1alpha1.VMClaim) (bool, error) {
		if c.Status.Node != node || (c.Status.Phase != v1alpha1.ClaimBound && c.Status.Phase != v1alpha1.ClaimReady) {
			return false, nil
		}
		c.Status.Phase = v1alpha1.ClaimLost
		meta.SetStatusCondition(&c.Status.Conditions, metav1.Condition{Type: CondReady, Status: metav1.ConditionFalse, Reason: "NodeLost",
			Message: fmt.Sprintf("node %s is lost: %s; its VM is never served again", node, why), ObservedGeneration: c.Generation})
		return true, nil
	}, true)
	if err == nil {
		s.log.Info("claim lost", "claim", client.ObjectKeyFromObject(c), "node", node)
	}
	return client.IgnoreNotFound(err)
}

// reconcileClaim binds a pending claim, or lets go of a deleted one nobody
// else will.
func (s *controllerState) reconcileClaim(ctx context.Context, req reconcile.Request) (reconcile.Result, error) {
	var c v1alpha1.VMClaim
	if err := s.c.Get(ctx, req.NamespacedName, &c); err != nil {
		return reconcile.Result{}, client.IgnoreNotFound(err)
	}
	now := time.Now()
	if c.Status.Node != "" {
		s.mu.Lock()
		delete(s.assumed, c.UID)
		s.mu.Unlock()
		live, err := s.liveness(ctx)
		if err != nil {
			return reconcile.Result{}, err
		}
		n, ok := live[c.Status.Node]
		alive := ok && n.live(now)
		if !alive && ok {
			fresh, found, err := s.freshLiveness(ctx, types.NamespacedName{Namespace: s.ns, Name: heartbeatName(c.Status.Node)})
			if err != nil {
				return reconcile.Result{}, err
			}
			alive = found && fresh.live(now)
		}
		if !alive && (c.Status.Phase == v1alpha1.ClaimBound || c.Status.Phase == v1alpha1.ClaimReady) {
			return reconcile.Result{}, s.setLost(ctx, &c, "its heartbeat is not current")
		}
		if !c.DeletionTimestamp.IsZero() && !alive {
			// Its node cannot release the VM now; it releases it when it
			// comes back and finds the claim gone.
			return reconcile.Result{}, s.removeFinalizer(ctx, &c)
		}
		return reconcile.Result{}, nil
	}
	if !c.DeletionTimestamp.IsZero() {
		return reconcile.Result{}, s.removeFinalizer(ctx, &c)
	}
	if c.Status.Phase.Terminal() {
		return reconcile.Result{}, nil
	}
	s.mu.Lock()
	_, bound := s.assumed[c.UID]
	s.mu.Unlock()
	if bound {
		return reconcile.Result{}, nil
	}
	pool := types.NamespacedName{Namespace: c.Namespace, Name: c.Spec.PoolRef.Name}
	var wp v1alpha1.WarmPool
	if err := s.c.Get(ctx, pool, &wp); err != nil {
		if apierrors.IsNotFound(err) {
			return reconcile.Result{}, s.setPending(ctx, &c, "PoolNotFound", fmt.Sprintf("WarmPool %s not found in namespace %s", pool.Name, pool.Namespace))
		}
		return reconcile.Result{}, err
	}
	if p := checkSpec(wp.Spec); p != nil {
		return reconcile.Result{}, s.setPending(ctx, &c, "PoolNotAccepted", fmt.Sprintf("WarmPool %s is not accepted: %s", pool.Name, p.Message))
	}
	nodes, _, err := s.selectedLiveNodes(ctx, &wp, now)
	if err != nil {
		return reconcile.Result{}, err
	}
	node, ok, err := s.choose(ctx, &c, &wp, nodes)
	if err != nil {
		return reconcile.Result{}, err
	}
	if !ok {
		msg := fmt.Sprintf("no live node has a ready VM of WarmPool %s (%d live nodes selected)", pool.Name, len(nodes))
		// The pool's status changes when a node's count does, and brings
		// the claim back; the requeue is for a missed event.
		return reconcile.Result{RequeueAfter: 5 * time.Second}, s.setPending(ctx, &c, "NoReadyVM", msg)
	}
	err = s.bind(ctx, &c, node, wp.Status.NodeStatus[node].Ready)
	if err != nil {
		s.mu.Lock()
		delete(s.assumed, c.UID)
		s.mu.Unlock()
		if apierrors.IsConflict(err) {
			return reconcile.Result{RequeueAfter: 10 * time.Millisecond}, nil
		}
		return reconcile.Result{}, client.IgnoreNotFound(err)
	}
	return reconcile.Result{}, nil
}

// choose picks c's node among nodes and assumes the binding, under one lock
// so that concurrent bindings count each other.
func (s *controllerState) choose(ctx context.Context, c *v1alpha1.VMClaim, wp *v1alpha1.WarmPool, nodes []string) (string, bool, error) {
	var claims v1alpha1.VMClaimList
	// Only read: the cache's own objects, not a copy of every claim per
	// binding.
	if err := s.c.List(ctx, &claims, client.InNamespace(c.Namespace), client.UnsafeDisableDeepCopy); err != nil {
		return "", false, fmt.Errorf("list claims: %w", err)
	}
	pool := types.NamespacedName{Namespace: wp.Namespace, Name: wp.Name}
	cands := map[string]*candidate{}
	for _, n := range nodes {
		cands[n] = &candidate{Node: n, Ready: wp.Status.NodeStatus[n].Ready}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	seen := map[types.UID]bool{}
	for _, o := range claims.Items {
		seen[o.UID] = true
		if o.Status.Node != "" {
			delete(s.assumed, o.UID) // the cache has caught up
		}
		if o.Spec.PoolRef.Name != wp.Name || o.Status.Node == "" {
			continue
		}
		if cd := cands[o.Status.Node]; cd != nil {
			switch o.Status.Phase {
			case v1alpha1.ClaimBound:
				cd.Inflight++
			case v1alpha1.ClaimReady:
				cd.Serving++
			}
		}
	}
	for uid, a := range s.assumed {
		if !seen[uid] && a.pool.Namespace == c.Namespace {
			delete(s.assumed, uid) // deleted meanwhile
			continue
		}
		if cd := cands[a.node]; cd != nil && a.pool == pool {
			cd.Inflight++
		}
	}
	list := make([]candidate, 0, len(cands))
	for _, n := range slices.Sorted(maps.Keys(cands)) {
		list = append(list, *cands[n])
	}
	node, ok := chooseNode(list)
	if ok {
		s.assumed[c.UID] = assumption{node: node, pool: pool}
	}
	return node, ok, nil
}

func (s *controllerState) bind(ctx context.Context, c *v1alpha1.VMClaim, node string, ready int32) error {
	now := metav1.NewMicroTime(time.Now())
	c.Status.Phase, c.Status.Node, c.Status.BoundTime = v1alpha1.ClaimBound, node, &now
	c.Status.ObservedGeneration = c.Generation
	meta.SetStatusCondition(&c.Status.Conditions, metav1.Condition{Type: CondBound, Status: metav1.ConditionTrue, Reason: "Bound",
		Message: fmt.Sprintf("bound to node %s, which reported %d ready", node, ready), ObservedGeneration: c.Generation})
	meta.SetStatusCondition(&c.Status.Conditions, metav1.Condition{Type: CondReady, Status: metav1.ConditionFalse, Reason: "Acquiring",
		Message: fmt.Sprintf("node %s is handing a VM over", node), ObservedGeneration: c.Generation})
	if err := s.c.Status().Update(ctx, c); err != nil {
		return fmt.Errorf("bind claim %s to node %s: %w", client.ObjectKeyFromObject(c), node, err)
	}
	return nil
}

// setPending records why a claim waits, writing only what changed.
func (s *controllerState) setPending(ctx context.Context, c *v1alpha1.VMClaim, reason, msg string) error {
	err := updateClaim(ctx, s.c, s.r, c, func(c *v1alpha1.VMClaim) (bool, error) {
		if c.Status.Node != "" || c.Status.Phase.Terminal() {
			return false, nil
		}
		cond := metav1.Condition{Type: CondBound, Status: metav1.ConditionFalse, Reason: reason, Message: msg, ObservedGeneration: c.Generation}
		old := meta.FindStatusCondition(c.Status.Conditions, CondBound)
		if c.Status.Phase == v1alpha1.ClaimPending && old != nil && old.Reason == reason && old.Message == msg && old.Status == cond.Status {
			return false, nil
		}
		c.Status.Phase = v1alpha1.ClaimPending
		c.Status.ObservedGeneration = c.Generation
		meta.SetStatusCondition(&c.Status.Conditions, cond)
		return true, nil
	}, true)
	return client.IgnoreNotFound(err)
}

func (s *controllerState) removeFinalizer(ctx context.Context, c *v1alpha1.VMClaim) error {
	err := updateClaim(ctx, s.c, s.r, c, func(c *v1alpha1.VMClaim) (bool, error) {
		return controllerutil.RemoveFinalizer(c, Finalizer), nil
	}, false)
	return client.IgnoreNotFound(err)
}
