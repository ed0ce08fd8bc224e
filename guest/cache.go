package guest

import (
	"cmp"
	"context"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// CachedImage is a finished image in a cache directory.
type CachedImage struct {
	Image
	SizeBytes int64     `json:"size_bytes"`
	BuiltAt   time.Time `json:"built_at"`
}

// ListCached returns the finished images in cacheDir (DefaultCacheDir() when
// empty), newest first. Builds in progress and unreadable directories are
// left out.
func ListCached(cacheDir string) ([]CachedImage, error) {
	root := filepath.Join(cmp.Or(cacheDir, DefaultCacheDir()), "images")
	entries, err := os.ReadDir(root)
	if os.IsNotExist(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list guest images in %s: %w", root, err)
	}
	var out []CachedImage
	for _, e := range entries {
		if !e.IsDir() || strings.HasPrefix(e.Name(), ".") {
			continue
		}
		dir := filepath.Join(root, e.Name())
		img, err := Load(dir)
		if err != nil {
			continue
		}
		c := CachedImage{Image: img}
		if fi, err := os.Stat(filepath.Join(dir, manifestName)); err == nil {
			c.BuiltAt = fi.ModTime().UTC()
		}
		c.SizeBytes, err = dirSize(dir)
		if err != nil {
			return nil, fmt.Errorf("size of guest image %s: %w", dir, err)
		}
		out = append(out, c)
	}
	slices.SortFunc(out, func(a, b CachedImage) int {
		if c := b.BuiltAt.Compare(a.BuiltAt); c != 0 {
			return c
		}
		return strings.Compare(a.Dir, b.Dir)
	})
	return out, nil
}

// PruneOptions says which cached images Prune keeps.
type PruneOptions struct {
	// CacheDir is the cache to prune; DefaultCacheDir() when empty.
	CacheDir string
	// KeepNewest is how many of the newest images are kept whatever else
	// holds; at least 1, so the image the next build would reuse stays.
	KeepNewest int
	// InUse lists image directories that something (a daemon's templates)
	// still boots or restores from; they are kept.
	InUse []string
	// DryRun reports what would be removed without removing it.
	DryRun bool
}

// Prune removes finished images from the cache that are neither among the
// newest nor in use, and returns them. It holds the cache's lock, so it never
// removes an image a concurrent Build is writing or has just returned.
func Prune(ctx context.Context, opts PruneOptions) ([]CachedImage, error) {
	if opts.KeepNewest < 1 {
		return nil, fmt.Errorf("prune guest images: keep at least the newest image (got %d)", opts.KeepNewest)
	}
	cache := cmp.Or(opts.CacheDir, DefaultCacheDir())
	if _, err := os.Stat(cache); os.IsNotExist(err) {
		return nil, nil
	}
	unlock, err := lockDir(ctx, cache)
	if err != nil {
		return nil, err
	}
	defer unlock()
	images, err := ListCached(cache)
	if err != nil {
		return nil, err
	}
	inUse := make(map[string]bool, len(opts.InUse))
	for _, dir := range opts.InUse {
		if abs, err := filepath.Abs(dir); err == nil {
			inUse[filepath.Clean(abs)] = true
		}
	}
	var removed []CachedImage
	for i, img := range images {
		if i < opts.KeepNewest || inUse[filepath.Clean(img.Dir)] {
			continue
		}
		if !opts.DryRun {
			if err := os.RemoveAll(img.Dir); err != nil {
				return removed, fmt.Errorf("remove guest image %s: %w", img.Dir, err)
			}
		}
		removed = append(removed, img)
	}
	return removed, nil
}

func dirSize(dir string) (int64, error) {
	var total int64
	err := filepath.WalkDir(dir, func(_ string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.Type().IsRegular() {
			fi, err := d.Info()
			if err != nil {
				return err
			}
			total += fi.Size()
		}
		return nil
	})
	return total, err
}
