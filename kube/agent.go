package kube

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"strings"
	"sync"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/util/workqueue"
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
	"sigs.k8s.io/controller-runtime/pkg/source"

	"github.com/warmpool/warmpool/api"
	"github.com/warmpool/warmpool/kube/v1alpha1"
	"github.com/warmpool/warmpool/vm"
)

// AgentOptions configure a node agent.
type AgentOptions struct {
	// Config reaches the API server.
	Config *rest.Config
	// Backend is the node's daemon.
	Backend api.Backend
	// Node is the node's name (the DaemonSet passes spec.nodeName).
	Node string
	// Namespace holds the heartbeat Leases (default warmpool-system).
	Namespace string
	// HeartbeatInterval is how often the Lease is renewed (default 10s);
	// HeartbeatTimeout is how long the controller waits after a renewal
	// before it declares the node lost (default 40s, whole seconds).
	HeartbeatInterval, HeartbeatTimeout time.Duration
	// ReportInterval is how often the ready counts are compared with what
	// the WarmPools' status says (default 250ms; only changes are written).
	ReportInterval time.Duration
	// AuditInterval is how often the claims this node serves are checked
	// against the daemon's leases (default 30s): a Ready claim whose lease
	// vanished fails with LeaseGone, a lease whose claim is gone or over
	// is released.
	AuditInterval time.Duration
	// AcquireWait bounds the wait for a ready VM of a bound claim before the
	// claim goes back to Pending for another node (default 30s).
	AcquireWait time.Duration
	// Images builds the images of WarmPools whose image is not busybox;
	// without it such pools report an error in this node's entry.
	Images ImageBuilder
	Logger *slog.Logger
	// WatchNamespace, when set, limits the WarmPools and VMClaims seen
	// to that namespace (a cluster shared with other warmpool
	// installations, or tests sharing one API server).
	WatchNamespace string
}

func (o *AgentOptions) setDefaults() error {
	if o.Config == nil || o.Backend == nil {
		return errors.New("node agent: Config and Backend are required")
	}
	if o.Node == "" {
		return errors.New("node agent: the node name is required (--node, or NODE_NAME)")
	}
	o.Namespace = cmp.Or(o.Namespace, DefaultNamespace)
	o.HeartbeatInterval = cmp.Or(o.HeartbeatInterval, 10*time.Second)
	o.HeartbeatTimeout = cmp.Or(o.HeartbeatTimeout, 40*time.Second)
	if o.HeartbeatTimeout < time.Second || o.HeartbeatTimeout <= o.HeartbeatInterval {
		return fmt.Errorf("node agent: heartbeat timeout %s must be at least 1s and longer than the interval %s", o.HeartbeatTimeout, o.HeartbeatInterval)
	}
	o.ReportInterval = cmp.Or(o.ReportInterval, 250*time.Millisecond)
	o.AcquireWait = cmp.Or(o.AcquireWait, 30*time.Second)
	o.AuditInterval = cmp.Or(o.AuditInterval, 30*time.Second)
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	return nil
}

// agent is one node agent.
type agent struct {
	opts   AgentOptions
	b      api.Backend
	log    *slog.Logger
	c      client.Client // cached reads, writes
	direct client.Client // uncached: heartbeats and conflict retries

	mu sync.Mutex
	// served is every daemon lease this agent holds for a claim, by claim.
	served map[types.UID]api.Lease
	// pools is what the agent keeps in its daemon, by local pool name.
	pools map[string]*localPool
	// reported is the node status last written, by local pool name.
	reported map[string]v1alpha1.NodePoolStatus
	poke     chan struct{}
	// recheck brings a claim to reconcileClaim outside the API server's
	// events: the audit found its lease gone.
	recheck chan event.GenericEvent
	// lastLease is the heartbeat Lease as last written (heartbeat only).
	lastLease *coordinationv1.Lease
}

// localPool is a WarmPool as this node keeps it.
type localPool struct {
	ref        types.NamespacedName
	generation int64
	target     int32
	// image is the image built for it and imageDir where it is.
	image    ImageRequest
	imageDir string
	// built is the template shape built for it; applied the pool set.
	built   api.TemplateRequest
	applied api.PoolRequest
	// err is why the node cannot keep the pool (a failed template build).
	err string
}

