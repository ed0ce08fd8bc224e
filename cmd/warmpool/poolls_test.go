package main

import (
	"bytes"
	"encoding/json"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/warmpool/warmpool/api"
	"github.com/warmpool/warmpool/api/apitest"
)

// pool ls says why a pool cannot fill, in the last column of its row, and
// -o json carries last_error (null for a pool that refills).
func TestPoolListShowsLastError(t *testing.T) {
	why := "template base (generation 1) cannot be restored (guest image file is gone)\tand could not be rebuilt"
	pools := []api.Pool{
		{Name: "broken", Template: "base", Min: 1, Max: 1, LastError: &why},
		{Name: "fine", Template: "base", Min: 1, Max: 1, Ready: 1},
	}
	var out bytes.Buffer
	if err := printPools(&out, &globals{}, pools, false); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) != 3 || !strings.HasSuffix(strings.TrimSpace(lines[0]), "LAST-ERROR") {
		t.Fatalf("pool ls:\n%s", out.String())
	}
	if want := strings.ReplaceAll(why, "\t", " "); !strings.HasSuffix(lines[1], want) {
		t.Errorf("row %q does not end with the last error %q", lines[1], want)
	}
	if !strings.HasSuffix(strings.TrimSpace(lines[2]), " -") {
		t.Errorf("row %q of a healthy pool does not end with -", lines[2])
	}

	out.Reset()
	if err := printPools(&out, &globals{output: "json"}, pools, false); err != nil {
		t.Fatal(err)
	}
	var raw []map[string]any
	if err := json.Unmarshal(out.Bytes(), &raw); err != nil || len(raw) != 2 {
		t.Fatalf("pool ls -o json: %v\n%s", err, out.String())
	}
	if raw[0]["last_error"] != why {
		t.Errorf("last_error = %v, want %q", raw[0]["last_error"], why)
	}
	if v, ok := raw[1]["last_error"]; !ok || v != nil {
		t.Errorf("healthy pool's last_error = %v (present %v), want null", v, ok)
	}
}

func TestAgeIsCoarse(t *testing.T) {
	now := time.Now()
	for ago, want := range map[time.Duration]string{
		-time.Second: "0s", 42 * time.Second: "42s", 90 * time.Second: "1m",
		3*time.Hour + 59*time.Minute: "3h", 47 * time.Hour: "47h", 80 * time.Hour: "3d",
	} {
		if got := age(now.Add(-ago)); got != want {
			t.Errorf("age %v ago = %q, want %q", ago, got, want)
		}
	}
	if got := age(time.Time{}); got != "-" {
		t.Errorf("age of the zero time = %q, want -", got)
	}
}

// pool ls shows an adaptive pool's target, estimated rate and why the
// target last changed; a fixed pool has "-" there. -o json carries them.
func TestPoolListShowsAdaptiveTarget(t *testing.T) {
	reason, at := "burst", time.Now().Add(-42*time.Second)
	pools := []api.Pool{
		{Name: "ad", Template: "base", Min: 1, Max: 16, Ready: 5, Target: 7, Adaptive: true, Rate: 12.345,
			TargetReason: &reason, TargetChanged: &at},
		{Name: "fixed", Template: "base", Min: 2, Max: 2, Ready: 2, Target: 2},
	}
	var out bytes.Buffer
	if err := printPools(&out, &globals{}, pools, false); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	header := strings.Fields(lines[0])
	cell := func(row int, col string) string {
		i := slices.Index(header, col)
		if i < 0 {
			t.Fatalf("pool ls has no %s column:\n%s", col, out.String())
		}
		// TARGET-REASON holds two words plus "ago"; it comes after RATE.
		f := strings.Fields(lines[row])
		if i > slices.Index(header, "TARGET-REASON") && row == 1 {
			i += 2
		}
		return f[i]
	}
	if cell(1, "TARGET") != "7" || cell(1, "RATE") != "12.35/s" || !strings.Contains(lines[1], "burst 42s ago") {
		t.Errorf("adaptive row %q: want target 7, rate 12.35/s, reason burst 42s ago", lines[1])
	}
	if cell(2, "TARGET") != "2" || cell(2, "RATE") != "-" || cell(2, "TARGET-REASON") != "-" {
		t.Errorf("fixed row %q: want target 2 and - for rate and reason", lines[2])
	}
	out.Reset()
	if err := printPools(&out, &globals{output: "json"}, pools, false); err != nil {
		t.Fatal(err)
	}
	var raw []map[string]any
	if err := json.Unmarshal(out.Bytes(), &raw); err != nil {
		t.Fatal(err)
	}
	if raw[0]["adaptive"] != true || raw[0]["target"] != 7.0 || raw[0]["rate"] != 12.345 || raw[0]["target_reason"] != "burst" {
		t.Errorf("adaptive pool JSON %v", raw[0])
	}
	if v, ok := raw[1]["target_reason"]; !ok || v != nil {
		t.Errorf("fixed pool's target_reason = %v (present %v), want null", v, ok)
	}
}

// pool set --adaptive needs --max (the most the pool may grow to) and
// sends adaptive to the daemon.
func TestPoolSetAdaptive(t *testing.T) {
	state := startDaemon(t, apitest.New())
	s := "--state=" + state
	if r := cli(t, "", s, "pool", "set", "ad", "--template", "base", "--adaptive"); r.code != 2 || !strings.Contains(r.stderr, "--adaptive needs --max") {
		t.Errorf("pool set --adaptive without --max: %+v", r)
	}
	r := cli(t, "", s, "pool", "set", "ad", "--template", "base", "--min", "1", "--max", "8", "--adaptive", "-o", "json")
	var p api.Pool
	if r.code != 0 || json.Unmarshal([]byte(r.stdout), &p) != nil || !p.Adaptive || p.Max != 8 {
		t.Errorf("pool set --adaptive: %+v", r)
	}
}
