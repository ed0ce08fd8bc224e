package server

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/warmpool/warmpool/agent/proto"
	"github.com/warmpool/warmpool/internal/tarball"
)

// guestPath checks that p is an absolute guest path and cleans it. Paths
// are the guest's own: the agent runs inside the VM, so no path (however
// many ".." or symlinks it has) reaches anything outside it.
func guestPath(p string) (string, error) {
	if p == "" || !strings.HasPrefix(p, "/") {
		return "", &codedError{code: proto.CodeBadRequest, err: fmt.Errorf("path %q: must be absolute", p)}
	}
	if strings.IndexByte(p, 0) >= 0 {
		return "", &codedError{code: proto.CodeBadRequest, err: fmt.Errorf("path %q: contains NUL", p)}
	}
	return filepath.Clean(p), nil
}

func unixMode(m fs.FileMode) uint32 {
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

func goMode(u uint32) fs.FileMode {
	m := fs.FileMode(u & 0o777)
	if u&0o4000 != 0 {
		m |= fs.ModeSetuid
	}
	if u&0o2000 != 0 {
		m |= fs.ModeSetgid
	}
	if u&0o1000 != 0 {
		m |= fs.ModeSticky
	}
	return m
}

func fileInfo(path string, fi fs.FileInfo) *proto.FileInfo {
	info := &proto.FileInfo{Name: fi.Name(), Path: path, Type: proto.FileType(fi.Mode()), Size: fi.Size(),
		Mode: unixMode(fi.Mode()), ModTimeUnixNano: fi.ModTime().UnixNano()}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		info.UID, info.GID = int(st.Uid), int(st.Gid)
	}
	if fi.Mode()&fs.ModeSymlink != 0 {
		info.Link, _ = os.Readlink(path)
	}
	return info
}

func (s *session) serveFS(st *stream, req *proto.StreamRequest) error {
	path, err := guestPath(req.Path)
	if err != nil {
		if req.Op == proto.SOpFSWrite {
			drainUpload(st.fr)
		}
		return st.fail(err)
	}
	switch req.Op {
	case proto.SOpFSStat:
		stat := os.Stat
		if req.NoFollow {
			stat = os.Lstat
		}
		fi, err := stat(path)
		if err != nil {
			return st.fail(err)
		}
		return st.result(proto.StreamResult{File: fileInfo(path, fi)})
	case proto.SOpFSList:
		fi, err := os.Stat(path)
		if err != nil {
			return st.fail(err)
		}
		if !fi.IsDir() {
			return st.fail(&codedError{code: proto.CodeNotDir, err: fmt.Errorf("list %s: not a directory", path)})
		}
		des, err := os.ReadDir(path)
		if err != nil {
			return st.fail(err)
		}
		entries := make([]proto.FileInfo, 0, len(des))
		for _, de := range des {
			fi, err := de.Info()
			if err != nil {
				continue // removed meanwhile
			}
			entries = append(entries, *fileInfo(filepath.Join(path, de.Name()), fi))
		}
		return st.result(proto.StreamResult{File: fileInfo(path, fi), Entries: entries})
	case proto.SOpFSMkdir:
		mode := goMode(req.Mode)
		if req.Mode == 0 {
			mode = 0o755
		}
		if req.Parents {
			err = os.MkdirAll(path, mode)
		} else {
			err = os.Mkdir(path, mode)
		}
		if err == nil {
			err = os.Chmod(path, mode)
		}
		if err != nil {
			return st.fail(err)
		}
		fi, err := os.Stat(path)
		if err != nil {
			return st.fail(err)
		}
		return st.result(proto.StreamResult{File: fileInfo(path, fi)})
	case proto.SOpFSRemove:
		if path == "/" {
			return st.fail(&codedError{code: proto.CodeBadRequest, err: errors.New("refusing to remove /")})
		}
		if _, err := os.Lstat(path); err != nil {
			return st.fail(err)
		}
		if req.Recursive {
			err = os.RemoveAll(path)
		} else {
			err = os.Remove(path)
		}
		if err != nil {
			return st.fail(err)
		}
		return st.result(proto.StreamResult{})
	case proto.SOpFSRename:
		to, err := guestPath(req.To)
		if err != nil {
			return st.fail(err)
		}
		if err := os.Rename(path, to); err != nil {
			return st.fail(err)
		}
		fi, err := os.Lstat(to)
		if err != nil {
			return st.fail(err)
		}
		return st.result(proto.StreamResult{File: fileInfo(to, fi)})
	case proto.SOpFSWatch:
		return s.serveWatch(st, path, req.Recursive)
	case proto.SOpFSRead:
		if req.Archive {
			return s.readArchive(st, path)
		}
		return readFile(st, path)
	case proto.SOpFSWrite:
		if req.Archive {
			return s.writeArchive(st, path, req)
		}
		return writeFile(st, path, req)
	}
	return nil
}

