package api_test

import (
	"bytes"
	"context"
	"errors"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/warmpool/warmpool/api"
	"github.com/warmpool/warmpool/api/apitest"
	"github.com/warmpool/warmpool/events"
	"github.com/warmpool/warmpool/vm"
)

// serveUnix runs the API for b on a Unix socket in a temp dir until the test
// ends and returns the socket path.
func serveUnix(t *testing.T, b api.Backend, token string) string {
	t.Helper()
	// Short path: Unix socket paths are limited to 108 bytes.
	dir, err := os.MkdirTemp("", "wp")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "state", "warmpool.sock")
	ln, err := api.Listen("unix:" + sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- api.Serve(ctx, ln, api.ServerOptions{Backend: b, Token: token}) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("serve: %v", err)
		}
	})
	return sock
}

func TestClientRoundTripOverUnixSocket(t *testing.T) {
	fake := apitest.New()
	// The token is set but the Unix socket's file mode is the access
	// control: a client without the token gets in.
	sock := serveUnix(t, fake, testToken)
	fi, err := os.Stat(sock)
	if err != nil {
		t.Fatal(err)
	}
	if perm := fi.Mode().Perm(); perm != 0o600 {
		t.Errorf("socket mode %o, want 600", perm)
	}
	c := api.NewClient(sock, "")
	t.Cleanup(c.Close)
	ctx := t.Context()

	if err := c.Health(ctx); err != nil {
		t.Fatalf("health: %v", err)
	}
	st, err := c.Status(ctx)
	if err != nil || st.Provider != "fake" {
		t.Fatalf("status: %+v, %v", st, err)
	}

	var steps []string
	tmpl, err := c.BuildTemplate(ctx, api.TemplateRequest{Name: "py", VCPUs: 2, MemoryMiB: 512}, func(s string) { steps = append(steps, s) })
	if err != nil || tmpl.Name != "py" || tmpl.VCPUs != 2 {
		t.Fatalf("build template: %+v, %v", tmpl, err)
	}
	if strings.Join(steps, ",") != "boot,wait for agent,snapshot" {
		t.Errorf("progress steps %q", steps)
	}
	ts, err := c.Templates(ctx)
	if err != nil || len(ts) != 2 {
		t.Fatalf("templates: %+v, %v", ts, err)
	}

	p, err := c.SetPool(ctx, "py", api.PoolRequest{Template: "py", Min: 1, Max: 3, MaxAge: api.Duration(time.Hour)})
	if err != nil || p.Max != 3 || p.MaxAge.Std() != time.Hour {
		t.Fatalf("set pool: %+v, %v", p, err)
	}
	if _, err := c.Pool(ctx, "nope"); !errors.Is(err, vm.ErrNotFound) {
		t.Errorf("pool nope: %v, want not found", err)
	}

	lease, err := c.Acquire(ctx, "web", 2*time.Second, api.AcquireRequest{Owner: "ci", TTL: api.Duration(time.Minute)})
	if err != nil || lease.Pool != "web" || lease.ExpiresAt == nil || lease.Owner != "ci" {
		t.Fatalf("acquire: %+v, %v", lease, err)
	}
	var stdout, stderr bytes.Buffer
	code, err := c.Exec(ctx, lease.ID, api.ExecRequest{Argv: []string{"echo", "hello", "world"}}, &stdout, &stderr)
	if err != nil || code != 0 || stdout.String() != "hello world\n" {
		t.Fatalf("exec echo: code %d, stdout %q, err %v", code, stdout.String(), err)
	}
	stdout.Reset()
	code, err = c.Exec(ctx, lease.ID, api.ExecRequest{Argv: []string{"fail"}}, &stdout, &stderr)
	if err != nil || code != 1 || stderr.String() != "failing as asked\n" {
		t.Fatalf("exec fail: code %d, stderr %q, err %v", code, stderr.String(), err)
	}
	if code, err = c.Exec(ctx, lease.ID, api.ExecRequest{Argv: []string{"exit", "42"}}, &stdout, &stderr); err != nil || code != 42 {
		t.Fatalf("exec exit 42: code %d, err %v", code, err)
	}
	stdout.Reset()
	_, err = c.Exec(ctx, lease.ID, api.ExecRequest{Argv: []string{"vanish"}}, &stdout, &stderr)
	if !errors.Is(err, vm.ErrInvalidState) || stdout.String() != "partial\n" {
		t.Fatalf("exec that fails after output: stdout %q, err %v; want the output and a conflict error", stdout.String(), err)
	}
	if _, err := c.Exec(ctx, "lease-404", api.ExecRequest{Argv: []string{"echo"}}, &stdout, &stderr); !errors.Is(err, vm.ErrNotFound) {
		t.Fatalf("exec in unknown lease: %v, want not found", err)
	}
	ls, err := c.Leases(ctx)
	if err != nil || len(ls) != 1 {
		t.Fatalf("leases: %+v, %v", ls, err)
	}
	for range 2 {
		if err := c.Release(ctx, lease.ID); err != nil {
			t.Fatalf("release (twice is fine): %v", err)
		}
	}

	// The fake's pool "web" had 2 ready VMs and one was taken above.
	if _, err := c.Acquire(ctx, "web", 0, api.AcquireRequest{}); err != nil {
		t.Fatal(err)
	}
	_, err = c.Acquire(ctx, "web", 10*time.Millisecond, api.AcquireRequest{})
	var apiErr *api.Error
	if !errors.Is(err, api.ErrNothingReady) || !errors.As(err, &apiErr) ||
		apiErr.Status != http.StatusServiceUnavailable || apiErr.RetryAfter != time.Second {
		t.Fatalf("acquire from an empty pool: %#v, want 503 nothing_ready with Retry-After 1s", err)
	}

	if err := c.DeletePool(ctx, "py"); err != nil {
		t.Fatal(err)
	}
	if err := c.DeletePool(ctx, "py"); !errors.Is(err, vm.ErrNotFound) {
		t.Errorf("second delete: %v, want not found", err)
	}
	if _, err := c.SetPool(ctx, "x", api.PoolRequest{Template: "base", Min: 3, Max: 1}); !errors.Is(err, vm.ErrInvalid) {
		t.Errorf("min > max: %v, want invalid", err)
	}
}

