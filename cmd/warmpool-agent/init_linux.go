package main

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	agentserver "github.com/warmpool/warmpool/agent/server"
)

// moduleOrder lists the modules to load, one file name per line, in
// dependency order. package guest writes it.
const moduleOrder = "/lib/modules/warmpool.order"

func runInit() error {
	logf := func(format string, args ...any) { fmt.Fprintf(os.Stderr, "warmpool-init: "+format+"\n", args...) }
	for _, m := range []struct{ source, target, fstype string }{
		{"proc", "/proc", "proc"},
		{"sysfs", "/sys", "sysfs"},
		{"devtmpfs", "/dev", "devtmpfs"},
	} {
		if err := os.MkdirAll(m.target, 0o755); err != nil {
			logf("mkdir %s: %v", m.target, err)
		}
		if err := unix.Mount(m.source, m.target, m.fstype, unix.MS_NOSUID|unix.MS_NOEXEC, ""); err != nil && !errors.Is(err, unix.EBUSY) {
			logf("mount %s on %s: %v", m.fstype, m.target, err)
		}
	}
	_ = os.MkdirAll("/dev/pts", 0o755)
	_ = unix.Mount("devpts", "/dev/pts", "devpts", unix.MS_NOSUID|unix.MS_NOEXEC, "")
	_ = os.MkdirAll("/dev/shm", 0o1777)
	_ = unix.Mount("tmpfs", "/dev/shm", "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "")
	if err := loadModules(logf); err != nil {
		logf("%v", err)
	}
	cmdline, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		logf("read kernel command line: %v", err)
	}
	rooted, err := switchRoot(string(cmdline))
	if rooted {
		logf("root filesystem: image disk with its writable layer")
		// The template writes the identity files once, so that a clone's
		// hand-off replaces files of its writable layer instead of
		// copying /etc up from the image first: copy-up is the slowest
		// part of the hand-off, under TCG all of it kernel code the clone
		// runs for the first time.
		if err := agentserver.WriteIdentityFiles("/", "warmpool"); err != nil {
			logf("identity files: %v", err)
		}
		// Written out now, before any snapshot: a dirty page the template
		// leaves in memory is written back by every clone, each to its
		// own disk.
		unix.Sync()
	}
	if err != nil {
		// The agent still starts (from the initramfs) so that the host
		// sees the guest and this message in its console log.
		logf("root filesystem disk: %v", err)
	}
	if err := loopbackUp(); err != nil {
		logf("bring up lo: %v", err)
	}
	if err := agentserver.ConfigureNetwork(); err != nil {
		logf("network: %v", err)
	}
	_ = unix.Sethostname([]byte("warmpool"))
	powerOffOnCtrlAltDel(logf)
	return superviseAgent(logf)
}

// powerOffOnCtrlAltDel turns the kernel's Ctrl-Alt-Del (SIGINT to PID 1,
// which Firecracker's SendCtrlAltDel and a host's graceful stop rely on)
// and SIGTERM into a clean power-off; PID 1 ignores both otherwise.
func powerOffOnCtrlAltDel(logf func(string, ...any)) {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, unix.SIGINT, unix.SIGTERM)
	go func() {
		sig := <-sigs
		logf("%v: powering off", sig)
		if err := agentserver.PowerOff(); err != nil {
			logf("power off: %v", err)
		}
	}()
}

func loadModules(logf func(string, ...any)) error {
	f, err := os.Open(moduleOrder)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read module list: %w", err)
	}
	defer f.Close()
	cmdline, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		logf("read kernel command line: %v", err)
	}
	params := moduleParams(string(cmdline))
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		name := strings.TrimSpace(sc.Text())
		if name == "" || strings.HasPrefix(name, "#") {
			continue
		}
		path := filepath.Join(filepath.Dir(moduleOrder), name)
		if err := insmod(path, params[moduleName(name)]); err != nil {
			logf("load module %s: %v", name, err)
		}
	}
	return sc.Err()
}

// moduleParams collects "module.param=value" words of the kernel command
// line by module, as modprobe would. The kernel applies them only to
// built-in code, and Debian builds virtio_mmio as a module: without this,
// devices described on the command line (virtio_mmio.device=..., how
// Firecracker and a microvm without ACPI announce them) never appear.
func moduleParams(cmdline string) map[string]string {
	params := map[string]string{}
	for _, word := range strings.Fields(cmdline) {
		key, _, _ := strings.Cut(word, "=")
		mod, _, ok := strings.Cut(key, ".")
		if !ok || mod == "" || strings.Contains(mod, "/") {
			continue
		}
		mod = strings.ReplaceAll(mod, "-", "_")
		param := word[len(mod)+1:]
		if params[mod] != "" {
			params[mod] += " "
		}
		params[mod] += param
	}
	return params
}

// moduleName turns a module file name (virtio_mmio.ko) into the name its
// parameters go by.
func moduleName(file string) string {
	name, _, _ := strings.Cut(filepath.Base(file), ".")
	return strings.ReplaceAll(name, "-", "_")
}

func insmod(path, params string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	raw, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var loadErr error
	if err := raw.Control(func(fd uintptr) { loadErr = unix.FinitModule(int(fd), params, 0) }); err != nil {
		return err
	}
	if errors.Is(loadErr, unix.EEXIST) {
		return nil
	}
	return loadErr
}

func loopbackUp() error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq("lo")
	if err != nil {
		return err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return err
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	return unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr)
}

// superviseAgent runs the agent as a child, restarts it if it dies, and reaps
// every other process that ends up parented to PID 1.
func superviseAgent(logf func(string, ...any)) error {
	// After a switch to an image's root the initramfs's /init is out of
	// reach by name; the running binary is not.
	self := "/proc/self/exe"
	start := func() int {
		p, err := os.StartProcess(self, []string{self, "serve"}, &os.ProcAttr{
			Dir:   "/",
			Env:   guestEnv(),
			Files: []*os.File{os.Stdin, os.Stdout, os.Stderr},
		})
		if err != nil {
			logf("start agent: %v", err)
			return 0
		}
		pid := p.Pid
		// The reaper below collects it; the os.Process handle is not needed.
		_ = p.Release()
		return pid
	}
	agentPID := start()
	for {
		var status unix.WaitStatus
		pid, err := unix.Wait4(-1, &status, 0, nil)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			// No children at all: the agent failed to start. Try again.
			time.Sleep(time.Second)
			agentPID = start()
			continue
		}
		if pid == agentPID {
			logf("agent exited (%v); restarting", describe(status))
			time.Sleep(200 * time.Millisecond)
			agentPID = start()
		}
	}
}

func describe(s unix.WaitStatus) string {
	if s.Signaled() {
		return "signal " + s.Signal().String()
	}
	return fmt.Sprintf("status %d", s.ExitStatus())
}