// RunAgent runs a node agent until ctx ends.
func RunAgent(ctx context.Context, opts AgentOptions) error {
	if err := opts.setDefaults(); err != nil {
		return err
	}
	a := &agent{
		opts: opts, b: opts.Backend, log: opts.Logger.With("component", "kube-agent", "node", opts.Node),
		served: map[types.UID]api.Lease{}, pools: map[string]*localPool{},
		reported: map[string]v1alpha1.NodePoolStatus{}, poke: make(chan struct{}, 1),
		recheck: make(chan event.GenericEvent, 64),
	}
	cfg := clientConfig(opts.Config)
	mopts, err := managerOptions(opts.Logger, func(o *manager.Options) {
		// Only this node's Node object: its labels decide what it keeps.
		o.Cache.ByObject = map[client.Object]cache.ByObject{
			&corev1.Node{}: {Field: fields.OneTermEqualSelector("metadata.name", opts.Node)},
		}
		if opts.WatchNamespace != "" {
			o.Cache.DefaultNamespaces = map[string]cache.Config{opts.WatchNamespace: {}}
		}
	})
	if err != nil {
		return err
	}
	mgr, err := manager.New(cfg, mopts)
	if err != nil {
		return fmt.Errorf("node agent: %w", err)
	}
	a.c = mgr.GetClient()
	if a.direct, err = client.New(cfg, client.Options{Scheme: mgr.GetScheme()}); err != nil {
		return fmt.Errorf("node agent: %w", err)
	}
	// The leases of an earlier run are known before any claim is looked
	// at, so that a claim whose VM this node already holds is adopted, not
	// served a second VM.
	leases, err := a.b.Leases(ctx)
	if err != nil {
		return fmt.Errorf("node agent: list the daemon's leases: %w", err)
	}
	for _, l := range leases {
		if _, _, uid, ok := claimOfLease(l); ok {
			a.served[uid] = l
		}
	}
	mine := predicate.NewPredicateFuncs(func(o client.Object) bool {
		c, ok := o.(*v1alpha1.VMClaim)
		return ok && c.Status.Node == opts.Node
	})
	err = builder.ControllerManagedBy(mgr).Named("node-claims").
		For(&v1alpha1.VMClaim{}, builder.WithPredicates(mine)).
		WatchesRawSource(source.Channel(a.recheck, &handler.EnqueueRequestForObject{})).
		WithOptions(controller.Options{MaxConcurrentReconciles: 16}).
		Complete(reconcile.Func(a.reconcileClaim))
	if err != nil {
		return fmt.Errorf("node agent: %w", err)
	}
	err = builder.ControllerManagedBy(mgr).Named("node-pools").
		For(&v1alpha1.WarmPool{}).
		Watches(&corev1.Node{}, handler.EnqueueRequestsFromMapFunc(allPools(a.c))).
		WithOptions(controller.Options{
			MaxConcurrentReconciles: 2,
			RateLimiter:             workqueue.NewTypedItemExponentialFailureRateLimiter[reconcile.Request](time.Second, 5*time.Minute),
		}).
		Complete(reconcile.Func(a.reconcilePool))
	if err != nil {
		return fmt.Errorf("node agent: %w", err)
	}
	for _, r := range []manager.RunnableFunc{a.heartbeat, a.report, a.audit} {
		if err := mgr.Add(r); err != nil {
			return fmt.Errorf("node agent: %w", err)
		}
	}
	a.log.Info("node agent starting", "namespace", opts.Namespace, "adopting", len(a.served))
	if err := mgr.Start(ctx); err != nil {
		return fmt.Errorf("node agent: %w", err)
	}
	return nil
}

