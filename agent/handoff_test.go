package agent_test

import (
	"bytes"
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/warmpool/warmpool/agent"
	"github.com/warmpool/warmpool/agent/server"
	"github.com/warmpool/warmpool/provider/fake"
	"github.com/warmpool/warmpool/vm"
)

// fakeVM restores one paused VM from a fake provider whose agent is the
// real agent server recording its effects.
func fakeVM(t *testing.T, rec *recorder) (*fake.Provider, vm.VM) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	opts := rec.options()
	opts.State = server.NewState()
	p := fake.New(fake.Options{AgentHandler: func(c net.Conn) { _ = server.Serve(ctx, c, opts) }})
	snap := p.AddSnapshot(vm.Spec{Name: "tmpl", VCPUs: 1, MemoryMiB: 128})
	v, err := p.Restore(ctxT(t), snap)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.Destroy(context.Background(), v.ID) })
	return p, v
}

func status(t *testing.T, p vm.Provider, id string) vm.Status {
	t.Helper()
	got, err := p.Inspect(ctxT(t), id)
	if err != nil {
		t.Fatal(err)
	}
	return got.Status
}

func TestPreparedVMIsHandedOffOverTheKeptConnection(t *testing.T) {
	rec := &recorder{}
	p, v := fakeVM(t, rec)
	h := agent.NewHandoffer(p, p)
	t.Cleanup(h.Close)
	ctx := ctxT(t)

	var checks atomic.Int32
	validate := h.Validate(func(context.Context, vm.VM) error { checks.Add(1); return nil })
	if err := validate(ctx, v); err != nil {
		t.Fatal(err)
	}
	if got := status(t, p, v.ID); got != vm.StatusPaused {
		t.Fatalf("after preparation the VM is %s, want paused (it waits in a pool)", got)
	}
	// Health checks and the check at hand-out find the connection open.
	if err := validate(ctx, v); err != nil {
		t.Fatal(err)
	}
	if n := checks.Load(); n != 1 {
		t.Errorf("check ran %d times, want once (when the VM was prepared)", n)
	}
	rec.mu.Lock()
	if len(rec.entropy) != 1 || len(rec.entropy[0]) != 32 || bytes.Equal(rec.entropy[0], make([]byte, 32)) {
		t.Errorf("preparation added entropy %x, want 32 random bytes", rec.entropy)
	}
	rec.mu.Unlock()

	if err := p.Resume(ctx, v.ID); err != nil {
		t.Fatal(err)
	}
	tenant := []byte("tenant entropy, 32 bytes long...")
	when := time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)
	timings, err := h.Handoff(ctx, v, agent.HandoffRequest{Entropy: tenant, Time: when, Hostname: "lease-1"})
	if err != nil {
		t.Fatal(err)
	}
	if !timings.Prepared || timings.Dial != 0 || timings.Handoff <= 0 {
		t.Errorf("timings = %+v, want a prepared hand-off without dialing", timings)
	}
	if r := timings.Result; !r.Reported || r.EntropyBytes != len(tenant) || !r.Reseeded {
		t.Errorf("hand-off result = %+v, want the agent's report of %d bytes, reseeded", r, len(tenant))
	}
	if n := p.Calls(fake.OpDialAgent); n != 1 {
		t.Errorf("agent dialed %d times, want once (by Prepare)", n)
	}
	rec.mu.Lock()
	defer rec.mu.Unlock()
	if len(rec.entropy) != 2 || !bytes.Equal(rec.entropy[1], tenant) {
		t.Errorf("entropy added = %x, want the tenant's last", rec.entropy)
	}
	if rec.hostname != "lease-1" || len(rec.times) == 0 || !rec.times[len(rec.times)-1].Equal(when) {
		t.Errorf("hostname %q, clock %v: want the tenant's", rec.hostname, rec.times)
	}
}

func TestHandoffOfUnpreparedVMDials(t *testing.T) {
	rec := &recorder{}
	p, v := fakeVM(t, rec)
	h := agent.NewHandoffer(p, p)
	t.Cleanup(h.Close)
	ctx := ctxT(t)
	if err := p.Resume(ctx, v.ID); err != nil {
		t.Fatal(err)
	}
	timings, err := h.Handoff(ctx, v, agent.HandoffRequest{Hostname: "lease-2"})
	if err != nil {
		t.Fatal(err)
	}
	if timings.Prepared || timings.Dial <= 0 {
		t.Errorf("timings = %+v, want an unprepared hand-off that dialed", timings)
	}
	rec.mu.Lock()
	defer rec.mu.Unlock()
	if rec.hostname != "lease-2" {
		t.Errorf("hostname = %q", rec.hostname)
	}
}

func TestPreparedVMWhoseHypervisorDiedFailsValidation(t *testing.T) {
	p, v := fakeVM(t, &recorder{})
	h := agent.NewHandoffer(p, p)
	t.Cleanup(h.Close)
	ctx := ctxT(t)
	validate := h.Validate(nil)
	if err := validate(ctx, v); err != nil {
		t.Fatal(err)
	}
	if err := p.Kill(v.ID); err != nil {
		t.Fatal(err)
	}
	// The kept connection ends with the VM; noticing it is asynchronous.
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := validate(ctx, v)
		if errors.Is(err, vm.ErrInvalidState) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("validation of a killed VM = %v, want vm.ErrInvalidState", err)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestCloseDropsKeptConnections(t *testing.T) {
	p, v := fakeVM(t, &recorder{})
	h := agent.NewHandoffer(p, p)
	ctx := ctxT(t)
	if err := h.Prepare(ctx, v); err != nil {
		t.Fatal(err)
	}
	h.Close()
	if err := p.Resume(ctx, v.ID); err != nil {
		t.Fatal(err)
	}
	timings, err := h.Handoff(ctx, v, agent.HandoffRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if timings.Prepared {
		t.Error("hand-off after Close used a connection Close should have closed")
	}
	if err := h.Prepare(ctx, v); !errors.Is(err, agent.ErrClosed) {
		t.Errorf("Prepare after Close = %v, want agent.ErrClosed", err)
	}
}

func TestHandoffAndPingReportsFailedEffect(t *testing.T) {
	opts := server.Options{SetHostname: func(string) error { return errors.New("read-only") }}
	c, _ := pipeAgent(t, opts)
	_, err := c.HandoffAndPing(ctxT(t), agent.HandoffRequest{Hostname: "x"})
	var remote *agent.RemoteError
	if !errors.As(err, &remote) || remote.Op != "handoff" {
		t.Fatalf("HandoffAndPing with a failing effect = %v, want the agent's handoff error", err)
	}
	// The ping sent with it was answered and forgotten: the client still works.
	if err := c.Ping(ctxT(t)); err != nil {
		t.Fatal(err)
	}
}

func TestPrepareRunsWarmExecAndToleratesItsFailure(t *testing.T) {
	for _, tc := range []struct {
		name    string
		command string
		ran     bool
	}{
		{"runs", "touch", true},
		{"missing command", "/nonexistent/warm-up", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			marker := filepath.Join(t.TempDir(), "warmed")
			p, v := fakeVM(t, &recorder{})
			h := agent.NewHandoffer(p, p)
			h.WarmExec = []string{tc.command, marker}
			t.Cleanup(h.Close)
			if err := h.Prepare(ctxT(t), v); err != nil {
				t.Fatalf("Prepare with warm-up %q: %v", h.WarmExec, err)
			}
			if _, err := os.Stat(marker); (err == nil) != tc.ran {
				t.Errorf("warm-up %q ran: %v, want %v", h.WarmExec, err == nil, tc.ran)
			}
		})
	}
}
