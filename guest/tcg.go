package guest

import (
	"bufio"
	"math"
	"os"
	"strconv"
	"strings"
)

// TCGKernelArgs returns kernel parameters a guest needs when QEMU emulates
// its CPU (TCG) on this host, to be appended to Image.Cmdline.
//
// Under TCG the guest's TSC ticks at the host's TSC rate, but the guest
// kernel cannot measure that rate: its calibration against the emulated PIT
// fails on a loaded host, and the boot then hangs in the delay-loop
// calibration right after "tsc: Marking TSC unstable" (seen here with the
// Debian 6.1 cloud kernel under QEMU 7.2 microvm whenever several VMs booted
// at once). Telling the kernel the rate with tsc_early_khz skips both
// calibrations. The rate is taken from /proc/cpuinfo on hosts whose TSC is
// constant; elsewhere the result is empty and the guest calibrates as usual.
func TCGKernelArgs() string {
	khz := hostTSCKHz("/proc/cpuinfo")
	if khz <= 0 {
		return ""
	}
	return "tsc_early_khz=" + strconv.Itoa(khz)
}

func hostTSCKHz(cpuinfo string) int {
	f, err := os.Open(cpuinfo)
	if err != nil {
		return 0
	}
	defer f.Close()
	var mhz float64
	constant := false
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		key, value, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		switch strings.TrimSpace(key) {
		case "cpu MHz":
			if mhz == 0 {
				mhz, _ = strconv.ParseFloat(strings.TrimSpace(value), 64)
			}
		case "flags":
			constant = constant || strings.Contains(" "+value+" ", " constant_tsc ")
		}
		if mhz != 0 && constant {
			break
		}
	}
	if !constant || mhz <= 0 {
		return 0
	}
	return int(math.Round(mhz * 1000))
}
