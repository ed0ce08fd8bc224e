package agent_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/warmpool/warmpool/agent"
	"github.com/warmpool/warmpool/agent/proto"
	"github.com/warmpool/warmpool/agent/server"
	"github.com/warmpool/warmpool/vm"
)

// recorder captures the effects a handoff asks for.
type recorder struct {
	mu       sync.Mutex
	entropy  [][]byte
	times    []time.Time
	hostname string
	poweroff int
}

func (r *recorder) options() server.Options {
	return server.Options{
		AddEntropy: func(b []byte) error {
			r.mu.Lock()
			defer r.mu.Unlock()
			r.entropy = append(r.entropy, bytes.Clone(b))
			return nil
		},
		SetTime: func(t time.Time) error {
			r.mu.Lock()
			defer r.mu.Unlock()
			r.times = append(r.times, t)
			return nil
		},
		SetHostname: func(h string) error {
			r.mu.Lock()
			defer r.mu.Unlock()
			r.hostname = h
			return nil
		},
		PowerOff: func() error {
			r.mu.Lock()
			defer r.mu.Unlock()
			r.poweroff++
			return nil
		},
		Env: []string{"PATH=/usr/bin:/bin"},
	}
}

// pipeAgent serves the agent on one end of a pipe and returns a client on
// the other. Serve's result is delivered on the returned channel.
func pipeAgent(t *testing.T, opts server.Options) (*agent.Client, chan error) {
	t.Helper()
	host, guest := net.Pipe()
	served := make(chan error, 1)
	go func() { served <- server.Serve(context.Background(), guest, opts) }()
	c := agent.NewClient(host)
	t.Cleanup(func() {
		c.Close()
		select {
		case <-served:
		case <-time.After(10 * time.Second):
			t.Error("agent server did not return after the client closed")
		}
	})
	return c, served
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestHelloPingStats(t *testing.T) {
	c, _ := pipeAgent(t, server.Options{Agent: "test-agent", Stats: func() (proto.Stats, error) {
		return proto.Stats{MemTotalKiB: 262144, MemFreeKiB: 1000, MemAvailableKiB: 2000, UptimeMillis: 1500}, nil
	}})
	ctx := ctxT(t)
	info, err := c.Hello(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if info.Version != proto.Version || info.Agent != "test-agent" {
		t.Errorf("hello = %+v", info)
	}
	if err := c.Ping(ctx); err != nil {
		t.Fatal(err)
	}
	st, err := c.Stats(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.MemTotalKiB != 262144 || st.MemAvailableKiB != 2000 || st.Uptime != 1500*time.Millisecond {
		t.Errorf("stats = %+v", st)
	}
}

func TestDefaultStatsReadProc(t *testing.T) {
	c, _ := pipeAgent(t, server.Options{})
	st, err := c.Stats(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	if st.MemTotalKiB == 0 || st.MemAvailableKiB == 0 || st.MemAvailableKiB > st.MemTotalKiB || st.Uptime <= 0 {
		t.Errorf("stats from /proc look wrong: %+v", st)
	}
}

func TestHandoffAppliesEffectsAndEnv(t *testing.T) {
	rec := &recorder{}
	c, _ := pipeAgent(t, rec.options())
	ctx := ctxT(t)
	when := time.Date(2031, 5, 6, 7, 8, 9, 123456789, time.UTC)
	entropy := []byte("0123456789abcdef0123456789abcdef")
	res, err := c.Handoff(ctx, agent.HandoffRequest{Entropy: entropy, Time: when, Hostname: "lease-42", Env: map[string]string{"LEASE": "42", "TENANT": "acme"}})
	if err != nil {
		t.Fatal(err)
	}
	if !res.Reported || res.EntropyBytes != len(entropy) || !res.Reseeded || res.NotReseeded != "" {
		t.Errorf("hand-off result = %+v, want %d bytes reported and reseeded", res, len(entropy))
	}
	for _, step := range []string{"entropy", "clock", "hostname", "network"} {
		if _, ok := res.Steps[step]; !ok {
			t.Errorf("hand-off steps %v lack %s", res.Steps, step)
		}
	}
	rec.mu.Lock()
	if len(rec.entropy) != 1 || !bytes.Equal(rec.entropy[0], entropy) {
		t.Errorf("entropy added = %q, want %q", rec.entropy, entropy)
	}
	if len(rec.times) != 1 || !rec.times[0].Equal(when) {
		t.Errorf("clock set to %v, want %v", rec.times, when)
	}
	if rec.hostname != "lease-42" {
		t.Errorf("hostname = %q", rec.hostname)
	}
	rec.mu.Unlock()

	var out bytes.Buffer
	code, err := c.Exec(ctx, agent.ExecRequest{Argv: []string{"sh", "-c", `echo "$LEASE $TENANT $EXTRA"`}, Env: []string{"EXTRA=x"}}, &out, nil)
	if err != nil || code != 0 {
		t.Fatalf("exec = %d, %v", code, err)
	}
	if got := out.String(); got != "42 acme x\n" {
		t.Errorf("exec saw env %q, want the handoff env", got)
	}
}

func TestHandoffEnvSurvivesReconnect(t *testing.T) {
	state := server.NewState()
	opts := server.Options{State: state, Env: []string{"PATH=/usr/bin:/bin"}}
	c1, _ := pipeAgent(t, opts)
	ctx := ctxT(t)
	if _, err := c1.Handoff(ctx, agent.HandoffRequest{Env: map[string]string{"K": "v"}}); err != nil {
		t.Fatal(err)
	}
	c1.Close()
	c2, _ := pipeAgent(t, opts)
	var out bytes.Buffer
	if _, err := c2.Exec(ctx, agent.ExecRequest{Argv: []string{"sh", "-c", "echo $K"}}, &out, nil); err != nil {
		t.Fatal(err)
	}
	if out.String() != "v\n" {
		t.Errorf("env after reconnect = %q, want v", out.String())
	}
}

func TestHandoffRejectsTooMuchEntropy(t *testing.T) {
	c, _ := pipeAgent(t, server.Options{})
	_, err := c.Handoff(ctxT(t), agent.HandoffRequest{Entropy: make([]byte, proto.MaxEntropy+1)})
	if !errors.Is(err, vm.ErrInvalid) {
		t.Errorf("handoff with %d bytes of entropy = %v, want ErrInvalid", proto.MaxEntropy+1, err)
	}
}

func TestHandoffReportsFailedEffect(t *testing.T) {
	c, _ := pipeAgent(t, server.Options{AddEntropy: func([]byte) error { return errors.New("permission denied") }})
	_, err := c.Handoff(ctxT(t), agent.HandoffRequest{Entropy: []byte{1, 2, 3}})
	if err == nil || !strings.Contains(err.Error(), "permission denied") {
		t.Errorf("handoff with failing entropy = %v, want the failure", err)
	}
}

// A kernel that takes the entropy but cannot reseed its CRNG does not fail
// the hand-off, but the host hears about it, with the guest's reason.
func TestHandoffReportsEntropyAddedWithoutReseed(t *testing.T) {
	notReseeded := fmt.Errorf("%w: RNDRESEEDCRNG: no data available (the CRNG is not initialised yet)", server.ErrNotReseeded)
	c, _ := pipeAgent(t, server.Options{AddEntropy: func([]byte) error { return notReseeded }})
	res, err := c.Handoff(ctxT(t), agent.HandoffRequest{Entropy: []byte{1, 2, 3}})
	if err != nil {
		t.Fatalf("hand-off whose entropy was added without a reseed = %v, want success", err)
	}
	if !res.Reported || res.EntropyBytes != 3 || res.Reseeded || !strings.Contains(res.NotReseeded, "not initialised") {
		t.Errorf("hand-off result = %+v, want 3 bytes added, not reseeded, with the reason", res)
	}
	// Without an entropy source (the fake's default), nothing is claimed.
	c, _ = pipeAgent(t, server.Options{})
	if res, err := c.Handoff(ctxT(t), agent.HandoffRequest{Entropy: []byte{1, 2, 3}}); err != nil || res.EntropyBytes != 0 || res.Reseeded {
		t.Errorf("hand-off to an agent without an entropy source = %+v, %v; want 0 bytes, not reseeded", res, err)
	}
}

func TestExecExitCodesAndOutput(t *testing.T) {
	c, _ := pipeAgent(t, server.Options{})
	ctx := ctxT(t)
	cases := []struct {
		argv     []string
		stdin    string
		code     int
		out, err string
	}{
		{[]string{"true"}, "", 0, "", ""},
		{[]string{"sh", "-c", "echo out; echo err >&2; exit 3"}, "", 3, "out\n", "err\n"},
		{[]string{"sh", "-c", "kill -9 $$"}, "", 137, "", ""},
		{[]string{"tr", "a-z", "A-Z"}, "hello stdin", 0, "HELLO STDIN", ""},
	}
	for _, tc := range cases {
		var out, errb bytes.Buffer
		code, err := c.Exec(ctx, agent.ExecRequest{Argv: tc.argv, Stdin: []byte(tc.stdin)}, &out, &errb)
		if err != nil {
			t.Errorf("%q: %v", tc.argv, err)
			continue
		}
		if code != tc.code || out.String() != tc.out || errb.String() != tc.err {
			t.Errorf("%q = %d %q %q, want %d %q %q", tc.argv, code, out.String(), errb.String(), tc.code, tc.out, tc.err)
		}
	}
}

func TestExecLargeOutput(t *testing.T) {
	c, _ := pipeAgent(t, server.Options{})
	var out bytes.Buffer
	// 3 MiB crosses many chunks and more than MaxFrame in total.
	code, err := c.Exec(ctxT(t), agent.ExecRequest{Argv: []string{"head", "-c", "3145728", "/dev/zero"}}, &out, nil)
	if err != nil || code != 0 {
		t.Fatalf("exec = %d, %v", code, err)
	}
	if out.Len() != 3<<20 {
		t.Errorf("got %d bytes of output, want %d", out.Len(), 3<<20)
	}
}

func TestExecNotFound(t *testing.T) {
	c, _ := pipeAgent(t, server.Options{})
	code, err := c.Exec(ctxT(t), agent.ExecRequest{Argv: []string{"/no/such/program"}}, nil, nil)
	if !errors.Is(err, agent.ErrExecFailed) || code != -1 {
		t.Errorf("exec of missing program = %d, %v, want ErrExecFailed", code, err)
	}
}

func TestExecTimeout(t *testing.T) {
	c, _ := pipeAgent(t, server.Options{})
	start := time.Now()
	_, err := c.Exec(ctxT(t), agent.ExecRequest{Argv: []string{"sleep", "60"}, Timeout: 200 * time.Millisecond}, nil, nil)
	if !errors.Is(err, agent.ErrTimeout) {
		t.Errorf("exec past its timeout = %v, want ErrTimeout", err)
	}
	if time.Since(start) > 30*time.Second {
		t.Errorf("timed-out command was not killed")
	}
}

// signalWriter reports the first write.
type signalWriter struct {
	once sync.Once
	ch   chan struct{}
	buf  bytes.Buffer
	mu   sync.Mutex
}

func (w *signalWriter) Write(b []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf.Write(b)
	w.once.Do(func() { close(w.ch) })
	return len(b), nil
}

func TestExecStreamsBeforeExitAndCancelKills(t *testing.T) {
	c, _ := pipeAgent(t, server.Options{})
	ctx, cancel := context.WithCancel(ctxT(t))
	w := &signalWriter{ch: make(chan struct{})}
	errc := make(chan error, 1)
	go func() {
		_, err := c.Exec(ctx, agent.ExecRequest{Argv: []string{"sh", "-c", "echo started; exec sleep 60"}}, w, nil)
		errc <- err
	}()
	select {
	case <-w.ch:
	case <-time.After(20 * time.Second):
		t.Fatal("no output streamed while the command runs")
	}
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Errorf("canceled exec = %v, want context.Canceled", err)
	}
	// The connection is still usable afterwards.
	if err := c.Ping(ctxT(t)); err != nil {
		t.Errorf("ping after canceled exec: %v", err)
	}
}

func TestPingAnsweredWhileExecRuns(t *testing.T) {
	c, _ := pipeAgent(t, server.Options{})
	ctx := ctxT(t)
	done := make(chan struct{})
	go func() {
		defer close(done)
		c.Exec(ctx, agent.ExecRequest{Argv: []string{"sleep", "2"}}, nil, nil)
	}()
	if err := c.Ping(ctx); err != nil {
		t.Fatal(err)
	}
	<-done
}

func TestShutdownAnswersThenPowersOff(t *testing.T) {
	rec := &recorder{}
	c, _ := pipeAgent(t, rec.options())
	if err := c.Shutdown(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	// The agent powers off after its answer is on the way, so the answer
	// may arrive first.
	deadline := time.Now().Add(10 * time.Second)
	for {
		rec.mu.Lock()
		n := rec.poweroff
		rec.mu.Unlock()
		if n == 1 {
			return
		}
		if n > 1 || time.Now().After(deadline) {
			t.Fatalf("power off called %d times, want 1", n)
		}
		time.Sleep(time.Millisecond)
	}
}

// rawAgent serves the agent on a pipe and returns the raw host end.
func rawAgent(t *testing.T, opts server.Options) (net.Conn, chan error) {
	host, guest := net.Pipe()
	served := make(chan error, 1)
	go func() { served <- server.Serve(context.Background(), guest, opts) }()
	t.Cleanup(func() { host.Close() })
	return host, served
}

func TestHostDisconnectMidMessage(t *testing.T) {
	host, served := rawAgent(t, server.Options{})
	if _, err := host.Write([]byte(`{"v":1,"id":1,"op":"pi`)); err != nil {
		t.Fatal(err)
	}
	host.Close()
	select {
	case err := <-served:
		if err != nil {
			t.Errorf("Serve after host disconnect = %v, want nil", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return after the host disconnected mid-message")
	}
}

// A virtio-serial port is one stream across host connections: the tail of a
// message from a host that went away can precede the next host's requests.
func TestFragmentFromEarlierConnectionIsSkipped(t *testing.T) {
	host, guest := net.Pipe()
	stream := io.MultiReader(strings.NewReader(`{"v":1,"id":99,"op":"exec","exec":{"argv":["rm","-rf`), guest)
	conn := struct {
		io.Reader
		io.Writer
		io.Closer
	}{stream, guest, guest}
	go server.Serve(context.Background(), conn, server.Options{})
	c := agent.NewClient(host)
	defer c.Close()
	if err := c.Ping(ctxT(t)); err != nil {
		t.Fatalf("ping after a stale fragment: %v", err)
	}
}

func TestOversizedFrameRejected(t *testing.T) {
	host, _ := rawAgent(t, server.Options{})
	r := proto.NewReader(host)
	go func() {
		big := append(bytes.Repeat([]byte("x"), proto.MaxFrame+10), '\n')
		host.Write(big)
		host.Write([]byte(`{"v":1,"id":7,"op":"ping"}` + "\n"))
	}()
	var kinds []string
	for len(kinds) < 2 {
		host.SetReadDeadline(time.Now().Add(20 * time.Second))
		line, err := r.Next()
		if err != nil {
			t.Fatal(err)
		}
		var resp proto.Response
		if err := json.Unmarshal(line, &resp); err != nil {
			t.Fatal(err)
		}
		kinds = append(kinds, resp.Kind+"/"+resp.Code)
	}
	if kinds[0] != "error/bad_request" || kinds[1] != "ok/" {
		t.Errorf("answers to an oversized frame and a ping = %q, want an error then ok", kinds)
	}
}

func TestUnsupportedVersionRejected(t *testing.T) {
	host, _ := rawAgent(t, server.Options{})
	go host.Write([]byte(`{"v":99,"id":1,"op":"ping"}` + "\n"))
	host.SetReadDeadline(time.Now().Add(20 * time.Second))
	line, err := proto.NewReader(host).Next()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(line), proto.CodeUnsupportedVersion) {
		t.Errorf("answer to version 99 = %s", line)
	}
}

func TestCallsFailWhenAgentGoesAway(t *testing.T) {
	host, guest := net.Pipe()
	c := agent.NewClient(host)
	defer c.Close()
	go func() {
		// Read the request, then vanish without answering.
		buf := make([]byte, 256)
		guest.Read(buf)
		guest.Close()
	}()
	err := c.Ping(ctxT(t))
	if !errors.Is(err, agent.ErrClosed) {
		t.Errorf("ping to a vanished agent = %v, want ErrClosed", err)
	}
}

// flakyDialer fails the first attempts, as a booting guest does.
type flakyDialer struct {
	failures atomic.Int32
}

func (d *flakyDialer) DialAgent(ctx context.Context, id string) (net.Conn, error) {
	if d.failures.Add(-1) >= 0 {
		return nil, errors.New("connection refused")
	}
	host, guest := net.Pipe()
	go server.Serve(ctx, guest, server.Options{})
	return host, nil
}

func TestWaitReadyRetries(t *testing.T) {
	d := &flakyDialer{}
	d.failures.Store(3)
	if err := agent.WaitReady(ctxT(t), d, "vm-1"); err != nil {
		t.Fatal(err)
	}
	dial, err := agent.Dial(ctxT(t), d, "vm-1")
	if err != nil {
		t.Fatal(err)
	}
	dial.Close()
}

func TestWaitReadyGivesUp(t *testing.T) {
	d := &flakyDialer{}
	d.failures.Store(1 << 30)
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	err := agent.WaitReady(ctx, d, "vm-1")
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "connection refused") {
		t.Errorf("WaitReady on a dead agent = %v, want the deadline and the last failure", err)
	}
}
