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

// jailCgroups returns the cgroup directories the jailer creates for VM id
// and leaves behind: for each hierarchy holding a controller that a --cgroup
// argument names, <cgroup_base>/<parent_cgroup>/<id>, where parent_cgroup is
// --parent-cgroup or the Firecracker binary's name (docs/jailer.md). Without
// --cgroup the jailer creates none. mounts is /proc/mounts' text, which the
// jailer also reads to find each controller's hierarchy.
func jailCgroups(mounts string, version int, jailerArgs []string, execFile, id string) []string {
	var files []string
	parent := filepath.Base(execFile)
	for i := 0; i < len(jailerArgs); i++ {
		name, value, inline := strings.Cut(jailerArgs[i], "=")
		if !inline && i+1 < len(jailerArgs) {
			value = jailerArgs[i+1]
		}
		switch name {
		case "--cgroup":
			file, _, _ := strings.Cut(value, "=")
			files = append(files, file)
		case "--parent-cgroup":
			parent = value
		default:
			continue
		}
		if !inline {
			i++
		}
	}
	if len(files) == 0 {
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
			for _, file := range files {
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
		dir := filepath.Join(base, parent, id)
		if !slices.Contains(dirs, dir) {
			dirs = append(dirs, dir)
		}
	}
	return dirs
}

// checkJailerArgs refuses extra jailer arguments that would contradict what
// the provider passes itself or how it tracks the process.
func checkJailerArgs(args []string) error {
	for _, a := range args {
		name, _, _ := strings.Cut(a, "=")
		switch name {
		case "--id", "--exec-file", "--uid", "--gid", "--chroot-base-dir", "--cgroup-version", "--netns":
			return &vm.FieldError{Field: "jailer_args", Value: a, Reason: "the provider sets " + name + " itself"}
		case "--daemonize", "--new-pid-ns":
			return &vm.FieldError{Field: "jailer_args", Value: a, Reason: "the provider must start and watch Firecracker's process itself"}
		case "--":
			return &vm.FieldError{Field: "jailer_args", Value: a, Reason: "arguments for Firecracker itself are not supported"}
		}
	}
	return nil
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
