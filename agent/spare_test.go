package agent_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/warmpool/warmpool/agent"
	"github.com/warmpool/warmpool/agent/server"
)

// spareHome is a HOME whose login profile counts its runs in HOME/runs
// and defines what only a shell that read it has.
func spareHome(t *testing.T, extra string) (home string, env []string) {
	t.Helper()
	if runtime.GOOS != "linux" {
		t.Skip("spare shells are a Linux guest's")
	}
	if _, err := exec.LookPath("bash"); err != nil {
		t.Skip("no bash on this host")
	}
	home = t.TempDir()
	profile := "echo ran >> \"$HOME/runs\"\nexport FROM_PROFILE=yes\ngreet() { echo hello-from-profile; }\n" + extra
	if err := os.WriteFile(filepath.Join(home, ".bash_profile"), []byte(profile), 0o644); err != nil {
		t.Fatal(err)
	}
	bash, _ := exec.LookPath("bash")
	return home, []string{"HOME=" + home, "PATH=" + os.Getenv("PATH"), "BASH=" + bash}
}

// spareSession is an agent session whose spare shells end with the test.
func spareSession(t *testing.T, env []string) *agent.Session {
	st := server.NewState()
	s := pipeSession(t, server.Options{Env: env, State: st})
	t.Cleanup(st.CloseSpares) // before pipeSession's cleanup and the HOME's removal
	return s
}

func profileRuns(t *testing.T, home string) int {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(home, "runs"))
	if errors.Is(err, os.ErrNotExist) {
		return 0
	}
	if err != nil {
		t.Fatal(err)
	}
	return strings.Count(string(b), "ran\n")
}

func run(t *testing.T, s *agent.Session, req agent.ProcessRequest) (string, agent.ExitStatus) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var out, errb bytes.Buffer
	e, err := s.Run(ctx, req, nil, &out, &errb)
	if err != nil {
		t.Fatalf("run %q: %v (stderr %q)", req.Argv, err, errb.String())
	}
	return out.String(), e
}

