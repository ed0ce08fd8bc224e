//go:build linux

package server

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/warmpool/warmpool/agent/proto"
)

// watchMask is what every watch asks the kernel for. IN_ONLYDIR makes the
// kernel itself refuse a path that stopped being a directory after the
// check; IN_EXCL_UNLINK keeps a file deleted while still open from
// reporting writes under a name that is gone.
const watchMask = unix.IN_CREATE | unix.IN_MODIFY | unix.IN_DELETE | unix.IN_MOVED_FROM | unix.IN_MOVED_TO |
	unix.IN_ATTRIB | unix.IN_DELETE_SELF | unix.IN_MOVE_SELF | unix.IN_ONLYDIR | unix.IN_EXCL_UNLINK

// maxEventsFrame bounds the estimated JSON size of one FrameEvents frame,
// well under MaxStreamFrame whatever the names' lengths.
const maxEventsFrame = 256 << 10

// watcher is one inotify instance watching a directory (and, recursive,
// every directory below it).
type watcher struct {
	f         *os.File
	raw       syscall.RawConn
	root      string
	recursive bool
	// dirs maps a watch descriptor to its directory relative to root
	// ("" is root).
	dirs   map[int32]string
	rootWD int32
	once   sync.Once
}

func (w *watcher) close() { w.once.Do(func() { w.f.Close() }) }

func newWatcher(root string, recursive bool) (*watcher, error) {
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		if errors.Is(err, unix.EMFILE) || errors.Is(err, unix.ENFILE) {
			return nil, &codedError{code: proto.CodeLimit, err: fmt.Errorf("watch %s: the guest's inotify instance limit is reached (fs.inotify.max_user_instances): %w", root, err)}
		}
		return nil, fmt.Errorf("watch %s: inotify_init1: %w", root, err)
	}
	// Non-blocking, so the runtime's poller serves reads and Close ends a
	// read in progress: that is how a host's cancel stops the watch.
	f := os.NewFile(uintptr(fd), "inotify")
	raw, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("watch %s: %w", root, err)
	}
	w := &watcher{f: f, raw: raw, root: root, recursive: recursive, dirs: map[int32]string{}}
	// The root is followed if it is a symlink (the caller named it);
	// directories below it never are.
	wd, err := w.add(root, "", false)
	if err != nil {
		w.close()
		return nil, err
	}
	w.rootWD = wd
	if recursive {
		if _, err := w.addTree("", false, nil); err != nil {
			w.close()
			return nil, err
		}
	}
	return w, nil
}

// add watches the directory at abs (rel below root).
func (w *watcher) add(abs, rel string, noFollow bool) (int32, error) {
	mask := uint32(watchMask)
	if noFollow {
		mask |= unix.IN_DONT_FOLLOW
	}
	var wd int
	var aerr error
	if err := w.raw.Control(func(fd uintptr) { wd, aerr = unix.InotifyAddWatch(int(fd), abs, mask) }); err != nil {
		return 0, fmt.Errorf("watch %s: %w", abs, err)
	}
	if aerr != nil {
		if errors.Is(aerr, unix.ENOSPC) {
			return 0, &codedError{code: proto.CodeLimit, err: fmt.Errorf("watch %s: the guest's inotify watch limit is reached (fs.inotify.max_user_watches): %w", abs, aerr)}
		}
		return 0, fmt.Errorf("watch %s: %w", abs, aerr)
	}
	w.dirs[int32(wd)] = rel
	return int32(wd), nil
}

// addTree watches rel (unless it is the root, watched already) and every
// directory below it. With scan, what it finds there is reported as
// created: a directory made under a recursive watch may have been filled
// before its own watch was in place, and those files would otherwise go
// unreported (one made just after the watch may so be reported twice).
func (w *watcher) addTree(rel string, scan bool, evs []proto.WatchEvent) ([]proto.WatchEvent, error) {
	top := filepath.Join(w.root, rel)
	err := filepath.WalkDir(top, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if gone(err) {
				return nil
			}
			return fmt.Errorf("watch %s: %w", p, err)
		}
		r, _ := filepath.Rel(w.root, p)
		if r == "." {
			r = ""
		}
		if p != top && scan {
			evs = append(evs, proto.WatchEvent{Type: proto.WatchCreate, Name: r, Dir: d.IsDir()})
		}
		if !d.IsDir() || (p == top && rel == "") {
			return nil
		}
		if _, err := w.add(p, r, true); err != nil && !gone(err) {
			return err
		}
		return nil
	})
	return evs, err
}

// gone is a path that vanished (or was replaced by a non-directory)
// between being listed and being watched: its removal is reported anyway.
func gone(err error) bool {
	return errors.Is(err, fs.ErrNotExist) || errors.Is(err, unix.ENOTDIR)
}

// forget removes the watches of rel and below: a directory moved away,
// whose new name (if still below root) is watched afresh.
func (w *watcher) forget(rel string) {
	for wd, d := range w.dirs {
		if wd != w.rootWD && (d == rel || strings.HasPrefix(d, rel+"/")) {
			_ = w.raw.Control(func(fd uintptr) { _, _ = unix.InotifyRmWatch(int(fd), uint32(wd)) })
			delete(w.dirs, wd)
		}
	}
}

