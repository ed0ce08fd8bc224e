package main

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/warmpool/warmpool/api"
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
