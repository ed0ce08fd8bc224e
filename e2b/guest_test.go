package e2b

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"mime/multipart"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
)

// These tests run envd's processes and files through the fake backend's
// guest agent, which runs on this host: real processes, real files.

func call[Req, Res any](t *testing.T, w *world, sb sandbox, procedure string, req *Req) (*Res, error) {
	t.Helper()
	c := connectClient[Req, Res](w, procedure, sb.SandboxID, sb.EnvdAccessToken)
	resp, err := c.CallUnary(context.Background(), connect.NewRequest(req))
	if err != nil {
		return nil, err
	}
	return resp.Msg, nil
}

// events is a Start or Connect stream read in the background.
type events struct {
	t      *testing.T
	ch     chan processEvent
	err    chan error
	cancel context.CancelFunc
	out    bytes.Buffer
	// pty: the output must come as a terminal's, not as stdout.
	pty bool
}

func (e *events) write(d *dataEvent) {
	e.t.Helper()
	if e.pty && len(d.Stdout)+len(d.Stderr) > 0 || !e.pty && len(d.PTY) > 0 {
		e.t.Errorf("data event %+v on a stream with pty %v", d, e.pty)
	}
	e.out.Write(d.Stdout)
	e.out.Write(d.PTY)
}

func openStream[Req any](t *testing.T, w *world, sb sandbox, procedure string, req *Req) *events {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	c := connectClient[Req, processStream](w, procedure, sb.SandboxID, sb.EnvdAccessToken)
	stream, err := c.CallServerStream(ctx, connect.NewRequest(req))
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	e := &events{t: t, ch: make(chan processEvent, 64), err: make(chan error, 1), cancel: cancel}
	go func() {
		defer stream.Close()
		for stream.Receive() {
			e.ch <- stream.Msg().Event
		}
		close(e.ch)
		e.err <- stream.Err()
	}()
	t.Cleanup(cancel)
	return e
}

func start(t *testing.T, w *world, sb sandbox, req *startRequest) *events {
	t.Helper()
	return openStream(t, w, sb, "/process.Process/Start", req)
}

// next returns the next event other than a keepalive.
func (e *events) next() processEvent {
	e.t.Helper()
	for {
		select {
		case ev, ok := <-e.ch:
			if !ok {
				e.t.Fatalf("stream ended early: %v", <-e.err)
			}
			if ev.Keepalive == nil {
				return ev
			}
		case <-time.After(10 * time.Second):
			e.t.Fatal("no event within 10s")
		}
	}
}

// until reads output events until the output so far contains want.
func (e *events) until(want string) {
	e.t.Helper()
	for !strings.Contains(e.out.String(), want) {
		ev := e.next()
		if ev.Data == nil {
			e.t.Fatalf("event %+v before output %q (have %q)", ev, want, e.out.String())
		}
		e.write(ev.Data)
	}
}

// end reads output until the end event.
func (e *events) end() *endEvent {
	e.t.Helper()
	for {
		ev := e.next()
		if ev.End != nil {
			return ev.End
		}
		if ev.Data != nil {
			e.write(ev.Data)
		}
	}
}

func ptr[T any](v T) *T { return &v }

func sh(script string) *processConfig {
	return &processConfig{Cmd: "/bin/sh", Args: []string{"-c", script}}
}

func TestLeaseEnvIsEveryProcesssDefault(t *testing.T) {
	w := newWorld(t)
	sb := w.create(`{"templateID":"web","envVars":{"SBX":"from-create","BOTH":"create"}}`)
	cfg := sh(`echo "$SBX $BOTH"; pwd`)
	cfg.Envs = map[string]string{"BOTH": "run"}
	cfg.Cwd = ptr(t.TempDir())
	e := start(t, w, sb, &startRequest{Process: cfg})
	if ev := e.next(); ev.Start == nil || ev.Start.PID == 0 {
		t.Fatalf("first event %+v, want start with a pid", ev)
	}
	if end := e.end(); end.ExitCode != 0 || e.out.String() != "from-create run\n"+*cfg.Cwd+"\n" {
		t.Errorf("output %q, end %+v; want the create's env under the command's, in its cwd", e.out.String(), end)
	}
}

