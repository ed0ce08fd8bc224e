package bench

import (
	"bytes"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

// The builtin trace is the same every time (documented seed), has the
// shape it documents, and survives --trace-out / --trace FILE.
func TestBuiltinTraceIsReplayable(t *testing.T) {
	a, b := BuiltinTrace(), BuiltinTrace()
	if !slices.Equal(a.Arrivals, b.Arrivals) || a.Seed != BuiltinTraceSeed {
		t.Fatal("two builtin traces differ")
	}
	if err := a.Validate(); err != nil {
		t.Fatal(err)
	}
	// Mean base rate 0.5/s over 600 s plus bursts of 16 arrivals about
	// once a minute: some 300 + 160.
	if n := len(a.Arrivals); n < 300 || n > 700 {
		t.Errorf("builtin trace has %d arrivals", n)
	}
	path := filepath.Join(t.TempDir(), "trace.json")
	var buf bytes.Buffer
	if err := a.WriteJSON(&buf); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	c, err := ReadTrace(path)
	if err != nil || !slices.Equal(c.Arrivals, a.Arrivals) || c.DurationSeconds != a.DurationSeconds {
		t.Fatalf("read back: %v", err)
	}
	if err := os.WriteFile(path, []byte(`{"duration_seconds": 10, "arrivals": [3, 1]}`), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadTrace(path); err == nil {
		t.Error("a trace with arrivals out of order was accepted")
	}
}

// The optimum of a steady stream of one arrival a second with a refill of
// a tenth of a second holds two VMs (P(no arrival in 0.1 s) is 0.905, below
// 0.99, so the 99% quantile is 1, plus the one taken), one of them replaced
// 0.1 s after each arrival: 1.9 VM-s per second.
func TestOptimumIdleOfASteadyStream(t *testing.T) {
	tr := Trace{DurationSeconds: 100}
	for i := range 100 {
		tr.Arrivals = append(tr.Arrivals, float64(i)+0.5)
	}
	got := OptimumIdleVMSeconds(tr, 0.1)
	if got < 188 || got > 192 {
		t.Errorf("optimum idle = %.1f VM-s, want about 190", got)
	}
}