// heartbeat renews the node's Lease every interval until ctx ends.
func (a *agent) heartbeat(ctx context.Context) error {
	t := time.NewTicker(a.opts.HeartbeatInterval)
	defer t.Stop()
	for {
		if err := a.renew(ctx); err != nil && ctx.Err() == nil {
			a.log.Warn("renew heartbeat", "err", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

func (a *agent) renew(ctx context.Context) error {
	now := metav1.NewMicroTime(time.Now())
	secs := int32((a.opts.HeartbeatTimeout + time.Second - 1) / time.Second)
	key := types.NamespacedName{Namespace: a.opts.Namespace, Name: heartbeatName(a.opts.Node)}
	if l := a.lastLease; l != nil && l.Spec.HolderIdentity != nil && *l.Spec.HolderIdentity == a.opts.Node {
		// One request per renewal: the Lease as this agent last wrote it.
		l.Spec.RenewTime = &now
		if err := a.direct.Update(ctx, l); err == nil {
			return nil
		}
		a.lastLease = nil
	}
	var l coordinationv1.Lease
	err := a.direct.Get(ctx, key, &l)
	if apierrors.IsNotFound(err) {
		l = coordinationv1.Lease{
			ObjectMeta: metav1.ObjectMeta{Namespace: key.Namespace, Name: key.Name, Labels: map[string]string{ComponentLabel: componentAgent}},
			Spec:       coordinationv1.LeaseSpec{HolderIdentity: &a.opts.Node, LeaseDurationSeconds: &secs, AcquireTime: &now, RenewTime: &now},
		}
		if err := a.direct.Create(ctx, &l); err != nil {
			return fmt.Errorf("create Lease %s: %w", key, err)
		}
		a.lastLease = &l
		return nil
	}
	if err != nil {
		return fmt.Errorf("get Lease %s: %w", key, err)
	}
	if l.Spec.HolderIdentity == nil || *l.Spec.HolderIdentity != a.opts.Node || l.Spec.RenewTime == nil ||
		now.Sub(l.Spec.RenewTime.Time) > time.Duration(*cmp.Or(l.Spec.LeaseDurationSeconds, &secs))*time.Second {
		l.Spec.AcquireTime = &now
	}
	l.Spec.HolderIdentity, l.Spec.LeaseDurationSeconds, l.Spec.RenewTime = &a.opts.Node, &secs, &now
	if l.Labels == nil {
		l.Labels = map[string]string{}
	}
	l.Labels[ComponentLabel] = componentAgent
	if err := a.direct.Update(ctx, &l); err != nil {
		return fmt.Errorf("renew Lease %s: %w", key, err)
	}
	a.lastLease = &l
	return nil
}

// audit runs once the caches are in and then every AuditInterval: it
// releases the daemon leases whose claims are gone, were bound elsewhere or
// are over (Lost included: a claim declared lost is never served again),
// and sends the Ready claims whose lease the daemon no longer has to
// reconcileClaim, which ends them (LeaseGone, or TTLExpired when the
// daemon's TTL took it). The first run also removes the daemon pools no
// WarmPool asks of this node any more.
func (a *agent) audit(ctx context.Context) error {
	if err := a.dropUnwantedPools(ctx); err != nil && ctx.Err() == nil {
		a.log.Warn("remove unwanted pools", "err", err)
	}
	t := time.NewTicker(a.opts.AuditInterval)
	defer t.Stop()
	for {
		if err := a.auditLeases(ctx); err != nil && ctx.Err() == nil {
			a.log.Warn("audit leases", "err", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

func (a *agent) auditLeases(ctx context.Context) error {
	// What this agent serves is read before the daemon's leases, so that a
	// lease acquired in between is not taken for one that vanished.
	a.mu.Lock()
	before := maps.Clone(a.served)
	a.mu.Unlock()
	leases, err := a.b.Leases(ctx)
	if err != nil {
		return fmt.Errorf("list the daemon's leases: %w", err)
	}
	// The claims are read after the leases: a lease is only taken for a
	// claim already in the cache, so a claim missing here is gone.
	var claims v1alpha1.VMClaimList
	if err := a.c.List(ctx, &claims); err != nil {
		return fmt.Errorf("list claims: %w", err)
	}
	byUID := map[types.UID]*v1alpha1.VMClaim{}
	for i := range claims.Items {
		byUID[claims.Items[i].UID] = &claims.Items[i]
	}
	held := map[string]bool{}
	var orphans []api.Lease
	for _, l := range leases {
		held[l.ID] = true
		_, _, uid, ok := claimOfLease(l)
		if !ok {
			continue // not a claim's: someone's own acquire on this daemon
		}
		c := byUID[uid]
		if c == nil || c.Status.Node != a.opts.Node || c.Status.Phase.Terminal() || c.Status.Phase == v1alpha1.ClaimPending ||
			(c.Status.Phase == v1alpha1.ClaimReady && c.Status.LeaseID != l.ID) {
			orphans = append(orphans, l)
		}
	}
	var vanished []*v1alpha1.VMClaim
	a.mu.Lock()
	for _, l := range orphans {
		if s, ok := a.served[types.UID(l.Labels[LabelClaimUID])]; ok && s.ID == l.ID {
			delete(a.served, types.UID(l.Labels[LabelClaimUID]))
		}
	}
	for uid, l := range before {
		if !held[l.ID] {
			if s, ok := a.served[uid]; ok && s.ID == l.ID {
				delete(a.served, uid)
			}
			if c := byUID[uid]; c != nil && c.Status.Phase == v1alpha1.ClaimReady && c.Status.LeaseID == l.ID {
				vanished = append(vanished, c)
			}
		}
	}
	a.mu.Unlock()
	var errs []error
	for _, l := range orphans {
		if err := a.b.Release(ctx, l.ID); err != nil {
			errs = append(errs, fmt.Errorf("release lease %s of claim %s: %w", l.ID, l.Labels[LabelClaim], err))
			continue
		}
		a.log.Info("released a lease whose claim no longer wants it", "lease", l.ID, "claim", l.Labels[LabelClaim])
	}
	if len(orphans) > 0 {
		a.pokeReport()
	}
	for _, c := range vanished {
		a.log.Warn("the daemon no longer has a Ready claim's lease", "claim", client.ObjectKeyFromObject(c), "lease", c.Status.LeaseID)
		select {
		case a.recheck <- event.GenericEvent{Object: c}:
		case <-ctx.Done():
			return nil
		}
	}
	return errors.Join(errs...)
}

// dropUnwantedPools removes the daemon pools an earlier run kept for
// WarmPools that are gone.
func (a *agent) dropUnwantedPools(ctx context.Context) error {
	var wps v1alpha1.WarmPoolList
	if err := a.c.List(ctx, &wps); err != nil {
		return fmt.Errorf("list WarmPools: %w", err)
	}
	want := map[string]bool{}
	for _, wp := range wps.Items {
		want[localName(wp.Namespace, wp.Name)] = true
	}
	pools, err := a.b.Pools(ctx)
	if err != nil {
		return fmt.Errorf("list the daemon's pools: %w", err)
	}
	var errs []error
	for _, p := range pools {
		if strings.HasPrefix(p.Name, localPrefix) && !want[p.Name] {
			if err := a.b.DeletePool(ctx, p.Name); err != nil && !errors.Is(err, vm.ErrNotFound) {
				errs = append(errs, fmt.Errorf("remove pool %s: %w", p.Name, err))
			}
		}
	}
	return errors.Join(errs...)
}

// reconcilePool keeps the daemon's template and pool of one WarmPool as the
// WarmPool and this node's labels ask.
func (a *agent) reconcilePool(ctx context.Context, req reconcile.Request) (reconcile.Result, error) {
	local := localName(req.Namespace, req.Name)
	var wp v1alpha1.WarmPool
	err := a.c.Get(ctx, req.NamespacedName, &wp)
	if apierrors.IsNotFound(err) {
		return reconcile.Result{}, a.dropPool(ctx, local)
	}
	if err != nil {
		return reconcile.Result{}, err
	}
	var node corev1.Node
	if err := a.c.Get(ctx, types.NamespacedName{Name: a.opts.Node}, &node); err != nil && !apierrors.IsNotFound(err) {
		return reconcile.Result{}, err
	}
	if !wp.DeletionTimestamp.IsZero() || !selects(wp.Spec.NodeSelector, node.Labels) || checkSpec(wp.Spec) != nil {
		return reconcile.Result{}, a.dropPool(ctx, local)
	}
	target := nodeTarget(wp.Spec, wp.Status.NodeStatus[a.opts.Node].Target)
	img, ownImage := imageOf(wp.Spec)
	a.mu.Lock()
	lp := a.pools[local]
	if lp == nil {
		lp = &localPool{ref: req.NamespacedName}
		a.pools[local] = lp
	}
	lp.generation, lp.target = wp.Generation, target
	dir := ""
	if ownImage && lp.imageDir != "" && lp.image.equal(img) {
		dir = lp.imageDir
	}
	a.mu.Unlock()
	if ownImage && dir == "" {
		var err error
		if dir, err = a.buildImage(ctx, img); err != nil {
			a.setPoolError(local, err.Error())
			a.pokeReport()
			return reconcile.Result{}, err
		}
		a.mu.Lock()
		lp.image, lp.imageDir = img, dir
		a.mu.Unlock()
	}
	tmpl := localTemplateRequest(wp.Spec, local, dir)
	a.mu.Lock()
	built := lp.built == tmpl
	a.mu.Unlock()
	if !built {
		if err := a.ensureTemplate(ctx, tmpl); err != nil {
			a.setPoolError(local, err.Error())
			a.pokeReport()
			return reconcile.Result{}, err
		}
		a.mu.Lock()
		lp.built = tmpl
		a.mu.Unlock()
	}
	preq := localPoolRequest(wp.Spec, local, target)
	a.mu.Lock()
	same := lp.applied.Equal(preq)
	a.mu.Unlock()
	if !same {
		if _, err := a.b.SetPool(ctx, local, preq); err != nil {
			a.setPoolError(local, err.Error())
			a.pokeReport()
			return reconcile.Result{}, fmt.Errorf("set pool %s: %w", local, err)
		}
		a.log.Info("pool set", "warmpool", req.NamespacedName, "pool", local, "min", preq.Min, "max", preq.Max)
	}
	a.mu.Lock()
	lp.applied, lp.err = preq, ""
	a.mu.Unlock()
	a.pokeReport()
	return reconcile.Result{}, nil
}

// buildImage builds img on this node (a debian suite takes minutes the
// first time; the same inputs again come from the image cache).
func (a *agent) buildImage(ctx context.Context, img ImageRequest) (string, error) {
	if a.opts.Images == nil {
		return "", fmt.Errorf("image %s: this node agent runs without an image builder", img.Source)
	}
	start := time.Now()
	a.log.Info("building image", "source", img.Source, "packages", img.Packages)
	dir, err := a.opts.Images(ctx, img)
	if err != nil {
		return "", fmt.Errorf("build image: %w", err)
	}
	a.log.Info("image built", "source", img.Source, "dir", dir, "ms", time.Since(start).Milliseconds())
	return dir, nil
}

// ensureTemplate builds tmpl unless the daemon has a template of that name
// and shape already (from an earlier run).
func (a *agent) ensureTemplate(ctx context.Context, tmpl api.TemplateRequest) error {
	have, err := a.b.Templates(ctx)
	if err != nil {
		return fmt.Errorf("list templates: %w", err)
	}
	for _, t := range have {
		if t.Name == tmpl.Name && sameShape(t, tmpl) {
			return nil
		}
	}
	start := time.Now()
	a.log.Info("building template", "template", tmpl.Name, "image", tmpl.Image, "disk_mib", tmpl.DiskMiB)
	if _, err := a.b.BuildTemplate(ctx, tmpl, func(string) {}); err != nil {
		return fmt.Errorf("build template %s: %w", tmpl.Name, err)
	}
	a.log.Info("template built", "template", tmpl.Name, "ms", time.Since(start).Milliseconds())
	return nil
}

// sameShape reports whether the daemon's template t is what req would
// build: zero fields of req stand for the daemon's defaults.
func sameShape(t api.Template, req api.TemplateRequest) bool {
	if (req.VCPUs != 0 && t.VCPUs != req.VCPUs) || (req.MemoryMiB != 0 && t.MemoryMiB != req.MemoryMiB) {
		return false
	}
	if req.Image == "" {
		return t.ImageSource == "" || t.ImageSource == "busybox"
	}
	return t.Image == req.Image && (req.DiskMiB == 0 || t.DiskMiB == req.DiskMiB)
}

func (a *agent) setPoolError(local, msg string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if lp := a.pools[local]; lp != nil {
		lp.err = msg
	}
}

// dropPool removes the daemon pool of a WarmPool this node no longer keeps;
// leases taken from it stay with their claims.
func (a *agent) dropPool(ctx context.Context, local string) error {
	a.mu.Lock()
	_, had := a.pools[local]
	delete(a.pools, local)
	delete(a.reported, local)
	a.mu.Unlock()
	if err := a.b.DeletePool(ctx, local); err != nil && !errors.Is(err, vm.ErrNotFound) {
		return fmt.Errorf("remove pool %s: %w", local, err)
	}
	if had {
		a.log.Info("pool removed", "pool", local)
	}
	return nil
}

func (a *agent) pokeReport() {
	select {
	case a.poke <- struct{}{}:
	default:
	}
}

// report writes this node's entry of each kept WarmPool's status whenever
// the daemon's counts changed.
func (a *agent) report(ctx context.Context) error {
	t := time.NewTicker(a.opts.ReportInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		case <-a.poke:
		}
		if err := a.reportOnce(ctx); err != nil && ctx.Err() == nil {
			a.log.Warn("report pool status", "err", err)
		}
	}
}

func (a *agent) reportOnce(ctx context.Context) error {
	pools, err := a.b.Pools(ctx)
	if err != nil {
		return fmt.Errorf("list the daemon's pools: %w", err)
	}
	byName := map[string]api.Pool{}
	for _, p := range pools {
		byName[p.Name] = p
	}
	type pending struct {
		local string
		ref   types.NamespacedName
		st    v1alpha1.NodePoolStatus
		sent  bool
	}
	var todo []pending
	a.mu.Lock()
	for local, lp := range a.pools {
		p := byName[local]
		st := v1alpha1.NodePoolStatus{
			Ready: int32(p.Ready), Restoring: int32(p.Restoring), Leased: int32(p.Leased),
			ObservedGeneration: lp.generation, Error: lp.err,
		}
		if st.Error == "" && p.LastError != nil {
			st.Error = *p.LastError
		}
		prev, sent := a.reported[local]
		todo = append(todo, pending{local, lp.ref, st, sent && prev == st})
	}
	a.mu.Unlock()
	var errs []error
	for _, p := range todo {
		if p.sent && !a.entryDiffers(ctx, p.ref, p.st) {
			continue
		}
		if err := a.patchNodeStatus(ctx, p.ref, p.st); err != nil {
			if !apierrors.IsNotFound(err) {
				errs = append(errs, err)
			}
			continue
		}
		a.mu.Lock()
		if _, kept := a.pools[p.local]; kept {
			a.reported[p.local] = p.st
		}
		a.mu.Unlock()
	}
	return errors.Join(errs...)
}

// entryDiffers reports whether the WarmPool's status, as the cache has it,
// says something else about this node than st: the controller removed the
// entry while the node was lost, say. Right after a patch the cache lags
// and this repeats the patch once, which changes nothing.
func (a *agent) entryDiffers(ctx context.Context, ref types.NamespacedName, st v1alpha1.NodePoolStatus) bool {
	var wp v1alpha1.WarmPool
	if err := a.c.Get(ctx, ref, &wp); err != nil {
		return false
	}
	e, ok := wp.Status.NodeStatus[a.opts.Node]
	if !ok {
		return true
	}
	written := e.UpdateTime
	e.Target, e.UpdateTime = 0, nil
	return e != st && (written == nil || time.Since(written.Time) > time.Second)
}

// patchNodeStatus merges this node's entry into a WarmPool's status. A merge
// patch of the one map entry leaves the other nodes' entries and the
// controller's target alone, so no writer waits for another.
func (a *agent) patchNodeStatus(ctx context.Context, ref types.NamespacedName, st v1alpha1.NodePoolStatus) error {
	entry := map[string]any{
		"ready": st.Ready, "restoring": st.Restoring, "leased": st.Leased,
		"observedGeneration": st.ObservedGeneration, "updateTime": metav1.NewMicroTime(time.Now()), "error": nil,
	}
	if st.Error != "" {
		entry["error"] = st.Error
	}
	patch := map[string]any{"status": map[string]any{"nodeStatus": map[string]any{a.opts.Node: entry}}}
	wp := &v1alpha1.WarmPool{ObjectMeta: metav1.ObjectMeta{Namespace: ref.Namespace, Name: ref.Name}}
	p, err := jsonMergePatch(patch)
	if err != nil {
		return err
	}
	if err := a.c.Status().Patch(ctx, wp, p); err != nil {
		return fmt.Errorf("patch WarmPool %s status of node %s: %w", ref, a.opts.Node, err)
	}
	return nil
}

// servedLease returns the lease held for claim uid.
func (a *agent) servedLease(uid types.UID) (api.Lease, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	l, ok := a.served[uid]
	return l, ok
}

// releaseServed releases the lease held for claim uid, if any.
func (a *agent) releaseServed(ctx context.Context, uid types.UID) error {
	l, ok := a.servedLease(uid)
	if !ok {
		return nil
	}
	if err := a.b.Release(ctx, l.ID); err != nil {
		return fmt.Errorf("release lease %s: %w", l.ID, err)
	}
	a.mu.Lock()
	delete(a.served, uid)
	a.mu.Unlock()
	a.pokeReport()
	a.log.Info("lease released", "lease", l.ID, "claim", l.Labels[LabelClaim])
	return nil
}

// reconcileClaim carries out a claim bound to this node.
func (a *agent) reconcileClaim(ctx context.Context, req reconcile.Request) (reconcile.Result, error) {
	var c v1alpha1.VMClaim
	err := a.c.Get(ctx, req.NamespacedName, &c)
	if apierrors.IsNotFound(err) {
		// Deleted without this node's finalizer (before it was added):
		// whatever this node holds for that name goes.
		return reconcile.Result{}, a.releaseByName(ctx, req.NamespacedName)
	}
	if err != nil {
		return reconcile.Result{}, err
	}
	if c.Status.Node != a.opts.Node {
		return reconcile.Result{}, nil
	}
	switch {
	case !c.DeletionTimestamp.IsZero():
		if err := a.releaseServed(ctx, c.UID); err != nil {
			return reconcile.Result{}, err
		}
		return reconcile.Result{}, a.removeFinalizer(ctx, &c)
	case c.Status.Phase.Terminal():
		if err := a.releaseServed(ctx, c.UID); err != nil {
			return reconcile.Result{}, err
		}
		return reconcile.Result{}, a.removeFinalizer(ctx, &c)
	case c.Status.Phase == v1alpha1.ClaimReady:
		return a.keepReady(ctx, &c)
	case c.Status.Phase == v1alpha1.ClaimBound:
		if l, ok := a.servedLease(c.UID); ok {
			// Acquired by an earlier run that died before it wrote Ready.
			return reconcile.Result{}, a.markReady(ctx, &c, l, time.Now())
		}
		return reconcile.Result{}, a.acquire(ctx, &c)
	}
	return reconcile.Result{}, nil
}

// releaseByName releases what this node holds for a claim that is gone.
func (a *agent) releaseByName(ctx context.Context, name types.NamespacedName) error {
	a.mu.Lock()
	var uids []types.UID
	for uid, l := range a.served {
		if ns, n, _, ok := claimOfLease(l); ok && ns == name.Namespace && n == name.Name {
			uids = append(uids, uid)
		}
	}
	a.mu.Unlock()
	var errs []error
	for _, uid := range uids {
		errs = append(errs, a.releaseServed(ctx, uid))
	}
	return errors.Join(errs...)
}

// keepReady checks on a Ready claim: its TTL, and that the daemon still has
// its lease.
func (a *agent) keepReady(ctx context.Context, c *v1alpha1.VMClaim) (reconcile.Result, error) {
	l, ok := a.servedLease(c.UID)
	if !ok || l.ID != c.Status.LeaseID {
		if ok {
			// A lease for the claim that its status does not name: an
			// acquire whose Ready write lost a race. It serves nobody.
			if err := a.releaseServed(ctx, c.UID); err != nil {
				return reconcile.Result{}, err
			}
		}
		if c.Status.ExpireTime != nil && !time.Now().Before(c.Status.ExpireTime.Time) {
			// The daemon's own TTL ran out while this agent was away.
			return reconcile.Result{}, a.finish(ctx, c, v1alpha1.ClaimReleased, "TTLExpired",
				fmt.Sprintf("the TTL of %s ran out; lease %s released", c.Spec.TTL.Duration, c.Status.LeaseID))
		}
		return reconcile.Result{}, a.finish(ctx, c, v1alpha1.ClaimFailed, "LeaseGone",
			fmt.Sprintf("node %s's daemon no longer has lease %s", a.opts.Node, c.Status.LeaseID))
	}
	if c.Status.ExpireTime != nil {
		if left := time.Until(c.Status.ExpireTime.Time); left > 0 {
			return reconcile.Result{RequeueAfter: left}, nil
		}
		if err := a.releaseServed(ctx, c.UID); err != nil {
			return reconcile.Result{}, err
		}
		return reconcile.Result{}, a.finish(ctx, c, v1alpha1.ClaimReleased, "TTLExpired",
			fmt.Sprintf("the TTL of %s ran out; lease %s released", c.Spec.TTL.Duration, l.ID))
	}
	return reconcile.Result{}, nil
}

// acquire takes a ready VM for a Bound claim and writes it Ready. The
// finalizer is added after that, off the path a tenant waits on: a claim
// deleted before it lands is gone at once, and its delete event releases
// the VM (a restarted agent's sweep would too).
func (a *agent) acquire(ctx context.Context, c *v1alpha1.VMClaim) error {
	start := time.Now()
	req := api.AcquireRequest{Owner: c.Spec.Owner, Labels: leaseLabels(c.Namespace, c.Name, c.UID), Wait: a.opts.AcquireWait}
	for _, e := range c.Spec.Env {
		req.Env = append(req.Env, e.Name+"="+e.Value)
	}
	if c.Spec.TTL != nil {
		req.TTL = api.Duration(c.Spec.TTL.Duration)
	}
	l, err := api.Lease{}, req.Validate()
	if err == nil {
		l, err = a.b.Acquire(ctx, localName(c.Namespace, c.Spec.PoolRef.Name), req)
	}
	claim := c.DeepCopy()
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if errors.Is(err, vm.ErrInvalid) {
			return a.finish(ctx, claim, v1alpha1.ClaimFailed, "InvalidClaim", fmt.Sprintf("spec: %v", err))
		}
		if errors.Is(err, api.ErrNothingReady) || errors.Is(err, vm.ErrNotFound) {
			return a.unbind(ctx, claim, err)
		}
		return a.finish(ctx, claim, v1alpha1.ClaimFailed, "AcquireFailed",
			fmt.Sprintf("node %s could not hand over a VM of pool %s: %v", a.opts.Node, c.Spec.PoolRef.Name, err))
	}
	a.mu.Lock()
	a.served[c.UID] = l
	a.mu.Unlock()
	a.pokeReport()
	if err := a.markReady(ctx, claim, l, start); err != nil {
		return err
	}
	if _, held := a.servedLease(c.UID); !held {
		return nil // the claim went away meanwhile; markReady released the VM
	}
	err = a.updateClaim(ctx, claim, func(c *v1alpha1.VMClaim) (bool, error) {
		if !c.DeletionTimestamp.IsZero() {
			return false, errDeleting
		}
		if c.Status.Node != a.opts.Node || c.Status.LeaseID != l.ID || c.Status.Phase.Terminal() {
			return false, errNotOurs
		}
		return controllerutil.AddFinalizer(c, Finalizer), nil
	}, false)
	switch {
	case err == nil:
		return nil
	case apierrors.IsNotFound(err) || errors.Is(err, errNotOurs):
		return a.releaseServed(ctx, c.UID)
	case errors.Is(err, errDeleting):
		return nil // the deletion's own event releases it
	}
	return err
}

var errDeleting = errors.New("claim is being deleted")

func (a *agent) removeFinalizer(ctx context.Context, c *v1alpha1.VMClaim) error {
	err := a.updateClaim(ctx, c, func(c *v1alpha1.VMClaim) (bool, error) {
		return controllerutil.RemoveFinalizer(c, Finalizer), nil
	}, false)
	if apierrors.IsNotFound(err) {
		return nil
	}
	return err
}

// markReady writes the claim Ready with lease l, unless the claim stopped
// being this node's meanwhile (deleted, or declared Lost): then l is
// released.
func (a *agent) markReady(ctx context.Context, c *v1alpha1.VMClaim, l api.Lease, start time.Time) error {
	now := time.Now()
	err := a.updateClaim(ctx, c, func(c *v1alpha1.VMClaim) (bool, error) {
		if c.Status.Node != a.opts.Node || !c.DeletionTimestamp.IsZero() {
			return false, errNotOurs
		}
		if c.Status.Phase == v1alpha1.ClaimReady && c.Status.LeaseID == l.ID {
			return false, nil // written already (this reconcile read a stale copy)
		}
		if c.Status.Phase != v1alpha1.ClaimBound {
			return false, errNotOurs
		}
		s := &c.Status
		s.Phase, s.LeaseID, s.VMID = v1alpha1.ClaimReady, l.ID, l.VMID
		s.Address = ""
		if l.Address != nil {
			s.Address = *l.Address
		}
		ready := metav1.NewMicroTime(now)
		s.ReadyTime = &ready
		if l.ExpiresAt != nil {
			e := metav1.NewMicroTime(*l.ExpiresAt)
			s.ExpireTime = &e
		}
		t := &v1alpha1.ClaimTimings{AcquireMS: l.Timings.TotalMS, WaitMS: l.Timings.WaitMS, HandoffMS: l.Timings.HandoffMS}
		if s.BoundTime != nil {
			t.BoundToReadyMS = now.Sub(s.BoundTime.Time).Milliseconds()
		}
		s.Timings = t
		s.ObservedGeneration = c.Generation
		meta.SetStatusCondition(&s.Conditions, metav1.Condition{Type: CondReady, Status: metav1.ConditionTrue, Reason: "VMReady",
			Message: fmt.Sprintf("lease %s on node %s", l.ID, a.opts.Node), ObservedGeneration: c.Generation})
		return true, nil
	}, true)
	if err == nil {
		a.log.Debug("claim ready", "claim", client.ObjectKeyFromObject(c), "lease", l.ID, "ms", time.Since(start).Milliseconds())
		return nil
	}
	if errors.Is(err, errNotOurs) || apierrors.IsNotFound(err) {
		return a.releaseServed(ctx, c.UID)
	}
	return err
}

var errNotOurs = errors.New("claim is no longer this node's to serve")

// unbind sends a claim back to Pending: this node had no VM to give it.
func (a *agent) unbind(ctx context.Context, c *v1alpha1.VMClaim, why error) error {
	err := a.updateClaim(ctx, c, func(c *v1alpha1.VMClaim) (bool, error) {
		if c.Status.Node != a.opts.Node || c.Status.Phase != v1alpha1.ClaimBound {
			return false, nil
		}
		c.Status.Phase, c.Status.Node, c.Status.BoundTime = v1alpha1.ClaimPending, "", nil
		meta.SetStatusCondition(&c.Status.Conditions, metav1.Condition{Type: CondBound, Status: metav1.ConditionFalse, Reason: "NodeHadNoReadyVM",
			Message: fmt.Sprintf("node %s had no ready VM of pool %s in %s: %v", a.opts.Node, c.Spec.PoolRef.Name, a.opts.AcquireWait, why), ObservedGeneration: c.Generation})
		return true, nil
	}, true)
	if apierrors.IsNotFound(err) {
		return nil
	}
	return err
}

// finish puts a claim in a terminal phase with a Ready=False reason, and
// lets it go (finalizer removed: nothing is held for it any more).
func (a *agent) finish(ctx context.Context, c *v1alpha1.VMClaim, phase v1alpha1.ClaimPhase, reason, msg string) error {
	err := a.updateClaim(ctx, c, func(c *v1alpha1.VMClaim) (bool, error) {
		if c.Status.Phase.Terminal() {
			return false, nil
		}
		c.Status.Phase = phase
		meta.SetStatusCondition(&c.Status.Conditions, metav1.Condition{Type: CondReady, Status: metav1.ConditionFalse, Reason: reason, Message: msg, ObservedGeneration: c.Generation})
		return true, nil
	}, true)
	if err != nil && !apierrors.IsNotFound(err) {
		return err
	}
	a.log.Info("claim finished", "claim", client.ObjectKeyFromObject(c), "phase", phase, "reason", reason)
	return a.removeFinalizer(ctx, c)
}

// updateClaim applies mutate to c and writes it (its status with status
// set), re-reading c from the API server on a conflict. mutate returns
// false when nothing needs writing.
func (a *agent) updateClaim(ctx context.Context, c *v1alpha1.VMClaim, mutate func(*v1alpha1.VMClaim) (bool, error), status bool) error {
	return updateClaim(ctx, a.c, a.direct, c, mutate, status)
}

func updateClaim(ctx context.Context, w client.Client, r client.Reader, c *v1alpha1.VMClaim, mutate func(*v1alpha1.VMClaim) (bool, error), status bool) error {
	for attempt := 0; ; attempt++ {
		changed, err := mutate(c)
		if err != nil || !changed {
			return err
		}
		if status {
			err = w.Status().Update(ctx, c)
		} else {
			err = w.Update(ctx, c)
		}
		if !apierrors.IsConflict(err) || attempt >= 10 {
			return err
		}
		if err := r.Get(ctx, client.ObjectKeyFromObject(c), c); err != nil {
			return err
		}
	}
}

// managerOptions are the manager settings both components share: no
// metrics or health listeners (the daemon serves its own), logs to log.
func managerOptions(log *slog.Logger, more func(*manager.Options)) (manager.Options, error) {
	scheme, err := NewScheme()
	if err != nil {
		return manager.Options{}, err
	}
	o := manager.Options{
		Scheme:                 scheme,
		Logger:                 ctrlLogger(log),
		HealthProbeBindAddress: "0",
	}
	o.Metrics.BindAddress = "0"
	skip := true
	// Tests run several agents in one process.
	o.Controller.SkipNameValidation = &skip
	if more != nil {
		more(&o)
	}
	return o, nil
}