func readFile(st *stream, path string) error {
	f, err := os.Open(path)
	if err != nil {
		return st.fail(err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return st.fail(err)
	}
	if fi.IsDir() {
		return st.fail(&codedError{code: proto.CodeIsDir, err: fmt.Errorf("read %s: is a directory (read it as an archive)", path)})
	}
	if err := st.result(proto.StreamResult{File: fileInfo(path, fi)}); err != nil {
		return err
	}
	buf := make([]byte, proto.DataChunk)
	for {
		n, rerr := f.Read(buf)
		if n > 0 {
			if err := st.fw.Frame(proto.FrameData, buf[:n]); err != nil {
				return err
			}
		}
		if errors.Is(rerr, io.EOF) {
			return st.fw.Frame(proto.FrameEnd, nil)
		}
		if rerr != nil {
			return st.fail(rerr)
		}
	}
}

// readArchive sends path (a file, directory or symlink) as a tar stream
// whose entries are named from path's base name down, as `tar -C dir base`
// would. Symlinks are archived as links, never followed.
func (s *session) readArchive(st *stream, path string) error {
	top, err := os.Lstat(path)
	if err != nil {
		return st.fail(err)
	}
	if err := st.result(proto.StreamResult{File: fileInfo(path, top)}); err != nil {
		return err
	}
	bw := bufio.NewWriterSize(st.fw.Data(proto.FrameData), proto.DataChunk)
	prefix := filepath.Base(path)
	if path == "/" {
		prefix = ""
	}
	err = tarball.Write(bw, path, prefix, nil)
	if err == nil {
		err = bw.Flush()
	}
	if err != nil {
		return st.fail(err)
	}
	return st.fw.Frame(proto.FrameEnd, nil)
}

// uploadReader reads an upload's FrameData frames: io.EOF at FrameEnd,
// errUploadAborted when the stream ends without one.
type uploadReader struct {
	fr   *proto.FrameReader
	rest []byte
	done bool
}

var errUploadAborted = errors.New("upload ended before its end frame")

func (u *uploadReader) Read(p []byte) (int, error) {
	for len(u.rest) == 0 {
		if u.done {
			return 0, io.EOF
		}
		typ, data, err := u.fr.Next()
		if err != nil {
			return 0, errUploadAborted
		}
		switch typ {
		case proto.FrameData:
			u.rest = data
		case proto.FrameEnd:
			u.done = true
		}
	}
	n := copy(p, u.rest)
	u.rest = u.rest[n:]
	return n, nil
}

// drainUpload reads what is left of an upload the agent refused, so that
// the host, which may still be sending, is not left blocked on a full
// window. It reports whether the upload was complete.
func drainUpload(fr *proto.FrameReader) bool {
	for {
		typ, _, err := fr.Next()
		if err != nil {
			return false
		}
		if typ == proto.FrameEnd {
			return true
		}
	}
}

// writeFile streams an upload into a temporary file next to path and
// renames it into place once it is complete, so that a failed or aborted
// upload leaves nothing and a reader never sees half a file.
func writeFile(st *stream, path string, req *proto.StreamRequest) error {
	fail := func(err error) error {
		drainUpload(st.fr)
		return st.fail(err)
	}
	if fi, err := os.Lstat(path); err == nil && fi.IsDir() {
		return fail(&codedError{code: proto.CodeIsDir, err: fmt.Errorf("write %s: is a directory", path)})
	}
	dir := filepath.Dir(path)
	if req.Parents {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return fail(err)
		}
	}
	if fi, err := os.Stat(dir); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return fail(&codedError{code: proto.CodeNotFound, err: fmt.Errorf("write %s: directory %s does not exist", path, dir)})
		}
		return fail(err)
	} else if !fi.IsDir() {
		return fail(&codedError{code: proto.CodeNotDir, err: fmt.Errorf("write %s: %s is not a directory", path, dir)})
	}
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".warmpool-*")
	if err != nil {
		return fail(err)
	}
	committed := false
	defer func() {
		if !committed {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	up := &uploadReader{fr: st.fr}
	buf := make([]byte, proto.DataChunk)
	if _, err := io.CopyBuffer(onlyWriter{tmp}, up, buf); err != nil {
		if errors.Is(err, errUploadAborted) {
			return err
		}
		return fail(fmt.Errorf("write %s: %w", path, err))
	}
	mode := goMode(req.Mode)
	if req.Mode == 0 {
		mode = 0o644
	}
	if err := tmp.Chmod(mode); err != nil {
		return st.fail(err)
	}
	if err := tmp.Close(); err != nil {
		return st.fail(fmt.Errorf("write %s: %w", path, err))
	}
	if req.ModTimeUnixNano != 0 {
		t := time.Unix(0, req.ModTimeUnixNano)
		if err := os.Chtimes(tmp.Name(), t, t); err != nil {
			return st.fail(err)
		}
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return st.fail(fmt.Errorf("write %s: %w", path, err))
	}
	committed = true
	fi, err := os.Lstat(path)
	if err != nil {
		return st.fail(err)
	}
	return st.result(proto.StreamResult{File: fileInfo(path, fi)})
}

// onlyWriter hides ReadFrom so that io.CopyBuffer uses the buffer.
type onlyWriter struct{ io.Writer }

// writeArchive unpacks a tar stream into the directory path. Every entry is
// resolved below path through os.Root, so no entry name or symlink in the
// archive places anything outside it. Files are written whole or not at
// all; a failure part way leaves the entries before it.
func (s *session) writeArchive(st *stream, path string, req *proto.StreamRequest) error {
	fail := func(err error) error {
		drainUpload(st.fr)
		return st.fail(err)
	}
	if req.Parents {
		if err := os.MkdirAll(path, 0o755); err != nil {
			return fail(err)
		}
	}
	fi, err := os.Stat(path)
	if err != nil {
		return fail(err)
	}
	if !fi.IsDir() {
		return fail(&codedError{code: proto.CodeNotDir, err: fmt.Errorf("unpack into %s: not a directory", path)})
	}
	root, err := os.OpenRoot(path)
	if err != nil {
		return fail(err)
	}
	defer root.Close()
	up := &uploadReader{fr: st.fr}
	err = tarball.Extract(root, up, 0, true, nil)
	switch {
	case errors.Is(err, errUploadAborted):
		return err
	case errors.Is(err, tarball.ErrEscape):
		return fail(&codedError{code: proto.CodeBadRequest, err: fmt.Errorf("unpack into %s: %w", path, err)})
	case errors.Is(err, tarball.ErrIsDir):
		return fail(&codedError{code: proto.CodeIsDir, err: fmt.Errorf("unpack into %s: %w", path, err)})
	case err != nil:
		return fail(fmt.Errorf("unpack into %s: %w", path, err))
	}
	// The tar end marker may come before the upload's end frame.
	if !up.done && !drainUpload(st.fr) {
		return errUploadAborted
	}
	if fi, err = os.Stat(path); err != nil {
		return st.fail(err)
	}
	return st.result(proto.StreamResult{File: fileInfo(path, fi)})
}
