package kube

import (
	"crypto/sha256"
	"encoding/hex"
	"strings"

	"k8s.io/apimachinery/pkg/types"

	"github.com/warmpool/warmpool/api"
	"github.com/warmpool/warmpool/vm"
)

const (
	// localPrefix starts the name of every template and pool a node agent
	// makes in its daemon, so that it knows which are its own.
	localPrefix = "k8s."
	// LabelClaim and LabelClaimUID are the labels of every daemon lease a
	// node agent takes for a claim: NAMESPACE/NAME and the claim's UID.
	LabelClaim    = "warmpool.dev/claim"
	LabelClaimUID = "warmpool.dev/claim-uid"
	// Finalizer keeps a claim until its node agent released its VM.
	Finalizer = "warmpool.dev/release"
	// heartbeatPrefix starts the name of a node agent's Lease.
	heartbeatPrefix = "warmpool-node-"
	// ComponentLabel marks the Leases of node agents.
	ComponentLabel = "warmpool.dev/component"
	componentAgent = "node-agent"
	// DefaultNamespace holds the node agents' Leases and the controller's
	// leader election.
	DefaultNamespace = "warmpool-system"
)

// localName is the daemon's template and pool name for the WarmPool ns/name:
// k8s.NS.NAME, or a shortened one with a hash when that is too long.
func localName(ns, name string) string {
	n := localPrefix + ns + "." + name
	if len(n) <= vm.MaxNameLen && vm.ValidateName("pool", n) == nil {
		return n
	}
	sum := sha256.Sum256([]byte(ns + "/" + name))
	h := hex.EncodeToString(sum[:])[:12]
	keep := vm.MaxNameLen - len(localPrefix) - len(h) - 1
	base := strings.Trim(ns+"."+name, ".-_")
	if len(base) > keep {
		base = base[:keep]
	}
	return localPrefix + base + "-" + h
}

// leaseLabels are the labels of the daemon lease that serves a claim.
func leaseLabels(ns, name string, uid types.UID) map[string]string {
	return map[string]string{LabelClaim: ns + "/" + name, LabelClaimUID: string(uid)}
}

// claimOfLease returns the claim a daemon lease serves, by its labels.
func claimOfLease(l api.Lease) (ns, name string, uid types.UID, ok bool) {
	ns, name, found := strings.Cut(l.Labels[LabelClaim], "/")
	uid = types.UID(l.Labels[LabelClaimUID])
	if !found || ns == "" || name == "" || uid == "" {
		return "", "", "", false
	}
	return ns, name, uid, true
}

// heartbeatName is the name of node's Lease.
func heartbeatName(node string) string { return heartbeatPrefix + node }
