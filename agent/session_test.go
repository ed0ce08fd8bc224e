package agent_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/warmpool/warmpool/agent"
	"github.com/warmpool/warmpool/agent/server"
	"github.com/warmpool/warmpool/vm"
)

// pipeDialer serves a fresh agent connection per dial, all sharing one
// agent state, as one guest does.
type pipeDialer struct {
	opts server.Options
	wg   sync.WaitGroup
}

func (d *pipeDialer) DialAgent(ctx context.Context, id string) (net.Conn, error) {
	host, guest := net.Pipe()
	d.wg.Go(func() { _ = server.Serve(context.Background(), guest, d.opts) })
	return host, nil
}

func pipeSession(t *testing.T, opts server.Options) *agent.Session {
	t.Helper()
	if opts.State == nil {
		opts.State = server.NewState()
	}
	d := &pipeDialer{opts: opts}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := agent.DialSession(ctx, d, "vm")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		s.Close()
		d.wg.Wait()
	})
	return s
}

func TestSessionRunStreamsStdinBothWays(t *testing.T) {
	s := pipeSession(t, server.Options{Env: []string{"PATH=/usr/bin:/bin"}})
	ctx := context.Background()
	in := bytes.Repeat([]byte("0123456789abcdef"), 1<<18) // 4 MiB: beyond any one window
	var out, errb bytes.Buffer
	e, err := s.Run(ctx, agent.ProcessRequest{Argv: []string{"sh", "-c", "cat; echo done >&2; exit 3"}}, bytes.NewReader(in), &out, &errb)
	if err != nil {
		t.Fatal(err)
	}
	if e.Code != 3 || !bytes.Equal(out.Bytes(), in) || errb.String() != "done\n" {
		t.Errorf("exit %d, %d bytes out (equal %v), stderr %q", e.Code, out.Len(), bytes.Equal(out.Bytes(), in), errb.String())
	}
}

