package firecracker

import (
	"slices"
	"strings"
	"testing"
)

func TestJailCgroups(t *testing.T) {
	const mounts = `sysfs /sys sysfs rw 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nosuid 0 0
cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,cpu,cpuacct 0 0
cgroup /sys/fs/cgroup/cpuset cgroup rw,cpuset 0 0
cgroup /sys/fs/cgroup/my\040memory cgroup rw,memory 0 0
`
	for _, tc := range []struct {
		name    string
		version int
		args    []string
		want    []string
	}{
		{"no --cgroup, no cgroup", 2, []string{"--parent-cgroup", "x"}, nil},
		{"v2 under the binary's name", 2, []string{"--cgroup", "cpu.max=1"}, []string{"/sys/fs/cgroup/unified/firecracker/fc-1"}},
		{"v2 with a parent", 2, []string{"--cgroup=memory.max=1", "--parent-cgroup", "a/b", "--cgroup", "cpu.max=1"}, []string{"/sys/fs/cgroup/unified/a/b/fc-1"}},
		{"v1 per controller", 1, []string{"--cgroup", "cpuset.cpus=0", "--cgroup", "cpu.shares=2", "--cgroup", "cpuset.mems=0"},
			[]string{"/sys/fs/cgroup/cpu,cpuacct/firecracker/fc-1", "/sys/fs/cgroup/cpuset/firecracker/fc-1"}},
		{"v1 escaped mount point", 1, []string{"--cgroup", "memory.limit_in_bytes=1"}, []string{"/sys/fs/cgroup/my memory/firecracker/fc-1"}},
	} {
		c, err := parseJailerArgs(tc.args, "/usr/bin/firecracker")
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		got := c.dirs(mounts, tc.version, "fc-1")
		slices.Sort(got)
		if !slices.Equal(got, tc.want) {
			t.Errorf("%s: %q, want %q", tc.name, got, tc.want)
		}
	}
}

func TestJailerArgsThatContradictTheProviderAreRefused(t *testing.T) {
	for _, args := range [][]string{{"--id", "x"}, {"--uid=0"}, {"--daemonize"}, {"--new-pid-ns"}, {"--", "--no-seccomp"}, {"--chroot-base-dir", "/"}} {
		_, err := New(Options{StateDir: t.TempDir(), Binary: fakeBinary, JailerBinary: fakeBinary,
			Jailer: &JailerOptions{ChrootBase: t.TempDir(), ExtraArgs: args}})
		if err == nil || !strings.Contains(err.Error(), args[0]) {
			t.Errorf("jailer args %q: %v, want an error naming %s", args, err, args[0])
		}
	}
	if _, err := parseJailerArgs([]string{"--cgroup", "cpu.max=1", "--parent-cgroup=a", "--resource-limit", "no-file=100"}, "/usr/bin/firecracker"); err != nil {
		t.Errorf("documented jailer args refused: %v", err)
	}
}
