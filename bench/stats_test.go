package bench

import (
	"bytes"
	"encoding/json"
	"encoding/xml"
	"io"
	"os"
	"runtime/debug"
	"strings"
	"testing"
	"time"
)

func TestSummarizeUsesMeasuredValues(t *testing.T) {
	values := make([]float64, 0, 100)
	for i := 100; i >= 1; i-- {
		values = append(values, float64(i))
	}
	s := Summarize(values)
	if s.Count != 100 || s.Min != 1 || s.Max != 100 {
		t.Fatalf("count/min/max = %d/%g/%g, want 100/1/100", s.Count, s.Min, s.Max)
	}
	if s.P50 != 50 || s.P90 != 90 || s.P99 != 99 {
		t.Errorf("p50/p90/p99 = %g/%g/%g, want 50/90/99", s.P50, s.P90, s.P99)
	}
	if s.Mean != 50.5 {
		t.Errorf("mean = %g, want 50.5", s.Mean)
	}
	// With three samples the tail percentiles are the slowest sample, not an
	// extrapolation.
	few := Summarize([]float64{3, 1, 2})
	if few.P50 != 2 || few.P90 != 3 || few.P99 != 3 {
		t.Errorf("3 samples: p50/p90/p99 = %g/%g/%g, want 2/3/3", few.P50, few.P90, few.P99)
	}
	if (Summarize(nil) != Summary{}) {
		t.Errorf("empty input should give the zero summary")
	}
}

func sampleReport() Report {
	sc := []Scenario{
		{ID: "cold-boot", Number: 1, Title: "cold boot to agent-ready", Unit: "ms", Summary: Summarize([]float64{2000, 2200, 2400}), Baseline: "cold-boot"},
		{ID: "restore", Number: 2, Title: "restore to agent-ready", Unit: "ms", Summary: Summarize([]float64{100, 150}), Baseline: "cold-boot"},
		{ID: "warm-acquire", Number: 3, Title: "warm acquire", Unit: "ms", Summary: Summarize([]float64{5, 30}), Baseline: "cold-boot"},
		{ID: "memory-private", Number: 5, Title: "private memory", Unit: "MiB", Summary: Summarize([]float64{40, 42}), Baseline: "configured-memory", BaselineValue: 256},
		{ID: "pool-overhead", Number: 7, Title: "pool overhead", Unit: "ms", Summary: Summarize([]float64{0.002, 0.01}), Baseline: "warm-acquire",
			Metrics: map[string]float64{"per_acquire_ns": 1234}},
		{ID: "ensure-suspended", Number: 6, Title: "ensure from suspended", Unit: "ms", Skipped: "provider cannot snapshot"},
	}
	computeRatios(sc)
	evaluateTargets(sc)
	return Report{Provider: "qemu", Started: time.Date(2026, 11, 23, 17, 13, 0, 0, time.UTC),
		Host: Host{CPUs: 2, Accel: "tcg", QEMUVersion: "7.2.22", Build: "commit abf5b8e0c1d2"}, Scenarios: sc}
}

func TestRatiosAndTargets(t *testing.T) {
	r := sampleReport()
	restore, _ := r.Scenario("restore")
	if want := 100.0 / 2200; restore.Ratio != want {
		t.Errorf("restore ratio = %g, want p50/p50 = %g", restore.Ratio, want)
	}
	if len(restore.Targets) != 1 || !restore.Targets[0].Pass {
		t.Errorf("restore targets = %+v, want one passing target", restore.Targets)
	}
	acquire, _ := r.Scenario("warm-acquire")
	if len(acquire.Targets) != 2 {
		t.Fatalf("warm-acquire targets = %+v, want 2", acquire.Targets)
	}
	for _, tg := range acquire.Targets {
		if tg.Pass {
			t.Errorf("target %q passed with p99 30 ms", tg.Description)
		}
	}
	if r.Passed() {
		t.Errorf("report with failed targets claims to pass")
	}
	mem, _ := r.Scenario("memory-private")
	if mem.Ratio != 40.0/256 || len(mem.Targets) != 1 || !mem.Targets[0].Pass {
		t.Errorf("memory ratio %g targets %+v, want p50 40/256 and a pass", mem.Ratio, mem.Targets)
	}
	skipped, _ := r.Scenario("ensure-suspended")
	if len(skipped.Targets) != 0 || skipped.Ratio != 0 {
		t.Errorf("skipped scenario got targets %+v ratio %g", skipped.Targets, skipped.Ratio)
	}
}

