package e2etest

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/creack/pty"

	"github.com/warmpool/warmpool/api"
	"github.com/warmpool/warmpool/vm"
)

// TestQEMUGuestStreams works inside one real leased VM the way a user does:
// files and trees copied in and out, stdin streamed, a terminal, signals,
// background processes, concurrent execs, a client that stalls, and the
// errors of bad input. One template, one VM.
func TestQEMUGuestStreams(t *testing.T) {
	state := qemuState(t, "real-VM guest streams test", "wp-e2e-guest-")
	start := time.Now()
	useTemplate(t, state, "base", busybox512)
	startDaemon(t, state)
	mustCLI(t, state, time.Minute, "pool", "set", "g", "--template", "base", "--min", "1", "--max", "1")
	waitPool(t, state, "g", 1)
	l := acquire(t, state, "g")
	t.Logf("template and lease ready after %s", time.Since(start).Round(time.Millisecond))
	lease := l.ID
	target := api.Target{Lease: lease}
	c := api.NewClient(filepath.Join(state, "warmpool.sock"), "")
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	guestRun := func(script string) string {
		t.Helper()
		return mustCLI(t, state, 2*time.Minute, "exec", lease, "--", "sh", "-c", script)
	}
	dir := t.TempDir()

	t.Run("100MiB file in and out", func(t *testing.T) {
		data := make([]byte, 100<<20)
		rand.Read(data)
		sum := sha256.Sum256(data)
		src := filepath.Join(dir, "big")
		if err := os.WriteFile(src, data, 0o640); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		mustCLI(t, state, 10*time.Minute, "cp", src, lease+":/tmp/big")
		in := time.Since(start)
		guestSum := guestRun("sha256sum /tmp/big; stat -c %a /tmp/big")
		if !strings.HasPrefix(guestSum, hex.EncodeToString(sum[:])) || !strings.HasSuffix(guestSum, "640\n") {
			t.Errorf("guest sha256sum and mode: %q, want %x and 640", guestSum, sum)
		}
		start = time.Now()
		back := filepath.Join(dir, "back")
		mustCLI(t, state, 10*time.Minute, "cp", lease+":/tmp/big", back)
		out := time.Since(start)
		got, err := os.ReadFile(back)
		if err != nil || sha256.Sum256(got) != sum {
			t.Errorf("copied back: %d bytes, %v; SHA-256 differs", len(got), err)
		}
		t.Logf("cp 100 MiB in %s (%.1f MB/s), out %s (%.1f MB/s)", in.Round(time.Millisecond), float64(len(data))/in.Seconds()/1e6,
			out.Round(time.Millisecond), float64(len(data))/out.Seconds()/1e6)
		guestRun("rm /tmp/big")
		os.Remove(back)
		os.Remove(src)
	})

	t.Run("tree with modes and a symlink", func(t *testing.T) {
		tree := filepath.Join(dir, "tree")
		os.MkdirAll(filepath.Join(tree, "bin"), 0o750)
		os.WriteFile(filepath.Join(tree, "bin", "tool"), []byte("#!/bin/sh\necho tool\n"), 0o755)
		os.WriteFile(filepath.Join(tree, "secret"), []byte("s"), 0o600)
		os.Symlink("bin/tool", filepath.Join(tree, "link"))
		old := time.Date(2020, 2, 3, 4, 5, 6, 0, time.UTC)
		os.Chtimes(filepath.Join(tree, "secret"), old, old)
		mustCLI(t, state, time.Minute, "cp", tree, lease+":/tmp/tree")
		if got := guestRun("cd /tmp/tree && stat -c '%n %a %Y' bin bin/tool secret && readlink link && ./link"); got != fmt.Sprintf("bin 750 %d\nbin/tool 755 %d\nsecret 600 %d\nbin/tool\ntool\n",
			mtime(t, filepath.Join(tree, "bin")), mtime(t, filepath.Join(tree, "bin", "tool")), old.Unix()) {
			t.Errorf("tree in the guest:\n%s", got)
		}
		back := filepath.Join(dir, "tree-back")
		mustCLI(t, state, time.Minute, "cp", lease+":/tmp/tree", back)
		for _, f := range []struct {
			name string
			mode os.FileMode
		}{{"bin", 0o750 | os.ModeDir}, {"bin/tool", 0o755}, {"secret", 0o600}} {
			fi, err := os.Stat(filepath.Join(back, f.name))
			if err != nil || fi.Mode() != f.mode {
				t.Errorf("%s back: %v %v, want %v", f.name, fi, err, f.mode)
			}
		}
		if fi, _ := os.Stat(filepath.Join(back, "secret")); fi == nil || !fi.ModTime().Equal(old) {
			t.Errorf("secret's mtime did not round-trip: %v", fi)
		}
		if l, err := os.Readlink(filepath.Join(back, "link")); err != nil || l != "bin/tool" {
			t.Errorf("link back: %q %v", l, err)
		}
	})

	t.Run("10MiB through exec -i sha256sum", func(t *testing.T) {
		data := make([]byte, 10<<20)
		rand.Read(data)
		sum := sha256.Sum256(data)
		cmd := checkout().command(ctx, "--state", state, "exec", "-i", lease, "--", "sha256sum")
		cmd.Stdin = bytes.NewReader(data)
		start := time.Now()
		out, err := cmd.Output()
		if err != nil || !strings.HasPrefix(string(out), hex.EncodeToString(sum[:])) {
			t.Errorf("exec -i sha256sum: %q, %v", out, err)
		}
		t.Logf("10 MiB through exec -i in %s", time.Since(start).Round(time.Millisecond))
	})

	t.Run("exec -t terminal, size, resize, Ctrl-C", func(t *testing.T) {
		cmd := checkout().command(ctx, "--state", state, "exec", "-t", lease, "--", "sh", "-c", "tty; stty size; read x; stty size; sleep 100")
		ptmx, err := pty.StartWithSize(cmd, &pty.Winsize{Rows: 33, Cols: 101})
		if err != nil {
			t.Fatal(err)
		}
		defer ptmx.Close()
		out := &lockedBuffer{}
		go io.Copy(out, ptmx)
		waitTerminal(t, out, "33 101", 60*time.Second)
		if !strings.Contains(out.String(), "/dev/pts/") {
			t.Errorf("tty in the guest printed %q, want a /dev/pts terminal", out.String())
		}
		// A resize of the local terminal reaches the guest's.
		if err := pty.Setsize(ptmx, &pty.Winsize{Rows: 40, Cols: 120}); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Second) // the SIGWINCH and the resize travel ahead of the newline
		ptmx.Write([]byte("\r"))
		waitTerminal(t, out, "40 120", 60*time.Second)
		time.Sleep(500 * time.Millisecond)
		ptmx.Write([]byte{3}) // Ctrl-C, as the terminal delivers it
		err = cmd.Wait()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 130 {
			t.Errorf("exec -t after Ctrl-C: %v, want exit 130; output %q", err, out.String())
		}
	})

	t.Run("SIGINT ends the guest process", func(t *testing.T) {
		cmd := checkout().command(ctx, "--state", state, "exec", lease, "--", "sleep", "100")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(time.Minute)
		for !strings.Contains(guestRun("ps -o args | grep -v grep | grep 'sleep 100' || true"), "sleep 100") {
			if time.Now().After(deadline) {
				t.Fatal("sleep 100 never showed in the guest")
			}
			time.Sleep(200 * time.Millisecond)
		}
		cmd.Process.Signal(syscall.SIGINT)
		err := cmd.Wait()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 130 {
			t.Errorf("exec after SIGINT: %v, want exit 130", err)
		}
		if left := guestRun("ps -o args | grep -v grep | grep 'sleep 100' || true"); left != "" {
			t.Errorf("guest still runs: %q", left)
		}
	})

	t.Run("detached process followed and killed", func(t *testing.T) {
		pid := strings.TrimSpace(mustCLI(t, state, time.Minute, "exec", "--detach", lease, "--", "sh", "-c", "i=0; while :; do echo tick $i; i=$((i+1)); sleep 0.2; done"))
		cmd := checkout().command(ctx, "--state", state, "logs", "-f", lease, pid)
		stdout, _ := cmd.StdoutPipe()
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		sc := bufio.NewScanner(stdout)
		for i := range 3 {
			if !sc.Scan() || sc.Text() != "tick "+strconv.Itoa(i) {
				t.Fatalf("logs -f line %d: %q", i, sc.Text())
			}
		}
		if ps := mustCLI(t, state, time.Minute, "ps", lease); !strings.Contains(ps, pid) || !strings.Contains(ps, "running (detached)") {
			t.Errorf("ps: %s", ps)
		}
		mustCLI(t, state, time.Minute, "kill", lease, pid)
		go io.Copy(io.Discard, stdout)
		err := cmd.Wait()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 143 {
			t.Errorf("logs -f after kill: %v, want 143", err)
		}
		if _, err := cli(t, state, time.Minute, "kill", lease, "1"); err == nil || !strings.Contains(err.Error(), "no process 1") {
			t.Errorf("kill of a PID that is not the lease's: %v", err)
		}
	})

	t.Run("8 concurrent execs", func(t *testing.T) {
		var wg sync.WaitGroup
		start := time.Now()
		for i := range 8 {
			wg.Go(func() {
				out, err := cli(t, state, 3*time.Minute, "exec", lease, "--", "sh", "-c", fmt.Sprintf("echo start %d; sleep 2; seq 1 %d | tail -n 1", i, 1000*(i+1)))
				if want := fmt.Sprintf("start %d\n%d\n", i, 1000*(i+1)); err != nil || out != want {
					t.Errorf("exec %d: %q, %v; want %q", i, out, err, want)
				}
			})
		}
		wg.Wait()
		t.Logf("8 concurrent execs of 2 s each took %s", time.Since(start).Round(time.Millisecond))
	})

	t.Run("stalled client, 200 MB of output", func(t *testing.T) {
		daemonRSS := func() int { return rssKiB(t, daemonPID(t, state)) }
		// The agent serving us (PID 1's child) is the parent of what it runs.
		agentRSS := func() int {
			v, _ := strconv.Atoi(strings.TrimSpace(guestRun("grep VmRSS /proc/$PPID/status | tr -dc 0-9")))
			return v
		}
		d0, a0 := daemonRSS(), agentRSS()
		stall := make(chan struct{})
		var got int64
		w := writerFunc(func(p []byte) (int, error) {
			<-stall
			got += int64(len(p))
			return len(p), nil
		})
		done := make(chan error, 1)
		var exit api.ExitStatus
		go func() {
			var err error
			exit, err = c.ExecStream(ctx, target, api.ProcessRequest{Argv: []string{"dd", "if=/dev/zero", "bs=1M", "count=200"}}, api.ExecIO{Stdout: w})
			done <- err
		}()
		time.Sleep(15 * time.Second)
		d1, a1 := daemonRSS(), agentRSS()
		// busybox dd overwrites the "=" of its arguments while parsing.
		written := guestRun("ps -o args | grep -v grep | grep -c 'dd if' || true")
		close(stall)
		if err := <-done; err != nil || exit.Code != 0 || got != 200<<20 {
			t.Errorf("dd after the stall: exit %+v, %v, %d bytes", exit, err, got)
		}
		t.Logf("stalled 15 s: daemon RSS %d -> %d KiB, agent RSS %d -> %d KiB, dd still running: %s", d0, d1, a0, a1, strings.TrimSpace(written))
		if a0 == 0 || d1-d0 > 64<<10 || a1-a0 > 16<<10 {
			t.Errorf("memory grew while the client stalled: daemon +%d KiB, agent +%d KiB", d1-d0, a1-a0)
		}
		if strings.TrimSpace(written) != "1" {
			t.Errorf("dd was not held back by the stall (running: %q)", written)
		}
	})

	t.Run("bad input", func(t *testing.T) {
		if _, _, err := c.ReadFile(ctx, target, "/no/such/file", false); !errors.Is(err, vm.ErrNotFound) || status(err) != 404 {
			t.Errorf("read of a missing path: %v", err)
		}
		if _, _, err := c.ReadFile(ctx, target, "/etc", false); status(err) != 400 {
			t.Errorf("raw read of a directory: %v, want 400", err)
		}
		if _, err := c.WriteFile(ctx, target, api.WriteFileOptions{Path: "/etc"}, strings.NewReader("x")); status(err) != 400 {
			t.Errorf("write onto a directory: %v, want 400", err)
		}
		guestRun("mkdir -p /mnt/small && mount -t tmpfs -o size=1m tmpfs /mnt/small")
		_, err := c.WriteFile(ctx, target, api.WriteFileOptions{Path: "/mnt/small/f"}, bytes.NewReader(make([]byte, 3<<20)))
		if status(err) != 409 || !strings.Contains(err.Error(), "no space") {
			t.Errorf("write onto a full disk: %v, want 409 and no space", err)
		}
		if left := guestRun("ls -A /mnt/small"); left != "" {
			t.Errorf("a failed write left %q", left)
		}
		if _, err := c.Stat(ctx, api.Target{Lease: "l-0000000000000000"}, "/", false); status(err) != 404 {
			t.Errorf("unknown lease: %v", err)
		}
		if err := c.Signal(ctx, target, 1, "TERM"); status(err) != 404 {
			t.Errorf("signal to the guest's PID 1: %v, want 404", err)
		}
		if _, err := c.Logs(ctx, target, 999999, false, nil, nil); status(err) != 404 {
			t.Errorf("logs of an unknown PID: %v, want 404", err)
		}
	})
}

func status(err error) int {
	var e *api.Error
	if errors.As(err, &e) {
		return e.Status
	}
	return 0
}

func mtime(t *testing.T, p string) int64 {
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	return fi.ModTime().Unix()
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func waitTerminal(t *testing.T, b *lockedBuffer, want string, d time.Duration) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !strings.Contains(b.String(), want) {
		if time.Now().After(deadline) {
			t.Fatalf("terminal never showed %q; it shows %q", want, b.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// daemonPID finds the `warmpool serve` of state.
func daemonPID(t *testing.T, state string) int {
	t.Helper()
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && strings.Contains(string(b), "serve\x00--state\x00"+state+"\x00") {
			return pid
		}
	}
	t.Fatal("daemon process not found")
	return 0
}

func rssKiB(t *testing.T, pid int) int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			n, _ := strconv.Atoi(strings.Fields(v)[0])
			return n
		}
	}
	return 0
}