// parse turns one read of the inotify queue into events; end reports that
// the watched directory itself went away.
func (w *watcher) parse(b []byte) (evs []proto.WatchEvent, end bool, err error) {
	for off := 0; off+unix.SizeofInotifyEvent <= len(b); {
		ev := (*unix.InotifyEvent)(unsafe.Pointer(&b[off]))
		nameEnd := off + unix.SizeofInotifyEvent + int(ev.Len)
		if nameEnd > len(b) {
			break
		}
		name := strings.TrimRight(string(b[off+unix.SizeofInotifyEvent:nameEnd]), "\x00")
		off = nameEnd
		mask := ev.Mask
		if mask&unix.IN_Q_OVERFLOW != 0 {
			return evs, false, &codedError{code: proto.CodeLimit, err: fmt.Errorf("watch %s: the guest kernel's event queue overflowed (fs.inotify.max_queued_events): events were lost, watch again", w.root)}
		}
		dir, ok := w.dirs[ev.Wd]
		if !ok {
			continue // the last events of a watch already forgotten
		}
		if mask&unix.IN_IGNORED != 0 {
			delete(w.dirs, ev.Wd)
			if ev.Wd == w.rootWD {
				// Removed without a DELETE_SELF first (an unmount, say).
				return append(evs, proto.WatchEvent{Type: proto.WatchRemove, Name: ".", Dir: true}), true, nil
			}
			continue
		}
		isDir := mask&unix.IN_ISDIR != 0
		if name == "" {
			// The directory of the watch itself. A subdirectory's removal
			// or move is its parent's event already.
			if ev.Wd != w.rootWD {
				continue
			}
			switch {
			case mask&(unix.IN_DELETE_SELF|unix.IN_UNMOUNT) != 0:
				return append(evs, proto.WatchEvent{Type: proto.WatchRemove, Name: ".", Dir: true}), true, nil
			case mask&unix.IN_MOVE_SELF != 0:
				// Names below it would be relative to a path that is gone.
				return append(evs, proto.WatchEvent{Type: proto.WatchRename, Name: ".", Dir: true}), true, nil
			case mask&unix.IN_ATTRIB != 0:
				evs = append(evs, proto.WatchEvent{Type: proto.WatchChmod, Name: ".", Dir: true})
			}
			continue
		}
		rel := path.Join(dir, name)
		switch {
		case mask&unix.IN_CREATE != 0:
			evs = append(evs, proto.WatchEvent{Type: proto.WatchCreate, Name: rel, Dir: isDir})
			if isDir && w.recursive {
				if evs, err = w.addTree(rel, true, evs); err != nil {
					return evs, false, err
				}
			}
		case mask&unix.IN_MOVED_TO != 0:
			evs = append(evs, proto.WatchEvent{Type: proto.WatchCreate, Name: rel, Dir: isDir})
			if isDir && w.recursive {
				if evs, err = w.addTree(rel, false, evs); err != nil {
					return evs, false, err
				}
			}
		case mask&unix.IN_MODIFY != 0:
			evs = append(evs, proto.WatchEvent{Type: proto.WatchWrite, Name: rel, Dir: isDir})
		case mask&unix.IN_DELETE != 0:
			evs = append(evs, proto.WatchEvent{Type: proto.WatchRemove, Name: rel, Dir: isDir})
		case mask&unix.IN_MOVED_FROM != 0:
			evs = append(evs, proto.WatchEvent{Type: proto.WatchRename, Name: rel, Dir: isDir})
			if isDir && w.recursive {
				w.forget(rel)
			}
		case mask&unix.IN_ATTRIB != 0:
			evs = append(evs, proto.WatchEvent{Type: proto.WatchChmod, Name: rel, Dir: isDir})
		}
	}
	return evs, false, nil
}

// sendEvents sends evs in frames of bounded size.
func sendEvents(st *stream, evs []proto.WatchEvent) error {
	for len(evs) > 0 {
		n, size := 0, 0
		for n < len(evs) && (n == 0 || size+len(evs[n].Name)+48 <= maxEventsFrame) {
			size += len(evs[n].Name) + 48
			n++
		}
		if err := st.fw.JSON(proto.FrameEvents, proto.WatchEvents{Events: evs[:n]}); err != nil {
			return err
		}
		evs = evs[n:]
	}
	return nil
}

// serveWatch streams the changes below path until the host ends the
// stream or the directory goes away.
func (s *session) serveWatch(st *stream, path string, recursive bool) error {
	fi, err := os.Stat(path)
	if err != nil {
		return st.fail(fmt.Errorf("watch %s: %w", path, err))
	}
	if !fi.IsDir() {
		return st.fail(&codedError{code: proto.CodeNotDir, err: fmt.Errorf("watch %s: not a directory", path)})
	}
	w, err := newWatcher(path, recursive)
	if err != nil {
		return st.fail(err)
	}
	defer w.close()
	go func() {
		// The host only ever ends the stream: then the read below ends,
		// and a send blocked on a host that stopped reading gives up.
		_, _ = io.Copy(io.Discard, st.st)
		w.close()
		_ = st.st.SetWriteDeadline(time.Unix(1, 0))
	}()
	if err := st.result(proto.StreamResult{File: fileInfo(path, fi)}); err != nil {
		return err
	}
	buf := make([]byte, 64<<10)
	for {
		n, rerr := w.f.Read(buf)
		if rerr != nil {
			if errors.Is(rerr, os.ErrClosed) {
				return nil // the host ended the watch
			}
			return st.fail(fmt.Errorf("watch %s: read events: %w", path, rerr))
		}
		evs, end, perr := w.parse(buf[:n])
		if err := sendEvents(st, evs); err != nil {
			return err
		}
		switch {
		case perr != nil:
			return st.fail(perr)
		case end:
			return st.result(proto.StreamResult{})
		}
	}
}
