// Package tap opens a TAP device that lives in another network namespace,
// for a VMM that is handed the descriptor (QEMU's -netdev tap,fd=N) rather
// than started inside the namespace. The descriptor keeps working in
// whatever namespace its holder runs.
package tap

import (
	"errors"
	"fmt"
	"os"
	"runtime"

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
// while. The thread goes back to its own namespace after, or, when that
// fails, stays locked so the runtime ends it rather than reuse it.
func inNetns(nsFD int, fn func() error) error {
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			done <- fmt.Errorf("opening the thread's namespace: %w", err)
			return
		}
		defer orig.Close()
		if err := unix.Setns(nsFD, unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			done <- fmt.Errorf("entering the namespace: %w", err)
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
