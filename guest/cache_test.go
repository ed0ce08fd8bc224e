package guest_test

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/warmpool/warmpool/guest"
)

// fakeCachedImage writes a finished image named name into cache, built at
// age before now.
func fakeCachedImage(t *testing.T, cache, name string, age time.Duration) string {
	t.Helper()
	dir := filepath.Join(cache, "images", name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(guest.Image{Digest: name + "0000"})
	for file, data := range map[string][]byte{"image.json": b, "vmlinuz": make([]byte, 1000), "initrd.img": make([]byte, 24)} {
		if err := os.WriteFile(filepath.Join(dir, file), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	when := time.Now().Add(-age)
	if err := os.Chtimes(filepath.Join(dir, "image.json"), when, when); err != nil {
		t.Fatal(err)
	}
	return dir
}

func cachedNames(t *testing.T, cache string) []string {
	t.Helper()
	imgs, err := guest.ListCached(cache)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, img := range imgs {
		names = append(names, filepath.Base(img.Dir))
	}
	return names
}

func TestPruneKeepsNewestAndInUseImages(t *testing.T) {
	cache := t.TempDir()
	fakeCachedImage(t, cache, "new", time.Minute)
	fakeCachedImage(t, cache, "mid", time.Hour)
	used := fakeCachedImage(t, cache, "old-used", 48*time.Hour)
	fakeCachedImage(t, cache, "oldest", 72*time.Hour)
	building := filepath.Join(cache, "images", ".build-123")
	if err := os.MkdirAll(building, 0o755); err != nil {
		t.Fatal(err)
	}

	if got, want := cachedNames(t, cache), []string{"new", "mid", "old-used", "oldest"}; !slices.Equal(got, want) {
		t.Fatalf("cached images = %v, want newest first %v", got, want)
	}
	imgs, _ := guest.ListCached(cache)
	if imgs[0].SizeBytes < 1024 {
		t.Errorf("size of an image with 1024 bytes of kernel and initrd = %d", imgs[0].SizeBytes)
	}

	ctx := context.Background()
	if _, err := guest.Prune(ctx, guest.PruneOptions{CacheDir: cache, KeepNewest: 0}); err == nil {
		t.Error("Prune keeping no image succeeded")
	}
	opts := guest.PruneOptions{CacheDir: cache, KeepNewest: 1, InUse: []string{used}, DryRun: true}
	would, err := guest.Prune(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	if got := cachedNames(t, cache); len(got) != 4 {
		t.Errorf("a dry run removed images: %v left", got)
	}
	opts.DryRun = false
	removed, err := guest.Prune(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	if len(removed) != 2 || len(would) != 2 || removed[0].Dir != would[0].Dir || removed[1].Dir != would[1].Dir {
		t.Errorf("removed %v, the dry run said %v", removed, would)
	}
	if got, want := cachedNames(t, cache), []string{"new", "old-used"}; !slices.Equal(got, want) {
		t.Errorf("after prune: %v, want %v", got, want)
	}
	if _, err := os.Stat(building); err != nil {
		t.Errorf("prune touched a build in progress: %v", err)
	}
	if removed, err := guest.Prune(ctx, guest.PruneOptions{CacheDir: filepath.Join(cache, "absent"), KeepNewest: 1}); err != nil || len(removed) != 0 {
		t.Errorf("prune of a missing cache = %v, %v", removed, err)
	}
}

func TestNamedImagesAreListedResolvedAndKeptByPrune(t *testing.T) {
	cache := t.TempDir()
	fakeCachedImage(t, cache, "new", time.Minute)
	named := fakeCachedImage(t, cache, "named", time.Hour)
	fakeCachedImage(t, cache, "old", 2*time.Hour)
	if err := guest.SetName(cache, "py", named); err != nil {
		t.Fatal(err)
	}
	if err := guest.SetName(cache, "Bad/Name", named); err == nil {
		t.Error("SetName accepted a name with a slash")
	}
	if err := guest.SetName(cache, "elsewhere", t.TempDir()); err == nil {
		t.Error("SetName accepted a directory outside the cache")
	}
	dir, err := guest.ResolveName(cache, "py")
	if err != nil || filepath.Base(dir) != "named" {
		t.Fatalf("ResolveName(py) = %s, %v", dir, err)
	}
	if _, err := guest.ResolveName(cache, "nope"); err == nil {
		t.Error("ResolveName of an unknown name succeeded")
	}
	imgs, err := guest.ListCached(cache)
	if err != nil {
		t.Fatal(err)
	}
	for _, img := range imgs {
		if want := filepath.Base(img.Dir) == "named"; want != slices.Equal(img.Names, []string{"py"}) {
			t.Errorf("%s: names %v", img.Dir, img.Names)
		}
	}
	removed, err := guest.Prune(context.Background(), guest.PruneOptions{CacheDir: cache, KeepNewest: 1})
	if err != nil {
		t.Fatal(err)
	}
	if len(removed) != 1 || filepath.Base(removed[0].Dir) != "old" {
		t.Errorf("prune removed %v, want only old", removed)
	}
	if got, want := cachedNames(t, cache), []string{"new", "named"}; !slices.Equal(got, want) {
		t.Errorf("after prune: %v, want %v", got, want)
	}
	// Renaming moves the name.
	if err := guest.SetName(cache, "py", filepath.Join(cache, "images", "new")); err != nil {
		t.Fatal(err)
	}
	if dir, _ := guest.ResolveName(cache, "py"); filepath.Base(dir) != "new" {
		t.Errorf("py after renaming: %s", dir)
	}
}