func TestClientMachinesAndEvents(t *testing.T) {
	fake := apitest.New()
	c := api.NewClient("unix:"+serveUnix(t, fake, ""), "")
	t.Cleanup(c.Close)
	ctx := t.Context()

	if _, err := c.PutMachine(ctx, "dev", api.MachineRequest{VCPUs: 1, MemoryMiB: 512}); err != nil {
		t.Fatal(err)
	}

	evCtx, stop := context.WithCancel(ctx)
	defer stop()
	subscribed := make(chan struct{})
	got := make(chan events.Event, 4)
	evDone := make(chan error, 1)
	go func() {
		evDone <- c.Events(evCtx, api.EventFilter{Subject: "dev"}, func() { close(subscribed) }, func(e events.Event) error {
			got <- e
			return nil
		})
	}()
	select {
	case <-subscribed:
	case err := <-evDone:
		t.Fatalf("events: %v", err)
	}
	fake.Bus.Publish(events.Event{Kind: "machine.state", Subject: "other"})

	m, err := c.EnsureMachine(ctx, "dev", api.MachineEnsureRequest{})
	if err != nil || m.State != api.MachineRunning {
		t.Fatalf("ensure: %+v, %v", m, err)
	}
	select {
	case e := <-got:
		if e.Subject != "dev" || e.Kind != "machine.state" || e.Detail["to"] != "running" {
			t.Errorf("event %+v, want machine.state of dev to running", e)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no event for ensure")
	}
	stop()
	if err := <-evDone; err != nil {
		t.Errorf("events after cancel: %v", err)
	}

	h, err := c.HoldMachine(ctx, "dev", api.HoldRequest{Owner: "me", TTL: api.Duration(time.Minute)})
	if err != nil || h.Machine != "dev" || h.ExpiresAt == nil {
		t.Fatalf("hold: %+v, %v", h, err)
	}
	if m, _ := c.Machine(ctx, "dev"); m.Holds != 1 {
		t.Errorf("holds %d, want 1", m.Holds)
	}
	if err := c.ReleaseHold(ctx, "dev", h.ID); err != nil {
		t.Fatal(err)
	}
	if err := c.StopMachine(ctx, "dev", true); err != nil {
		t.Fatal(err)
	}
	ms, err := c.Machines(ctx)
	if err != nil || len(ms) != 1 || ms[0].State != api.MachineStopped || ms[0].Holds != 0 {
		t.Fatalf("machines: %+v, %v", ms, err)
	}
	// A new machine ensured without a spec gets the default shape.
	if m, err := c.EnsureMachine(ctx, "bare", api.MachineEnsureRequest{}); err != nil || !m.Spec.Equal(api.MachineSpec{}.WithDefaults()) {
		t.Fatalf("ensure without spec: %+v, %v; want the default shape", m, err)
	}
}

func TestServeEndsOpenEventStreamsOnShutdown(t *testing.T) {
	dir := t.TempDir()
	ln, err := api.Listen("unix:" + filepath.Join(dir, "s.sock"))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- api.Serve(ctx, ln, api.ServerOptions{Backend: apitest.New()}) }()
	c := api.NewClient(filepath.Join(dir, "s.sock"), "")
	defer c.Close()
	subscribed := make(chan struct{})
	streamDone := make(chan error, 1)
	go func() {
		streamDone <- c.Events(context.Background(), api.EventFilter{}, func() { close(subscribed) }, func(events.Event) error { return nil })
	}()
	<-subscribed
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("serve: %v", err)
		}
	case <-time.After(api.ShutdownTimeout / 2):
		t.Fatal("Serve did not return while an event stream was open")
	}
	if err := <-streamDone; err != nil {
		t.Errorf("stream ended with %v, want a clean end", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "s.sock")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket left behind after shutdown: %v", err)
	}
}

