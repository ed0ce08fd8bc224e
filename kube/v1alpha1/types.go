// Package v1alpha1 holds the warmpool.dev/v1alpha1 resources: WarmPool (warm
// VMs of one template kept on every node it selects) and VMClaim (one of
// those VMs handed to a tenant). The CRD manifests in deploy/ are generated
// from these types by controller-gen (go generate ./kube/...).
//
// +kubebuilder:object:generate=true
// +groupName=warmpool.dev
package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

//go:generate ../../scripts/controller-gen.sh object paths=. crd:crdVersions=v1 output:crd:dir=../../deploy

// GroupVersion is warmpool.dev/v1alpha1.
var GroupVersion = schema.GroupVersion{Group: "warmpool.dev", Version: "v1alpha1"}

// AddToScheme registers WarmPool and VMClaim (and their lists) in a scheme.
func AddToScheme(s *runtime.Scheme) error {
	s.AddKnownTypes(GroupVersion, &WarmPool{}, &WarmPoolList{}, &VMClaim{}, &VMClaimList{})
	metav1.AddToGroupVersion(s, GroupVersion)
	return nil
}

// ImageBusybox is the default guest image: a kernel and a busybox initramfs
// with the guest agent.
const ImageBusybox = "busybox"

// WarmPoolSpec is what a WarmPool asks of the nodes it selects.
type WarmPoolSpec struct {
	// Image is the guest image the pool's template boots: "busybox" (the
	// default image), or a source of `warmpool image build --from` that
	// adds a root filesystem: dir:PATH, tar:PATH, oci-archive:PATH or
	// docker-archive:PATH (absolute paths on the node), or debian:SUITE.
	// Each node builds it into its own image cache (reused while the
	// inputs are the same).
	// +kubebuilder:default=busybox
	// +optional
	Image string `json:"image,omitempty"`
	// Packages are Debian packages installed on top of a debian:SUITE
	// image (image build --packages).
	// +kubebuilder:validation:MaxItems=256
	// +optional
	Packages []string `json:"packages,omitempty"`
	// Template is the shape of every VM of the pool.
	// +optional
	Template TemplateShape `json:"template,omitempty"`
	// Network is the pool's network policy (pool set --network): none (no
	// interface), isolated (the node reaches the VM at its address) or
	// egress (isolated, and the VM may reach beyond the node). Empty: the
	// node daemon's default (isolated when its network.cidr is set, else
	// none). A node whose daemon has no network for it reports why in its
	// status entry.
	// +kubebuilder:validation:Enum=none;isolated;egress
	// +optional
	Network string `json:"network,omitempty"`
	// EgressAllow limits what an egress VM may reach: CIDR or CIDR:PORT
	// entries (pool set --egress-allow); empty allows anything beyond the
	// node. Only with network: egress.
	// +kubebuilder:validation:MaxItems=64
	// +optional
	EgressAllow []string `json:"egressAllow,omitempty"`
	// Min is the number of ready VMs every selected node keeps.
	// +kubebuilder:validation:Minimum=0
	// +kubebuilder:validation:Maximum=1024
	// +optional
	Min int32 `json:"min,omitempty"`
	// Max bounds the ready VMs of one node; 0 means no bound below the
	// daemon's own (1024). Min must not exceed it.
	// +kubebuilder:validation:Minimum=0
	// +kubebuilder:validation:Maximum=1024
	// +optional
	Max int32 `json:"max,omitempty"`
	// Adaptive lets each node size its pool from its demand between min
	// and max (pool set --adaptive); it needs max and excludes replicas.
	// +optional
	Adaptive bool `json:"adaptive,omitempty"`
	// MaxAge replaces a warm VM that waited this long; unset means never.
	// +optional
	MaxAge *metav1.Duration `json:"maxAge,omitempty"`
	// NodeSelector selects the nodes (by the labels of their Node objects)
	// whose node agents keep this pool; empty selects every node with a
	// live node agent.
	// +optional
	NodeSelector map[string]string `json:"nodeSelector,omitempty"`
	// Replicas is a cluster-wide target of ready VMs, split evenly over the
	// selected live nodes and then bounded by min and max on each. Unset,
	// each node keeps min. The scale subresource sets it (an HPA can).
	// +kubebuilder:validation:Minimum=0
	// +optional
	Replicas *int32 `json:"replicas,omitempty"`
}

