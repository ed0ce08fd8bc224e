package guest_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/warmpool/warmpool/agent"
)

// TestStreamThroughputInQEMU moves data through the agent's channel both
// ways and logs the rates side by side with the line protocol's exec (JSON
// and base64), so one run shows what the stream protocol changed. It also
// checks what it moved: the file read back and the guest's sha256sum match
// what was written.
func TestStreamThroughputInQEMU(t *testing.T) {
	img := builtImage(t)
	v := bootQEMUMem(t, img, "", 512)
	c := waitReady(t, v)
	c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	rate := func(n int64, d time.Duration) float64 { return float64(n) / d.Seconds() / 1e6 }

	s, err := agent.DialSession(ctx, v, "e2e")
	if err != nil {
		t.Fatal(err)
	}
	data := make([]byte, 64<<20)
	rand.Read(data)
	sum := sha256.Sum256(data)
	start := time.Now()
	if _, err := s.WriteFile(ctx, agent.WriteRequest{Path: "/tmp/big"}, bytes.NewReader(data)); err != nil {
		t.Fatal(err)
	}
	in := rate(int64(len(data)), time.Since(start))
	start = time.Now()
	_, rc, err := s.ReadFile(ctx, "/tmp/big", false)
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.New()
	n, err := io.Copy(h, rc)
	rc.Close()
	if err != nil {
		t.Fatal(err)
	}
	out := rate(n, time.Since(start))
	if !bytes.Equal(h.Sum(nil), sum[:]) {
		t.Error("file read back differs")
	}
	var gsum bytes.Buffer
	if _, err := s.Run(ctx, agent.ProcessRequest{Argv: []string{"sha256sum", "/tmp/big"}}, nil, &gsum, nil); err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(gsum.String(), hex.EncodeToString(sum[:])) {
		t.Errorf("guest sha256sum %q", gsum.String())
	}
	run := func(argv ...string) float64 {
		var cnt countWriter
		start := time.Now()
		if _, err := s.Run(ctx, agent.ProcessRequest{Argv: argv}, nil, &cnt, nil); err != nil {
			t.Fatal(err)
		}
		return rate(max(cnt.n, int64(len(data))), time.Since(start))
	}
	streamCat := run("cat", "/tmp/big")
	guestOnly := run("sh", "-c", "cat /tmp/big > /dev/null")
	streamDD := run("dd", "if=/tmp/big", "bs=64k", "count=256")
	s.Close()

	c, err = agent.Dial(ctx, v, "e2e")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var cnt countWriter
	start = time.Now()
	if _, err := c.Exec(ctx, agent.ExecRequest{Argv: []string{"dd", "if=/tmp/big", "bs=64k", "count=256"}}, &cnt, nil); err != nil {
		t.Fatal(err)
	}
	legacyDD := rate(cnt.n, time.Since(start))
	t.Logf("MB/s: write into guest %.1f | read from guest %.1f | exec cat %.1f | exec dd 16 MiB %.1f vs %.1f over the line protocol (%.1fx) | guest alone reads the file at %.1f",
		in, out, streamCat, streamDD, legacyDD, streamDD/legacyDD, guestOnly)
}

type countWriter struct{ n int64 }

func (w *countWriter) Write(p []byte) (int, error) { w.n += int64(len(p)); return len(p), nil }

// TestStalledReaderHoldsBackInQEMU: while the host reads nothing, a command
// writing 200 MB is held back by the stream's window and the agent's
// bounded buffer; the agent's memory does not grow, and all of the output
// arrives once the host reads again.
func TestStalledReaderHoldsBackInQEMU(t *testing.T) {
	img := builtImage(t)
	v := bootQEMUMem(t, img, "", 512)
	waitReady(t, v).Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	s, err := agent.DialSession(ctx, v, "e2e")
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	guest := func(script string) string {
		var out bytes.Buffer
		if _, err := s.Run(ctx, agent.ProcessRequest{Argv: []string{"sh", "-c", script}}, nil, &out, &out); err != nil {
			t.Fatal(err)
		}
		return out.String()
	}
	// The agent serving us (PID 1's child) is the parent of what it runs.
	agentRSS := func() int {
		out := guest(`grep VmRSS /proc/$PPID/status | tr -dc 0-9`)
		n, _ := strconv.Atoi(strings.TrimSpace(out))
		return n
	}
	before := agentRSS()
	stall := make(chan struct{})
	var got int64
	done := make(chan error, 1)
	go func() {
		_, err := s.Run(ctx, agent.ProcessRequest{Argv: []string{"dd", "if=/dev/zero", "bs=1M", "count=200"}}, nil, writerFunc(func(p []byte) (int, error) {
			<-stall
			got += int64(len(p))
			return len(p), nil
		}), nil)
		done <- err
	}()
	time.Sleep(10 * time.Second)
	during := agentRSS()
	// busybox dd overwrites the "=" of its arguments while parsing them.
	ps := guest("ps -o pid,stat,args | grep 'dd if' | grep -v grep || true")
	close(stall)
	if err := <-done; err != nil || got != 200<<20 {
		t.Errorf("after the stall: %d bytes, %v", got, err)
	}
	t.Logf("agent RSS %d KiB before, %d KiB while the host stalled; dd then: %q", before, during, ps)
	if before == 0 || during-before > 16<<10 {
		t.Errorf("agent RSS %d -> %d KiB while the host read nothing", before, during)
	}
	if !strings.Contains(ps, "dd if") {
		t.Errorf("dd was not held back: ps shows %q", ps)
	}
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }
