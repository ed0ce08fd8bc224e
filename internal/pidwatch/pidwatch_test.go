package pidwatch

import (
	"bytes"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestWatchReportsExitOfAProcess(t *testing.T) {
	cmd := exec.Command("sleep", "60")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	stop, err := Watch(cmd.Process.Pid, func() { close(exited) })
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	select {
	case <-exited:
		t.Fatal("exit reported while the process runs")
	case <-time.After(50 * time.Millisecond):
	}
	cmd.Process.Kill()
	select {
	case <-exited:
	case <-time.After(10 * time.Second):
		t.Fatal("no exit reported within 10s of SIGKILL")
	}
	cmd.Wait()
}

func TestStopEndsTheWatchWithoutAReport(t *testing.T) {
	cmd := exec.Command("sleep", "60")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Wait()
	defer cmd.Process.Kill()
	reported := make(chan struct{}, 1)
	stop, err := Watch(cmd.Process.Pid, func() { reported <- struct{}{} })
	if err != nil {
		t.Fatal(err)
	}
	stop()
	stop() // a second stop must not close someone else's descriptor
	time.Sleep(20 * time.Millisecond)
	cmd.Process.Kill()
	select {
	case <-reported:
		t.Fatal("exit reported after stop")
	case <-time.After(200 * time.Millisecond):
	}
}

func TestExitingFromTheKillOn(t *testing.T) {
	for _, open := range []struct {
		name    string
		exiting func(t *testing.T, pid int) func() bool
	}{
		{"by path", func(t *testing.T, pid int) func() bool { return func() bool { return Exiting(pid) } }},
		{"open files", func(t *testing.T, pid int) func() bool {
			p, err := OpenProc(pid)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { p.Close() })
			return p.Exiting
		}},
	} {
		t.Run(open.name, func(t *testing.T) {
			cmd := exec.Command("sleep", "60")
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			pid := cmd.Process.Pid
			exiting := open.exiting(t, pid)
			if exiting() {
				t.Fatal("a sleeping process counts as exiting")
			}
			// Stopped with SIGSTOP, the process cannot act on the SIGKILL:
			// only the pending signal tells that it is doomed.
			if err := cmd.Process.Signal(syscall.SIGSTOP); err != nil {
				t.Fatal(err)
			}
			waitState(t, pid, "T")
			if exiting() {
				t.Fatal("a stopped process counts as exiting")
			}
			cmd.Process.Kill()
			if !exiting() {
				t.Error("not exiting right after SIGKILL")
			}
			cmd.Wait()
			if !exiting() {
				t.Error("a reaped process is not reported as exiting")
			}
		})
	}
}

func waitState(t *testing.T, pid int, want string) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		b, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
		if f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:])); len(f) > 0 && f[0] == want {
			return
		}
	}
	t.Fatalf("pid %d never reached state %s", pid, want)
}
