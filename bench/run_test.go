package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"
)

// captureEnv lets a test look at the run's provider after Run returned.
func captureEnv(t *testing.T) func() *env {
	var mu sync.Mutex
	var got *env
	testHookEnv = func(e *env) {
		mu.Lock()
		defer mu.Unlock()
		got = e
	}
	t.Cleanup(func() { testHookEnv = nil })
	return func() *env {
		mu.Lock()
		defer mu.Unlock()
		return got
	}
}

func assertNothingLeft(t *testing.T, e *env, stateDir string) {
	t.Helper()
	if e == nil {
		t.Fatal("run did not create its environment")
	}
	vms, err := e.provider.List(context.Background())
	if err != nil {
		t.Fatalf("list VMs after the run: %v", err)
	}
	if len(vms) != 0 {
		t.Errorf("run left %d VMs behind: %+v", len(vms), vms)
	}
	left, err := os.ReadDir(stateDir)
	if err != nil {
		t.Fatal(err)
	}
	if len(left) != 0 {
		t.Errorf("run left %d entries in its state directory, first %s", len(left), left[0].Name())
	}
}

func TestRunFakeQuickReportShape(t *testing.T) {
	env := captureEnv(t)
	stateDir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	var progress bytes.Buffer
	rep, err := Run(ctx, Options{Provider: "fake", Quick: true, StateDir: stateDir, Progress: &progress})
	if err != nil {
		t.Fatalf("Run: %v\nprogress:\n%s", err, progress.String())
	}
	assertNothingLeft(t, env(), stateDir)

	if rep.Provider != "fake" || !rep.Quick || rep.Host.CPUs <= 0 || rep.Host.GoVersion == "" || rep.Host.Kernel == "" || rep.Host.Time.IsZero() {
		t.Errorf("report header incomplete: provider %q quick %t host %+v", rep.Provider, rep.Quick, rep.Host)
	}
	ran := map[string]bool{}
	for _, s := range rep.Scenarios {
		ran[s.ID] = true
		if s.Skipped != "" {
			continue
		}
		if s.Count <= 0 {
			t.Errorf("scenario %s has %d samples", s.ID, s.Count)
		}
		if !(s.Min <= s.P50 && s.P50 <= s.P90 && s.P90 <= s.P99 && s.P99 <= s.Max) {
			t.Errorf("scenario %s percentiles out of order: %+v", s.ID, s.Summary)
		}
		if s.Baseline != "" && (s.Ratio <= 0 || s.BaselineValue <= 0) {
			t.Errorf("scenario %s has baseline %s but ratio %g (baseline value %g)", s.ID, s.Baseline, s.Ratio, s.BaselineValue)
		}
	}
	want := []string{"cold-boot", "restore", "warm-acquire", "burst", "burst-hit", "burst-wait",
		"memory-private", "memory-pss", "ensure-cold", "ensure-running", "ensure-suspended", "pool-overhead", "exec-cat-line", "exec-cat", "cp-in", "cp-out"}
	for _, id := range want {
		if !ran[id] {
			t.Errorf("scenario %s missing from the report", id)
		}
	}
	// The fake has no hypervisor process, so memory is the one scenario it
	// cannot measure, and it says why.
	for _, id := range []string{"memory-private", "memory-pss"} {
		if s, _ := rep.Scenario(id); !strings.Contains(s.Skipped, "no hypervisor process") {
			t.Errorf("%s: skipped = %q, want the reason", id, s.Skipped)
		}
	}
	for _, id := range []string{"cold-boot", "restore", "warm-acquire", "burst", "ensure-cold", "ensure-running", "ensure-suspended", "pool-overhead", "exec-cat-line", "exec-cat", "cp-in", "cp-out"} {
		if s, _ := rep.Scenario(id); s.Skipped != "" {
			t.Errorf("%s skipped with the fake provider: %s", id, s.Skipped)
		}
	}
	burst, _ := rep.Scenario("burst")
	if burst.Count != rep.Config.BurstConcurrency*rep.Config.BurstRounds {
		t.Errorf("burst has %d samples, want K×rounds = %d", burst.Count, rep.Config.BurstConcurrency*rep.Config.BurstRounds)
	}
	if hr := burst.Metrics["hit_rate"]; hr <= 0 || hr >= 1 {
		t.Errorf("burst hit rate %g: with K=%d > D=%d some acquires must hit and some wait", hr, rep.Config.BurstConcurrency, rep.Config.BurstDepth)
	}
	if burst.Metrics["back_to_depth_p50_ms"] <= 0 {
		t.Errorf("burst did not report the time back to depth: %+v", burst.Metrics)
	}
	targets := 0
	for _, s := range rep.Scenarios {
		targets += len(s.Targets)
	}
	if targets < 6 {
		t.Errorf("only %d targets evaluated, want every target whose scenario ran", targets)
	}
	if !strings.Contains(progress.String(), "[8/8]") {
		t.Errorf("progress did not report every step:\n%s", progress.String())
	}

	var js bytes.Buffer
	if err := rep.WriteJSON(&js); err != nil {
		t.Fatal(err)
	}
	var back Report
	if err := json.Unmarshal(js.Bytes(), &back); err != nil {
		t.Fatalf("report JSON does not decode: %v", err)
	}
	if !reflect.DeepEqual(back, rep) {
		t.Errorf("report changed in a JSON round trip:\n got %+v\nwant %+v", back, rep)
	}
	for _, field := range []string{`"loadavg_before"`, `"loadavg_after"`, `"cpus"`, `"samples"`, `"p50"`, `"p90"`, `"p99"`, `"ratio"`, `"targets"`, `"pass"`} {
		if !strings.Contains(js.String(), field) {
			t.Errorf("report JSON lacks %s", field)
		}
	}
}

// cancelOn cancels a context when a progress line contains a marker, the
// way Ctrl-C arrives in the middle of a scenario.
type cancelOn struct {
	marker string
	cancel context.CancelFunc
}

func (c cancelOn) Write(p []byte) (int, error) {
	if strings.Contains(string(p), c.marker) {
		c.cancel()
	}
	return len(p), nil
}

func TestRunCancelledCleansUp(t *testing.T) {
	for _, marker := range []string{"[3/8]", "[4/8]", "[6/8]", "[8/8]"} {
		t.Run(marker, func(t *testing.T) {
			env := captureEnv(t)
			stateDir := t.TempDir()
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			_, err := Run(ctx, Options{Provider: "fake", Quick: true, StateDir: stateDir, Progress: cancelOn{marker, cancel}})
			if !errors.Is(err, context.Canceled) {
				t.Fatalf("Run after cancel = %v, want context.Canceled", err)
			}
			assertNothingLeft(t, env(), stateDir)
		})
	}
}

func TestRunRejectsBadOptions(t *testing.T) {
	for name, opts := range map[string]Options{
		"provider": {Provider: "vmware"},
		"vcpus":    {Provider: "fake", VCPUs: 999},
	} {
		_, err := Run(context.Background(), opts)
		if err == nil || !strings.Contains(err.Error(), name) {
			t.Errorf("Run(%+v) = %v, want an error naming %s", opts, err, name)
		}
	}
}
