// Command fakejailer pretends to be Firecracker's jailer, doing for real
// what its documentation (docs/jailer.md) says it does, short of mount and
// PID namespaces: it validates the id and paths, joins the --netns
// namespace, clears the environment, creates the
// cgroup directories (see below), creates
// <chroot_base>/<exec_file_name>/<id>/root, copies the exec file
// into it, creates /dev/kvm and /dev/net/tun there, hands the jail to
// uid:gid, chroots into it, drops to uid:gid and execs
// "<exec_file_name> --id <id> --start-time-us N --start-time-cpu-us N"
// followed by the arguments after "--". It must run as root and the exec
// file must be statically linked, as with the real jailer.
//
// The fake firecracker cannot see the host's API description from inside
// the jail, so when WARMPOOL_FIRECRACKER_SPEC is set the fake jailer copies
// that file into the jail where the fake firecracker looks for it. Of the
// environment, only the fake firecracker's FAKE_FIRECRACKER_* settings
// reach it.
//
// Cgroups: like the real jailer it finds the hierarchy of each controller a
// --cgroup names in the mount table and creates
// <cgroup_base>/<parent_cgroup>/<id> there, but it reads the mount table
// from the file FAKEJAILER_MOUNTS names, so tests can point it at plain
// directories; it writes no cgroup files, which would keep the directory
// from being removed as an empty cgroup is. Without FAKEJAILER_MOUNTS it
// creates no cgroups.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/warmpool/warmpool/provider/firecracker/internal/fakefirecracker"
)

// The network namespace joined is the thread's: main stays on the thread
// that joins it and then execs Firecracker.
func init() { runtime.LockOSThread() }

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "fakejailer:", err)
		os.Exit(1)
	}
}

var validID = regexp.MustCompile(`^[a-zA-Z0-9-]{1,64}$`)

// multi collects a flag that may be repeated.
type multi []string

func (m *multi) String() string     { return strings.Join(*m, ",") }
func (m *multi) Set(v string) error { *m = append(*m, v); return nil }

