package rootfs

import (
	"archive/tar"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// ErrEscape is returned (wrapped) for a layer entry whose path or link
// leaves the root filesystem through ".." or a symlink.
var ErrEscape = errors.New("path escapes the root filesystem")

const (
	whiteoutPrefix = ".wh."
	opaqueWhiteout = ".wh..wh..opq"
)

// tree is a root filesystem being assembled in a directory. Every write
// goes through os.Root, which refuses paths that leave the directory
// through ".." or symlinks (absolute symlinks included), so a layer cannot
// write outside it.
type tree struct {
	dir  string
	root *os.Root
	// dirTimes are directory mtimes, set last because creating entries in
	// a directory changes its mtime.
	dirTimes map[string]time.Time
}

func openTree(dir string) (*tree, error) {
	r, err := os.OpenRoot(dir)
	if err != nil {
		return nil, fmt.Errorf("open root filesystem %s: %w", dir, err)
	}
	return &tree{dir: dir, root: r, dirTimes: map[string]time.Time{}}, nil
}

func (t *tree) close() error { return t.root.Close() }

// entryName cleans a tar entry's name into a path relative to the root, or
// refuses it when it has a ".." component.
func entryName(name string) (string, error) {
	n := strings.TrimPrefix(name, "./")
	n = strings.TrimLeft(n, "/")
	for c := range strings.SplitSeq(n, "/") {
		if c == ".." {
			return "", fmt.Errorf("%w: %q has a .. component", ErrEscape, name)
		}
	}
	n = path.Clean(n)
	if n == "." {
		return "", nil
	}
	return n, nil
}

// applyLayer applies one layer's tar stream: whiteouts remove what lower
// layers put there, other entries are written (replacing what was there).
// onBytes is told how many bytes of file content were written.
func (t *tree) applyLayer(ctx context.Context, r io.Reader, what string, onBytes func(int64)) error {
	tr := tar.NewReader(r)
	written := map[string]bool{} // paths this layer wrote, which its own opaque whiteouts keep
	var opaque []string
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return fmt.Errorf("read %s: corrupt or truncated archive: %w", what, err)
		}
		name, err := entryName(hdr.Name)
		if err != nil {
			return fmt.Errorf("%s: %w", what, err)
		}
		base := path.Base(name)
		parent := path.Dir(name)
		switch {
		case base == opaqueWhiteout:
			opaque = append(opaque, parent)
			continue
		case strings.HasPrefix(base, whiteoutPrefix):
			victim := path.Join(parent, strings.TrimPrefix(base, whiteoutPrefix))
			if err := t.root.RemoveAll(victim); err != nil {
				return fmt.Errorf("%s: whiteout %s: %w", what, victim, t.explain(err))
			}
			continue
		}
		if name == "" {
			if hdr.Typeflag == tar.TypeDir {
				t.dirTimes["."] = hdr.ModTime
				if err := t.root.Chmod(".", fs.FileMode(hdr.Mode)&fs.ModePerm); err != nil {
					return fmt.Errorf("%s: chmod /: %w", what, err)
				}
			}
			continue
		}
		for p := name; p != "."; p = path.Dir(p) {
			written[p] = true
		}
		n, err := t.writeEntry(hdr, name, tr)
		if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, gzip.ErrChecksum) || errors.Is(err, gzip.ErrHeader) {
			return fmt.Errorf("read %s: corrupt or truncated archive: %s: %w", what, hdr.Name, err)
		}
		if err != nil {
			return fmt.Errorf("%s: %s: %w", what, hdr.Name, t.explain(err))
		}
		if onBytes != nil && n > 0 {
			onBytes(n)
		}
	}
	for _, dir := range opaque {
		if err := t.clearExcept(dir, written); err != nil {
			return fmt.Errorf("%s: opaque whiteout in %s: %w", what, dir, t.explain(err))
		}
	}
	return nil
}

// explain turns os.Root's escape errors into ErrEscape.
func (t *tree) explain(err error) error {
	var pe *fs.PathError
	var le *os.LinkError
	if errors.As(err, &pe) && strings.Contains(pe.Err.Error(), "escapes") ||
		errors.As(err, &le) && strings.Contains(le.Err.Error(), "escapes") {
		return fmt.Errorf("%w: %w", ErrEscape, err)
	}
	return err
}

