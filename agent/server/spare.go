package server

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"io"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/warmpool/warmpool/agent/proto"
)

// A spare is a bash started ahead of the command it will run: it has read
// its profile (a login shell's /etc/profile and ~/.profile fork and exec
// programs, which under TCG costs more than most commands) and waits for
// its script. A command of the same shape, `bash [flags] -c SCRIPT` with
// the same flags, environment and user, takes it over, so its first
// instruction runs at once. The host asks for one (proto.ProcessSpec.Spare,
// a pool's warm-up does); from then on the agent keeps one of the last
// such command's shape ready, starting the next when a command of that
// shape ends.
//
// The spare sources its script from a pipe rather than taking it as -c's
// argument, so a script differs from `bash -c SCRIPT` only in
// $BASH_EXECUTION_STRING and in how a syntax error is worded. What the
// shell fixed when it started and what must not be shared by clones of one
// snapshot, or be stale after a hand-off, the prelude sets anew: HOSTNAME,
// the RANDOM seed, SECONDS, and the working directory when the command
// asks for another.

// spareScript is the spare's -c script: it says it is ready on fd 4, then
// sources what the agent writes to fd 3 (/proc/self/fd, as a guest may
// have no /dev/fd; bash reads a non-regular file
// whole before it runs any of it, so the prelude can close fd 3).
const spareScript = `printf . >&4; exec 4>&-; . /proc/self/fd/3`

// spareReadyTimeout bounds a spare's start when the request sets no timeout.
const spareReadyTimeout = 10 * time.Second

// spareKey is what a command must share with a spare to take it over.
type spareKey struct {
	argv []string // the command's argv up to and with "-c"
	env  []string // the request's, to start another spare of this shape
	dir  string   // where it starts ("" is the agent's own)
	user string
}

// spareShape returns the key of a command that a spare can run: bash with
// flags and -c SCRIPT, no terminal and no stdin.
func spareShape(spec *proto.ProcessSpec) (spareKey, bool) {
	n := len(spec.Argv)
	if n < 3 || spec.Argv[n-2] != "-c" || filepath.Base(spec.Argv[0]) != "bash" || spec.TTY || spec.Stdin {
		return spareKey{}, false
	}
	return spareKey{argv: slices.Clone(spec.Argv[:n-1]), env: slices.Clone(spec.Env), dir: spec.Dir, user: spec.User}, true
}

// equal compares the shapes but not the requests' environments: what must
// match is the environment the shell gets (sameEnv).
func (k spareKey) equal(o spareKey) bool {
	return slices.Equal(k.argv, o.argv) && k.user == o.user
}

// sameEnv says whether two environments as command builds them (the
// agent's, the user's, the hand-off's and the request's, a later entry
// overriding an earlier one, as exec does) give a process the same
// variables, in whatever order.
func sameEnv(a, b []string) bool {
	return maps.Equal(envMap(a), envMap(b))
}

func envMap(env []string) map[string]string {
	m := make(map[string]string, len(env))
	for _, kv := range env {
		k, v, _ := strings.Cut(kv, "=")
		m[k] = v
	}
	return m
}

// spare is one parked shell.
type spare struct {
	key     spareKey
	cmd     *exec.Cmd
	env     []string // the shell's whole environment, as command built it
	script  *os.File // write end of the shell's fd 3
	stdout  *os.File // read ends of its output
	stderr  *os.File
	ready   chan struct{} // closed when the profile has run and it waits
	exited  chan struct{} // closed when it has exited (waitErr set)
	waitErr error
}

// spares holds the agent's spare, shared by all host connections.
type spares struct {
	mu     sync.Mutex
	cur    *spare
	want   *spareKey // the shape to keep a spare of, once one was asked for
	closed bool
}

// CloseSpares ends the parked spare shell, and no other is started. A
// guest's agent never needs it (its shells end with the VM); an agent
// served in a test does.
func (s *State) CloseSpares() {
	h := &s.spares
	h.mu.Lock()
	sp := h.cur
	h.cur, h.want, h.closed = nil, nil, true
	h.mu.Unlock()
	if sp != nil {
		sp.kill()
	}
}

func (sp *spare) close() {
	sp.script.Close()
	sp.stdout.Close()
	sp.stderr.Close()
}

// kill ends a spare nobody took, and what its profile started: the shell
// leads its own process group.
func (sp *spare) kill() {
	select {
	case <-sp.exited:
	default:
		if err := syscall.Kill(-sp.cmd.Process.Pid, syscall.SIGKILL); err != nil {
			_ = sp.cmd.Process.Kill()
		}
		<-sp.exited
	}
	sp.close()
}

