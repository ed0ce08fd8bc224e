package main

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/warmpool/warmpool/bench"
)

// A resume of 30 ms puts every warm acquire above the 20 ms target, so
// bench --check must exit 1, name that target, and still print the report
// with the target marked failed.
func TestBenchCheckFailsOnAMissedTarget(t *testing.T) {
	r := cli(t, "", "bench", "--provider", "fake", "--quick", "--check", "--fake-latency", "resume=30ms",
		"--bench-dir", t.TempDir(), "-o", "json")
	const target = "warm acquire p99 < 20 ms"
	if r.code != exitFailure {
		t.Errorf("bench --check with a missed target exited %d, want %d (stderr %q)", r.code, exitFailure, r.stderr)
	}
	if !strings.Contains(r.stderr, "missed") || !strings.Contains(r.stderr, target) {
		t.Errorf("stderr %q does not name the missed target %q", r.stderr, target)
	}
	var rep bench.Report
	if err := json.Unmarshal([]byte(r.stdout), &rep); err != nil {
		t.Fatalf("report on stdout: %v\n%s", err, r.stdout)
	}
	found := false
	for _, m := range rep.Missed() {
		if m.Description == target {
			found = true
			if m.Value <= m.Limit {
				t.Errorf("target %q reported missed with value %g within its limit %g", target, m.Value, m.Limit)
			}
		}
	}
	if !found {
		t.Errorf("report does not mark %q missed; missed: %+v", target, rep.Missed())
	}
}

func TestBenchFakeLatencyNeedsAKnownOperation(t *testing.T) {
	r := cli(t, "", "bench", "--provider", "fake", "--fake-latency", "warp=1ms")
	assertFailure(t, r, exitUsage, "resume")
	r = cli(t, "", "bench", "--provider", "fake", "--fake-latency", "resume=soon")
	assertFailure(t, r, exitUsage, "resume=soon")
}