func run(args []string) error {
	start := time.Now()
	jailerArgs, fcArgs := args, []string(nil)
	for i, a := range args {
		if a == "--" {
			jailerArgs, fcArgs = args[:i], args[i+1:]
			break
		}
	}
	fs := flag.NewFlagSet("jailer", flag.ContinueOnError)
	id := fs.String("id", "", "")
	execFile := fs.String("exec-file", "", "")
	uidArg := fs.String("uid", "", "")
	gidArg := fs.String("gid", "", "")
	chrootBase := fs.String("chroot-base-dir", "/srv/jailer", "")
	cgroupVersion := fs.String("cgroup-version", "1", "")
	parentCgroup := fs.String("parent-cgroup", "", "")
	netns := fs.String("netns", "", "")
	daemonize := fs.Bool("daemonize", false, "")
	newPIDNS := fs.Bool("new-pid-ns", false, "")
	var cgroups, limits multi
	fs.Var(&cgroups, "cgroup", "")
	fs.Var(&limits, "resource-limit", "")
	if err := fs.Parse(jailerArgs); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("found argument %q which wasn't expected", fs.Arg(0))
	}
	if err := rejectDuplicates(fs, jailerArgs, "cgroup", "resource-limit"); err != nil {
		return err
	}
	for _, req := range []struct{ name, val string }{{"id", *id}, {"exec-file", *execFile}, {"uid", *uidArg}, {"gid", *gidArg}} {
		if req.val == "" {
			return fmt.Errorf("argument '%s' required, but not found", req.name)
		}
	}
	if !validID.MatchString(*id) {
		return fmt.Errorf("invalid instance ID %q: alphanumeric characters and hyphens, at most 64", *id)
	}
	uid, err := strconv.Atoi(*uidArg)
	if err != nil || uid < 0 {
		return fmt.Errorf("invalid uid %q", *uidArg)
	}
	gid, err := strconv.Atoi(*gidArg)
	if err != nil || gid < 0 {
		return fmt.Errorf("invalid gid %q", *gidArg)
	}
	if *cgroupVersion != "1" && *cgroupVersion != "2" {
		return fmt.Errorf("invalid cgroup version %q", *cgroupVersion)
	}
	for _, c := range cgroups {
		if k, _, ok := strings.Cut(c, "="); !ok || k == "" {
			return fmt.Errorf("invalid cgroup %q: want <cgroup_file>=<value>", c)
		}
	}
	if *parentCgroup == "" {
		*parentCgroup = filepath.Base(*execFile)
	}
	for _, l := range limits {
		k, v, ok := strings.Cut(l, "=")
		if _, err := strconv.ParseUint(v, 10, 64); !ok || (k != "fsize" && k != "no-file") || err != nil {
			return fmt.Errorf("invalid resource limit %q", l)
		}
	}
	if *daemonize || *newPIDNS {
		return errors.New("--daemonize and --new-pid-ns are not supported by the fake jailer")
	}
	if *netns != "" {
		// As the jailer does: the thread that goes on to exec Firecracker
		// joins the namespace (main's thread is locked, see init).
		f, err := os.Open(*netns)
		if err != nil {
			return fmt.Errorf("invalid network namespace %s: %w", *netns, err)
		}
		err = unix.Setns(int(f.Fd()), unix.CLONE_NEWNET)
		f.Close()
		if err != nil {
			return fmt.Errorf("join network namespace %s: %w", *netns, err)
		}
	}
	if !filepath.IsAbs(*chrootBase) {
		return fmt.Errorf("chroot base dir %s must be an absolute path", *chrootBase)
	}
	exec, err := filepath.Abs(*execFile)
	if err != nil {
		return err
	}
	st, err := os.Stat(exec)
	if err != nil {
		return fmt.Errorf("invalid exec file %s: %w", *execFile, err)
	}
	if !st.Mode().IsRegular() {
		return fmt.Errorf("exec file %s is not a regular file", exec)
	}
	execName := filepath.Base(exec)
	if !strings.Contains(execName, "firecracker") {
		return fmt.Errorf("exec file name %s must include the string firecracker", execName)
	}

	if err := createCgroups(os.Getenv("FAKEJAILER_MOUNTS"), *cgroupVersion, cgroups, *parentCgroup, *id); err != nil {
		return err
	}
	specPath := os.Getenv(fakefirecracker.SpecEnv)
	// The jailer clears the environment it received. The fake firecracker's
	// own knobs (FAKE_FIRECRACKER_*) are test controls, not environment a
	// real Firecracker would see, so they pass.
	var env []string
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "FAKE_FIRECRACKER_") {
			env = append(env, kv)
		}
	}
	os.Clearenv()

	chrootDir := filepath.Join(*chrootBase, execName, *id, "root")
	if err := os.MkdirAll(chrootDir, 0o755); err != nil {
		return fmt.Errorf("create chroot dir: %w", err)
	}
	if err := copyFile(exec, filepath.Join(chrootDir, execName), 0o755); err != nil {
		return fmt.Errorf("copy exec file into the jail: %w", err)
	}
	if specPath != "" {
		if err := copyFile(specPath, filepath.Join(chrootDir, fakefirecracker.JailedSpecName), 0o644); err != nil {
			return fmt.Errorf("copy the API description into the jail: %w", err)
		}
	}
	noFile := uint64(2048)
	for _, l := range limits {
		k, v, _ := strings.Cut(l, "=")
		n, _ := strconv.ParseUint(v, 10, 64)
		res := syscall.RLIMIT_NOFILE
		if k == "fsize" {
			res = syscall.RLIMIT_FSIZE
		} else {
			noFile = n
		}
		if err := syscall.Setrlimit(res, &syscall.Rlimit{Cur: n, Max: n}); err != nil {
			return fmt.Errorf("set resource limit %s: %w", l, err)
		}
	}
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &syscall.Rlimit{Cur: noFile, Max: noFile}); err != nil {
		return fmt.Errorf("set the open file limit: %w", err)
	}

	if err := syscall.Chroot(chrootDir); err != nil {
		return fmt.Errorf("chroot %s: %w", chrootDir, err)
	}
	if err := os.Chdir("/"); err != nil {
		return err
	}
	for _, dev := range []struct {
		path         string
		major, minor uint32
	}{{"/dev/net/tun", 10, 200}, {"/dev/kvm", 10, 232},
		// Not made by the real jailer: the fake Firecracker's in-process
		// guest agent runs in the jail and gives commands /dev/null as
		// stdin, where a real agent runs inside the guest.
		{"/dev/null", 1, 3}} {
		if err := os.MkdirAll(filepath.Dir(dev.path), 0o755); err != nil {
			return err
		}
		mode := uint32(syscall.S_IFCHR | 0o600)
		if err := syscall.Mknod(dev.path, mode, int(dev.major<<8|dev.minor)); err != nil && !errors.Is(err, syscall.EEXIST) {
			return fmt.Errorf("mknod %s: %w", dev.path, err)
		}
		if err := os.Chown(dev.path, uid, gid); err != nil {
			return err
		}
	}
	if err := os.Chown("/", uid, gid); err != nil {
		return fmt.Errorf("chown the jail root: %w", err)
	}
	if err := syscall.Setgroups(nil); err != nil {
		return fmt.Errorf("setgroups: %w", err)
	}
	if err := syscall.Setgid(gid); err != nil {
		return fmt.Errorf("setgid %d: %w", gid, err)
	}
	if err := syscall.Setuid(uid); err != nil {
		return fmt.Errorf("setuid %d: %w", uid, err)
	}
	elapsed := strconv.FormatInt(time.Since(start).Microseconds(), 10)
	argv := append([]string{"./" + execName, "--id", *id, "--start-time-us", elapsed, "--start-time-cpu-us", elapsed}, fcArgs...)
	if err := syscall.Exec("/"+execName, argv, env); err != nil {
		return fmt.Errorf("exec %s in the jail: %w", execName, err)
	}
	return nil
}

