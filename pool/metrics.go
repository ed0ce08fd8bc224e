package pool

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

const metricPrefix = "warmpool_pool_"

// metrics are the pool's Prometheus collectors. Depth, target and restoring
// are read from the pool's state at scrape time so that the acquire path
// does not update gauges.
type metrics struct {
	acquires        *prometheus.CounterVec
	acquireLatency  *prometheus.HistogramVec
	restoreDuration *prometheus.HistogramVec
	validation      *prometheus.CounterVec
	evictions       *prometheus.CounterVec
	refillErrors    *prometheus.CounterVec
	targetChanges   *prometheus.CounterVec
	state           *stateCollector
}

// bucketMetrics are one pool's children, looked up once at registration.
type bucketMetrics struct {
	hit, waited, timeout prometheus.Counter
	acquireLatency       prometheus.Observer
	restoreDuration      prometheus.Observer
	validation           prometheus.Counter
	refillErrors         prometheus.Counter
	evictions            *prometheus.CounterVec
	targetChanges        *prometheus.CounterVec
	name                 string
}

func newMetrics(p *Pool) *metrics {
	return &metrics{
		acquires: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: metricPrefix + "acquires_total",
			Help: "Acquire calls by outcome: hit (a VM was ready), waited (a VM became ready in time), timeout (none did).",
		}, []string{"pool", "outcome"}),
		acquireLatency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    metricPrefix + "acquire_duration_seconds",
			Help:    "Time from Acquire to a leased VM, waits and hand-off included.",
			Buckets: prometheus.ExponentialBuckets(10e-6, 4, 12), // 10µs .. 42s
		}, []string{"pool"}),
		restoreDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    metricPrefix + "restore_duration_seconds",
			Help:    "Time to restore and validate a VM that entered the pool.",
			Buckets: prometheus.ExponentialBuckets(0.005, 2, 14), // 5ms .. 41s
		}, []string{"pool"}),
		validation: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: metricPrefix + "validation_failures_total",
			Help: "VMs that failed validation after restore, in a health check or at hand-out.",
		}, []string{"pool"}),
		evictions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: metricPrefix + "evictions_total",
			Help: "VMs destroyed without being handed out, by reason.",
		}, []string{"pool", "reason"}),
		refillErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: metricPrefix + "refill_errors_total",
			Help: "Restores that failed or produced a VM that failed validation.",
		}, []string{"pool"}),
		targetChanges: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: metricPrefix + "target_changes_total",
			Help: "Changes of an adaptive pool's target depth, by reason (start, rate, burst, miss, idle, bounds, budget).",
		}, []string{"pool", "reason"}),
		state: &stateCollector{
			p:         p,
			depth:     prometheus.NewDesc(metricPrefix+"depth", "VMs ready in the pool.", []string{"pool"}, nil),
			target:    prometheus.NewDesc(metricPrefix+"target", "Depth the pool fills towards: min, or an adaptive pool's target; waiting acquirers get restores on top of it.", []string{"pool"}, nil),
			restoring: prometheus.NewDesc(metricPrefix+"restoring", "Restores in flight.", []string{"pool"}, nil),
			rate:      prometheus.NewDesc(metricPrefix+"arrival_rate", "An adaptive pool's estimated acquire arrivals per second (0 for a fixed pool).", []string{"pool"}, nil),
			idle:      prometheus.NewDesc(metricPrefix+"idle_vm_seconds_total", "Time VMs have waited ready in the pool, summed over VMs.", []string{"pool"}, nil),
		},
	}
}

func (m *metrics) register(r prometheus.Registerer) error {
	for _, c := range []prometheus.Collector{m.acquires, m.acquireLatency, m.restoreDuration, m.validation, m.evictions, m.refillErrors, m.targetChanges, m.state} {
		if err := r.Register(c); err != nil {
			return fmt.Errorf("register pool metrics: %w", err)
		}
	}
	return nil
}

func (m *metrics) forBucket(name string) bucketMetrics {
	return bucketMetrics{
		name:            name,
		hit:             m.acquires.WithLabelValues(name, "hit"),
		waited:          m.acquires.WithLabelValues(name, "waited"),
		timeout:         m.acquires.WithLabelValues(name, "timeout"),
		acquireLatency:  m.acquireLatency.WithLabelValues(name),
		restoreDuration: m.restoreDuration.WithLabelValues(name),
		validation:      m.validation.WithLabelValues(name),
		refillErrors:    m.refillErrors.WithLabelValues(name),
		evictions:       m.evictions,
		targetChanges:   m.targetChanges,
	}
}

func (m *metrics) forget(name string) {
	l := prometheus.Labels{"pool": name}
	m.acquires.DeletePartialMatch(l)
	m.acquireLatency.DeletePartialMatch(l)
	m.restoreDuration.DeletePartialMatch(l)
	m.validation.DeletePartialMatch(l)
	m.evictions.DeletePartialMatch(l)
	m.refillErrors.DeletePartialMatch(l)
	m.targetChanges.DeletePartialMatch(l)
}

func (bm bucketMetrics) evicted(reason string) {
	bm.evictions.WithLabelValues(bm.name, reason).Inc()
}

func (bm bucketMetrics) targetChanged(reason string) {
	bm.targetChanges.WithLabelValues(bm.name, reason).Inc()
}

type stateCollector struct {
	p                                    *Pool
	depth, target, restoring, rate, idle *prometheus.Desc
}

func (c *stateCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.depth
	ch <- c.target
	ch <- c.restoring
	ch <- c.rate
	ch <- c.idle
}

func (c *stateCollector) Collect(ch chan<- prometheus.Metric) {
	send := func(d *prometheus.Desc, t prometheus.ValueType, v float64, pool string) {
		if m, err := prometheus.NewConstMetric(d, t, v, pool); err == nil {
			ch <- m
		}
	}
	for _, s := range c.p.gauges() {
		send(c.depth, prometheus.GaugeValue, float64(s.ready), s.name)
		send(c.target, prometheus.GaugeValue, float64(s.target), s.name)
		send(c.restoring, prometheus.GaugeValue, float64(s.restoring), s.name)
		send(c.rate, prometheus.GaugeValue, s.rate, s.name)
		send(c.idle, prometheus.CounterValue, s.idle, s.name)
	}
}