// clearExcept removes the entries of dir that this layer did not write.
func (t *tree) clearExcept(dir string, keep map[string]bool) error {
	f, err := t.root.Open(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	names, err := f.Readdirnames(-1)
	f.Close()
	if err != nil {
		return err
	}
	for _, n := range names {
		p := path.Join(dir, n)
		if dir == "." {
			p = n
		}
		if !keep[p] {
			if err := t.root.RemoveAll(p); err != nil {
				return err
			}
		}
	}
	return nil
}

func (t *tree) writeEntry(hdr *tar.Header, name string, body io.Reader) (int64, error) {
	mode := fs.FileMode(hdr.Mode) & (fs.ModePerm | fs.ModeSetuid | fs.ModeSetgid | fs.ModeSticky)
	if err := t.root.MkdirAll(path.Dir(name), 0o755); err != nil {
		return 0, err
	}
	// An entry replaces what lower layers had at its path, except that a
	// directory merges with an existing directory.
	existing, statErr := t.root.Lstat(name)
	if statErr == nil && !(hdr.Typeflag == tar.TypeDir && existing.IsDir()) {
		if err := t.root.RemoveAll(name); err != nil {
			return 0, err
		}
	}
	var n int64
	switch hdr.Typeflag {
	case tar.TypeDir:
		if statErr != nil || !existing.IsDir() {
			if err := t.root.Mkdir(name, 0o700); err != nil {
				return 0, err
			}
		}
		t.dirTimes[name] = hdr.ModTime
	case tar.TypeReg:
		f, err := t.root.OpenFile(name, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
		if err != nil {
			return 0, err
		}
		n, err = io.Copy(f, body)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return n, fmt.Errorf("write: %w", err)
		}
	case tar.TypeSymlink:
		if err := t.root.Symlink(hdr.Linkname, name); err != nil {
			return 0, err
		}
		return 0, t.lchown(name, hdr)
	case tar.TypeLink:
		target, err := entryName(hdr.Linkname)
		if err != nil {
			return 0, err
		}
		if err := t.root.Link(target, name); err != nil {
			return 0, err
		}
		return 0, nil
	case tar.TypeChar, tar.TypeBlock, tar.TypeFifo:
		if err := t.mknod(name, hdr); err != nil {
			return 0, err
		}
	default:
		return 0, fmt.Errorf("unsupported tar entry type %q", hdr.Typeflag)
	}
	if err := t.lchown(name, hdr); err != nil {
		return n, err
	}
	if err := t.root.Chmod(name, mode); err != nil {
		return n, err
	}
	if hdr.Typeflag != tar.TypeDir {
		if err := t.root.Chtimes(name, hdr.ModTime, hdr.ModTime); err != nil {
			return n, err
		}
	}
	return n, nil
}

func (t *tree) lchown(name string, hdr *tar.Header) error {
	if os.Geteuid() != 0 {
		return nil // files stay the builder's; only root can give them away
	}
	return t.root.Lchown(name, hdr.Uid, hdr.Gid)
}

// mknod creates a device or fifo through a descriptor of its parent, which
// os.Root opened without leaving the root.
func (t *tree) mknod(name string, hdr *tar.Header) error {
	parent, err := t.root.Open(path.Dir(name))
	if err != nil {
		return err
	}
	defer parent.Close()
	mode := uint32(hdr.Mode) & 0o7777
	switch hdr.Typeflag {
	case tar.TypeChar:
		mode |= unix.S_IFCHR
	case tar.TypeBlock:
		mode |= unix.S_IFBLK
	default:
		mode |= unix.S_IFIFO
	}
	dev := unix.Mkdev(uint32(hdr.Devmajor), uint32(hdr.Devminor))
	if err := unix.Mknodat(int(parent.Fd()), path.Base(name), mode, int(dev)); err != nil {
		return fmt.Errorf("mknod %s: %w", name, err)
	}
	return nil
}

// finish sets the directories' mtimes (those no entry named get the
// epoch) and symlinks' mtimes to the epoch, so that equal inputs give an
// equal tree.
func (t *tree) finish() error {
	epoch := time.Unix(0, 0)
	var dirs []string
	err := filepath.WalkDir(t.dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(t.dir, p)
		switch {
		case d.IsDir():
			dirs = append(dirs, rel)
		case d.Type()&fs.ModeSymlink != 0:
			ts := []unix.Timespec{unix.NsecToTimespec(0), unix.NsecToTimespec(0)}
			if err := unix.UtimesNanoAt(unix.AT_FDCWD, p, ts, unix.AT_SYMLINK_NOFOLLOW); err != nil {
				return fmt.Errorf("set mtime of %s: %w", p, err)
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	for i := len(dirs) - 1; i >= 0; i-- {
		when, ok := t.dirTimes[filepath.ToSlash(dirs[i])]
		if !ok {
			when = epoch
		}
		if err := os.Chtimes(filepath.Join(t.dir, dirs[i]), when, when); err != nil {
			return fmt.Errorf("set mtime of %s: %w", dirs[i], err)
		}
	}
	return nil
}

// hasShell says whether /bin/sh exists and is a regular file, following
// symlinks the way the guest will (absolute targets from the root).
func hasShell(dir string) bool {
	p := "bin/sh"
	for range 40 {
		full := filepath.Join(dir, p)
		fi, err := os.Lstat(full)
		if err != nil {
			// A parent may be a symlink (merged /usr: bin -> usr/bin).
			parent, base := filepath.Split(p)
			parent = strings.TrimSuffix(parent, "/")
			if parent == "" {
				return false
			}
			resolved, ok := resolveLink(dir, parent)
			if !ok || resolved == parent {
				return false
			}
			p = path.Join(resolved, base)
			continue
		}
		if fi.Mode().IsRegular() {
			return fi.Mode()&0o111 != 0
		}
		if fi.Mode()&fs.ModeSymlink == 0 {
			return false
		}
		target, err := os.Readlink(full)
		if err != nil {
			return false
		}
		if strings.HasPrefix(target, "/") {
			p = path.Clean(strings.TrimPrefix(target, "/"))
		} else {
			p = path.Clean(path.Join(path.Dir(p), target))
		}
		if strings.HasPrefix(p, "..") {
			return false
		}
	}
	return false
}

// resolveLink resolves p's last component when it is a symlink, within dir.
func resolveLink(dir, p string) (string, bool) {
	target, err := os.Readlink(filepath.Join(dir, p))
	if err != nil {
		return p, true
	}
	var out string
	if strings.HasPrefix(target, "/") {
		out = path.Clean(strings.TrimPrefix(target, "/"))
	} else {
		out = path.Clean(path.Join(path.Dir(p), target))
	}
	return out, !strings.HasPrefix(out, "..")
}
