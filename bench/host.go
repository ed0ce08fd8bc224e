package bench

import (
	"os"
	"runtime"
	"strconv"
	"strings"
	"time"
)

// Host describes the machine a report was measured on, so readers can judge
// how much noise to expect.
type Host struct {
	Time          time.Time  `json:"time"`
	CPUs          int        `json:"cpus"`
	Kernel        string     `json:"kernel"`
	GoVersion     string     `json:"go_version"`
	Accel         string     `json:"accel,omitempty"`
	QEMUVersion   string     `json:"qemu_version,omitempty"`
	LoadAvgBefore [3]float64 `json:"loadavg_before"`
	LoadAvgAfter  [3]float64 `json:"loadavg_after"`
}

// readLoadAvg returns the 1, 5 and 15 minute load averages. A host without
// /proc reports zeros rather than failing the whole run.
func readLoadAvg() [3]float64 {
	var out [3]float64
	data, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return out
	}
	return parseLoadAvg(string(data))
}

func parseLoadAvg(s string) [3]float64 {
	var out [3]float64
	fields := strings.Fields(s)
	for i := 0; i < 3 && i < len(fields); i++ {
		v, err := strconv.ParseFloat(fields[i], 64)
		if err == nil {
			out[i] = v
		}
	}
	return out
}

func kernelRelease() string {
	data, err := os.ReadFile("/proc/sys/kernel/osrelease")
	if err != nil {
		return runtime.GOOS
	}
	return strings.TrimSpace(string(data))
}

func hostInfo() Host {
	return Host{
		Time:          time.Now().UTC(),
		CPUs:          runtime.NumCPU(),
		Kernel:        kernelRelease(),
		GoVersion:     runtime.Version(),
		LoadAvgBefore: readLoadAvg(),
	}
}
