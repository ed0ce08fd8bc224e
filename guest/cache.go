package guest

import (
	"cmp"
	"context"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"time"
)

// CachedImage is a finished image in a cache directory.
type CachedImage struct {
	Image
	SizeBytes int64     `json:"size_bytes"`
	BuiltAt   time.Time `json:"built_at"`
	// Names are the names (image build --name) that refer to it.
	Names []string `json:"names,omitempty"`
}

var imageName = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,62}$`)

// CheckName says whether name can name an image.
func CheckName(name string) error {
	if !imageName.MatchString(name) {
		return fmt.Errorf("image name %q: use 1-63 lower-case letters, digits, '.', '_' or '-', starting with a letter or digit", name)
	}
	return nil
}

// SetName makes name refer to the image in imageDir, a directory of
// cacheDir's images, replacing what it referred to before. The caller holds
// LockCache.
func SetName(cacheDir, name, imageDir string) error {
	if err := CheckName(name); err != nil {
		return err
	}
	images, err := filepath.Abs(filepath.Join(cacheDir, "images"))
	if err != nil {
		return err
	}
	abs, err := filepath.Abs(imageDir)
	if err != nil {
		return err
	}
	if filepath.Dir(abs) != images {
		return fmt.Errorf("name image %s: not an image of the cache %s", imageDir, cacheDir)
	}
	names := filepath.Join(cacheDir, "names")
	if err := os.MkdirAll(names, 0o755); err != nil {
		return fmt.Errorf("name image %s: %w", name, err)
	}
	tmp := filepath.Join(names, ".new-"+name)
	_ = os.Remove(tmp)
	if err := os.Symlink(filepath.Join("..", "images", filepath.Base(imageDir)), tmp); err != nil {
		return fmt.Errorf("name image %s: %w", name, err)
	}
	if err := os.Rename(tmp, filepath.Join(names, name)); err != nil {
		return fmt.Errorf("name image %s: %w", name, err)
	}
	return nil
}

// ResolveName returns the directory of the image called name in cacheDir
// (DefaultCacheDir() when empty).
func ResolveName(cacheDir, name string) (string, error) {
	if err := CheckName(name); err != nil {
		return "", err
	}
	link := filepath.Join(cmp.Or(cacheDir, DefaultCacheDir()), "names", name)
	target, err := os.Readlink(link)
	if err != nil {
		return "", fmt.Errorf("image %s: no image of that name in the cache (image ls lists them): %w", name, err)
	}
	dir := filepath.Join(filepath.Dir(link), target)
	if _, err := Load(dir); err != nil {
		return "", fmt.Errorf("image %s: %w", name, err)
	}
	return dir, nil
}

// namesByDir maps image directories to the names that refer to them.
func namesByDir(cacheDir string) map[string][]string {
	names := filepath.Join(cacheDir, "names")
	entries, _ := os.ReadDir(names)
	out := map[string][]string{}
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), ".") {
			continue
		}
		target, err := os.Readlink(filepath.Join(names, e.Name()))
		if err != nil {
			continue
		}
		dir := filepath.Clean(filepath.Join(names, target))
		out[dir] = append(out[dir], e.Name())
	}
	return out
}

// ListCached returns the finished images in cacheDir (DefaultCacheDir() when
// empty), newest first. Builds in progress and unreadable directories are
// left out.
func ListCached(cacheDir string) ([]CachedImage, error) {
	cacheDir = cmp.Or(cacheDir, DefaultCacheDir())
	root := filepath.Join(cacheDir, "images")
	entries, err := os.ReadDir(root)
	if os.IsNotExist(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list guest images in %s: %w", root, err)
	}
	named := namesByDir(cacheDir)
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
		c := CachedImage{Image: img, Names: named[filepath.Clean(dir)]}
		if fi, err := os.Stat(filepath.Join(dir, ManifestName)); err == nil {
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
	// Named images (SetName) are always kept.
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
		if i < opts.KeepNewest || inUse[filepath.Clean(img.Dir)] || len(img.Names) > 0 {
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
