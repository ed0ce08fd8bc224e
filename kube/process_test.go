package kube

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/warmpool/warmpool/api"
)

// warmpoolBin is the warmpool command the tests run as processes, built
// once per test binary into dir.
var warmpoolBin struct {
	dir  string
	once sync.Once
	path string
	err  error
	out  []byte
}

func warmpoolBinary(t *testing.T) string {
	t.Helper()
	warmpoolBin.once.Do(func() {
		start := time.Now()
		warmpoolBin.path = filepath.Join(warmpoolBin.dir, "warmpool")
		warmpoolBin.out, warmpoolBin.err = exec.Command("go", "build", "-o", warmpoolBin.path, "../cmd/warmpool").CombinedOutput()
		t.Logf("warmpool built in %s", time.Since(start).Round(time.Millisecond))
	})
	if warmpoolBin.err != nil {
		t.Fatalf("build warmpool: %v\n%s", warmpoolBin.err, warmpoolBin.out)
	}
	return warmpoolBin.path
}

// nodeProcess is a node run as `warmpool serve --kubernetes` on the fake
// provider: its daemon and agent are one process, which the test may kill.
type nodeProcess struct {
	args   []string
	logf   string
	cmd    *exec.Cmd
	exited chan struct{}
}

// addProcessNode starts node name as a process of its own with a 250ms
// heartbeat and a 2s timeout, and waits until its daemon answers.
func (tc *testCluster) addProcessNode(name string, labels map[string]string) *testNode {
	tc.t.Helper()
	tc.createNode(name, labels)
	state := tc.t.TempDir()
	p := &nodeProcess{
		args: []string{"serve", "--state", state, "--provider", "fake", "--stop-all", "--log-level", "debug",
			"--kubernetes", "--kubeconfig", kubeconfig(tc.t), "--node", name,
			"--kube-namespace", tc.ns, "--watch-namespace", tc.ns,
			"--heartbeat-interval", "250ms", "--heartbeat-timeout", "2s"},
		logf: filepath.Join(state, "serve.log"),
	}
	n := &testNode{name: name, view: api.NewClient(filepath.Join(state, "warmpool.sock"), ""), proc: p,
		opts: AgentOptions{HeartbeatInterval: 250 * time.Millisecond, HeartbeatTimeout: 2 * time.Second}}
	tc.nodes[name] = n
	tc.t.Cleanup(func() {
		if tc.t.Failed() {
			b, _ := os.ReadFile(p.logf)
			tc.t.Logf("log of node process %s:\n%s", name, tail(string(b), 80))
		}
	})
	p.start(tc.t)
	tc.waitDaemon(n)
	return n
}

// waitDaemon waits until n's daemon answers on its socket.
func (tc *testCluster) waitDaemon(n *testNode) {
	tc.t.Helper()
	tc.eventually(30*time.Second, "node "+n.name+"'s daemon answers", func() string {
		if _, err := n.view.Pools(context.Background()); err != nil {
			return err.Error()
		}
		return ""
	})
}

func (p *nodeProcess) start(t *testing.T) {
	t.Helper()
	logf, err := os.OpenFile(p.logf, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(warmpoolBinary(t), p.args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = append(os.Environ(), "WARMPOOL_SOCKET=")
	if err := cmd.Start(); err != nil {
		logf.Close()
		t.Fatal(err)
	}
	p.cmd, p.exited = cmd, make(chan struct{})
	go func() {
		_ = cmd.Wait()
		logf.Close()
		close(p.exited)
	}()
}

// kill ends the process with SIGKILL: no goodbye, no release, no cleanup.
func (p *nodeProcess) kill(t *testing.T) {
	t.Helper()
	if err := p.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatalf("kill -9 %d: %v", p.cmd.Process.Pid, err)
	}
	<-p.exited
	p.cmd = nil
}

// stop ends a running process as its service manager would (SIGTERM; it
// destroys its VMs, --stop-all).
func (p *nodeProcess) stop(t *testing.T) {
	if p.cmd == nil {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(time.Minute):
		t.Errorf("node process %d did not stop in a minute after SIGTERM", p.cmd.Process.Pid)
		_ = p.cmd.Process.Kill()
		<-p.exited
	}
	p.cmd = nil
}
