package bench

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/warmpool/warmpool/agent"
	"github.com/warmpool/warmpool/api"
)

// guestIO is scenario 8: moving data in and out of a leased VM. The
// baseline is what there was before the stream sessions: `exec cat` over
// the agent's line protocol (JSON and base64 per 32 KiB chunk). Then, over
// the daemon's multiplexed session as the API uses it: a file written into
// the guest (cp in), read back (cp out), and exec output (cat of that
// file). The guest reading the file by itself says how fast the guest can
// go without the channel. Rates are MB/s (10^6 bytes a second).
func guestIO(ctx context.Context, e *env) ([]Scenario, error) {
	bp, err := e.newPool(ctx, "guest-io", 1)
	if err != nil {
		return nil, err
	}
	defer bp.shutdown(ctx)
	if err := bp.waitFull(ctx); err != nil {
		return nil, err
	}
	l, err := bp.acquire(ctx)
	if err != nil {
		return nil, err
	}
	defer bp.release(ctx, l)
	lineMiB, streamMiB, samples := 16, 100, 3
	if e.opts.Quick {
		lineMiB, streamMiB, samples = 8, 32, 2
	}
	var tag [6]byte
	_, _ = rand.Read(tag[:])
	path := "/tmp/warmpool-bench-" + hex.EncodeToString(tag[:])
	rate := func(n int, d time.Duration) float64 { return float64(n) / d.Seconds() / 1e6 }

	// The line protocol first: its connection is the agent's only one, so
	// it must come before the daemon opens its session to the VM.
	c, err := agent.Dial(ctx, e.dialer, l.VMID)
	if err != nil {
		return nil, err
	}
	mk := fmt.Sprintf("dd if=/dev/urandom of=%s bs=1M count=%d 2>/dev/null", path, lineMiB)
	if code, err := c.Exec(ctx, agent.ExecRequest{Argv: []string{"sh", "-c", mk}}, nil, nil); err != nil || code != 0 {
		c.Close()
		return nil, fmt.Errorf("make %s in the guest: exit %d, %v", path, code, err)
	}
	var line []float64
	for range samples {
		var n countingWriter
		start := time.Now()
		if _, err := c.Exec(ctx, agent.ExecRequest{Argv: []string{"cat", path}}, &n, nil); err != nil {
			c.Close()
			return nil, err
		}
		line = append(line, rate(int(n), time.Since(start)))
	}
	c.Close()

	g, err := e.d.Guest(ctx, api.Target{Lease: l.ID})
	if err != nil {
		return nil, err
	}
	data := make([]byte, streamMiB<<20)
	_, _ = rand.Read(data)
	var in, out, cat []float64
	// What limits the rates: the hypervisor process's CPU time per second
	// of wall time while it moves the data (under TCG its vCPU thread
	// emulates the guest's every instruction, the channel's included).
	hvPID := 0
	if v, err := e.provider.Inspect(ctx, l.VMID); err == nil {
		hvPID = v.PID
	}
	cpu0, wall0 := processCPU(hvPID), time.Now()
	for range samples {
		start := time.Now()
		if _, err := g.WriteFile(ctx, agent.WriteRequest{Path: path}, bytes.NewReader(data)); err != nil {
			return nil, err
		}
		in = append(in, rate(len(data), time.Since(start)))
		start = time.Now()
		_, rc, err := g.ReadFile(ctx, path, false)
		if err != nil {
			return nil, err
		}
		n, err := io.Copy(io.Discard, rc)
		rc.Close()
		if err != nil || n != int64(len(data)) {
			return nil, fmt.Errorf("read %s back: %d bytes, %v", path, n, err)
		}
		out = append(out, rate(len(data), time.Since(start)))
		var cnt countingWriter
		start = time.Now()
		if _, err := g.Run(ctx, agent.ProcessRequest{Argv: []string{"cat", path}}, nil, &cnt, nil); err != nil {
			return nil, err
		}
		cat = append(cat, rate(int(cnt), time.Since(start)))
	}
	hvCPU := 0.0
	if hvPID > 0 {
		hvCPU = (processCPU(hvPID) - cpu0).Seconds() / time.Since(wall0).Seconds()
	}
	start := time.Now()
	if _, err := g.Run(ctx, agent.ProcessRequest{Argv: []string{"sh", "-c", "cat " + path + " > /dev/null"}}, nil, nil, nil); err != nil {
		return nil, err
	}
	guestAlone := rate(len(data), time.Since(start))
	_, _ = g.Run(ctx, agent.ProcessRequest{Argv: []string{"rm", "-f", path}}, nil, nil, nil)

	row := func(id, title string, v []float64) Scenario {
		return Scenario{ID: id, Number: 8, Title: title, Unit: "MB/s", Summary: Summarize(v), Baseline: "exec-cat-line"}
	}
	base := Scenario{ID: "exec-cat-line", Number: 8, Title: "guest I/O: exec cat, line protocol (before)", Unit: "MB/s", Summary: Summarize(line),
		Baseline: "exec-cat-line", Metrics: map[string]float64{"size_mib": float64(lineMiB)}}
	catRow := row("exec-cat", "guest I/O: exec cat, stream session", cat)
	catRow.Metrics = map[string]float64{"size_mib": float64(streamMiB), "guest_alone_mbps": guestAlone}
	if hvPID > 0 {
		catRow.Metrics["hypervisor_cpu_per_s"] = hvCPU
	}
	return []Scenario{base, catRow,
		row("cp-in", "guest I/O: file into the guest (cp in)", in),
		row("cp-out", "guest I/O: file out of the guest (cp out)", out)}, nil
}

type countingWriter int

func (c *countingWriter) Write(p []byte) (int, error) {
	*c += countingWriter(len(p))
	return len(p), nil
}

// processCPU is the user and system time pid has used; zero when unknown.
func processCPU(pid int) time.Duration {
	if pid <= 0 {
		return 0
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// Fields after the command (which may hold spaces) start after ')'.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0
	}
	utime, _ := strconv.ParseInt(f[11], 10, 64)
	stime, _ := strconv.ParseInt(f[12], 10, 64)
	// The kernel's USER_HZ is 100 on every Linux this runs on.
	return time.Duration(utime+stime) * 10 * time.Millisecond
}
