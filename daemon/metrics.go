package daemon

import (
	"fmt"
	"runtime"
	"runtime/debug"
	"slices"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/warmpool/warmpool/api"
	"github.com/warmpool/warmpool/events"
	"github.com/warmpool/warmpool/lifecycle"
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

const machineMetricPrefix = "warmpool_machine_"

// machineMetrics are the machines' Prometheus collectors, in the style of the
// pools': states are read at scrape time, the counters follow the events the
// lifecycle publishes (through countingPublisher, so none is lost to a slow
// event subscriber), and ensure latency is observed by EnsureMachine.
type machineMetrics struct {
	recoveries  *prometheus.CounterVec
	failures    *prometheus.CounterVec
	transitions *prometheus.CounterVec
	ensure      *prometheus.HistogramVec
	state       *prometheus.Desc
	// list returns every machine the daemon knows, as `machine ls` shows it.
	list func() ([]api.Machine, error)
}

// idleEvents are the lifecycle's idle steps that transitions_total counts.
var idleEvents = []lifecycle.Event{lifecycle.EvShrink, lifecycle.EvWake, lifecycle.EvSuspend, lifecycle.EvResume}

func newMachineMetrics(list func() ([]api.Machine, error)) *machineMetrics {
	return &machineMetrics{
		recoveries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: machineMetricPrefix + "recoveries_total",
			Help: "Machines that failed or crashed and were running again after recovery.",
		}, []string{"machine"}),
		failures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: machineMetricPrefix + "failures_total",
			Help: "Times a machine became failed: a start or stop that failed, or a VM that crashed, vanished or stopped answering.",
		}, []string{"machine"}),
		transitions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: machineMetricPrefix + "idle_transitions_total",
			Help: "Idle steps by event: shrink (balloon shrunk), wake (balloon back up), suspend (saved to a snapshot, VM freed), resume (restored from it).",
		}, []string{"machine", "event"}),
		ensure: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    machineMetricPrefix + "ensure_duration_seconds",
			Help:    "Time from an ensure request to a running machine: a few microseconds when it runs, a boot or a resume otherwise.",
			Buckets: prometheus.ExponentialBuckets(10e-6, 4, 12), // 10µs .. 42s
		}, []string{"machine"}),
		state: prometheus.NewDesc(machineMetricPrefix+"state",
			"1 for the state each machine is in, 0 for the others.", []string{"machine", "state"}, nil),
		list: list,
	}
}

func (m *machineMetrics) register(r prometheus.Registerer) error {
	for _, c := range []prometheus.Collector{m.recoveries, m.failures, m.transitions, m.ensure, m} {
		if err := r.Register(c); err != nil {
			return fmt.Errorf("register machine metrics: %w", err)
		}
	}
	return nil
}

// Describe and Collect make the state gauge a collector of its own.
func (m *machineMetrics) Describe(ch chan<- *prometheus.Desc) { ch <- m.state }

func (m *machineMetrics) Collect(ch chan<- prometheus.Metric) {
	machines, err := m.list()
	if err != nil {
		ch <- prometheus.NewInvalidMetric(m.state, err)
		return
	}
	for _, mc := range machines {
		for _, s := range lifecycle.States {
			v := 0.0
			if string(s) == mc.State {
				v = 1
			}
			ch <- prometheus.MustNewConstMetric(m.state, prometheus.GaugeValue, v, mc.Name, string(s))
		}
	}
}

// count updates the counters for one lifecycle event. The machine's
// counters all exist (at 0) from its first event on, so that rate() sees the
// first increment.
func (m *machineMetrics) count(e events.Event) {
	if !strings.HasPrefix(e.Kind, "machine.") || e.Subject == "" {
		return
	}
	name := e.Subject
	recoveries, failures := m.recoveries.WithLabelValues(name), m.failures.WithLabelValues(name)
	for _, ev := range idleEvents {
		m.transitions.WithLabelValues(name, string(ev))
	}
	switch e.Kind {
	case "machine.recovered":
		recoveries.Inc()
	case "machine.state":
		ev, _ := e.Detail["event"].(string)
		to, _ := e.Detail["to"].(string)
		switch {
		case lifecycle.State(to) == lifecycle.Failed:
			failures.Inc()
		case slices.Contains(idleEvents, lifecycle.Event(ev)):
			m.transitions.WithLabelValues(name, ev).Inc()
		}
	}
}

func (m *machineMetrics) observeEnsure(name string, took time.Duration) {
	m.ensure.WithLabelValues(name).Observe(took.Seconds())
}

// countingPublisher counts each lifecycle event in the machine metrics
// before passing it on to the daemon's event bus.
type countingPublisher struct {
	metrics *machineMetrics
	next    events.Publisher
}

func (p countingPublisher) Publish(e events.Event) {
	p.metrics.count(e)
	p.next.Publish(e)
}
