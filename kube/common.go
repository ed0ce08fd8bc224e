package kube

import (
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
