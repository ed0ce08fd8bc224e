package kube

import (
	"cmp"
	"slices"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	"k8s.io/apimachinery/pkg/labels"
)

// nodeLiveness is what a node agent's Lease says about its node.
type nodeLiveness struct {
	Node string
	// Expires is when the heartbeat runs out unless renewed.
	Expires time.Time
}

// live reports whether the heartbeat is current at now.
func (n nodeLiveness) live(now time.Time) bool { return now.Before(n.Expires) }

// livenessOf reads a node agent's Lease; ok is false for a Lease that is
// not one (no holder, no renew time, no duration).
func livenessOf(l *coordinationv1.Lease) (nodeLiveness, bool) {
	s := l.Spec
	if s.HolderIdentity == nil || *s.HolderIdentity == "" || s.RenewTime == nil || s.LeaseDurationSeconds == nil {
		return nodeLiveness{}, false
	}
	d := time.Duration(*s.LeaseDurationSeconds) * time.Second
	return nodeLiveness{Node: *s.HolderIdentity, Expires: s.RenewTime.Add(d)}, true
}

// selects reports whether a pool with selector picks a node with nodeLabels.
func selects(selector, nodeLabels map[string]string) bool {
	if len(selector) == 0 {
		return true
	}
	return labels.SelectorFromSet(selector).Matches(labels.Set(nodeLabels))
}

// splitReplicas divides replicas over nodes as evenly as it goes: each
// gets replicas/len(nodes), the first replicas%len(nodes) in name order one
// more. The caller bounds each share by the pool's min and max.
func splitReplicas(replicas int32, nodes []string) map[string]int32 {
	out := make(map[string]int32, len(nodes))
	if len(nodes) == 0 {
		return out
	}
	sorted := slices.Sorted(slices.Values(nodes))
	n := int32(len(sorted))
	for i, name := range sorted {
		out[name] = replicas / n
		if int32(i) < replicas%n {
			out[name]++
		}
	}
	return out
}

// candidate is a live node that selects a claim's pool, as the binder sees
// it.
type candidate struct {
	Node string
	// Ready is what the node agent last reported; Inflight the claims bound
	// to it that it has not turned Ready yet; Serving the claims it serves.
	Ready, Inflight, Serving int32
}

// available is how many ready VMs are not spoken for yet.
func (c candidate) available() int32 { return c.Ready - c.Inflight }

// chooseNode picks the node for a claim: the most available ready VMs
// first; among equals the one serving fewest claims of the pool, so that
// claims spread; then by name, so that the choice is stable. ok is false
// when no node has a ready VM left.
func chooseNode(cands []candidate) (string, bool) {
	best := -1
	for i, c := range cands {
		if c.available() <= 0 {
			continue
		}
		if best < 0 || better(c, cands[best]) {
			best = i
		}
	}
	if best < 0 {
		return "", false
	}
	return cands[best].Node, true
}

func better(a, b candidate) bool {
	if d := cmp.Compare(a.available(), b.available()); d != 0 {
		return d > 0
	}
	if d := cmp.Compare(a.Serving+a.Inflight, b.Serving+b.Inflight); d != 0 {
		return d < 0
	}
	return a.Node < b.Node
}
