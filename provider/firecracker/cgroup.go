package firecracker

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/warmpool/warmpool/vm"
)

// jailerCgroups is what the extra jailer arguments ask of cgroups.
type jailerCgroups struct {
	files  []string // the cgroup files --cgroup sets, e.g. cpu.max
	parent string   // --parent-cgroup, or the Firecracker binary's name
}

// parseJailerArgs refuses extra jailer arguments that would contradict what
// the provider passes itself or how it tracks the process, and returns what
// they ask of cgroups.
func parseJailerArgs(args []string, execFile string) (jailerCgroups, error) {
	c := jailerCgroups{parent: filepath.Base(execFile)}
	for i := 0; i < len(args); i++ {
		name, value, inline := strings.Cut(args[i], "=")
		if !inline && i+1 < len(args) {
			value = args[i+1]
		}
		switch name {
		case "--cgroup":
			file, _, _ := strings.Cut(value, "=")
			c.files = append(c.files, file)
		case "--parent-cgroup":
			c.parent = value
		case "--id", "--exec-file", "--uid", "--gid", "--chroot-base-dir", "--cgroup-version", "--netns":
			return c, &vm.FieldError{Field: "jailer_args", Value: args[i], Reason: "the provider sets " + name + " itself"}
		case "--daemonize", "--new-pid-ns":
			return c, &vm.FieldError{Field: "jailer_args", Value: args[i], Reason: "the provider must start and watch Firecracker's process itself"}
		case "--":
			return c, &vm.FieldError{Field: "jailer_args", Value: args[i], Reason: "arguments for Firecracker itself are not supported"}
		default:
			continue
		}
		if !inline {
			i++
		}
	}
	return c, nil
}

// dirs returns the cgroup directories the jailer creates for VM id and
// leaves behind: for each hierarchy holding a controller that a --cgroup
// argument names, <cgroup_base>/<parent_cgroup>/<id> (docs/jailer.md).
// Without --cgroup the jailer creates none. mounts is /proc/mounts' text,
// which the jailer also reads to find each controller's hierarchy.
func (c jailerCgroups) dirs(mounts string, version int, id string) []string {
	if len(c.files) == 0 {
		return nil
	}
	var bases []string
	for line := range strings.SplitSeq(mounts, "\n") {
		f := strings.Fields(line)
		if len(f) < 4 {
			continue
		}
		mountPoint, fsType, options := unescapeMount(f[1]), f[2], strings.Split(f[3], ",")
		switch {
		case version == 2 && fsType == "cgroup2":
			bases = append(bases, mountPoint)
		case version == 1 && fsType == "cgroup":
			for _, file := range c.files {
				controller, _, _ := strings.Cut(file, ".")
				if slices.Contains(options, controller) {
					bases = append(bases, mountPoint)
					break
				}
			}
		}
		if version == 2 && len(bases) > 0 {
			break // one unified hierarchy
		}
	}
	var dirs []string
	for _, base := range bases {
		dir := filepath.Join(base, c.parent, id)
		if !slices.Contains(dirs, dir) {
			dirs = append(dirs, dir)
		}
	}
	return dirs
}

// unescapeMount undoes /proc/mounts' octal escapes (\040 for a space).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if c, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(c))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// removeCgroups removes the VM's cgroup directories, empty once its process
// is gone; one already gone counts as removed.
func removeCgroups(dirs []string) error {
	var errs []error
	for _, dir := range dirs {
		if err := os.Remove(dir); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, fmt.Errorf("remove cgroup %s: %w", dir, err))
		}
	}
	return errors.Join(errs...)
}