func TestServeRefusesTCPWithoutToken(t *testing.T) {
	ln, err := api.Listen("tcp:127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	err = api.Serve(t.Context(), ln, api.ServerOptions{Backend: apitest.New()})
	if err == nil || !strings.Contains(err.Error(), "token") {
		t.Fatalf("serve on TCP without token: %v, want an error about the token", err)
	}
}

func TestClientOverTCPSendsToken(t *testing.T) {
	ln, err := api.Listen("tcp:127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- api.Serve(ctx, ln, api.ServerOptions{Backend: apitest.New(), Token: testToken}) }()
	t.Cleanup(func() { cancel(); <-done })
	addr := "tcp:" + ln.Addr().String()
	if _, err := api.NewClient(addr, testToken).Pools(t.Context()); err != nil {
		t.Fatalf("with token: %v", err)
	}
	_, err = api.NewClient(addr, "wrong").Pools(t.Context())
	var e *api.Error
	if !errors.As(err, &e) || e.Status != http.StatusUnauthorized {
		t.Fatalf("wrong token: %v, want 401", err)
	}
}

func TestListen(t *testing.T) {
	dir := t.TempDir()

	t.Run("removes a stale socket", func(t *testing.T) {
		path := filepath.Join(dir, "stale.sock")
		ln, err := net.Listen("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		ln.(*net.UnixListener).SetUnlinkOnClose(false)
		ln.Close() // the file stays, nobody answers: a crashed daemon
		ln2, err := api.Listen("unix:" + path)
		if err != nil {
			t.Fatalf("listen over a stale socket: %v", err)
		}
		ln2.Close()
	})
	t.Run("refuses a live socket", func(t *testing.T) {
		path := filepath.Join(dir, "live.sock")
		ln, err := api.Listen("unix:" + path)
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				c.Close()
			}
		}()
		if ln2, err := api.Listen("unix:" + path); err == nil {
			ln2.Close()
			t.Fatal("listened on a socket another daemon answers on")
		}
	})
	t.Run("refuses to remove a regular file", func(t *testing.T) {
		path := filepath.Join(dir, "file")
		if err := os.WriteFile(path, []byte("precious"), 0o600); err != nil {
			t.Fatal(err)
		}
		if ln, err := api.Listen("unix:" + path); err == nil {
			ln.Close()
			t.Fatal("listened over a regular file")
		}
		if b, _ := os.ReadFile(path); string(b) != "precious" {
			t.Fatal("the regular file was touched")
		}
	})
	for _, bad := range []string{"", "relative.sock", "unix:rel", "tcp:nohost", "udp:1.2.3.4:5"} {
		if ln, err := api.Listen(bad); err == nil {
			ln.Close()
			t.Errorf("Listen(%q) succeeded", bad)
		}
	}
}

// TestLongRequestsOutliveServerTimeouts checks that an event stream keeps
// working past the server's read and write timeouts (scaled down here).
func TestLongRequestsOutliveServerTimeouts(t *testing.T) {
	fake := apitest.New()
	srv := api.NewHTTPServer(api.NewServer(api.ServerOptions{Backend: fake}))
	srv.ReadTimeout, srv.WriteTimeout = 100*time.Millisecond, 100*time.Millisecond
	ln, err := api.Listen("unix:" + filepath.Join(t.TempDir(), "s.sock"))
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	c := api.NewClient(ln.Addr().String(), "")
	defer c.Close()

	subscribed := make(chan struct{})
	got := make(chan events.Event, 1)
	done := make(chan error, 1)
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	go func() {
		done <- c.Events(ctx, api.EventFilter{}, func() { close(subscribed) }, func(e events.Event) error {
			got <- e
			return nil
		})
	}()
	<-subscribed
	time.Sleep(500 * time.Millisecond) // well past both timeouts
	fake.Bus.Publish(events.Event{Kind: "pool.refilled", Subject: "web"})
	select {
	case e := <-got:
		if e.Kind != "pool.refilled" {
			t.Fatalf("event %+v", e)
		}
	case err := <-done:
		t.Fatalf("stream ended after the server's timeouts: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("no event")
	}
}
