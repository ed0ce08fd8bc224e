package kube

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"

	"github.com/go-logr/logr"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	"github.com/warmpool/warmpool/kube/v1alpha1"
)

// Condition types of a VMClaim.
const (
	// CondBound is true once a node is chosen; its reason says why not
	// while Pending (PoolNotFound, PoolNotAccepted, NoReadyVM, ...).
	CondBound = "Bound"
	// CondReady is true while the claim's VM is the tenant's; false with
	// NodeLost, TTLExpired, LeaseGone, AcquireFailed once it is over.
	CondReady = "Ready"
)

// Condition types of a WarmPool.
const (
	// CondAccepted says whether the spec is valid and supported.
	CondAccepted = "Accepted"
	// CondPoolReady is true when every selected live node reached its
	// target (type "Ready").
	CondPoolReady = "Ready"
)

// NewScheme knows the core, coordination and warmpool.dev types.
func NewScheme() (*runtime.Scheme, error) {
	s := runtime.NewScheme()
	for _, add := range []func(*runtime.Scheme) error{corev1.AddToScheme, coordinationv1.AddToScheme, v1alpha1.AddToScheme} {
		if err := add(s); err != nil {
			return nil, fmt.Errorf("kube scheme: %w", err)
		}
	}
	return s, nil
}

// clientConfig is cfg without client-go's default rate limit (5 requests
// a second), which would add seconds to a burst of claims.
func clientConfig(cfg *rest.Config) *rest.Config {
	c := rest.CopyConfig(cfg)
	if c.QPS == 0 {
		c.QPS, c.Burst = 500, 1000
	}
	return c
}

// ctrlLogger is log as the logr.Logger controller-runtime takes.
func ctrlLogger(log *slog.Logger) logr.Logger {
	if log == nil {
		return logr.Discard()
	}
	return logr.FromSlogHandler(log.Handler())
}

// jsonMergePatch is a JSON merge patch (RFC 7386) of v.
func jsonMergePatch(v any) (client.Patch, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return nil, fmt.Errorf("merge patch: %w", err)
	}
	return client.RawPatch(types.MergePatchType, b), nil
}

// allPools maps any event to a reconcile of every WarmPool c lists: a node
// or heartbeat change can move any pool's per-node targets.
func allPools(c client.Reader) handler.MapFunc {
	return func(ctx context.Context, _ client.Object) []reconcile.Request {
		var wps v1alpha1.WarmPoolList
		if err := c.List(ctx, &wps, client.UnsafeDisableDeepCopy); err != nil {
			return nil
		}
		reqs := make([]reconcile.Request, 0, len(wps.Items))
		for _, wp := range wps.Items {
			reqs = append(reqs, reconcile.Request{NamespacedName: types.NamespacedName{Namespace: wp.Namespace, Name: wp.Name}})
		}
		return reqs
	}
}
