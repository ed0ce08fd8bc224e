package kube

import (
	"context"
	"fmt"
	"slices"

	"github.com/warmpool/warmpool/guest"
	"github.com/warmpool/warmpool/rootfs"
)

// ImageRequest is the image a WarmPool asks its nodes to build: an `image
// build --from` source other than busybox and, for debian:SUITE, the
// packages on top (sorted, without duplicates).
type ImageRequest struct {
	Source   string
	Packages []string
}

func (r ImageRequest) equal(o ImageRequest) bool {
	return r.Source == o.Source && slices.Equal(r.Packages, o.Packages)
}

// ImageBuilder builds the image of req on the node and returns the
// directory the daemon's template boots (TemplateRequest.Image). Building
// the same inputs again returns the cached image.
type ImageBuilder func(ctx context.Context, req ImageRequest) (dir string, err error)

// LocalImages builds images as `warmpool image build` does, on top of the
// busybox image of agent (the guest agent binary), into the guest image
// cache cacheDir (guest.DefaultCacheDir() when empty): the cache the
// daemon builds its own busybox image into, so both share that base.
func LocalImages(cacheDir string, agent []byte) ImageBuilder {
	return func(ctx context.Context, req ImageRequest) (string, error) {
		src, err := rootfs.ParseSource(req.Source)
		if err != nil {
			return "", fmt.Errorf("image %s: %w", req.Source, err)
		}
		base, err := guest.Build(ctx, guest.BuildOptions{Agent: agent, CacheDir: cacheDir})
		if err != nil {
			return "", fmt.Errorf("image %s: build the busybox base: %w", req.Source, err)
		}
		img, err := rootfs.Build(ctx, rootfs.Options{Source: src, Packages: req.Packages, Base: base, CacheDir: cacheDir})
		if err != nil {
			return "", fmt.Errorf("image %s: %w", req.Source, err)
		}
		return img.Dir, nil
	}
}
