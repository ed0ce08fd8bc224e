// Package tarball writes a file tree as a tar stream and unpacks one below
// a directory without letting any entry reach outside it. The guest agent
// and the CLI's cp share it, so both ends of a copy agree on the format:
// regular files, directories and symlinks (as links, never followed), with
// mode, mtime and numeric owner; other file types are skipped.
package tarball

import (
	"archive/tar"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// Write archives path (a file, directory or symlink) to w. Entry names
// start with prefix (path's base name for `tar -C dir base`, "" for the
// contents of a directory only). counted, when not nil, is called with the
// bytes of each file archived.
func Write(w io.Writer, path, prefix string, counted func(int64)) error {
	tw := tar.NewWriter(w)
	buf := make([]byte, 128<<10)
	err := filepath.WalkDir(path, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		mode := fi.Mode()
		if !mode.IsRegular() && !mode.IsDir() && mode&fs.ModeSymlink == 0 {
			return nil // devices, sockets and fifos are not copied
		}
		link := ""
		if mode&fs.ModeSymlink != 0 {
			if link, err = os.Readlink(p); err != nil {
				return err
			}
		}
		hdr, err := tar.FileInfoHeader(fi, link)
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(path, p)
		if err != nil {
			return err
		}
		name := filepath.ToSlash(filepath.Join(prefix, rel))
		if name == "." {
			if !mode.IsDir() {
				return fmt.Errorf("archive %s: a file needs a name prefix", path)
			}
			name = "."
		}
		hdr.Name = name
		if mode.IsDir() && name != "." {
			hdr.Name += "/"
		}
		hdr.Uname, hdr.Gname = "", ""
		hdr.Format = tar.FormatPAX
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		if mode.IsRegular() {
			f, err := os.Open(p)
			if err != nil {
				return err
			}
			n, err := io.CopyBuffer(tw, io.LimitReader(f, hdr.Size), buf)
			f.Close()
			if counted != nil {
				counted(n)
			}
			if err == nil && n != hdr.Size {
				err = fmt.Errorf("%s shrank while it was archived", p)
			}
			if err != nil {
				return fmt.Errorf("archive %s: %w", p, err)
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	return tw.Close()
}

// ErrEscape is an entry whose name would leave the directory.
var ErrEscape = errors.New("entry leaves the directory")

// Extract unpacks r below root, dropping the first strip components of
// every name (entries with fewer are skipped). Every name is resolved
// through root, so neither ".." nor a symlink unpacked earlier places
// anything outside it. Files are written to a temporary name and renamed
// into place whole; directory times are set last. counted, when not nil,
// is called with the bytes of each file written. owner sets numeric owners
// (root only).
func Extract(root *os.Root, r io.Reader, strip int, owner bool, counted func(int64)) error {
	tr := tar.NewReader(r)
	type dirTime struct {
		name string
		t    time.Time
	}
	var dirs []dirTime
	buf := make([]byte, 128<<10)
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return err
		}
		name := filepath.Clean(filepath.FromSlash(hdr.Name))
		if filepath.IsAbs(name) || name == ".." || strings.HasPrefix(name, ".."+string(filepath.Separator)) {
			return fmt.Errorf("%q: %w", hdr.Name, ErrEscape)
		}
		if strip > 0 {
			parts := strings.Split(name, string(filepath.Separator))
			if name == "." || len(parts) < strip {
				continue
			}
			name = filepath.Join(parts[strip:]...)
			if name == "" {
				name = "."
			}
		}
		mode := fs.FileMode(hdr.Mode & 0o777)
		if hdr.Mode&0o4000 != 0 {
			mode |= fs.ModeSetuid
		}
		if hdr.Mode&0o2000 != 0 {
			mode |= fs.ModeSetgid
		}
		if hdr.Mode&0o1000 != 0 {
			mode |= fs.ModeSticky
		}
		if dir := filepath.Dir(name); dir != "." {
			if err := root.MkdirAll(dir, 0o755); err != nil {
				return err
			}
		}
		switch hdr.Typeflag {
		case tar.TypeDir:
			if name != "." {
				if err := root.MkdirAll(name, mode); err != nil {
					return err
				}
			}
			if owner {
				_ = root.Lchown(name, hdr.Uid, hdr.Gid)
			}
			if err := root.Chmod(name, mode); err != nil {
				return err
			}
			dirs = append(dirs, dirTime{name, hdr.ModTime})
		case tar.TypeReg:
			n, err := writeFile(root, name, mode, hdr, tr, buf, owner)
			if counted != nil {
				counted(n)
			}
			if err != nil {
				return fmt.Errorf("unpack %s: %w", hdr.Name, err)
			}
		case tar.TypeSymlink:
			if fi, err := root.Lstat(name); err == nil && !fi.IsDir() {
				_ = root.Remove(name)
			}
			if err := root.Symlink(hdr.Linkname, name); err != nil {
				return err
			}
			if owner {
				_ = root.Lchown(name, hdr.Uid, hdr.Gid)
			}
		}
	}
	// Directory times last: creating their entries changed them.
	for i := len(dirs) - 1; i >= 0; i-- {
		_ = root.Chtimes(dirs[i].name, dirs[i].t, dirs[i].t)
	}
	return nil
}

// ErrIsDir is a file entry that lands on a directory.
var ErrIsDir = errors.New("is a directory")

func writeFile(root *os.Root, name string, mode fs.FileMode, hdr *tar.Header, r io.Reader, buf []byte, owner bool) (int64, error) {
	if fi, err := root.Lstat(name); err == nil && fi.IsDir() {
		return 0, fmt.Errorf("%s: %w", name, ErrIsDir)
	}
	tmpName := filepath.Join(filepath.Dir(name), "."+filepath.Base(name)+".warmpool-part")
	f, err := root.OpenFile(tmpName, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return 0, err
	}
	n, err := io.CopyBuffer(onlyWriter{f}, r, buf)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil && owner {
		_ = root.Lchown(tmpName, hdr.Uid, hdr.Gid)
	}
	if err == nil {
		err = root.Chmod(tmpName, mode) // after chown, which clears setuid
	}
	if err == nil {
		err = root.Chtimes(tmpName, hdr.ModTime, hdr.ModTime)
	}
	if err == nil {
		err = root.Rename(tmpName, name)
	}
	if err != nil {
		_ = root.Remove(tmpName)
	}
	return n, err
}

// onlyWriter hides ReadFrom so that io.CopyBuffer uses the buffer.
type onlyWriter struct{ io.Writer }