func waitRuns(t *testing.T, home string, n int) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for profileRuns(t, home) < n {
		if time.Now().After(deadline) {
			t.Fatalf("the profile ran %d times, want %d: no spare was started", profileRuns(t, home), n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestSpareShellRunsTheNextCommandOfItsShape(t *testing.T) {
	home, env := spareHome(t, "")
	s := spareSession(t, env)
	login := func(script string) []string { return []string{"bash", "-l", "-c", script} }

	warmup := `echo warm-up output; echo warmed > "$HOME/warmed"; readlink /proc/$BASHPID/fd/3 /proc/$BASHPID/fd/4 > "$HOME/fds"; LEAK=1; cd /`
	if out, e := run(t, s, agent.ProcessRequest{Argv: login(warmup), Spare: true}); e.Code != 0 || out != "" {
		t.Fatalf("spare: exit %+v, output %q; want 0 and nothing", e, out)
	}
	if n := profileRuns(t, home); n != 1 {
		t.Fatalf("the spare returned after %d profile runs, want 1 (it must answer once its profile ran)", n)
	}
	if b, err := os.ReadFile(filepath.Join(home, "warmed")); err != nil || string(b) != "warmed\n" {
		t.Fatalf("the spare's script did not run before it answered: %q, %v", b, err)
	}
	if b, err := os.ReadFile(filepath.Join(home, "fds")); err != nil || len(b) != 0 {
		t.Errorf("the warm-up script ran with the spare's fds 3 or 4 open: %q, %v", b, err)
	}
	ctx := context.Background()
	ps, err := s.Processes(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(ps) != 0 {
		t.Errorf("ps lists %+v: a spare nobody took is no process of the tenant's", ps)
	}

	// The next login shell is the spare: the profile does not run again
	// before the script, and what it defined is there.
	sub := filepath.Join(home, "sub")
	if err := os.Mkdir(sub, 0o755); err != nil {
		t.Fatal(err)
	}
	out, e := run(t, s, agent.ProcessRequest{Argv: login(`greet; echo "$FROM_PROFILE $(wc -l < "$HOME/runs") $(pwd) $SECONDS [$LEAK]"; exit 3`), Dir: sub})
	if e.Code != 3 || out != "hello-from-profile\nyes 1 "+sub+" 0 []\n" {
		t.Fatalf("command in the spare: exit %d, output %q; want exit 3 and the profile's function and variable, 1 profile run, cwd %s, SECONDS 0, nothing of the warm-up", e.Code, out, sub)
	}
	// The spare waited in the idle scheduling class; the command it runs
	// does not.
	waitRuns(t, home, 2)
	out, _ = run(t, s, agent.ProcessRequest{Argv: login(`sed -n 's/^policy *: *//p' /proc/$$/sched`)})
	if strings.TrimSpace(out) != "0" {
		t.Errorf("a command in a spare runs in scheduling policy %q, want 0 (normal)", out)
	}
	waitRuns(t, home, 3)

	// A spare of the same shape is started again once that one ended. A
	// request that names a variable the shell has anyway (an image's PATH,
	// say) asks for the same environment.
	same := []string{"PATH=" + os.Getenv("PATH")}
	if out, _ := run(t, s, agent.ProcessRequest{Argv: login(`wc -l < "$HOME/runs"`), Env: same}); strings.TrimSpace(out) != "3" {
		t.Errorf("the next command saw %q profile runs, want 3 (the replenished spare's)", out)
	}

	// Another environment is another shape: that command gets a shell of
	// its own, which reads the profile with its environment.
	waitRuns(t, home, 4)
	out, _ = run(t, s, agent.ProcessRequest{Argv: login(`echo "[$EXTRA] $(wc -l < "$HOME/runs")"`), Env: []string{"EXTRA=1"}})
	if out != "[1] 5\n" {
		t.Errorf("command with another environment printed %q, want [1] 5 (a fresh shell with EXTRA)", out)
	}
	// Not a login bash -c: never a spare.
	if out, _ := run(t, s, agent.ProcessRequest{Argv: []string{"sh", "-c", `echo sh`}}); out != "sh\n" {
		t.Errorf("sh -c printed %q", out)
	}
}

func TestSpareShellRefusedOrFailed(t *testing.T) {
	home, env := spareHome(t, "exit 5\n")
	s := spareSession(t, env)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	_, err := s.Run(ctx, agent.ProcessRequest{Argv: []string{"sh", "-c", "true"}, Spare: true}, nil, nil, nil)
	if err == nil || !strings.Contains(err.Error(), "bash [flags] -c SCRIPT") {
		t.Errorf("spare of sh: %v, want a refusal naming what a spare must be", err)
	}
	_, err = s.Run(ctx, agent.ProcessRequest{Argv: []string{"bash", "-l", "-c", "true"}, Spare: true}, nil, nil, nil)
	if err == nil || !strings.Contains(err.Error(), "exited before it was ready") {
		t.Errorf("spare whose profile exits: %v, want an error saying it exited", err)
	}
	if n := profileRuns(t, home); n != 1 {
		t.Errorf("profile ran %d times, want 1", n)
	}
	// Nothing parked: the next command runs on its own.
	if out, e := run(t, s, agent.ProcessRequest{Argv: []string{"bash", "-c", "echo ok"}}); out != "ok\n" || e.Code != 0 {
		t.Errorf("after a failed spare: %q exit %d", out, e.Code)
	}
}

func TestCanSpare(t *testing.T) {
	for argv, want := range map[string]bool{
		"/bin/bash -l -c true": true, "bash -c x": true, "sh -c x": false, "bash -l": false, "/usr/bin/bash -c": false,
	} {
		if got := agent.CanSpare(strings.Fields(argv)); got != want {
			t.Errorf("CanSpare(%q) = %v, want %v", argv, got, want)
		}
	}
}

// A spare whose profile hangs fails the request at its timeout, and
// nothing the profile started is left running.
func TestSpareShellThatHangsIsEndedWithItsChildren(t *testing.T) {
	_, env := spareHome(t, "sleep 31.4159\n")
	s := spareSession(t, env)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	_, err := s.Run(ctx, agent.ProcessRequest{Argv: []string{"bash", "-l", "-c", "true"}, Spare: true, Timeout: 500 * time.Millisecond}, nil, nil, nil)
	if err == nil || !strings.Contains(err.Error(), "not ready after") {
		t.Fatalf("spare with a hanging profile: %v, want a timeout", err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		left := processesRunning(t, "sleep 31.4159")
		if left == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d processes of the spare's profile left running", left)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// processesRunning counts this host's processes whose command line is cmd.
func processesRunning(t *testing.T, cmd string) int {
	t.Helper()
	ents, err := os.ReadDir("/proc")
	if err != nil {
		t.Skipf("no /proc: %v", err)
	}
	n := 0
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && strings.TrimRight(strings.ReplaceAll(string(b), "\x00", " "), " ") == cmd {
			if st, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat")); err == nil && !strings.Contains(string(st), ") Z ") {
				n++
			}
		}
	}
	return n
}
