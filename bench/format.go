package bench

import (
	"fmt"
	"io"
	"math"
	"sort"
	"strings"
	"text/tabwriter"
)

// formatValue renders a value of the given unit for humans: latencies pick
// the unit that keeps three significant digits readable.
func formatValue(v float64, unit string) string {
	switch unit {
	case "ms":
		return formatMillis(v)
	case "MiB":
		return fmt.Sprintf("%.1f MiB", v)
	case "ratio":
		return formatRatio(v)
	default:
		return fmt.Sprintf("%.3g %s", v, unit)
	}
}

func formatMillis(ms float64) string {
	switch {
	case ms == 0:
		return "0"
	case ms < 0.001:
		return fmt.Sprintf("%.0fns", ms*1e6)
	case ms < 1:
		return fmt.Sprintf("%.3gµs", ms*1e3)
	case ms < 1000:
		return fmt.Sprintf("%.3gms", ms)
	default:
		return fmt.Sprintf("%.3gs", ms/1e3)
	}
}

func formatRatio(r float64) string {
	switch {
	case r == 0:
		return "-"
	case r >= 0.01:
		return fmt.Sprintf("%.3g", r)
	default:
		// Tiny ratios read better as "1/N" than as 0.000123.
		return fmt.Sprintf("1/%.0f", math.Round(1/r))
	}
}

// WriteTable prints the report as an aligned table followed by the extra
// metrics and the targets with their verdicts.
func (r Report) WriteTable(w io.Writer) error {
	var b strings.Builder
	h := r.Host
	fmt.Fprintf(&b, "warmpool bench: provider=%s quick=%t  %d CPUs  kernel %s  %s", r.Provider, r.Quick, h.CPUs, h.Kernel, h.GoVersion)
	if h.QEMUVersion != "" {
		fmt.Fprintf(&b, "  QEMU %s", h.QEMUVersion)
	}
	if h.Accel != "" {
		fmt.Fprintf(&b, "  accel=%s", h.Accel)
	}
	if h.Image != "" {
		fmt.Fprintf(&b, "  image=%s", h.Image)
	}
	// Which run this is: a table pasted somewhere (the README) says so itself.
	build := h.Build
	if build == "" {
		build = "devel"
	}
	fmt.Fprintf(&b, "\nrun started %s, warmpool %s", r.Started.UTC().Format("2006-01-02 15:04 UTC"), build)
	fmt.Fprintf(&b, "\nload average %.2f %.2f %.2f before, %.2f %.2f %.2f after; run took %.1fs; warm-up runs excluded\n\n",
		h.LoadAvgBefore[0], h.LoadAvgBefore[1], h.LoadAvgBefore[2],
		h.LoadAvgAfter[0], h.LoadAvgAfter[1], h.LoadAvgAfter[2], r.DurationSeconds)

	tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "#\tSCENARIO\tN\tP50\tP90\tP99\tBASELINE\tRATIO\tTARGETS")
	for _, s := range r.Scenarios {
		if s.Skipped != "" {
			fmt.Fprintf(tw, "%d\t%s\t-\t-\t-\t-\t-\t-\tskipped\n", s.Number, s.Title)
			continue
		}
		fmt.Fprintf(tw, "%d\t%s\t%d\t%s\t%s\t%s\t%s\t%s\t%s\n", s.Number, s.Title, s.Count,
			cell(s, s.P50), cell(s, s.P90), cell(s, s.P99), baselineCell(s), formatRatio(s.Ratio), verdict(s.Targets))
	}
	if err := tw.Flush(); err != nil {
		return err
	}

	var notes []string
	for _, s := range r.Scenarios {
		if s.Skipped != "" {
			notes = append(notes, fmt.Sprintf("  %s: skipped: %s", s.ID, s.Skipped))
		}
		keys := make([]string, 0, len(s.Metrics))
		for k := range s.Metrics {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			notes = append(notes, fmt.Sprintf("  %s %s = %s", s.ID, k, formatMetric(k, s.Metrics[k])))
		}
	}
	if len(notes) > 0 {
		b.WriteString("\n")
		b.WriteString(strings.Join(notes, "\n"))
		b.WriteString("\n")
	}
	var goals []string
	for _, s := range r.Scenarios {
		for _, t := range s.Targets {
			mark := "pass"
			if !t.Pass {
				mark = "FAIL"
			}
			goals = append(goals, fmt.Sprintf("  %s  %s: %s (limit %s)", mark, t.Description,
				formatValue(t.Value, t.Unit), formatValue(t.Limit, t.Unit)))
		}
	}
	if len(goals) > 0 {
		b.WriteString("\ntargets:\n")
		b.WriteString(strings.Join(goals, "\n"))
		b.WriteString("\n")
	}
	_, err := io.WriteString(w, b.String())
	return err
}

func cell(s Scenario, v float64) string {
	if s.Count == 0 {
		return "-"
	}
	return formatValue(v, s.Unit)
}

func baselineCell(s Scenario) string {
	if s.Baseline == "" || s.BaselineValue == 0 {
		return "-"
	}
	return s.Baseline
}

func verdict(ts []Target) string {
	if len(ts) == 0 {
		return "-"
	}
	failed := 0
	for _, t := range ts {
		if !t.Pass {
			failed++
		}
	}
	if failed == 0 {
		return fmt.Sprintf("pass (%d)", len(ts))
	}
	return fmt.Sprintf("FAIL (%d of %d)", failed, len(ts))
}

// formatMetric uses the metric's name suffix to pick a rendering.
func formatMetric(name string, v float64) string {
	switch {
	case strings.HasSuffix(name, "_ms"):
		return formatMillis(v)
	case strings.HasSuffix(name, "_ns"):
		return fmt.Sprintf("%.0fns", v)
	case strings.HasSuffix(name, "_mib"):
		return fmt.Sprintf("%.1f MiB", v)
	case strings.HasSuffix(name, "_rate"):
		return fmt.Sprintf("%.0f%%", v*100)
	case strings.HasSuffix(name, "_mbps"):
		return fmt.Sprintf("%.3g MB/s", v)
	case strings.HasSuffix(name, "_per_s"):
		return fmt.Sprintf("%.2f", v)
	default:
		return fmt.Sprintf("%g", v)
	}
}
