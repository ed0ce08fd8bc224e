package rootfs

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"fmt"
	"io"
	"os"

	"github.com/klauspost/compress/zstd"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/warmpool/warmpool/guest"
)

// openArchive reads the image in a docker-archive (docker save) or an
// oci-archive (a tarball of an OCI image layout). For the latter, the
// layout is unpacked under scratch first.
func openArchive(ctx context.Context, src Source, scratch string) (v1.Image, error) {
	switch src.Kind {
	case KindDockerArchive:
		img, err := tarball.ImageFromPath(src.Arg, nil)
		if err != nil {
			return nil, fmt.Errorf("read docker archive %s: corrupt, truncated or not what docker save writes: %w", src.Arg, err)
		}
		return img, nil
	case KindOCIArchive:
		f, err := os.Open(src.Arg)
		if err != nil {
			return nil, fmt.Errorf("read OCI archive: %w", err)
		}
		defer f.Close()
		if err := os.MkdirAll(scratch, 0o700); err != nil {
			return nil, err
		}
		t, err := openTree(scratch)
		if err != nil {
			return nil, err
		}
		err = t.applyLayer(ctx, f, "OCI archive "+src.Arg, nil)
		t.close()
		if err != nil {
			return nil, err
		}
		idx, err := layout.ImageIndexFromPath(scratch)
		if err != nil {
			return nil, fmt.Errorf("read OCI archive %s: not an OCI image layout: %w", src.Arg, err)
		}
		return firstImage(idx, src.Arg)
	}
	return nil, fmt.Errorf("%s is not an image archive", src)
}

// firstImage picks the linux/amd64 image of an index (nested indexes
// included), or its only image.
func firstImage(idx v1.ImageIndex, what string) (v1.Image, error) {
	m, err := idx.IndexManifest()
	if err != nil {
		return nil, fmt.Errorf("read OCI archive %s: %w", what, err)
	}
	var candidates []v1.Descriptor
	for _, d := range m.Manifests {
		if d.Platform == nil || (d.Platform.OS == "linux" && d.Platform.Architecture == "amd64") {
			candidates = append(candidates, d)
		}
	}
	if len(candidates) == 0 {
		return nil, fmt.Errorf("read OCI archive %s: no linux/amd64 image among %d manifests", what, len(m.Manifests))
	}
	d := candidates[0]
	if d.MediaType.IsIndex() {
		child, err := idx.ImageIndex(d.Digest)
		if err != nil {
			return nil, fmt.Errorf("read OCI archive %s: %w", what, err)
		}
		return firstImage(child, what)
	}
	img, err := idx.Image(d.Digest)
	if err != nil {
		return nil, fmt.Errorf("read OCI archive %s: %w", what, err)
	}
	return img, nil
}

// applyImage applies img's layers in order onto t and returns its exec
// defaults.
func applyImage(ctx context.Context, img v1.Image, t *tree, what string, progress func(step string, done, total int64)) (guest.ExecDefaults, error) {
	cfg, err := img.ConfigFile()
	if err != nil {
		return guest.ExecDefaults{}, fmt.Errorf("read image config of %s: %w", what, err)
	}
	layers, err := img.Layers()
	if err != nil {
		return guest.ExecDefaults{}, fmt.Errorf("read layers of %s: %w", what, err)
	}
	var total int64
	for _, l := range layers {
		if n, err := l.Size(); err == nil {
			total += n
		}
	}
	var done int64
	for i, l := range layers {
		step := fmt.Sprintf("extract layer %d/%d", i+1, len(layers))
		progress(step, done, total)
		rc, err := l.Compressed()
		if err != nil {
			return guest.ExecDefaults{}, fmt.Errorf("%s: layer %d: %w", what, i+1, err)
		}
		counted := &countingReader{r: rc, onRead: func(n int64) { done += n; progress(step, done, total) }}
		u, err := decompress(counted)
		if err != nil {
			rc.Close()
			return guest.ExecDefaults{}, fmt.Errorf("%s: layer %d: corrupt or truncated: %w", what, i+1, err)
		}
		err = t.applyLayer(ctx, u, fmt.Sprintf("%s layer %d", what, i+1), nil)
		u.Close()
		rc.Close()
		if err != nil {
			return guest.ExecDefaults{}, err
		}
	}
	c := cfg.Config
	return guest.ExecDefaults{Env: c.Env, WorkingDir: c.WorkingDir, User: c.User, Entrypoint: c.Entrypoint, Cmd: c.Cmd}, nil
}

// decompress reads r as gzip, zstd or plain tar, by its first bytes.
func decompress(r io.Reader) (io.ReadCloser, error) {
	br := bufio.NewReader(r)
	magic, _ := br.Peek(4)
	switch {
	case bytes.HasPrefix(magic, []byte{0x1f, 0x8b}):
		return gzip.NewReader(br)
	case bytes.HasPrefix(magic, []byte{0x28, 0xb5, 0x2f, 0xfd}):
		d, err := zstd.NewReader(br)
		if err != nil {
			return nil, err
		}
		return d.IOReadCloser(), nil
	}
	return io.NopCloser(br), nil
}

type countingReader struct {
	r      io.Reader
	onRead func(int64)
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	if n > 0 {
		c.onRead(int64(n))
	}
	return n, err
}

// applyTarball applies a root filesystem tarball (optionally compressed).
func applyTarball(ctx context.Context, path string, t *tree, progress func(step string, done, total int64)) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("read root filesystem tarball: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	var done int64
	counted := &countingReader{r: f, onRead: func(n int64) { done += n; progress("extract "+path, done, fi.Size()) }}
	u, err := decompress(counted)
	if err != nil {
		return fmt.Errorf("read root filesystem tarball %s: %w", path, err)
	}
	defer u.Close()
	return t.applyLayer(ctx, u, "tarball "+path, nil)
}
