package rootfs

import (
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/warmpool/warmpool/guest"
)

// ErrNoShell is returned (wrapped) when the root filesystem has no /bin/sh:
// exec runs commands through it.
var ErrNoShell = errors.New("root filesystem has no /bin/sh")

// layoutVersion changes whenever the disk's layout changes in a way the
// other inputs do not capture.
const layoutVersion = "warmpool-rootfs-1"

// DiskFile is the root filesystem disk's name in the image directory.
const DiskFile = "rootfs.ext4"

// Options configures Build.
type Options struct {
	Source Source
	// Packages are installed on top of the suite's minimal system
	// (debian sources only).
	Packages []string
	// SizeMiB is the disk's size; 0 sizes it to its files.
	SizeMiB int
	// Base is the busybox image (guest.Build) whose kernel and initramfs
	// the image boots with; it must be in CacheDir.
	Base guest.Image
	// CacheDir is the guest image cache; guest.DefaultCacheDir() when empty.
	CacheDir string
	// TreeCache holds debootstrap trees, by a key of their inputs;
	// CacheDir when empty.
	TreeCache string
	// Mirror is the Debian archive; the host apt's (HostDebianMirror) when
	// empty.
	Mirror string
	// Progress, when set, is told about each step; total is -1 when
	// unknown, else done and total count bytes.
	Progress func(step string, done, total int64)
}

// Build builds the image for opts, or returns the cached one with the same
// digest. On failure nothing is left in the cache (a debootstrap tree that
// completed stays cached under its own key).
func Build(ctx context.Context, opts Options) (guest.Image, error) {
	progress := opts.Progress
	if progress == nil {
		progress = func(string, int64, int64) {}
	}
	src := opts.Source
	if src.Kind == KindBusybox || src.Kind == "" {
		return guest.Image{}, errors.New("rootfs.Build: the busybox image is guest.Build's")
	}
	if len(opts.Packages) > 0 && src.Kind != KindDebian {
		return guest.Image{}, fmt.Errorf("--packages needs a debian:SUITE source, not %s", src)
	}
	if opts.SizeMiB < 0 {
		return guest.Image{}, fmt.Errorf("disk size %d MiB: must be positive", opts.SizeMiB)
	}
	if opts.Base.Digest == "" || opts.Base.Rootfs != nil {
		return guest.Image{}, errors.New("rootfs.Build: Base must be a busybox image")
	}
	cache := cmp.Or(opts.CacheDir, guest.DefaultCacheDir())
	if err := os.MkdirAll(cache, 0o755); err != nil {
		return guest.Image{}, fmt.Errorf("guest image cache: %w", err)
	}
	packages := slices.Clone(opts.Packages)
	slices.Sort(packages)
	packages = slices.Compact(packages)

	scratch, err := os.MkdirTemp(cache, ".rootfs-")
	if err != nil {
		return guest.Image{}, fmt.Errorf("guest image cache: %w", err)
	}
	defer os.RemoveAll(scratch)

	// The content key: what the disk's files are made of.
	content := sha256.New()
	fmt.Fprintf(content, "%s\n%s\n", layoutVersion, src.Kind)
	var treeDir string
	defaults := guest.ExecDefaults{Env: debianEnv}
	stage := filepath.Join(scratch, "root")
	switch src.Kind {
	case KindDir:
		fi, err := os.Stat(src.Arg)
		if err != nil || !fi.IsDir() {
			return guest.Image{}, fmt.Errorf("image source %s: not a directory: %w", src, cmp.Or(err, fs.ErrInvalid))
		}
		progress("hash "+src.Arg, 0, -1)
		if err := hashTree(content, src.Arg); err != nil {
			return guest.Image{}, err
		}
		treeDir = src.Arg
	case KindTar, KindOCIArchive, KindDockerArchive:
		if err := hashFile(content, src.Arg); err != nil {
			return guest.Image{}, fmt.Errorf("image source %s: %w", src, err)
		}
		treeDir = stage
	case KindDebian:
		mirror := opts.Mirror
		if mirror == "" {
			if mirror, err = HostDebianMirror("/"); err != nil {
				return guest.Image{}, err
			}
		}
		treeDir, err = debootstrapTree(ctx, cmp.Or(opts.TreeCache, cache), src.Arg, mirror, packages, progress)
		if err != nil {
			return guest.Image{}, err
		}
		// The exact package versions installed say what the tree is.
		if err := hashFile(content, filepath.Join(treeDir, "var/lib/dpkg/status")); err != nil {
			return guest.Image{}, fmt.Errorf("debootstrap of %s: %w", src.Arg, err)
		}
		fmt.Fprintf(content, "suite %s\n", src.Arg)
	}
	h := sha256.New()
	fmt.Fprintf(h, "%s\nbase %s\ncontent %x\npackages %s\nsize %d\nformat ext4\n", layoutVersion, opts.Base.Digest, content.Sum(nil), strings.Join(packages, ","), opts.SizeMiB)
	digest := hex.EncodeToString(h.Sum(nil))
	dir := filepath.Join(cache, "images", digest[:16])
	if img, err := loadCached(ctx, cache, dir, digest, src.String()); err != nil || img.Digest != "" {
		if err == nil {
			progress("image up to date", 1, 1)
		}
		return img, err
	}

	if treeDir == stage {
		if err := os.Mkdir(stage, 0o755); err != nil {
			return guest.Image{}, err
		}
		t, err := openTree(stage)
		if err != nil {
			return guest.Image{}, err
		}
		switch src.Kind {
		case KindTar:
			err = applyTarball(ctx, src.Arg, t, progress)
		default:
			img, openErr := openArchive(ctx, src, filepath.Join(scratch, "layout"))
			if openErr != nil {
				t.close()
				return guest.Image{}, openErr
			}
			defaults, err = applyImage(ctx, img, t, src.String(), progress)
		}
		if err == nil {
			err = t.finish()
		}
		t.close()
		if err != nil {
			return guest.Image{}, err
		}
		if defaults.Env == nil {
			defaults.Env = debianEnv
		}
	}
	if !hasShell(treeDir) {
		return guest.Image{}, fmt.Errorf("image source %s: %w (a symlink to an executable counts): exec runs commands through it", src, ErrNoShell)
	}
	u, err := measure(treeDir)
	if err != nil {
		return guest.Image{}, err
	}
	sizeMiB, err := diskSize(u, opts.SizeMiB)
	if err != nil {
		return guest.Image{}, fmt.Errorf("image source %s: %w", src, err)
	}
	out := filepath.Join(scratch, "image")
	if err := os.Mkdir(out, 0o755); err != nil {
		return guest.Image{}, err
	}
	disk := filepath.Join(out, DiskFile)
	if err := makeExt4(ctx, treeDir, disk, u, sizeMiB, uuidFrom(digest), progress); err != nil {
		return guest.Image{}, fmt.Errorf("image source %s: %w", src, err)
	}
	for name, from := range map[string]string{"vmlinuz": opts.Base.Kernel, "initrd.img": opts.Base.Initrd} {
		if err := linkOrCopy(from, filepath.Join(out, name)); err != nil {
			return guest.Image{}, fmt.Errorf("image: take %s from the busybox image: %w", name, err)
		}
	}
	fi, err := os.Stat(disk)
	if err != nil {
		return guest.Image{}, err
	}
	img := guest.Image{
		Cmdline:       opts.Base.Cmdline,
		Digest:        digest,
		KernelPackage: opts.Base.KernelPackage,
		KernelRelease: opts.Base.KernelRelease,
		Modules:       opts.Base.Modules,
		Source:        src.String(),
		Rootfs: &guest.Rootfs{
			File:       DiskFile,
			Format:     "ext4",
			SizeBytes:  fi.Size(),
			BaseDigest: opts.Base.Digest,
			Packages:   packages,
			Exec:       defaults,
		},
	}
	manifest, err := json.MarshalIndent(img, "", "  ")
	if err != nil {
		return guest.Image{}, err
	}
	if err := os.WriteFile(filepath.Join(out, guest.ManifestName), append(manifest, '\n'), 0o644); err != nil {
		return guest.Image{}, fmt.Errorf("write image: %w", err)
	}
	if err := install(ctx, cache, out, dir, digest); err != nil {
		return guest.Image{}, err
	}
	progress("image built", 1, 1)
	return guest.Load(dir)
}

