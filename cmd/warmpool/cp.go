package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"
	"sync/atomic"

	"github.com/spf13/cobra"

	"github.com/warmpool/warmpool/api"
	"github.com/warmpool/warmpool/internal/tarball"
	"github.com/warmpool/warmpool/vm"
)

// cpEnd is one side of a copy: a local path, "-", or a path in a VM.
type cpEnd struct {
	target api.Target
	guest  bool
	path   string
	stdio  bool
}

// parseCpEnd reads LEASE:/path, machine:NAME:/path, - or a local path. A
// local path with a colon needs a slash before it (./a:b).
func parseCpEnd(s string) (cpEnd, error) {
	if s == "-" {
		return cpEnd{stdio: true}, nil
	}
	if rest, ok := strings.CutPrefix(s, "machine:"); ok {
		name, p, ok := strings.Cut(rest, ":")
		if !ok || name == "" || !strings.HasPrefix(p, "/") {
			return cpEnd{}, usagef("%q: want machine:NAME:/absolute/path", s)
		}
		return cpEnd{target: api.Target{Machine: name}, guest: true, path: p}, nil
	}
	if i := strings.IndexByte(s, ':'); i > 0 && !strings.Contains(s[:i], "/") {
		p := s[i+1:]
		if !strings.HasPrefix(p, "/") {
			return cpEnd{}, usagef("%q: the guest path must be absolute (LEASE:/path)", s)
		}
		return cpEnd{target: api.Target{Lease: s[:i]}, guest: true, path: p}, nil
	}
	return cpEnd{path: s}, nil
}

func newCpCommand(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "cp SRC DST",
		Short: "Copy files and directory trees into or out of a VM (mode, mtime and symlinks kept)",
		Long: `Copy a file or a directory tree between this host and a VM. One side is
LEASE:/path or machine:NAME:/path, the other a local path or - (stdin or
stdout). Like cp: a file copied onto an existing directory lands inside
it; a directory copied to a path that does not exist becomes that path,
onto an existing directory it lands inside it. Mode, mtime and symlinks
(as links) are kept; devices and fifos are skipped. - reads or writes a
file's raw bytes (a directory comes out as a tar stream).

The copy streams: nothing is buffered whole on the way, and a file
appears in the VM only once it has arrived completely.`,
		Args: args("SRC", "DST"),
		RunE: func(cmd *cobra.Command, a []string) error {
			src, err := parseCpEnd(a[0])
			if err != nil {
				return err
			}
			dst, err := parseCpEnd(a[1])
			if err != nil {
				return err
			}
			switch {
			case src.guest && dst.guest:
				return usagef("cp copies between this host and a VM; copy VM to VM through a local file")
			case !src.guest && !dst.guest:
				return usagef("cp needs one side in a VM (LEASE:/path or machine:NAME:/path)")
			}
			return g.withClient(func(c *api.Client) error {
				p := newProgress(cmd.ErrOrStderr())
				defer p.done()
				if dst.guest {
					return copyIn(cmd.Context(), c, src, dst, cmd.InOrStdin(), p)
				}
				return copyOut(cmd.Context(), c, src, dst, cmd.OutOrStdout(), p)
			})
		},
	}
}

// countingReader reports progress as bytes go by.
type countingReader struct {
	r    io.Reader
	n    atomic.Int64
	tick func(int64)
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	if n > 0 {
		c.tick(c.n.Add(int64(n)))
	}
	return n, err
}

func copyIn(ctx context.Context, c *api.Client, src, dst cpEnd, stdin io.Reader, p *progress) error {
	remote, rerr := c.Stat(ctx, dst.target, dst.path, false)
	remoteDir := rerr == nil && remote.Type == "dir"
	if rerr != nil && !errors.Is(rerr, vm.ErrNotFound) {
		return wrapf(rerr, "stat %s in %s", dst.path, dst.target)
	}
	if src.stdio {
		if remoteDir {
			return fmt.Errorf("%s in %s is a directory; name the file to write", dst.path, dst.target)
		}
		r := &countingReader{r: stdin, tick: func(n int64) { p.update("copying stdin", n, -1) }}
		_, err := c.WriteFile(ctx, dst.target, api.WriteFileOptions{Path: dst.path}, r)
		return wrapf(err, "copy stdin to %s in %s", dst.path, dst.target)
	}
	fi, err := os.Stat(src.path)
	if err != nil {
		return wrapf(err, "copy %s", src.path)
	}
	if fi.Mode().IsRegular() {
		to := dst.path
		if remoteDir {
			to = path.Join(dst.path, filepath.Base(src.path))
		}
		f, err := os.Open(src.path)
		if err != nil {
			return wrapf(err, "copy %s", src.path)
		}
		defer f.Close()
		step := "copying " + filepath.Base(src.path)
		r := &countingReader{r: f, tick: func(n int64) { p.update(step, n, fi.Size()) }}
		_, err = c.WriteFile(ctx, dst.target, api.WriteFileOptions{Path: to, Mode: unixPerm(fi.Mode()), ModTime: fi.ModTime()}, r)
		return wrapf(err, "copy %s to %s in %s", src.path, to, dst.target)
	}
	if !fi.IsDir() {
		return fmt.Errorf("copy %s: not a regular file or directory", src.path)
	}
	// Onto an existing directory the tree lands inside it; else it becomes
	// the destination.
	prefix := ""
	if remoteDir {
		prefix = filepath.Base(filepath.Clean(src.path))
	} else if rerr == nil {
		return fmt.Errorf("copy directory %s onto %s in %s: it is a %s", src.path, dst.path, dst.target, remote.Type)
	}
	pr, pw := io.Pipe()
	var sent atomic.Int64
	go func() {
		pw.CloseWithError(tarball.Write(pw, src.path, prefix, func(n int64) { p.update("copying "+src.path, sent.Add(n), -1) }))
	}()
	_, err = c.WriteFile(ctx, dst.target, api.WriteFileOptions{Path: dst.path, Archive: true, Parents: !remoteDir}, pr)
	pr.CloseWithError(errors.New("upload ended"))
	return wrapf(err, "copy %s to %s in %s", src.path, dst.path, dst.target)
}

