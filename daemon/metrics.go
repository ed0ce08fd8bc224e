package daemon

import (
	"runtime"
	"runtime/debug"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// Version is the module version the binary was built from ("devel" for a
// work-tree build).
func Version() string {
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		return bi.Main.Version
	}
	return "devel"
}

func (d *Daemon) registerMetrics() {
	d.reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "warmpool_leases_active",
			Help: "Leases handed out and not yet released or expired.",
		}, func() float64 { return float64(d.leaseCount()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "warmpool_uptime_seconds",
			Help: "Seconds since the daemon started.",
		}, func() float64 { return time.Since(d.started).Seconds() }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name:        "warmpool_build_info",
			Help:        "Always 1; the labels say which build and provider run.",
			ConstLabels: prometheus.Labels{"version": Version(), "goversion": runtime.Version(), "provider": d.prov.Name()},
		}, func() float64 { return 1 }),
	)
}