// loadCached returns the image in dir when it is complete and has digest,
// else a zero Image. The files are assembled without the cache's lock (a
// debootstrap takes minutes, and the busybox build shares the lock); only
// looking and installing take it.
func loadCached(ctx context.Context, cache, dir, digest, source string) (guest.Image, error) {
	unlock, err := guest.LockCache(ctx, cache)
	if err != nil {
		return guest.Image{}, err
	}
	defer unlock()
	img, err := guest.Load(dir)
	if err != nil || img.Digest != digest {
		return guest.Image{}, nil
	}
	if img.Source != source {
		// The same content from another source: templates built from it
		// now name this one.
		if err := guest.SetSource(dir, source); err != nil {
			return guest.Image{}, err
		}
		img.Source = source
	}
	return img, nil
}

// install moves the finished image out into dir, unless a concurrent build
// of the same digest installed it first.
func install(ctx context.Context, cache, out, dir, digest string) error {
	unlock, err := guest.LockCache(ctx, cache)
	if err != nil {
		return err
	}
	defer unlock()
	if img, err := guest.Load(dir); err == nil && img.Digest == digest {
		return nil
	}
	if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
		return err
	}
	_ = os.RemoveAll(dir) // an incomplete image from an interrupted build
	if err := os.Rename(out, dir); err != nil {
		return fmt.Errorf("install image in %s: %w", dir, err)
	}
	return nil
}

// uuidFrom formats the digest's first 16 bytes as a UUID.
func uuidFrom(digest string) string {
	return digest[0:8] + "-" + digest[8:12] + "-" + digest[12:16] + "-" + digest[16:20] + "-" + digest[20:32]
}

func hashFile(h hash.Hash, path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	sum := sha256.New()
	if _, err := io.Copy(sum, f); err != nil {
		return fmt.Errorf("read %s: %w", path, err)
	}
	fmt.Fprintf(h, "file %x\n", sum.Sum(nil))
	return nil
}

// hashTree hashes every entry of dir: path, type, mode, owner, mtime,
// content or link target.
func hashTree(h hash.Hash, dir string) error {
	return filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return fmt.Errorf("read %s: %w", p, err)
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		uid, gid := owner(fi)
		fmt.Fprintf(h, "%q %v %d:%d %d", rel, fi.Mode(), uid, gid, fi.ModTime().UnixNano())
		switch {
		case fi.Mode().IsRegular():
			if err := hashFile(h, p); err != nil {
				return err
			}
		case fi.Mode()&fs.ModeSymlink != 0:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			fmt.Fprintf(h, " -> %q\n", target)
		default:
			fmt.Fprintln(h)
		}
		return nil
	})
}

func linkOrCopy(from, to string) error {
	if err := os.Link(from, to); err == nil {
		return nil
	}
	data, err := os.ReadFile(from)
	if err != nil {
		return err
	}
	return os.WriteFile(to, data, 0o644)
}
