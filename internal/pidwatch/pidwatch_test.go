package pidwatch

import (
	"os/exec"
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
