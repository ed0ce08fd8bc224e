package bench

import (
	"fmt"
	"html"
	"io"
	"math"
	"strings"
)

// Chart geometry in SVG user units.
const (
	chartWidth   = 900
	labelWidth   = 310
	valueGutter  = 70
	rowHeight    = 34
	barHeight    = 11
	chartTop     = 64
	chartBottom  = 44
	chartPadLeft = 10
)

// WriteSVG draws the latency scenarios as horizontal bars on a logarithmic
// axis, p50 and p99 side by side, with no dependency beyond the standard
// library. Latency spans six orders of magnitude here (microseconds for the
// pool's own work, seconds for a cold boot), which a linear axis cannot show.
func (r Report) WriteSVG(w io.Writer) error {
	var rows []Scenario
	for _, s := range r.Scenarios {
		if s.Unit == "ms" && s.Count > 0 && s.Skipped == "" && s.P99 > 0 {
			rows = append(rows, s)
		}
	}
	lo, hi := decadeRange(rows)
	plotLeft := float64(labelWidth + chartPadLeft)
	plotWidth := float64(chartWidth) - plotLeft - valueGutter
	x := func(ms float64) float64 {
		ms = math.Max(ms, math.Pow(10, lo))
		return plotLeft + (math.Log10(ms)-lo)/(hi-lo)*plotWidth
	}
	height := chartTop + len(rows)*rowHeight + chartBottom

	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="sans-serif" font-size="12">`+"\n",
		chartWidth, height, chartWidth, height)
	fmt.Fprintf(&b, `<rect width="100%%" height="100%%" fill="#ffffff"/>`+"\n")
	title := fmt.Sprintf("warmpool bench: provider %s%s, %d CPUs", r.Provider, quickLabel(r.Quick), r.Host.CPUs)
	if r.Host.Accel != "" {
		title += ", accel " + r.Host.Accel
	}
	if r.Host.QEMUVersion != "" {
		title += ", QEMU " + r.Host.QEMUVersion
	}
	fmt.Fprintf(&b, `<text x="%d" y="22" font-size="15" font-weight="bold">%s</text>`+"\n", chartPadLeft, esc(title))
	fmt.Fprintf(&b, `<text x="%d" y="40" fill="#555">latency, log scale; %s; load average %.2f before, %.2f after</text>`+"\n",
		chartPadLeft, esc(r.Host.Time.Format("2006-01-02 15:04 MST")), r.Host.LoadAvgBefore[0], r.Host.LoadAvgAfter[0])
	// Legend.
	lx := chartWidth - 190
	fmt.Fprintf(&b, `<rect x="%d" y="30" width="12" height="10" fill="#2b6cb0"/><text x="%d" y="39">p50</text>`+"\n", lx, lx+16)
	fmt.Fprintf(&b, `<rect x="%d" y="30" width="12" height="10" fill="#f6ad55"/><text x="%d" y="39">p99</text>`+"\n", lx+60, lx+76)

	// Decade grid lines with their labels below the plot.
	gridBottom := chartTop + len(rows)*rowHeight
	for d := lo; d <= hi; d++ {
		gx := x(math.Pow(10, d))
		fmt.Fprintf(&b, `<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#ddd"/>`+"\n", gx, chartTop-6, gx, gridBottom)
		fmt.Fprintf(&b, `<text x="%.1f" y="%d" text-anchor="middle" fill="#555">%s</text>`+"\n", gx, gridBottom+16, esc(formatMillis(math.Pow(10, d))))
	}

	for i, s := range rows {
		y := chartTop + i*rowHeight
		label := fmt.Sprintf("%d. %s (n=%d)", s.Number, s.Title, s.Count)
		fmt.Fprintf(&b, `<text x="%d" y="%d">%s</text>`+"\n", chartPadLeft, y+barHeight+4, esc(truncate(label, 46)))
		for j, bar := range []struct {
			v     float64
			color string
		}{{s.P50, "#2b6cb0"}, {s.P99, "#f6ad55"}} {
			by := y + j*(barHeight+1)
			bw := math.Max(x(bar.v)-plotLeft, 1)
			fmt.Fprintf(&b, `<rect x="%.1f" y="%d" width="%.1f" height="%d" fill="%s"><title>%s p%s %s</title></rect>`+"\n",
				plotLeft, by, bw, barHeight, bar.color, esc(s.ID), map[int]string{0: "50", 1: "99"}[j], esc(formatMillis(bar.v)))
			fmt.Fprintf(&b, `<text x="%.1f" y="%d" font-size="10" fill="#333">%s</text>`+"\n", plotLeft+bw+4, by+barHeight-1, esc(formatMillis(bar.v)))
		}
	}
	fmt.Fprintf(&b, `<text x="%d" y="%d" fill="#555" font-size="11">samples per row in parentheses; warm-up runs excluded</text>`+"\n", chartPadLeft, height-8)
	b.WriteString("</svg>\n")
	_, err := io.WriteString(w, b.String())
	if err != nil {
		return fmt.Errorf("write svg: %w", err)
	}
	return nil
}

// decadeRange returns whole powers of ten (as exponents of milliseconds)
// that enclose every bar, at least one decade wide.
func decadeRange(rows []Scenario) (lo, hi float64) {
	lo, hi = math.Inf(1), math.Inf(-1)
	for _, s := range rows {
		for _, v := range []float64{s.P50, s.P99} {
			if v <= 0 {
				continue
			}
			lo = math.Min(lo, math.Floor(math.Log10(v)))
			hi = math.Max(hi, math.Ceil(math.Log10(v)))
		}
	}
	if math.IsInf(lo, 1) {
		return -3, 4
	}
	if hi <= lo {
		hi = lo + 1
	}
	return lo, hi
}

func quickLabel(q bool) string {
	if q {
		return " (--quick)"
	}
	return ""
}

func truncate(s string, n int) string {
	r := []rune(s)
	if len(r) <= n {
		return s
	}
	return string(r[:n-1]) + "…"
}

func esc(s string) string { return html.EscapeString(s) }
