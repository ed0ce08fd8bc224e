package kube

import (
	"fmt"
	"path/filepath"
	"strings"

	"github.com/warmpool/warmpool/api"
	"github.com/warmpool/warmpool/kube/v1alpha1"
	"github.com/warmpool/warmpool/rootfs"
	"github.com/warmpool/warmpool/vm"
)

// Reasons of the WarmPool Accepted condition when it is false.
const (
	ReasonAccepted           = "Accepted"
	ReasonInvalidSpec        = "InvalidSpec"
	ReasonUnknownImageSource = "UnknownImageSource"
	ReasonUnsupported        = "Unsupported"
)

// specProblem is why a WarmPool spec cannot be served: Reason is the
// condition's reason, Message says what to change.
type specProblem struct {
	Reason, Message string
}

func (p *specProblem) Error() string { return p.Message }

// checkSpec returns nil when the nodes can serve s. The node agents and
// the controller both judge a spec with it, so neither waits for the other.
func checkSpec(s v1alpha1.WarmPoolSpec) *specProblem {
	image := s.Image
	if image == "" {
		image = v1alpha1.ImageBusybox
	}
	if image != v1alpha1.ImageBusybox {
		src, err := rootfs.ParseSource(image)
		if err != nil {
			return &specProblem{ReasonUnknownImageSource, fmt.Sprintf("spec.image: %v", err)}
		}
		if (src.Kind != rootfs.KindDebian) && !filepath.IsAbs(strings.SplitN(image, ":", 2)[1]) {
			return &specProblem{ReasonUnknownImageSource, fmt.Sprintf("spec.image %q: the path must be absolute on the node", image)}
		}
		return &specProblem{ReasonUnsupported, fmt.Sprintf("spec.image %q: templates cannot boot %s root filesystem images yet; use busybox", image, src.Kind)}
	}
	if s.Max > 0 && s.Min > s.Max {
		return &specProblem{ReasonInvalidSpec, fmt.Sprintf("spec.min (%d) exceeds spec.max (%d)", s.Min, s.Max)}
	}
	if s.Min < 0 || s.Min > api.MaxPoolSize || s.Max < 0 || s.Max > api.MaxPoolSize {
		return &specProblem{ReasonInvalidSpec, fmt.Sprintf("spec.min and spec.max must be between 0 and %d", api.MaxPoolSize)}
	}
	if s.Template.VCPUs != 0 {
		if err := vm.ValidateRange("spec.template.vcpus", int(s.Template.VCPUs), 1, vm.MaxVCPUs); err != nil {
			return &specProblem{ReasonInvalidSpec, err.Error()}
		}
	}
	if s.Template.MemoryMiB != 0 {
		if err := vm.ValidateRange("spec.template.memoryMiB", int(s.Template.MemoryMiB), vm.MinMemoryMiB, vm.MaxMemoryMiB); err != nil {
			return &specProblem{ReasonInvalidSpec, err.Error()}
		}
	}
	if s.Template.DiskMiB != 0 {
		return &specProblem{ReasonUnsupported, "spec.template.diskMiB: per-VM disks are not supported yet"}
	}
	if s.Network != "" && s.Network != "none" {
		return &specProblem{ReasonUnsupported, fmt.Sprintf("spec.network %q: only none is supported yet", s.Network)}
	}
	if s.Adaptive {
		return &specProblem{ReasonUnsupported, "spec.adaptive: adaptive pools are not supported yet"}
	}
	if s.MaxAge != nil && s.MaxAge.Duration < 0 {
		return &specProblem{ReasonInvalidSpec, "spec.maxAge must not be negative"}
	}
	return nil
}

// nodeTarget is how many ready VMs a node keeps of a pool with spec s whose
// controller-assigned share is assigned (unset when the controller has not
// assigned one yet): min, or with replicas the share bounded by min and max.
func nodeTarget(s v1alpha1.WarmPoolSpec, assigned int32) int32 {
	if s.Replicas == nil {
		return s.Min
	}
	return clamp(assigned, s.Min, s.Max)
}

// localPoolRequest is the daemon pool that keeps target ready VMs.
func localPoolRequest(s v1alpha1.WarmPoolSpec, template string, target int32) api.PoolRequest {
	req := api.PoolRequest{Template: template, Min: int(target), Max: max(int(target), int(s.Max), 1)}
	if s.MaxAge != nil {
		req.MaxAge = api.Duration(s.MaxAge.Duration)
	}
	return req
}

func clamp(v, lo, hi int32) int32 {
	if hi > 0 && v > hi {
		v = hi
	}
	return max(v, lo)
}
