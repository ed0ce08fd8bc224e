package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/warmpool/warmpool/agent/server"
)

// servePort serves the virtio-serial port named name for as long as ctx
// lasts. A virtio-serial port is one device for the VM's whole life while
// host connections come and go (a restored snapshot always gets a new one),
// so each host connection is one server.Serve call on the same open file.
//
// What the kernel's virtio_console does when the host side is not connected
// (and what this loop relies on): read returns 0 (EOF) instead of blocking,
// write blocks (EAGAIN when non-blocking), poll reports POLLHUP, and every
// host connect or disconnect raises SIGIO for a file opened with O_ASYNC.
// So after EOF the agent waits for SIGIO (with a slow timer as a fallback)
// and serves again.
func servePort(ctx context.Context, name string, opts server.Options) error {
	log := opts.Logger
	path, err := waitForPort(ctx, name, log)
	if err != nil {
		return err
	}
	sigio := make(chan os.Signal, 1)
	signal.Notify(sigio, unix.SIGIO)
	defer signal.Stop(sigio)

	// Opened non-blocking, the file goes through Go's poller, which is what
	// makes deadlines (and so abandoning a blocked write) possible.
	f, err := os.OpenFile(path, os.O_RDWR|unix.O_NONBLOCK, 0)
	if err != nil {
		return fmt.Errorf("open agent port %s: %w", path, err)
	}
	defer f.Close()
	if err := enableSIGIO(f); err != nil {
		log.Warn("no SIGIO on agent port; polling for host connections", "port", path, "err", err)
	}
	log.Info("serving", "port", path, "name", name)
	for ctx.Err() == nil {
		sess := &portSession{f: f}
		if err := server.Serve(ctx, sess, opts); err != nil {
			log.Debug("host session ended", "err", err)
		}
		// Serve waited for its handlers; a write still blocked because the
		// host left was aborted by the session's Close. Clear that deadline
		// before the next host connects.
		_ = f.SetDeadline(time.Time{})
		if sess.bytes.Load() == 0 {
			// Host not connected: wait for it to connect.
			select {
			case <-sigio:
			case <-time.After(250 * time.Millisecond):
			case <-ctx.Done():
			}
		}
	}
	return nil
}

// portSession is one host connection on the port. Close does not close the
// file, which outlives the connection; it aborts pending I/O instead.
type portSession struct {
	f      *os.File
	closed atomic.Bool
	bytes  atomic.Int64
}

func (s *portSession) Read(p []byte) (int, error) {
	if s.closed.Load() {
		return 0, io.EOF
	}
	n, err := s.f.Read(p)
	s.bytes.Add(int64(n))
	if errors.Is(err, os.ErrDeadlineExceeded) && s.closed.Load() {
		return n, io.EOF
	}
	return n, err
}

func (s *portSession) Write(p []byte) (int, error) {
	if s.closed.Load() {
		return 0, os.ErrClosed
	}
	return s.f.Write(p)
}

func (s *portSession) Close() error {
	if s.closed.CompareAndSwap(false, true) {
		return s.f.SetDeadline(time.Now())
	}
	return nil
}

func enableSIGIO(f *os.File) error {
	raw, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var ferr error
	err = raw.Control(func(fd uintptr) {
		if _, ferr = unix.FcntlInt(fd, unix.F_SETOWN, os.Getpid()); ferr != nil {
			return
		}
		var flags int
		if flags, ferr = unix.FcntlInt(fd, unix.F_GETFL, 0); ferr != nil {
			return
		}
		_, ferr = unix.FcntlInt(fd, unix.F_SETFL, flags|unix.O_ASYNC)
	})
	if err != nil {
		return err
	}
	return ferr
}

// waitForPort finds the device of the virtio-serial port called name. Without
// udev there are no /dev/virtio-ports symlinks, so it looks the name up in
// sysfs and creates the device node if devtmpfs has not.
func waitForPort(ctx context.Context, name string, log *slog.Logger) (string, error) {
	warned := false
	start := time.Now()
	for {
		path, err := findPort(name)
		if err == nil {
			return path, nil
		}
		if !warned && time.Since(start) > 5*time.Second {
			log.Warn("still waiting for the agent port", "name", name, "err", err)
			warned = true
		}
		select {
		case <-ctx.Done():
			return "", fmt.Errorf("wait for virtio-serial port %q: %w", name, ctx.Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
}

func findPort(name string) (string, error) {
	names, _ := filepath.Glob("/sys/class/virtio-ports/*/name")
	for _, nameFile := range names {
		b, err := os.ReadFile(nameFile)
		if err != nil || strings.TrimSpace(string(b)) != name {
			continue
		}
		dir := filepath.Dir(nameFile)
		dev := filepath.Join("/dev", filepath.Base(dir))
		if _, err := os.Stat(dev); err == nil {
			return dev, nil
		}
		numbers, err := os.ReadFile(filepath.Join(dir, "dev"))
		if err != nil {
			return "", fmt.Errorf("read device number of %s: %w", dir, err)
		}
		major, minor, ok := strings.Cut(strings.TrimSpace(string(numbers)), ":")
		maj, err1 := strconv.Atoi(major)
		mnr, err2 := strconv.Atoi(minor)
		if !ok || err1 != nil || err2 != nil {
			return "", fmt.Errorf("device number %q of %s", numbers, dir)
		}
		if err := unix.Mknod(dev, unix.S_IFCHR|0o600, int(unix.Mkdev(uint32(maj), uint32(mnr)))); err != nil && !errors.Is(err, unix.EEXIST) {
			return "", fmt.Errorf("mknod %s: %w", dev, err)
		}
		return dev, nil
	}
	return "", fmt.Errorf("no virtio-serial port named %q among %d ports", name, len(names))
}

// serveVsock listens on vsock port and serves each host connection. It gives
// up quietly when the guest has no vsock.
func serveVsock(ctx context.Context, port uint32, opts server.Options) {
	log := opts.Logger
	fd, err := unix.Socket(unix.AF_VSOCK, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		log.Debug("no vsock", "err", err)
		return
	}
	if err := unix.Bind(fd, &unix.SockaddrVM{CID: unix.VMADDR_CID_ANY, Port: port}); err != nil {
		unix.Close(fd)
		log.Debug("no vsock", "err", err)
		return
	}
	if err := unix.Listen(fd, 16); err != nil {
		unix.Close(fd)
		log.Debug("no vsock", "err", err)
		return
	}
	context.AfterFunc(ctx, func() { unix.Close(fd) })
	log.Info("serving", "vsock_port", port)
	for {
		nfd, _, err := unix.Accept4(fd, unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK)
		if errors.Is(err, unix.EINTR) || errors.Is(err, unix.ECONNABORTED) {
			continue
		}
		if err != nil {
			if ctx.Err() == nil {
				log.Error("vsock accept", "err", err)
			}
			return
		}
		conn := os.NewFile(uintptr(nfd), "vsock")
		go func() {
			if err := server.Serve(ctx, conn, opts); err != nil {
				log.Debug("vsock session ended", "err", err)
			}
		}()
	}
}