func unixPerm(m fs.FileMode) uint32 {
	u := uint32(m.Perm())
	if m&fs.ModeSetuid != 0 {
		u |= 0o4000
	}
	if m&fs.ModeSetgid != 0 {
		u |= 0o2000
	}
	if m&fs.ModeSticky != 0 {
		u |= 0o1000
	}
	return u
}

func copyOut(ctx context.Context, c *api.Client, src, dst cpEnd, stdout io.Writer, p *progress) error {
	remote, err := c.Stat(ctx, src.target, src.path, false)
	if err != nil {
		return wrapf(err, "copy %s from %s", src.path, src.target)
	}
	isDir := remote.Type == "dir"
	if !isDir && remote.Type != "file" {
		return fmt.Errorf("copy %s from %s: a %s, not a file or directory", src.path, src.target, remote.Type)
	}
	_, body, err := c.ReadFile(ctx, src.target, src.path, isDir)
	if err != nil {
		return wrapf(err, "copy %s from %s", src.path, src.target)
	}
	defer body.Close()
	step := "copying " + path.Base(src.path)
	total := remote.Size
	if isDir {
		total = -1
	}
	r := &countingReader{r: body, tick: func(n int64) { p.update(step, n, total) }}
	if dst.stdio {
		_, err := io.Copy(stdout, r)
		return wrapf(err, "copy %s from %s", src.path, src.target)
	}
	local, lerr := os.Stat(dst.path)
	localDir := lerr == nil && local.IsDir()
	if !isDir {
		to := dst.path
		if localDir {
			to = filepath.Join(dst.path, path.Base(src.path))
		}
		return wrapf(writeLocal(to, r, remote), "copy %s from %s to %s", src.path, src.target, to)
	}
	// The archive's entries start with the directory's base name.
	strip := 1
	into := dst.path
	switch {
	case localDir:
		strip = 0
	case lerr == nil:
		return fmt.Errorf("copy directory %s from %s onto %s: not a directory", src.path, src.target, dst.path)
	default:
		if err := os.Mkdir(dst.path, 0o755); err != nil {
			return wrapf(err, "copy %s from %s", src.path, src.target)
		}
	}
	root, err := os.OpenRoot(into)
	if err != nil {
		return wrapf(err, "copy %s from %s", src.path, src.target)
	}
	defer root.Close()
	if strip == 1 {
		// The directory's own entry carries its mode and time.
		return wrapf(extractTop(root, r), "copy %s from %s into %s", src.path, src.target, into)
	}
	return wrapf(tarball.Extract(root, r, 0, os.Geteuid() == 0, nil), "copy %s from %s into %s", src.path, src.target, into)
}

// extractTop unpacks an archive whose entries all start with one
// directory's name into root as that directory.
func extractTop(root *os.Root, r io.Reader) error {
	return tarball.Extract(root, r, 1, os.Geteuid() == 0, nil)
}

// writeLocal writes a downloaded file next to its destination and renames
// it into place once complete, with the guest file's mode and mtime.
func writeLocal(to string, r io.Reader, fi api.FileInfo) error {
	dir := filepath.Dir(to)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(to)+".warmpool-*")
	if err != nil {
		return err
	}
	ok := false
	defer func() {
		if !ok {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	if _, err := io.Copy(tmp, r); err != nil {
		return err
	}
	if err := tmp.Chmod(fs.FileMode(fi.Mode & 0o777)); err != nil {
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Chtimes(tmp.Name(), fi.ModTime(), fi.ModTime()); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), to); err != nil {
		return err
	}
	ok = true
	return nil
}