// rejectDuplicates fails, like the jailer's argument parser, when a flag
// that takes one value is given twice.
func rejectDuplicates(fs *flag.FlagSet, args []string, repeatable ...string) error {
	seen := map[string]bool{}
	for _, a := range args {
		if !strings.HasPrefix(a, "--") {
			continue
		}
		name, _, _ := strings.Cut(strings.TrimPrefix(a, "--"), "=")
		if fs.Lookup(name) == nil {
			continue
		}
		if seen[name] && !slices.Contains(repeatable, name) {
			return fmt.Errorf("the argument '%s' was provided more than once", name)
		}
		seen[name] = true
	}
	return nil
}

func copyFile(src, dst string, mode os.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, mode)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// createCgroups creates <cgroup_base>/<parent>/<id> in the hierarchy of
// every controller the cgroup files belong to, as listed in mountsFile.
func createCgroups(mountsFile, version string, cgroups []string, parent, id string) error {
	if mountsFile == "" || len(cgroups) == 0 {
		return nil
	}
	mounts, err := os.ReadFile(mountsFile)
	if err != nil {
		return fmt.Errorf("read the mount table: %w", err)
	}
	bases := map[string]string{} // controller -> hierarchy
	for _, line := range strings.Split(string(mounts), "\n") {
		f := strings.Fields(line)
		if len(f) < 4 {
			continue
		}
		for _, c := range cgroups {
			controller, _, _ := strings.Cut(c, ".")
			if version == "2" && f[2] == "cgroup2" || version == "1" && f[2] == "cgroup" && slices.Contains(strings.Split(f[3], ","), controller) {
				if _, seen := bases[controller]; !seen {
					bases[controller] = f[1]
				}
			}
		}
	}
	for _, c := range cgroups {
		controller, _, _ := strings.Cut(c, ".")
		base, ok := bases[controller]
		if !ok {
			return fmt.Errorf("cannot find the cgroup v%s hierarchy of controller %s", version, controller)
		}
		if err := os.MkdirAll(filepath.Join(base, parent, id), 0o755); err != nil {
			return fmt.Errorf("create cgroup: %w", err)
		}
	}
	return nil
}
