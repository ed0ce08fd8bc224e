package bench

import (
	"os"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"time"
)

// Host describes the machine a report was measured on, so readers can judge
// how much noise to expect.
type Host struct {
	Time time.Time `json:"time"`
	// Build names the warmpool that ran: the commit it was built from
	// ("+modified" with uncommitted changes) or its module version.
	Build       string `json:"build,omitempty"`
	CPUs        int    `json:"cpus"`
	Kernel      string `json:"kernel"`
	GoVersion   string `json:"go_version"`
	Accel       string `json:"accel,omitempty"`
	QEMUVersion string `json:"qemu_version,omitempty"`
	// Image is what the run's guest image was built from (image build
	// --from); empty for the busybox image.
	Image         string     `json:"image,omitempty"`
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

// buildName is the commit the binary was built from, or its module version
// when it carries no VCS stamp (go install), or "devel" (go run).
func buildName() string {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "devel"
	}
	return buildNameOf(bi)
}

func buildNameOf(bi *debug.BuildInfo) string {
	var rev, modified string
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.modified":
			modified = s.Value
		}
	}
	switch {
	case rev != "" && modified == "true":
		return "commit " + rev[:min(12, len(rev))] + "+modified"
	case rev != "":
		return "commit " + rev[:min(12, len(rev))]
	case bi.Main.Version != "" && bi.Main.Version != "(devel)":
		return bi.Main.Version
	}
	return "devel"
}

func hostInfo() Host {
	return Host{
		Time:          time.Now().UTC(),
		Build:         buildName(),
		CPUs:          runtime.NumCPU(),
		Kernel:        kernelRelease(),
		GoVersion:     runtime.Version(),
		LoadAvgBefore: readLoadAvg(),
	}
}