// TemplateShape is the shape of a pool's VMs; zero fields take the node
// daemon's defaults.
type TemplateShape struct {
	// +kubebuilder:validation:Minimum=0
	// +kubebuilder:validation:Maximum=64
	// +optional
	VCPUs int32 `json:"vcpus,omitempty"`
	// +kubebuilder:validation:Minimum=0
	// +optional
	MemoryMiB int32 `json:"memoryMiB,omitempty"`
	// DiskMiB is each VM's writable disk over the image's root filesystem
	// (template build --disk; 0: 1024). Only for images with a root
	// filesystem, not busybox.
	// +kubebuilder:validation:Minimum=0
	// +kubebuilder:validation:Maximum=1048576
	// +optional
	DiskMiB int32 `json:"diskMiB,omitempty"`
}

// NodePoolStatus is one node's part of a WarmPool. The controller writes
// Target; the node's agent writes the rest.
type NodePoolStatus struct {
	// Target is how many ready VMs the node should keep.
	// +optional
	Target int32 `json:"target,omitempty"`
	// Ready VMs wait for a claim; Restoring are on their way; Leased serve
	// claims.
	// +optional
	Ready     int32 `json:"ready,omitempty"`
	Restoring int32 `json:"restoring,omitempty"`
	Leased    int32 `json:"leased,omitempty"`
	// ObservedGeneration is the pool generation the node applied.
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`
	// Error says why the node cannot fill the pool (a template build that
	// failed, a refill that fails), empty while it fills fine.
	Error string `json:"error,omitempty"`
	// UpdateTime is when the node agent last wrote this entry.
	UpdateTime *metav1.MicroTime `json:"updateTime,omitempty"`
}

// WarmPoolStatus is what the controller and the node agents report.
type WarmPoolStatus struct {
	// ObservedGeneration is the generation the controller last judged.
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`
	// Replicas is the number of ready VMs on live selected nodes.
	Replicas int32 `json:"replicas"`
	// Nodes counts the live nodes the pool selects.
	Nodes int32 `json:"nodes"`
	// NodeStatus is per node, keyed by node name.
	// +optional
	NodeStatus map[string]NodePoolStatus `json:"nodeStatus,omitempty"`
	// Conditions: Accepted (the spec is valid and supported) and Ready
	// (every selected live node reached its target).
	// +listType=map
	// +listMapKey=type
	// +optional
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}

// WarmPool keeps warm VMs of one template on every node it selects.
//
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:subresource:scale:specpath=.spec.replicas,statuspath=.status.replicas
// +kubebuilder:resource:shortName=wpool
// +kubebuilder:printcolumn:name="Image",type=string,JSONPath=`.spec.image`
// +kubebuilder:printcolumn:name="Min",type=integer,JSONPath=`.spec.min`
// +kubebuilder:printcolumn:name="Max",type=integer,JSONPath=`.spec.max`
// +kubebuilder:printcolumn:name="Replicas",type=integer,JSONPath=`.spec.replicas`
// +kubebuilder:printcolumn:name="Ready",type=integer,JSONPath=`.status.replicas`
// +kubebuilder:printcolumn:name="Nodes",type=integer,JSONPath=`.status.nodes`
// +kubebuilder:printcolumn:name="Status",type=string,JSONPath=`.status.conditions[?(@.type=="Ready")].reason`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type WarmPool struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   WarmPoolSpec   `json:"spec,omitempty"`
	Status WarmPoolStatus `json:"status,omitempty"`
}

// WarmPoolList is a list of WarmPools.
//
// +kubebuilder:object:root=true
type WarmPoolList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []WarmPool `json:"items"`
}

// PoolReference names a WarmPool in the claim's namespace.
type PoolReference struct {
	// +kubebuilder:validation:MinLength=1
	Name string `json:"name"`
}

// VMClaimSpec asks for one warm VM of a pool.
type VMClaimSpec struct {
	// PoolRef is the WarmPool to take the VM from.
	PoolRef PoolReference `json:"poolRef"`
	// TTL releases the VM this long after it became Ready; unset means
	// until the claim is deleted.
	// +optional
	TTL *metav1.Duration `json:"ttl,omitempty"`
	// Owner is a free-form label recorded with the claim.
	// +kubebuilder:validation:MaxLength=256
	// +optional
	Owner string `json:"owner,omitempty"`
	// Env is the default environment of every exec in the VM (an exec's
	// own --env wins).
	// +kubebuilder:validation:MaxItems=4096
	// +listType=map
	// +listMapKey=name
	// +optional
	Env []EnvVar `json:"env,omitempty"`
}