// startSpare starts a spare of key's shape; it does not wait for it to be
// ready. A warm-up script runs first, in a subshell whose output is
// discarded, so that it leaves nothing in the shell or its output.
func (s *session) startSpare(key spareKey, warmup string) (*spare, error) {
	script := spareScript
	if warmup != "" {
		// Without fds 3 and 4: nothing it leaves running reads the
		// command's script or holds the ready pipe.
		script = "( " + warmup + "\n) </dev/null >/dev/null 2>&1 3<&- 4>&-\n" + spareScript
	}
	argv := append(slices.Clone(key.argv), script)
	cmd, err := s.command(argv, key.env, key.dir, key.user)
	if err != nil {
		return nil, err
	}
	sp := &spare{key: key, cmd: cmd, env: cmd.Env, ready: make(chan struct{}), exited: make(chan struct{})}
	var toClose []*os.File
	fail := func(err error) (*spare, error) {
		for _, f := range toClose {
			f.Close()
		}
		return nil, fmt.Errorf("start a spare %q: %w", strings.Join(argv[:len(argv)-1], " "), err)
	}
	pipe := func() (r, w *os.File, err error) {
		r, w, err = os.Pipe()
		if err == nil {
			toClose = append(toClose, r, w)
		}
		return r, w, err
	}
	scriptR, scriptW, err := pipe()
	if err != nil {
		return fail(err)
	}
	readyR, readyW, err := pipe()
	if err != nil {
		return fail(err)
	}
	outR, outW, err := pipe()
	if err != nil {
		return fail(err)
	}
	errR, errW, err := pipe()
	if err != nil {
		return fail(err)
	}
	// Files, not writers: the child gets the pipes themselves, and Wait
	// leaves the read ends alone, so it can run before anyone reads them.
	cmd.Stdout, cmd.Stderr = outW, errW
	cmd.ExtraFiles = []*os.File{scriptR, readyW} // fd 3 and fd 4
	if err := cmd.Start(); err != nil {
		return fail(err)
	}
	for _, f := range []*os.File{scriptR, readyW, outW, errW} {
		f.Close()
	}
	if err := setSparePriority(cmd.Process.Pid, true); err != nil {
		s.opts.Logger.Debug("spare shell keeps its priority", "pid", cmd.Process.Pid, "err", err)
	}
	sp.script, sp.stdout, sp.stderr = scriptW, outR, errR
	go func() {
		sp.waitErr = cmd.Wait()
		close(sp.exited)
	}()
	go func() {
		defer readyR.Close()
		var b [1]byte
		if n, _ := readyR.Read(b[:]); n == 1 {
			close(sp.ready)
		}
	}()
	return sp, nil
}

// serveSpare starts the spare spec asks for, replacing the agent's, and
// answers once its profile and spec's script have run: exit 0 (the
// script's own status is not kept), or an error when the shell exited or
// hung instead.
func (s *session) serveSpare(st *stream, spec *proto.ProcessSpec) error {
	key, ok := spareShape(spec)
	if !ok {
		return st.fail(&codedError{code: proto.CodeBadRequest, err: fmt.Errorf("a spare must be bash [flags] -c SCRIPT without a terminal or stdin, not %q", spec.Argv)})
	}
	sp, err := s.startSpare(key, spec.Argv[len(spec.Argv)-1])
	if err != nil {
		return st.fail(&codedError{code: proto.CodeExecFailed, err: err})
	}
	timeout := spareReadyTimeout
	if spec.TimeoutMillis > 0 {
		timeout = time.Duration(spec.TimeoutMillis) * time.Millisecond
	}
	ctx, cancel := context.WithTimeout(s.ctx, timeout)
	defer cancel()
	select {
	case <-sp.ready:
	case <-sp.exited:
		sp.kill()
		return st.fail(&codedError{code: proto.CodeExecFailed, err: fmt.Errorf("spare %q exited before it was ready: %v", spec.Argv, sp.waitErr)})
	case <-ctx.Done():
		sp.kill()
		return st.fail(&codedError{code: proto.CodeTimeout, err: fmt.Errorf("spare %q not ready after %s", spec.Argv, timeout)})
	}
	s.opts.State.spares.put(sp)
	if err := st.result(proto.StreamResult{PID: sp.cmd.Process.Pid}); err != nil {
		return err
	}
	return st.fw.JSON(proto.FrameExit, proto.ExitStatus{})
}