func TestSessionSignalAndExitCode(t *testing.T) {
	s := pipeSession(t, server.Options{Env: []string{"PATH=/usr/bin:/bin"}})
	ctx := context.Background()
	p, err := s.Start(ctx, agent.ProcessRequest{Argv: []string{"sleep", "100"}})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if err := s.Signal(ctx, p.PID, syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	e, err := p.Output(nil, nil)
	if err != nil || e.Code != 130 || e.Signal != 2 {
		t.Errorf("sleep after SIGINT: %+v, %v; want code 130", e, err)
	}
	if err := s.Signal(ctx, 1, syscall.SIGTERM); !errors.Is(err, vm.ErrNotFound) {
		t.Errorf("signal to a PID the agent did not start = %v, want not found", err)
	}
}

func TestSessionDetachedLogsFollowAndKill(t *testing.T) {
	s := pipeSession(t, server.Options{Env: []string{"PATH=/usr/bin:/bin"}})
	ctx := context.Background()
	p, err := s.Start(ctx, agent.ProcessRequest{Argv: []string{"sh", "-c", "echo start; while :; do sleep 0.05; echo tick; done"}, Detach: true})
	if err != nil {
		t.Fatal(err)
	}
	ps, err := s.Processes(ctx)
	if err != nil || len(ps) != 1 || ps[0].PID != p.PID || !ps[0].Running || !ps[0].Detached {
		t.Fatalf("ps = %+v, %v", ps, err)
	}
	pr, pw := io.Pipe()
	done := make(chan agent.ExitStatus, 1)
	go func() {
		e, _, err := s.Logs(ctx, p.PID, true, pw, nil)
		if err != nil {
			t.Error(err)
		}
		pw.Close()
		done <- e
	}()
	buf := make([]byte, 64)
	var got strings.Builder
	for !strings.Contains(got.String(), "tick\ntick\n") {
		n, err := pr.Read(buf)
		if err != nil {
			t.Fatal(err)
		}
		got.Write(buf[:n])
	}
	if !strings.HasPrefix(got.String(), "start\n") {
		t.Errorf("logs -f began with %q", got.String())
	}
	if err := s.Signal(ctx, p.PID, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	go io.Copy(io.Discard, pr)
	select {
	case e := <-done:
		if e.Code != 128+15 {
			t.Errorf("followed process ended %+v, want 143", e)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("logs -f did not end when the process was killed")
	}
	e, err := s.Wait(ctx, p.PID)
	if err != nil || e.Code != 143 {
		t.Errorf("wait = %+v, %v", e, err)
	}
}

func TestSessionTTY(t *testing.T) {
	if _, err := os.Stat("/dev/ptmx"); err != nil {
		t.Skip("no /dev/ptmx")
	}
	s := pipeSession(t, server.Options{Env: []string{"PATH=/usr/bin:/bin"}})
	ctx := context.Background()
	p, err := s.Start(ctx, agent.ProcessRequest{Argv: []string{"sh", "-c", "stty size; read x; stty size"}, TTY: true, Rows: 33, Cols: 101, Stdin: true})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	pr, pw := io.Pipe()
	go func() {
		e, err := p.Output(pw, nil)
		pw.CloseWithError(fmt.Errorf("exit %+v: %v", e, err))
	}()
	var got strings.Builder
	readUntil := func(want string) {
		buf := make([]byte, 256)
		for !strings.Contains(got.String(), want) {
			n, err := pr.Read(buf)
			got.Write(buf[:n])
			if err != nil {
				t.Fatalf("waiting for %q: %v (got %q)", want, err, got.String())
			}
		}
	}
	readUntil("33 101")
	if err := s.Resize(ctx, p.PID, 40, 120); err != nil {
		t.Fatal(err)
	}
	p.Write([]byte("\n"))
	readUntil("40 120")
}

func TestSessionEightConcurrentExecs(t *testing.T) {
	s := pipeSession(t, server.Options{Env: []string{"PATH=/usr/bin:/bin"}})
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Go(func() {
			var out bytes.Buffer
			e, err := s.Run(context.Background(), agent.ProcessRequest{Argv: []string{"sh", "-c", fmt.Sprintf("sleep 0.2; seq %d 100000 | tail -n 1; echo %d", i, i)}}, nil, &out, nil)
			if err != nil || e.Code != 0 || out.String() != fmt.Sprintf("100000\n%d\n", i) {
				t.Errorf("exec %d: %+v %v %q", i, e, err, out.String())
			}
		})
	}
	wg.Wait()
}

func TestSessionFiles(t *testing.T) {
	s := pipeSession(t, server.Options{})
	ctx := context.Background()
	dir := t.TempDir()
	data := bytes.Repeat([]byte{1, 2, 3, 4, 5, 6, 7}, 3<<20/7)
	mtime := time.Date(2020, 1, 2, 3, 4, 5, 0, time.UTC)
	fi, err := s.WriteFile(ctx, agent.WriteRequest{Path: dir + "/a/b/f", Mode: 0o640, ModTime: mtime, Parents: true}, bytes.NewReader(data))
	if err != nil {
		t.Fatal(err)
	}
	if fi.Size != int64(len(data)) || fi.Mode != 0o640 || !fi.ModTime().Equal(mtime) {
		t.Errorf("written %+v", fi)
	}
	_, rc, err := s.ReadFile(ctx, dir+"/a/b/f", false)
	if err != nil {
		t.Fatal(err)
	}
	back, err := io.ReadAll(rc)
	rc.Close()
	if err != nil || sha256.Sum256(back) != sha256.Sum256(data) {
		t.Errorf("read back %d bytes, %v", len(back), err)
	}
	if _, _, err := s.ReadFile(ctx, dir+"/a", false); !errors.Is(err, vm.ErrInvalid) {
		t.Errorf("read of a directory = %v, want invalid", err)
	}
	if _, _, err := s.ReadFile(ctx, dir+"/nope", false); !errors.Is(err, vm.ErrNotFound) {
		t.Errorf("read of a missing file = %v, want not found", err)
	}
	if _, err := s.WriteFile(ctx, agent.WriteRequest{Path: dir + "/missing/f"}, bytes.NewReader(data)); !errors.Is(err, vm.ErrNotFound) {
		t.Errorf("write without parent = %v, want not found", err)
	}
	if _, err := s.WriteFile(ctx, agent.WriteRequest{Path: dir + "/a"}, bytes.NewReader(data)); !errors.Is(err, vm.ErrInvalid) {
		t.Errorf("write onto a directory = %v, want invalid", err)
	}
	// An upload cut short leaves nothing.
	cctx, cancel := context.WithCancel(ctx)
	r := io.MultiReader(bytes.NewReader(data[:1<<20]), readerFunc(func([]byte) (int, error) { cancel(); return 0, errors.New("client gone") }))
	if _, err := s.WriteFile(cctx, agent.WriteRequest{Path: dir + "/cut"}, r); err == nil {
		t.Error("cut upload succeeded")
	}
	time.Sleep(100 * time.Millisecond)
	if ents, _ := os.ReadDir(dir); len(ents) != 1 {
		t.Errorf("after a cut upload the directory holds %v", ents)
	}
	if err := os.Symlink("b/f", dir+"/a/link"); err != nil {
		t.Fatal(err)
	}
	ents, err := s.ListDir(ctx, dir+"/a")
	if err != nil || len(ents) != 2 || ents[1].Type != "symlink" || ents[1].Link != "b/f" {
		t.Errorf("list = %+v, %v", ents, err)
	}
	// A tree round-trips through an archive.
	_, rc, err = s.ReadFile(ctx, dir+"/a", true)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.WriteFile(ctx, agent.WriteRequest{Path: dir + "/copy", Archive: true, Parents: true}, rc); err != nil {
		t.Fatal(err)
	}
	rc.Close()
	got, err := os.ReadFile(dir + "/copy/a/b/f")
	if err != nil || !bytes.Equal(got, data) {
		t.Errorf("unpacked file: %d bytes, %v", len(got), err)
	}
	if l, err := os.Readlink(dir + "/copy/a/link"); err != nil || l != "b/f" {
		t.Errorf("unpacked link %q, %v", l, err)
	}
	if st, err := os.Stat(dir + "/copy/a/b/f"); err != nil || st.Mode().Perm() != 0o640 || !st.ModTime().Equal(mtime) {
		t.Errorf("unpacked mode/mtime: %v", st)
	}
	if _, err := s.Rename(ctx, dir+"/copy", dir+"/moved"); err != nil {
		t.Fatal(err)
	}
	if err := s.Remove(ctx, dir+"/moved", false); !errors.Is(err, vm.ErrInvalidState) {
		t.Errorf("remove of a full directory = %v, want conflict", err)
	}
	if err := s.Remove(ctx, dir+"/moved", true); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Stat(ctx, dir+"/moved", false); !errors.Is(err, vm.ErrNotFound) {
		t.Errorf("stat after remove = %v", err)
	}
	if _, err := s.Stat(ctx, "relative", false); !errors.Is(err, vm.ErrInvalid) {
		t.Errorf("stat of a relative path = %v", err)
	}
	_ = filepath.Join
	_ = runtime.NumGoroutine
}

type readerFunc func([]byte) (int, error)

func (f readerFunc) Read(p []byte) (int, error) { return f(p) }

// A host that reads slowly slows the command down; nothing is dropped.
func TestSessionSlowReaderLosesNothing(t *testing.T) {
	s := pipeSession(t, server.Options{Env: []string{"PATH=/usr/bin:/bin"}, OutputBuffer: 64 << 10})
	var n int
	slow := writerFuncT(func(p []byte) (int, error) {
		time.Sleep(2 * time.Millisecond)
		n += len(p)
		return len(p), nil
	})
	e, err := s.Run(context.Background(), agent.ProcessRequest{Argv: []string{"sh", "-c", "dd if=/dev/zero bs=64k count=64 2>/dev/null"}}, nil, slow, nil)
	if err != nil || e.Code != 0 || n != 4<<20 {
		t.Errorf("slow reader got %d of %d bytes: %+v %v", n, 4<<20, e, err)
	}
}

type writerFuncT func([]byte) (int, error)

func (f writerFuncT) Write(p []byte) (int, error) { return f(p) }

// A kept process streams like an attached one, and when its stream ends
// first it runs on: a later attach sees its new output and its exit.
func TestSessionKeptProcessOutlivesItsStream(t *testing.T) {
	s := pipeSession(t, server.Options{Env: []string{"PATH=/usr/bin:/bin"}})
	ctx := context.Background()
	sctx, cancel := context.WithCancel(ctx)
	p, err := s.Start(sctx, agent.ProcessRequest{Argv: []string{"sh", "-c", "echo first; read line; echo got $line; sleep 0.2; exit 7"}, Keep: true, Stdin: true, Dir: "/tmp"})
	if err != nil {
		t.Fatal(err)
	}
	pr, pw := io.Pipe()
	go func() {
		_, _ = p.Output(pw, nil)
		pw.Close()
	}()
	buf := make([]byte, 6)
	if _, err := io.ReadFull(pr, buf); err != nil || string(buf) != "first\n" {
		t.Fatalf("kept process streamed %q, %v", buf, err)
	}
	// The client goes away.
	cancel()
	p.Close()
	go io.Copy(io.Discard, pr)
	ps, err := s.Processes(ctx)
	if err != nil || len(ps) != 1 || !ps[0].Running || ps[0].Dir != "/tmp" {
		t.Fatalf("after its stream ended: ps = %+v, %v (want it running, in /tmp)", ps, err)
	}
	var out bytes.Buffer
	attached := make(chan agent.ExitStatus, 1)
	go func() {
		e, err := s.Attach(ctx, p.PID, false, &out, nil)
		if err != nil {
			t.Error(err)
		}
		attached <- e
	}()
	time.Sleep(50 * time.Millisecond) // the attach is in place before the input
	if err := s.Input(ctx, p.PID, strings.NewReader("hello\n"), false); err != nil {
		t.Fatal(err)
	}
	select {
	case e := <-attached:
		if e.Code != 7 || out.String() != "got hello\n" {
			t.Errorf("attach after the stream ended: exit %+v, output %q; want 7 and \"got hello\\n\"", e, out.String())
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the kept process did not run to its end")
	}
}