// EnvVar is one environment variable of a claim's VM.
type EnvVar struct {
	// +kubebuilder:validation:Pattern=`^[A-Za-z_][A-Za-z0-9_]*$`
	Name string `json:"name"`
	// +optional
	Value string `json:"value,omitempty"`
}

// ClaimPhase is where a claim is in its life.
// +kubebuilder:validation:Enum=Pending;Bound;Ready;Lost;Released;Failed
type ClaimPhase string

// The phases of a claim. Pending: no node chosen yet. Bound: a node with a
// ready VM was chosen and its agent is acquiring it. Ready: the VM is the
// claim's (status names node, lease and address). Lost: the node's
// heartbeat expired; the VM is never served again. Released: the VM was
// destroyed (TTL). Failed: the node could not hand a VM over.
const (
	ClaimPending  ClaimPhase = "Pending"
	ClaimBound    ClaimPhase = "Bound"
	ClaimReady    ClaimPhase = "Ready"
	ClaimLost     ClaimPhase = "Lost"
	ClaimReleased ClaimPhase = "Released"
	ClaimFailed   ClaimPhase = "Failed"
)

// Terminal reports whether a claim in phase p is done: it never gets (or
// gets back) a VM.
func (p ClaimPhase) Terminal() bool {
	return p == ClaimLost || p == ClaimReleased || p == ClaimFailed
}

// ClaimTimings says where the time of a claim went, as the node saw it.
type ClaimTimings struct {
	// AcquireMS is the node daemon's acquire (wait plus hand-off).
	AcquireMS int64 `json:"acquireMS"`
	WaitMS    int64 `json:"waitMS"`
	HandoffMS int64 `json:"handoffMS"`
	// BoundToReadyMS runs from the binding to the Ready status write.
	BoundToReadyMS int64 `json:"boundToReadyMS"`
}

// VMClaimStatus is written by the controller (Pending, Bound, Lost) and the
// bound node's agent (Ready, Released, Failed).
type VMClaimStatus struct {
	// +optional
	Phase ClaimPhase `json:"phase,omitempty"`
	// Node is the node the claim is bound to.
	// +optional
	Node string `json:"node,omitempty"`
	// LeaseID is the lease on that node's daemon (warmpool exec LEASE).
	// +optional
	LeaseID string `json:"leaseID,omitempty"`
	// +optional
	VMID string `json:"vmID,omitempty"`
	// Address is the VM's network address, empty when it has none.
	// +optional
	Address string `json:"address,omitempty"`
	// +optional
	BoundTime *metav1.MicroTime `json:"boundTime,omitempty"`
	// +optional
	ReadyTime *metav1.MicroTime `json:"readyTime,omitempty"`
	// ExpireTime is when the TTL releases the VM.
	// +optional
	ExpireTime *metav1.MicroTime `json:"expireTime,omitempty"`
	// +optional
	Timings *ClaimTimings `json:"timings,omitempty"`
	// ObservedGeneration is the claim generation the status describes.
	// +optional
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`
	// Conditions: Bound and Ready, each with a reason.
	// +listType=map
	// +listMapKey=type
	// +optional
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}

// VMClaim takes one warm VM of a WarmPool on some node.
//
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:shortName=vmc
// +kubebuilder:printcolumn:name="Pool",type=string,JSONPath=`.spec.poolRef.name`
// +kubebuilder:printcolumn:name="Phase",type=string,JSONPath=`.status.phase`
// +kubebuilder:printcolumn:name="Node",type=string,JSONPath=`.status.node`
// +kubebuilder:printcolumn:name="Lease",type=string,JSONPath=`.status.leaseID`
// +kubebuilder:printcolumn:name="Address",type=string,JSONPath=`.status.address`
// +kubebuilder:printcolumn:name="Reason",type=string,JSONPath=`.status.conditions[?(@.type=="Ready")].reason`,priority=1
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type VMClaim struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   VMClaimSpec   `json:"spec,omitempty"`
	Status VMClaimStatus `json:"status,omitempty"`
}

// VMClaimList is a list of VMClaims.
//
// +kubebuilder:object:root=true
type VMClaimList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []VMClaim `json:"items"`
}
