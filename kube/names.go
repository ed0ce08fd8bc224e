package kube

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"strings"

	"k8s.io/apimachinery/pkg/types"

	"github.com/warmpool/warmpool/vm"
)

const (
	// localPrefix starts the name of every template and pool a node agent
	// makes in its daemon, so that it knows which are its own.
	localPrefix = "k8s."
	// leaseOwnerPrefix starts the owner label of every daemon lease a node
	// agent takes for a claim; the rest is namespace/name/uid.
	leaseOwnerPrefix = "vmclaim:"
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

// leaseOwner is the owner label of the daemon lease that serves a claim.
func leaseOwner(ns, name string, uid types.UID) string {
	return fmt.Sprintf("%s%s/%s/%s", leaseOwnerPrefix, ns, name, uid)
}

// claimOfLease returns the claim a daemon lease's owner label names.
func claimOfLease(owner string) (ns, name string, uid types.UID, ok bool) {
	rest, found := strings.CutPrefix(owner, leaseOwnerPrefix)
	if !found {
		return "", "", "", false
	}
	parts := strings.Split(rest, "/")
	if len(parts) != 3 || parts[0] == "" || parts[1] == "" || parts[2] == "" {
		return "", "", "", false
	}
	return parts[0], parts[1], types.UID(parts[2]), true
}

// heartbeatName is the name of node's Lease.
func heartbeatName(node string) string { return heartbeatPrefix + node }