func TestTableJSONAndSVG(t *testing.T) {
	r := sampleReport()
	var table bytes.Buffer
	if err := r.WriteTable(&table); err != nil {
		t.Fatal(err)
	}
	out := table.String()
	// The header names the run, so a table pasted elsewhere says where it came from.
	for _, want := range []string{"run started 2026-11-23 17:13 UTC, warmpool commit abf5b8e0c1d2",
		"SCENARIO", "cold boot to agent-ready", "2.2s", "100ms", "FAIL", "skipped: provider cannot snapshot", "per_acquire_ns = 1234ns"} {
		if !strings.Contains(out, want) {
			t.Errorf("table lacks %q:\n%s", want, out)
		}
	}

	var js bytes.Buffer
	if err := r.WriteJSON(&js); err != nil {
		t.Fatal(err)
	}
	var back Report
	if err := json.Unmarshal(js.Bytes(), &back); err != nil {
		t.Fatalf("JSON does not decode: %v", err)
	}
	if len(back.Scenarios) != len(r.Scenarios) || back.Scenarios[1].P50 != r.Scenarios[1].P50 || back.Scenarios[1].Count != 2 {
		t.Errorf("JSON round trip lost data: %+v", back.Scenarios)
	}
	if !strings.Contains(js.String(), `"samples": 3`) || !strings.Contains(js.String(), `"p99"`) {
		t.Errorf("JSON lacks samples/p99 fields:\n%s", js.String())
	}

	var svg bytes.Buffer
	if err := r.WriteSVG(&svg); err != nil {
		t.Fatal(err)
	}
	svgText := svg.String()
	dec := xml.NewDecoder(strings.NewReader(svgText))
	bars := 0
	for {
		tok, err := dec.Token()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("SVG is not well-formed XML: %v", err)
		}
		if se, ok := tok.(xml.StartElement); ok && se.Name.Local == "rect" {
			for _, a := range se.Attr {
				if a.Name.Local == "fill" && (a.Value == "#2b6cb0" || a.Value == "#f6ad55") {
					bars++
				}
			}
		}
	}
	// 4 latency rows with data, p50 and p99 each, plus 2 legend swatches.
	if bars != 4*2+2 {
		t.Errorf("SVG has %d bars, want %d", bars, 4*2+2)
	}
}

func TestParseSmapsRollup(t *testing.T) {
	in := `557fed109000-7fff79f19000 ---p 00000000 00:00 0                          [rollup]
Rss:              180000 kB
Pss:               54000 kB
Pss_Dirty:           116 kB
Shared_Clean:     130000 kB
Private_Clean:      2000 kB
Private_Dirty:     41000 kB
`
	m, err := parseSmapsRollup(strings.NewReader(in))
	if err != nil {
		t.Fatal(err)
	}
	if m.PrivateKiB != 43000 || m.PssKiB != 54000 || m.RssKiB != 180000 {
		t.Errorf("parsed %+v, want private 43000 (clean+dirty), pss 54000, rss 180000", m)
	}
	if _, err := parseSmapsRollup(strings.NewReader("Rss: 1 kB\n")); err == nil {
		t.Errorf("truncated smaps_rollup accepted")
	}
	self, err := readProcMemory(os.Getpid())
	if err != nil {
		t.Fatalf("read own smaps_rollup: %v", err)
	}
	if self.RssKiB <= 0 || self.PssKiB <= 0 {
		t.Errorf("own memory %+v has no resident pages", self)
	}
}

func TestBuildNameSaysWhichCommit(t *testing.T) {
	rev := debug.BuildSetting{Key: "vcs.revision", Value: "e19e28e0123456789abcdef0123456789abcdef0"}
	for want, bi := range map[string]*debug.BuildInfo{
		"commit e19e28e01234":          {Settings: []debug.BuildSetting{rev, {Key: "vcs.modified", Value: "false"}}},
		"commit e19e28e01234+modified": {Settings: []debug.BuildSetting{rev, {Key: "vcs.modified", Value: "true"}}},
		"v1.2.0":                       {Main: debug.Module{Version: "v1.2.0"}},
		"devel":                        {Main: debug.Module{Version: "(devel)"}},
	} {
		if got := buildNameOf(bi); got != want {
			t.Errorf("buildNameOf(%+v) = %q, want %q", bi, got, want)
		}
	}
}
