package guest_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"io"
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