func TestStdinSendInputAndStreamInput(t *testing.T) {
	w := newWorld(t)
	sb := w.create(`{"templateID":"web"}`)
	e := start(t, w, sb, &startRequest{Process: sh(`while read l; do echo "got $l"; done; echo eof`), Stdin: ptr(true)})
	pid := e.next().Start.PID
	sel := processSelector{PID: &pid}
	if _, err := call[sendInputRequest, empty](t, w, sb, "/process.Process/SendInput", &sendInputRequest{Process: sel, Input: &processInput{Stdin: []byte("one\n")}}); err != nil {
		t.Fatal(err)
	}
	e.until("got one\n")

	c := connectClient[streamInputRequest, empty](w, "/process.Process/StreamInput", sb.SandboxID, sb.EnvdAccessToken)
	cs := c.CallClientStream(context.Background())
	first := &streamInputRequest{Start: &struct {
		Process processSelector `json:"process"`
	}{sel}}
	if err := cs.Send(first); err != nil {
		t.Fatal(err)
	}
	for _, line := range []string{"two\n", "three\n"} {
		if err := cs.Send(&streamInputRequest{Data: &struct {
			Input *processInput `json:"input,omitempty"`
		}{&processInput{Stdin: []byte(line)}}}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := cs.CloseAndReceive(); err != nil {
		t.Fatal(err)
	}
	e.until("got three\n")
	if _, err := call[closeStdinRequest, empty](t, w, sb, "/process.Process/CloseStdin", &closeStdinRequest{Process: sel}); err != nil {
		t.Fatal(err)
	}
	if end := e.end(); end.ExitCode != 0 || e.out.String() != "got one\ngot two\ngot three\neof\n" {
		t.Errorf("output %q, end %+v", e.out.String(), end)
	}

	// A command started without stdin says how to get one.
	e = start(t, w, sb, &startRequest{Process: sh(`sleep 5`)})
	pid = e.next().Start.PID
	_, err := call[sendInputRequest, empty](t, w, sb, "/process.Process/SendInput", &sendInputRequest{Process: processSelector{PID: &pid}, Input: &processInput{Stdin: []byte("x")}})
	if connect.CodeOf(err) != connect.CodeFailedPrecondition || !strings.Contains(err.Error(), "stdin: true") {
		t.Errorf("input to a command without stdin: %v, want failed precondition naming stdin: true", err)
	}
}

func TestPTYStartInputAndResize(t *testing.T) {
	w := newWorld(t)
	sb := w.create(`{"templateID":"web"}`)
	e := start(t, w, sb, &startRequest{Process: sh(`stty size; read l; echo "typed $l"; stty size`), PTY: &pty{Size: &ptySize{Rows: 10, Cols: 40}}})
	e.pty = true
	pid := e.next().Start.PID
	e.until("10 40")
	if _, err := call[updateRequest, empty](t, w, sb, "/process.Process/Update", &updateRequest{Process: processSelector{PID: &pid}, PTY: &pty{Size: &ptySize{Rows: 20, Cols: 100}}}); err != nil {
		t.Fatal(err)
	}
	if _, err := call[sendInputRequest, empty](t, w, sb, "/process.Process/SendInput", &sendInputRequest{Process: processSelector{PID: &pid}, Input: &processInput{PTY: []byte("abc\n")}}); err != nil {
		t.Fatal(err)
	}
	if end := e.end(); end.ExitCode != 0 || !strings.Contains(e.out.String(), "typed abc") || !strings.Contains(e.out.String(), "20 100") {
		t.Errorf("terminal output %q, end %+v; want the input echoed and the new size", e.out.String(), end)
	}
	if _, err := call[updateRequest, empty](t, w, sb, "/process.Process/Update", &updateRequest{Process: processSelector{PID: &pid}}); connect.CodeOf(err) != connect.CodeInvalidArgument {
		t.Errorf("update without a size: %v, want invalid argument", err)
	}
}

// A command whose client went away runs on, as envd's do: it is listed,
// and Connect follows its output to its end.
func TestBackgroundCommandOutlivesItsClient(t *testing.T) {
	w := newWorld(t)
	sb := w.create(`{"templateID":"web"}`)
	dir := t.TempDir()
	e := start(t, w, sb, &startRequest{Process: sh(`echo begun; while [ ! -e ` + dir + `/go ]; do sleep 0.05; done; echo resumed; exit 4`), Tag: ptr("bg")})
	pid := e.next().Start.PID
	e.until("begun\n")
	e.cancel() // the client disconnects

	var listed *listResponse
	for i := 0; i < 20; i++ {
		var err error
		if listed, err = call[listRequest, listResponse](t, w, sb, "/process.Process/List", &listRequest{}); err != nil {
			t.Fatal(err)
		}
		if len(listed.Processes) == 1 {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if len(listed.Processes) != 1 || listed.Processes[0].PID != pid || listed.Processes[0].Tag == nil || *listed.Processes[0].Tag != "bg" ||
		listed.Processes[0].Config.Cmd != "/bin/sh" {
		t.Fatalf("after its client went away: list %+v, want pid %d tagged bg", listed, pid)
	}
	c := openStream(t, w, sb, "/process.Process/Connect", &connectProcessRequest{Process: processSelector{Tag: ptr("bg")}})
	if ev := c.next(); ev.Start == nil || ev.Start.PID != pid {
		t.Fatalf("connect's first event %+v, want start of %d", ev, pid)
	}
	if err := os.WriteFile(filepath.Join(dir, "go"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if end := c.end(); end.ExitCode != 4 || !end.Exited || c.out.String() != "resumed\n" {
		t.Errorf("connected: output %q, end %+v; want what came after the connect and exit 4", c.out.String(), end)
	}
	if _, err := call[listRequest, listResponse](t, w, sb, "/process.Process/List", &listRequest{}); err != nil {
		t.Fatal(err)
	}
	_, err := call[sendSignalRequest, empty](t, w, sb, "/process.Process/SendSignal", &sendSignalRequest{Process: processSelector{PID: &pid}, Signal: 9})
	if connect.CodeOf(err) != connect.CodeNotFound {
		t.Errorf("kill of the ended command: %v, want not found", err)
	}
	conn := connectClient[connectProcessRequest, processStream](w, "/process.Process/Connect", sb.SandboxID, sb.EnvdAccessToken)
	st, err := conn.CallServerStream(context.Background(), connect.NewRequest(&connectProcessRequest{Process: processSelector{PID: &pid}}))
	if err == nil {
		for st.Receive() {
		}
		err = st.Err()
	}
	if connect.CodeOf(err) != connect.CodeNotFound {
		t.Errorf("connect to the ended command: %v, want not found", err)
	}
}

func TestKilledCommandEndsAsEnvdReportsIt(t *testing.T) {
	w := newWorld(t)
	sb := w.create(`{"templateID":"web"}`)
	e := start(t, w, sb, &startRequest{Process: sh(`echo up; sleep 30`)})
	pid := e.next().Start.PID
	e.until("up\n")
	if _, err := call[sendSignalRequest, empty](t, w, sb, "/process.Process/SendSignal", &sendSignalRequest{Process: processSelector{PID: &pid}, Signal: 9}); err != nil {
		t.Fatal(err)
	}
	end := e.end()
	if end.ExitCode != -1 || end.Exited || end.Status != "signal: killed" || end.Error == nil {
		t.Errorf("end of a killed command %+v, want exit -1, not exited, signal: killed", end)
	}
}

func TestFilesThroughTheAgent(t *testing.T) {
	w := newWorld(t)
	sb := w.create(`{"templateID":"web"}`)
	dir := t.TempDir()
	data := bytes.Repeat([]byte("warmpool"), 300<<10) // 2.4 MiB: many frames
	up := func(p string, body []byte) (int, string) {
		var buf bytes.Buffer
		mw := multipart.NewWriter(&buf)
		fw, _ := mw.CreateFormFile("file", p)
		fw.Write(body)
		mw.Close()
		req, _ := http.NewRequest("POST", w.srv.URL+"/files?path="+p, &buf)
		req.Header.Set("Content-Type", mw.FormDataContentType())
		setEnvdHeaders(req.Header, sb.SandboxID, sb.EnvdAccessToken)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	get := func(p string) (int, []byte) {
		req, _ := http.NewRequest("GET", w.srv.URL+"/files?path="+p, nil)
		setEnvdHeaders(req.Header, sb.SandboxID, sb.EnvdAccessToken)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, b
	}
	blob := dir + "/a/b/blob"
	if code, body := up(blob, data); code != 200 || !strings.Contains(body, `"path":"`+blob+`"`) {
		t.Fatalf("upload: %d %s", code, body)
	}
	if code, back := get(blob); code != 200 || !bytes.Equal(back, data) {
		t.Fatalf("download: %d, %d bytes (equal %v)", code, len(back), bytes.Equal(back, data))
	}
	if code, _ := get(dir + "/nope"); code != http.StatusNotFound {
		t.Errorf("download of a missing file: %d, want 404", code)
	}
	if code, _ := get(dir); code != http.StatusBadRequest {
		t.Errorf("download of a directory: %d, want 400", code)
	}

	st, err := call[pathRequest, entryResponse](t, w, sb, "/filesystem.Filesystem/Stat", &pathRequest{Path: blob})
	if err != nil || st.Entry.Type != fileTypeFile || int(st.Entry.Size) != len(data) || st.Entry.Name != "blob" || st.Entry.Permissions != "-rw-r--r--" ||
		st.Entry.Owner == "" || st.Entry.ModifiedTime == nil {
		t.Fatalf("stat: %+v, %v", st, err)
	}
	if _, err := call[pathRequest, entryResponse](t, w, sb, "/filesystem.Filesystem/Stat", &pathRequest{Path: dir + "/nope"}); connect.CodeOf(err) != connect.CodeNotFound {
		t.Errorf("stat of a missing path: %v, want not found", err)
	}
	if _, err := call[pathRequest, entryResponse](t, w, sb, "/filesystem.Filesystem/MakeDir", &pathRequest{Path: dir + "/x/y"}); err != nil {
		t.Fatal(err)
	}
	if _, err := call[pathRequest, entryResponse](t, w, sb, "/filesystem.Filesystem/MakeDir", &pathRequest{Path: dir + "/x/y"}); connect.CodeOf(err) != connect.CodeAlreadyExists {
		t.Errorf("makeDir of an existing directory: %v, want already exists (the SDK's false)", err)
	}
	mv, err := call[moveRequest, entryResponse](t, w, sb, "/filesystem.Filesystem/Move", &moveRequest{Source: blob, Destination: dir + "/new/dir/blob"})
	if err != nil || mv.Entry.Path != dir+"/new/dir/blob" {
		t.Fatalf("move into a directory that is not there yet: %+v, %v", mv, err)
	}
	if _, err := call[moveRequest, entryResponse](t, w, sb, "/filesystem.Filesystem/Move", &moveRequest{Source: blob, Destination: dir + "/c"}); connect.CodeOf(err) != connect.CodeNotFound {
		t.Errorf("move of a missing file: %v, want not found", err)
	}
	ls, err := call[listDirRequest, listDirResponse](t, w, sb, "/filesystem.Filesystem/ListDir", &listDirRequest{Path: dir, Depth: 1})
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ls.Entries {
		names = append(names, strings.TrimPrefix(e.Path, dir))
	}
	if fmt.Sprint(names) != "[/a /new /x]" {
		t.Errorf("list depth 1: %v", names)
	}
	ls, err = call[listDirRequest, listDirResponse](t, w, sb, "/filesystem.Filesystem/ListDir", &listDirRequest{Path: dir, Depth: 3})
	names = names[:0]
	for _, e := range ls.Entries {
		names = append(names, strings.TrimPrefix(e.Path, dir))
	}
	if err != nil || fmt.Sprint(names) != "[/a /a/b /new /new/dir /new/dir/blob /x /x/y]" {
		t.Errorf("list depth 3: %v, %v", names, err)
	}
	if _, err := call[pathRequest, empty](t, w, sb, "/filesystem.Filesystem/Remove", &pathRequest{Path: dir + "/new"}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir + "/new"); !os.IsNotExist(err) {
		t.Errorf("removed directory: %v", err)
	}
	if _, err := call[pathRequest, empty](t, w, sb, "/filesystem.Filesystem/Remove", &pathRequest{Path: dir + "/new"}); connect.CodeOf(err) != connect.CodeNotFound {
		t.Errorf("remove of a missing path: %v, want not found", err)
	}
}
