package procfs

import (
	"maps"
	"os"
	"strings"
	"testing"
)

func TestParseKiB(t *testing.T) {
	in := "MemTotal:       24576000 kB\nMemFree: 100 kB\nHugePages_Total:       0\nVmallocChunk: x kB\nno colon here\nEmpty:\n"
	got, err := ParseKiB(strings.NewReader(in))
	want := map[string]uint64{"MemTotal": 24576000, "MemFree": 100, "HugePages_Total": 0}
	if err != nil || !maps.Equal(got, want) {
		t.Errorf("ParseKiB = %v, %v; want %v", got, err, want)
	}
}

func TestReadKiBOfThisMachine(t *testing.T) {
	vals, err := ReadKiB("/proc/meminfo")
	if err != nil {
		t.Skipf("no /proc/meminfo: %v", err)
	}
	if vals["MemTotal"] == 0 || vals["MemAvailable"] > vals["MemTotal"] {
		t.Errorf("meminfo: MemTotal %d, MemAvailable %d", vals["MemTotal"], vals["MemAvailable"])
	}
	if _, err := ReadKiB("/proc/nonexistent"); !os.IsNotExist(err) {
		t.Errorf("ReadKiB of a missing file = %v, want not-exist", err)
	}
}
