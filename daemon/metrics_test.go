package daemon

import (
	"bytes"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/warmpool/warmpool/api"
)

// /metrics describes machines next to pools and leases: each machine's
// state, its failures and recoveries, its idle steps and how long ensures
// took, in a format promtool accepts.
func TestMetricsCoverMachinesPoolsAndLeases(t *testing.T) {
	r := startDiskFake(t, "")
	c := r.client
	setupPool(t, c, 1, 2)
	if _, err := c.Acquire(ctxT(t), "py", 5*time.Second, api.AcquireRequest{}); err != nil {
		t.Fatal(err)
	}
	// An adaptive pool reports its target, rate, idle time and why its
	// target changed.
	if _, err := c.SetPool(ctxT(t), "ad", api.PoolRequest{Template: "base", Min: 1, Max: 3, Adaptive: true}); err != nil {
		t.Fatal(err)
	}
	waitReady(t, c, "ad", 1)

	// box shrinks, suspends, and resumes on the next ensure, which turns its
	// idling off so that it stays running.
	box := api.MachineSpec{VCPUs: 1, MemoryMiB: 512, DataDiskMiB: 64,
		IdleAfter: dur(10 * time.Minute), SuspendAfter: dur(time.Hour)}
	if _, err := c.EnsureMachine(ctxT(t), "box", box.EnsureRequest()); err != nil {
		t.Fatal(err)
	}
	r.clock.Advance(10 * time.Minute)
	waitMachine(t, c, "box", api.MachineIdle)
	r.clock.Advance(50 * time.Minute)
	waitMachine(t, c, "box", api.MachineSuspended)
	awake := api.MachineSpec{VCPUs: 1, MemoryMiB: 512, DataDiskMiB: 64, IdleAfter: dur(0), SuspendAfter: dur(0)}
	if m, err := c.EnsureMachine(ctxT(t), "box", awake.EnsureRequest()); err != nil || m.State != api.MachineRunning {
		t.Fatalf("ensure after suspend: %+v, %v", m, err)
	}

	// dev's VM dies and the machine recovers on a new one.
	dev, err := c.EnsureMachine(ctxT(t), "dev", api.MachineSpec{VCPUs: 1, MemoryMiB: 256}.EnsureRequest())
	if err != nil {
		t.Fatal(err)
	}
	if err := r.prov.Kill(dev.VMID); err != nil {
		t.Fatal(err)
	}
	// The recovery waits out its backoff on the manual clock.
	text := waitMetric(t, c, `warmpool_machine_recoveries_total{machine="dev"}`, 1, func() { r.clock.Advance(time.Minute) })
	if m := waitMachine(t, c, "dev", api.MachineRunning); m.VMID == dev.VMID {
		t.Errorf("dev recovered on its killed VM %s", m.VMID)
	}

	for series, want := range map[string]float64{
		`warmpool_machine_state{machine="box",state="running"}`:                  1,
		`warmpool_machine_state{machine="box",state="suspended"}`:                0,
		`warmpool_machine_state{machine="dev",state="running"}`:                  1,
		`warmpool_machine_idle_transitions_total{event="shrink",machine="box"}`:  1,
		`warmpool_machine_idle_transitions_total{event="suspend",machine="box"}`: 1,
		`warmpool_machine_idle_transitions_total{event="resume",machine="box"}`:  1,
		`warmpool_machine_idle_transitions_total{event="wake",machine="box"}`:    0,
		`warmpool_machine_idle_transitions_total{event="shrink",machine="dev"}`:  0,
		`warmpool_machine_failures_total{machine="dev"}`:                         1,
		`warmpool_machine_failures_total{machine="box"}`:                         0,
		`warmpool_machine_recoveries_total{machine="box"}`:                       0,
		`warmpool_machine_ensure_duration_seconds_count{machine="box"}`:          2,
		`warmpool_machine_ensure_duration_seconds_count{machine="dev"}`:          1,
		`warmpool_leases_active`:                                       1,
		`warmpool_pool_acquires_total{outcome="hit",pool="py"}`:        1,
		`warmpool_pool_target{pool="py"}`:                              1,
		`warmpool_pool_target{pool="ad"}`:                              1,
		`warmpool_pool_arrival_rate{pool="ad"}`:                        0,
		`warmpool_pool_target_changes_total{pool="ad",reason="start"}`: 1,
	} {
		if got, ok := metricValue(text, series); !ok || got != want {
			t.Errorf("%s = %v (present %v), want %v", series, got, ok, want)
		}
	}
	if idle, ok := metricValue(text, `warmpool_pool_idle_vm_seconds_total{pool="py"}`); !ok || idle <= 0 {
		t.Errorf("warmpool_pool_idle_vm_seconds_total{pool=\"py\"} = %v (present %v), want the time its VMs waited", idle, ok)
	}
	if states := strings.Count(text, `warmpool_machine_state{machine="dev",`); states < 2 {
		t.Errorf("dev has %d state series, want one per state", states)
	}

	promtool, err := exec.LookPath("promtool")
	if err != nil {
		t.Skip("SKIPPING promtool check metrics: promtool is not installed (Debian package prometheus; make deps installs it)")
	}
	check := exec.Command(promtool, "check", "metrics")
	check.Stdin = strings.NewReader(text)
	var out bytes.Buffer
	check.Stdout, check.Stderr = &out, &out
	if err := check.Run(); err != nil {
		t.Errorf("promtool check metrics: %v\n%s", err, out.String())
	}
}

// metricValue returns the value of series (name{labels} exactly as
// exposed) in the text format.
func metricValue(text, series string) (float64, bool) {
	for line := range strings.SplitSeq(text, "\n") {
		if v, ok := strings.CutPrefix(line, series+" "); ok {
			f, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			return f, err == nil
		}
	}
	return 0, false
}

// waitMetric scrapes /metrics until series has value want and returns that
// scrape.
// waitMetric scrapes /metrics until series is want, calling each (if any)
// between scrapes, and returns the last scrape.
func waitMetric(t *testing.T, c *api.Client, series string, want float64, each ...func()) string {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	var text string
	for time.Now().Before(deadline) {
		var err error
		if text, err = c.Metrics(ctxT(t)); err != nil {
			t.Fatal(err)
		}
		if v, ok := metricValue(text, series); ok && v == want {
			return text
		}
		for _, f := range each {
			f()
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("%s never became %v; last scrape:\n%s", series, want, text)
	return ""
}
