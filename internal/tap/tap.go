// Package tap handles TAP devices in network namespaces: it opens one that
// lives in another namespace, for a VMM that is handed the descriptor
// (QEMU's -netdev tap,fd=N) rather than started inside the namespace (the
// descriptor keeps working in whatever namespace its holder runs), and
// makes a namespace holding nothing but a TAP, for a VMM that must back an
// interface with a TAP that carries no traffic.
package tap

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Open attaches to the persistent TAP device name inside the network
// namespace file netnsPath. The flags match those network slots make
// their TAPs with (no packet information, virtio-net headers).
func Open(netnsPath, name string) (*os.File, error) {
	target, err := os.Open(netnsPath)
	if err != nil {
		return nil, fmt.Errorf("opening network namespace %s: %w", netnsPath, err)
	}
	defer target.Close()
	var f *os.File
	err = inNetns(int(target.Fd()), func() error {
		fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("opening /dev/net/tun: %w", err)
		}
		ifr, err := unix.NewIfreq(name)
		if err != nil {
			unix.Close(fd)
			return fmt.Errorf("TAP name %q: %w", name, err)
		}
		ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR | unix.IFF_ONE_QUEUE)
		if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
			unix.Close(fd)
			return fmt.Errorf("attaching to TAP %s: %w", name, err)
		}
		f = os.NewFile(uintptr(fd), "tap:"+name)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("TAP %s in %s: %w", name, netnsPath, err)
	}
	return f, nil
}

// inNetns runs fn on a thread that is in the namespace of nsFD for the
// while.
func inNetns(nsFD int, fn func() error) error {
	return onOwnThread(func() error {
		if err := unix.Setns(nsFD, unix.CLONE_NEWNET); err != nil {
			return fmt.Errorf("entering the namespace: %w", err)
		}
		return nil
	}, fn)
}

// onNewNetns runs fn on a thread moved into a new network namespace.
func onNewNetns(fn func() error) error {
	return onOwnThread(func() error {
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			return fmt.Errorf("unshare: %w", err)
		}
		return nil
	}, fn)
}

// onOwnThread runs fn on a thread that enter moved into another network
// namespace. The thread goes back to its own namespace after, or, when
// that fails, stays locked so the runtime ends it rather than reuse it.
func onOwnThread(enter, fn func() error) error {
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			done <- fmt.Errorf("opening the thread's namespace: %w", err)
			return
		}
		defer orig.Close()
		if err := enter(); err != nil {
			runtime.UnlockOSThread()
			done <- err
			return
		}
		err = fn()
		if rerr := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); rerr != nil {
			done <- errors.Join(err, fmt.Errorf("returning to the thread's namespace: %w", rerr))
			return
		}
		runtime.UnlockOSThread()
		done <- err
	}()
	return <-done
}

// InNetns runs fn on a thread inside the network namespace file
// netnsPath; a process fn starts (os/exec forks from the calling thread)
// is born in that namespace.
func InNetns(netnsPath string, fn func() error) error {
	target, err := os.Open(netnsPath)
	if err != nil {
		return fmt.Errorf("opening network namespace %s: %w", netnsPath, err)
	}
	defer target.Close()
	return inNetns(int(target.Fd()), fn)
}

// netnsDir is where named namespaces are bind-mounted, as ip netns does.
const netnsDir = "/run/netns"

// NetnsPath is the file of the named namespace name.
func NetnsPath(name string) string { return filepath.Join(netnsDir, name) }

// NewNetns makes the named network namespace name holding one persistent
// TAP device tapName and nothing else: a device a VMM can open (a VMM
// that backs every interface with a TAP) whose traffic goes nowhere. It
// returns the namespace's file; on error nothing is left.
func NewNetns(name, tapName string) (_ string, err error) {
	if err := os.MkdirAll(netnsDir, 0o755); err != nil {
		return "", fmt.Errorf("network namespace %s: %w", name, err)
	}
	path := NetnsPath(name)
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_RDONLY, 0o444)
	if err != nil {
		return "", fmt.Errorf("network namespace %s: %w", name, err)
	}
	f.Close()
	defer func() {
		if err != nil {
			err = errors.Join(err, RemoveNetns(name))
		}
	}()
	err = onNewNetns(func() error {
		if err := unix.Mount("/proc/thread-self/ns/net", path, "bind", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("bind-mounting it at %s: %w", path, err)
		}
		t := &netlink.Tuntap{
			LinkAttrs: netlink.LinkAttrs{Name: tapName},
			Mode:      netlink.TUNTAP_MODE_TAP,
			Flags:     netlink.TUNTAP_NO_PI | netlink.TUNTAP_VNET_HDR | netlink.TUNTAP_ONE_QUEUE,
		}
		if err := netlink.LinkAdd(t); err != nil {
			return fmt.Errorf("adding TAP %s: %w", tapName, err)
		}
		return nil
	})
	if err != nil {
		return "", fmt.Errorf("network namespace %s: %w", name, err)
	}
	return path, nil
}

// RemoveNetns removes the named namespace name; its devices go with it
// once no process runs in it. A namespace that is not there is no error.
func RemoveNetns(name string) error {
	path := NetnsPath(name)
	if err := unix.Unmount(path, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("unmounting network namespace %s: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("removing network namespace %s: %w", path, err)
	}
	return nil
}
