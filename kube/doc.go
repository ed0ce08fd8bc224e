// Package kube runs warmpool on Kubernetes: the cluster's API server and
// etcd hold the state, node agents heartbeat through it, and a controller
// schedules through it, so nothing home-made stands in for consensus,
// membership or storage.
//
// The node agent (RunAgent, `warmpool serve --kubernetes`) sits next to one
// node's daemon, reached through its api.Backend: it builds the templates and
// keeps the pools of the WarmPools that select its node, reports their ready
// counts in the WarmPool's status, renews its coordination.k8s.io Lease, and
// carries out the VMClaims bound to its node (acquire, status, release on
// deletion or TTL). A restarted agent adopts the leases whose claims still
// name it and releases the rest.
//
// The controller (RunController, `warmpool controller`) binds pending claims
// to a live node with a ready VM of their pool, splits a WarmPool's
// cluster-wide replicas into per-node targets, and marks the claims of a
// node whose heartbeat expired Lost. It keeps nothing but caches: everything
// it decides is in the API server.
//
// Only this package and the command that starts it import Kubernetes
// modules.
package kube
