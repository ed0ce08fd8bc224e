package kube

import (
	"errors"
	"fmt"
	"path/filepath"
	"slices"
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
)

// specProblem is why a WarmPool spec cannot be served: Reason is the
// condition's reason, Message says what to change.
type specProblem struct {
	Reason, Message string
}

func (p *specProblem) Error() string { return p.Message }

// checkSpec returns nil when the nodes can serve s. The node agents and
// the controller both judge a spec with it, so neither waits for the other.
// What only a node can know (whether its daemon has a network for the
// pool, whether the image builds there) the node reports in its status
// entry.
func checkSpec(s v1alpha1.WarmPoolSpec) *specProblem {
	src, err := rootfs.ParseSource(s.Image)
	if err != nil {
		return &specProblem{ReasonUnknownImageSource, fmt.Sprintf("spec.image: %v", err)}
	}
	// ParseSource makes a path absolute against this process's directory,
	// which means nothing on the node: the spec's own path must be.
	if _, path, _ := strings.Cut(s.Image, ":"); src.Kind != rootfs.KindBusybox && src.Kind != rootfs.KindDebian && !filepath.IsAbs(path) {
		return &specProblem{ReasonUnknownImageSource, fmt.Sprintf("spec.image %q: the path must be absolute on the node", s.Image)}
	}
	if len(s.Packages) > 0 && src.Kind != rootfs.KindDebian {
		return &specProblem{ReasonInvalidSpec, fmt.Sprintf("spec.packages needs a debian:SUITE image, not %s", src)}
	}
	for _, p := range s.Packages {
		if p == "" || strings.ContainsAny(p, " \t\n,") {
			return &specProblem{ReasonInvalidSpec, fmt.Sprintf("spec.packages: %q is not a package name", p)}
		}
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
		if src.Kind == rootfs.KindBusybox {
			return &specProblem{ReasonInvalidSpec, "spec.template.diskMiB needs an image with a root filesystem (spec.image dir:, tar:, oci-archive:, docker-archive: or debian:), busybox has none"}
		}
		if err := vm.ValidateRange("spec.template.diskMiB", int(s.Template.DiskMiB), 16, api.MaxTemplateDiskMiB); err != nil {
			return &specProblem{ReasonInvalidSpec, err.Error()}
		}
	}
	if s.Network != "" || len(s.EgressAllow) > 0 {
		if err := api.ValidateNetwork(s.Network, s.EgressAllow); err != nil {
			return &specProblem{ReasonInvalidSpec, specField(err)}
		}
	}
	if s.Adaptive {
		if s.Max == 0 {
			return &specProblem{ReasonInvalidSpec, "spec.adaptive needs spec.max, the most ready VMs a node's pool may grow to"}
		}
		if s.Replicas != nil {
			return &specProblem{ReasonInvalidSpec, "spec.adaptive and spec.replicas exclude each other: each node sizes an adaptive pool itself"}
		}
	}
	if s.MaxAge != nil && s.MaxAge.Duration < 0 {
		return &specProblem{ReasonInvalidSpec, "spec.maxAge must not be negative"}
	}
	return nil
}

// specField says what is wrong with the WarmPool's names for the daemon's
// fields (egress_allow is spec.egressAllow).
func specField(err error) string {
	var fe *vm.FieldError
	if !errors.As(err, &fe) {
		return "spec: " + err.Error()
	}
	field := map[string]string{"egress_allow": "egressAllow"}[fe.Field]
	if field == "" {
		field = fe.Field
	}
	return fmt.Sprintf("spec.%s %q: %s", field, fmt.Sprint(fe.Value), fe.Reason)
}

// imageOf is the image build a WarmPool asks of a node; ok is false for
// the busybox image, which the daemon builds itself.
func imageOf(s v1alpha1.WarmPoolSpec) (ImageRequest, bool) {
	src, err := rootfs.ParseSource(s.Image)
	if err != nil || src.Kind == rootfs.KindBusybox {
		return ImageRequest{}, false
	}
	pkgs := slices.Clone(s.Packages)
	slices.Sort(pkgs)
	return ImageRequest{Source: src.String(), Packages: slices.Compact(pkgs)}, true
}

// localTemplateRequest is the daemon template of a WarmPool, booting the
// image in imageDir (empty: the daemon's busybox image).
func localTemplateRequest(s v1alpha1.WarmPoolSpec, name, imageDir string) api.TemplateRequest {
	return api.TemplateRequest{Name: name, Image: imageDir, VCPUs: int(s.Template.VCPUs), MemoryMiB: int(s.Template.MemoryMiB), DiskMiB: int(s.Template.DiskMiB)}
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
	req := api.PoolRequest{Template: template, Min: int(target), Max: max(int(target), int(s.Max), 1),
		Adaptive: s.Adaptive, Network: s.Network, EgressAllow: s.EgressAllow}
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