// put makes sp the spare (and its shape the one to keep), ending the one
// it replaces.
func (h *spares) put(sp *spare) {
	h.mu.Lock()
	if h.closed {
		h.mu.Unlock()
		sp.kill()
		return
	}
	old := h.cur
	h.cur = sp
	key := sp.key
	h.want = &key
	h.mu.Unlock()
	if old != nil {
		old.kill()
	}
}

// take hands the spare to a command of spec's shape whose environment,
// as command built it, is env, or returns nil. A spare of another shape
// or one that has exited is ended.
func (h *spares) take(spec *proto.ProcessSpec, env []string) *spare {
	key, ok := spareShape(spec)
	if !ok {
		return nil
	}
	h.mu.Lock()
	sp := h.cur
	if sp == nil {
		h.mu.Unlock()
		return nil
	}
	h.cur = nil
	h.mu.Unlock()
	alive := true
	select {
	case <-sp.exited:
		alive = false
	default:
	}
	if !alive || !sp.key.equal(key) || !sameEnv(sp.env, env) || !dirUsable(sp.key.dir, spec.Dir) {
		sp.kill()
		return nil
	}
	return sp
}

// dirUsable says whether a spare started in have can run a command that
// asks for want: the same, or a directory the prelude can change to ("" is
// the agent's own).
func dirUsable(have, want string) bool {
	if want == have {
		return true
	}
	if want == "" {
		_, err := os.Getwd()
		return err == nil
	}
	if !filepath.IsAbs(want) {
		return false
	}
	fi, err := os.Stat(want)
	return err == nil && fi.IsDir()
}

// replenishDelay is how long after a command of a spare's shape ended the
// next spare starts: a command that follows at once (a script's next
// step) runs without competing with a shell reading its profile.
const replenishDelay = 100 * time.Millisecond

// replenish starts, after replenishDelay, a spare of spec's shape once a
// command of that shape ended, if the host asked for spares and none is
// parked.
func (s *session) replenish(spec *proto.ProcessSpec) {
	key, ok := spareShape(spec)
	if !ok {
		return
	}
	h := &s.opts.State.spares
	h.mu.Lock()
	wanted := h.want != nil && !h.closed
	h.mu.Unlock()
	if wanted {
		time.AfterFunc(replenishDelay, func() { s.startReplenish(key) })
	}
}

func (s *session) startReplenish(key spareKey) {
	h := &s.opts.State.spares
	h.mu.Lock()
	if h.want == nil || h.cur != nil {
		h.mu.Unlock()
		return
	}
	// The shape follows the commands: a hand-off's environment or another
	// user changes it.
	h.want = &key
	h.mu.Unlock()
	sp, err := s.startSpare(key, "")
	if err != nil {
		s.opts.Logger.Debug("spare not replenished", "err", err)
		return
	}
	h.mu.Lock()
	if h.cur != nil || h.closed {
		h.mu.Unlock()
		sp.kill()
		return
	}
	h.cur = sp
	h.mu.Unlock()
}

// run sends sp the prelude and script and returns the readers of its
// output; its process is then the command's.
func (sp *spare) run(spec *proto.ProcessSpec) ([]io.Reader, error) {
	script := spec.Argv[len(spec.Argv)-1]
	// Best effort: a shell left in the idle class only runs slower.
	_ = setSparePriority(sp.cmd.Process.Pid, false)
	select {
	case <-sp.ready:
	default:
		normalPriorityGroup(sp.cmd.Process.Pid)
	}
	var b strings.Builder
	b.WriteString("exec 3<&-; ")
	if host, err := os.Hostname(); err == nil {
		b.WriteString("HOSTNAME=" + shellQuote(host) + "; ")
	}
	var seed [4]byte
	if _, err := rand.Read(seed[:]); err == nil {
		fmt.Fprintf(&b, "RANDOM=%d; ", binary.LittleEndian.Uint32(seed[:]))
	}
	b.WriteString("SECONDS=0; ")
	if dir := spec.Dir; dir != sp.key.dir {
		if dir == "" {
			dir, _ = os.Getwd() // dirUsable checked it
		}
		b.WriteString("cd -- " + shellQuote(dir) + " || exit 1; ")
	}
	b.WriteString(script)
	_, err := io.WriteString(sp.script, b.String())
	if cerr := sp.script.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		sp.kill()
		return nil, fmt.Errorf("give the spare shell its script: %w", err)
	}
	return []io.Reader{sp.stdout, sp.stderr}, nil
}

// wait waits for the spare's process, as exec.Cmd.Wait would.
func (sp *spare) wait() error {
	<-sp.exited
	sp.stdout.Close()
	sp.stderr.Close()
	return sp.waitErr
}

func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}
