package e2b

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/warmpool/warmpool/api/apitest"
)

type world struct {
	t       *testing.T
	b       *apitest.Backend
	srv     *httptest.Server
	key     string
	keyFile string
}

func newWorld(t *testing.T) *world {
	t.Helper()
	dir := t.TempDir()
	keyFile := filepath.Join(dir, "keys")
	key, err := AppendKey(keyFile)
	if err != nil {
		t.Fatal(err)
	}
	keys, err := LoadKeys(keyFile)
	if err != nil {
		t.Fatal(err)
	}
	secret, err := LoadTokenSecret(filepath.Join(dir, "secret"))
	if err != nil {
		t.Fatal(err)
	}
	b := apitest.New()
	s, err := NewServer(Options{Backend: b, Keys: keys, TokenSecret: secret, AcquireWait: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(s)
	t.Cleanup(srv.Close)
	return &world{t: t, b: b, srv: srv, key: key, keyFile: keyFile}
}

// rest sends one REST request with the world's key (or key, when given)
// and decodes the answer into out when it is not nil.
func (w *world) rest(method, path, body string, out any, key ...string) int {
	w.t.Helper()
	req, err := http.NewRequest(method, w.srv.URL+path, strings.NewReader(body))
	if err != nil {
		w.t.Fatal(err)
	}
	k := w.key
	if len(key) > 0 {
		k = key[0]
	}
	req.Header.Set("X-API-Key", k)
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		w.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if out != nil && len(b) > 0 {
		if err := json.Unmarshal(b, out); err != nil {
			w.t.Fatalf("%s %s: decode %q: %v", method, path, b, err)
		}
	}
	return resp.StatusCode
}

func (w *world) create(body string) sandbox {
	w.t.Helper()
	var sb sandbox
	if code := w.rest("POST", "/v2/sandboxes", body, &sb); code != http.StatusCreated {
		w.t.Fatalf("create %s = %d %+v", body, code, sb)
	}
	return sb
}

func TestRESTRefusesMissingAndWrongKeysInE2BShape(t *testing.T) {
	w := newWorld(t)
	for _, key := range []string{"", "e2b_" + strings.Repeat("0", 40), w.key + "0", w.key[:len(w.key)-1]} {
		var e apiError
		if code := w.rest("GET", "/v2/sandboxes", "", &e, key); code != http.StatusUnauthorized || e.Code != 401 || e.Message == "" {
			t.Errorf("key %q: %d %+v, want 401 with {code: 401, message}", key, code, e)
		}
	}
	if got := w.b.Calls(); len(got) != 0 {
		t.Errorf("refused requests reached the backend: %v", got)
	}
	var list []sandboxDetail
	if code := w.rest("GET", "/v2/sandboxes", "", &list); code != http.StatusOK || len(list) != 0 {
		t.Errorf("with the key: %d %v, want 200 []", code, list)
	}
}

func TestKeysFileForm(t *testing.T) {
	dir := t.TempDir()
	bad := filepath.Join(dir, "bad")
	for _, content := range []string{"", "# only a comment\n\n", "e2b_xyz\n", "sk_" + strings.Repeat("a", 40) + "\n"} {
		if err := os.WriteFile(bad, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := LoadKeys(bad); err == nil {
			t.Errorf("LoadKeys(%q) accepted it", content)
		}
	}
	// A last line without newline must not swallow the next key.
	f := filepath.Join(dir, "keys")
	first := "e2b_" + strings.Repeat("ab", 20)
	if err := os.WriteFile(f, []byte(first), 0o600); err != nil {
		t.Fatal(err)
	}
	second, err := AppendKey(f)
	if err != nil {
		t.Fatal(err)
	}
	k, err := LoadKeys(f)
	if err != nil {
		t.Fatal(err)
	}
	if !k.Valid(first) || !k.Valid(second) || k.Valid(first+second) {
		t.Errorf("after append: first %v second %v", k.Valid(first), k.Valid(second))
	}
	if st, _ := os.Stat(f); st.Mode().Perm() != 0o600 {
		t.Errorf("key file mode %v, want 0600", st.Mode().Perm())
	}
}

func TestSandboxLifecycleOverLeases(t *testing.T) {
	w := newWorld(t)
	sb := w.create(`{"templateID":"web","timeout":60,"metadata":{"team":"a"},"envVars":{"K":"v"}}`)
	if sb.TemplateID != "web" || sb.SandboxID == "" || sb.ClientID == "" || sb.EnvdVersion != EnvdVersion || len(sb.EnvdAccessToken) != 64 {
		t.Fatalf("create answered %+v", sb)
	}
	leases, _ := w.b.Leases(context.Background())
	if len(leases) != 1 || leases[0].ID != sb.SandboxID || leases[0].Labels["team"] != "a" || leases[0].ExpiresAt == nil ||
		!leases[0].ExpiresAt.Equal(w.b.Now().Add(time.Minute)) {
		t.Fatalf("the lease behind it: %+v", leases)
	}
	w.create(`{"templateID":"web","metadata":{"team":"b"}}`)

	var d sandboxDetail
	if code := w.rest("GET", "/sandboxes/"+sb.SandboxID, "", &d); code != 200 || d.Metadata["team"] != "a" || d.State != "running" ||
		d.CPUCount != 1 || d.MemoryMB != 256 || d.EnvdAccessToken != sb.EnvdAccessToken {
		t.Fatalf("get: %d %+v", code, d)
	}
	var list []sandboxDetail
	w.rest("GET", "/v2/sandboxes?metadata=team%3Da", "", &list)
	if len(list) != 1 || list[0].SandboxID != sb.SandboxID || list[0].EnvdAccessToken != "" {
		t.Fatalf("list by metadata team=a: %+v (and no token in listings)", list)
	}
	w.rest("GET", "/v2/sandboxes?state=paused", "", &list)
	if len(list) != 0 {
		t.Errorf("paused sandboxes: %+v, want none", list)
	}

	if code := w.rest("POST", "/sandboxes/"+sb.SandboxID+"/timeout", `{"timeout":3600}`, nil); code != http.StatusNoContent {
		t.Fatalf("timeout: %d", code)
	}
	w.rest("GET", "/sandboxes/"+sb.SandboxID, "", &d)
	if !d.EndAt.Equal(w.b.Now().Add(time.Hour)) {
		t.Errorf("endAt after timeout 3600 = %v, want %v", d.EndAt, w.b.Now().Add(time.Hour))
	}
	var e apiError
	if code := w.rest("POST", "/sandboxes/"+sb.SandboxID+"/pause", `{}`, &e); code != http.StatusBadRequest || !strings.Contains(e.Message, "not supported") {
		t.Errorf("pause: %d %+v, want a clear 400", code, e)
	}
	if code := w.rest("DELETE", "/sandboxes/"+sb.SandboxID, "", nil); code != http.StatusNoContent {
		t.Fatalf("kill: %d", code)
	}
	for _, req := range [][2]string{{"DELETE", ""}, {"GET", ""}, {"POST", "/timeout"}, {"POST", "/connect"}} {
		if code := w.rest(req[0], "/sandboxes/"+sb.SandboxID+req[1], `{"timeout":10}`, &e); code != http.StatusNotFound || e.Code != 404 {
			t.Errorf("%s %s of a killed sandbox: %d %+v, want 404 code 404", req[0], req[1], code, e)
		}
	}
}

func TestCreateRefusesWhatItCannotDo(t *testing.T) {
	w := newWorld(t)
	cases := []struct {
		body    string
		status  int
		mention string
	}{
		{`{"templateID":"nope"}`, 404, `"nope"`},
		{`{"templateID":"../x"}`, 404, "not found"},
		{`{"templateID":"web","timeout":-1}`, 400, "timeout"},
		{`{"templateID":"web","autoPause":true}`, 400, "pause"},
		{`{"templateID":"web","envVars":{"=x":"y"}}`, 400, "envVars"},
		{`{"templateID":"web","metadata":{"":"y"}}`, 400, "metadata"},
		{`{"templateID":`, 400, "JSON"},
	}
	for _, c := range cases {
		var e apiError
		if code := w.rest("POST", "/sandboxes", c.body, &e); code != c.status || e.Code != c.status || !strings.Contains(e.Message, c.mention) {
			t.Errorf("create %s: %d %+v, want %d mentioning %s", c.body, code, e, c.status, c.mention)
		}
	}
	if n := w.b.Mutations(); n != 0 {
		t.Errorf("refused creates changed the backend %d times", n)
	}
}

func TestCreateFromATemplateMakesItsPool(t *testing.T) {
	w := newWorld(t)
	// The fake's new pool has nothing ready: the create waits, then
	// answers 503, which the SDK raises as ServiceBusyError.
	var e apiError
	if code := w.rest("POST", "/sandboxes", `{"templateID":"base"}`, &e); code != http.StatusServiceUnavailable {
		t.Fatalf("create from template base: %d %+v, want 503 from the fresh pool", code, e)
	}
	pools, _ := w.b.Pools(context.Background())
	var found bool
	for _, p := range pools {
		found = found || p.Name == "base" && p.Template == "base" && p.Min == 0
	}
	if !found {
		t.Errorf("no pool base (min 0) made for template base: %+v", pools)
	}
}

// connectClient calls envd like the SDK does: Connect with JSON, the
// sandbox headers and its access token.
func connectClient[Req, Res any](w *world, procedure, sandboxID, token string) *connect.Client[Req, Res] {
	return connect.NewClient[Req, Res](http.DefaultClient, w.srv.URL+procedure, connect.WithCodec(jsonCodec{}),
		connect.WithInterceptors(connect.UnaryInterceptorFunc(func(next connect.UnaryFunc) connect.UnaryFunc {
			return func(ctx context.Context, r connect.AnyRequest) (connect.AnyResponse, error) {
				setEnvdHeaders(r.Header(), sandboxID, token)
				return next(ctx, r)
			}
		}), streamHeaders{sandboxID, token}))
}

func setEnvdHeaders(h http.Header, sandboxID, token string) {
	h.Set("E2b-Sandbox-Id", sandboxID)
	h.Set("E2b-Sandbox-Port", EnvdPort)
	if token != "" {
		h.Set("X-Access-Token", token)
	}
}

type streamHeaders struct{ id, token string }

func (s streamHeaders) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc { return next }
func (s streamHeaders) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return func(ctx context.Context, spec connect.Spec) connect.StreamingClientConn {
		c := next(ctx, spec)
		setEnvdHeaders(c.RequestHeader(), s.id, s.token)
		return c
	}
}
func (s streamHeaders) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return next
}

func startEvents(t *testing.T, w *world, sb sandbox, token string, cmd string, args ...string) ([]processEvent, error) {
	t.Helper()
	c := connectClient[startRequest, processStream](w, "/process.Process/Start", sb.SandboxID, token)
	stream, err := c.CallServerStream(context.Background(), connect.NewRequest(&startRequest{Process: &processConfig{Cmd: cmd, Args: args}}))
	if err != nil {
		return nil, err
	}
	defer stream.Close()
	var evs []processEvent
	for stream.Receive() {
		evs = append(evs, stream.Msg().Event)
	}
	return evs, stream.Err()
}

func TestStartStreamsStartDataEnd(t *testing.T) {
	w := newWorld(t)
	sb := w.create(`{"templateID":"web"}`)
	evs, err := startEvents(t, w, sb, sb.EnvdAccessToken, "echo", "hi")
	if err != nil {
		t.Fatal(err)
	}
	if len(evs) != 3 || evs[0].Start == nil || evs[0].Start.PID == 0 || evs[1].Data == nil || string(evs[1].Data.Stdout) != "hi\n" ||
		evs[2].End == nil || evs[2].End.ExitCode != 0 || !evs[2].End.Exited || evs[2].End.Error != nil {
		t.Fatalf("events %+v, want start, stdout hi, end 0", evs)
	}
	evs, err = startEvents(t, w, sb, sb.EnvdAccessToken, "sh", "-c", "echo failing as asked >&2; exit 1")
	if err != nil {
		t.Fatal(err)
	}
	last := evs[len(evs)-1].End
	if last == nil || last.ExitCode != 1 || last.Error == nil || string(evs[1].Data.Stderr) != "failing as asked\n" {
		t.Fatalf("failing command: %+v", evs)
	}
}

func TestEnvdNeedsTheSandboxsToken(t *testing.T) {
	w := newWorld(t)
	a := w.create(`{"templateID":"web"}`)
	b := w.create(`{"templateID":"web"}`)
	w.b.ResetCalls()
	for _, token := range []string{"", b.EnvdAccessToken, a.EnvdAccessToken[:63]} {
		_, err := startEvents(t, w, a, token, "echo", "hi")
		if connect.CodeOf(err) != connect.CodeUnauthenticated {
			t.Errorf("token %q: %v, want unauthenticated", token, err)
		}
	}
	if got := w.b.Calls(); len(got) != 0 {
		t.Errorf("refused envd requests reached the backend: %v", got)
	}
}

func TestEnvdOfAKilledSandboxIsUnavailable(t *testing.T) {
	w := newWorld(t)
	sb := w.create(`{"templateID":"web"}`)
	w.rest("DELETE", "/sandboxes/"+sb.SandboxID, "", nil)
	if _, err := startEvents(t, w, sb, sb.EnvdAccessToken, "echo", "hi"); connect.CodeOf(err) != connect.CodeUnavailable {
		t.Errorf("start in a killed sandbox: %v, want unavailable (the SDK's 'not running any more')", err)
	}
	req, _ := http.NewRequest("GET", w.srv.URL+"/health", nil)
	setEnvdHeaders(req.Header, sb.SandboxID, "")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadGateway {
		t.Errorf("health of a killed sandbox: %d, want 502", resp.StatusCode)
	}
}

// TestWireFormat reads the bytes of a Start stream as the SDK's Connect
// transport does: enveloped protobuf JSON with lowerCamelCase names and
// base64 bytes, ended by an end-stream envelope.
func TestWireFormat(t *testing.T) {
	w := newWorld(t)
	sb := w.create(`{"templateID":"web"}`)
	body := []byte(`{"process":{"cmd":"echo","args":["hi"],"envs":{},"cwd":"/tmp"},"stdin":false}`)
	env := append([]byte{0, 0, 0, 0, 0}, body...)
	binary.BigEndian.PutUint32(env[1:5], uint32(len(body)))
	req, _ := http.NewRequest("POST", w.srv.URL+"/process.Process/Start", bytes.NewReader(env))
	req.Header.Set("Content-Type", "application/connect+json")
	req.Header.Set("Connect-Protocol-Version", "1")
	setEnvdHeaders(req.Header, sb.SandboxID, sb.EnvdAccessToken)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	var msgs []string
	var flags []byte
	for len(raw) >= 5 {
		n := binary.BigEndian.Uint32(raw[1:5])
		flags = append(flags, raw[0])
		msgs = append(msgs, string(raw[5:5+n]))
		raw = raw[5+n:]
	}
	var start struct {
		Event struct{ Start startEvent }
	}
	if len(msgs) > 0 {
		_ = json.Unmarshal([]byte(msgs[0]), &start)
	}
	want := []string{
		fmt.Sprintf(`{"event":{"start":{"pid":%d}}}`, start.Event.Start.PID),
		`{"event":{"data":{"stdout":"aGkK"}}}`,
		`{"event":{"end":{"exitCode":0,"exited":true,"status":"exit status 0"}}}`,
		`{}`,
	}
	if strings.Join(msgs, "\n") != strings.Join(want, "\n") || !bytes.Equal(flags, []byte{0, 0, 0, 2}) {
		t.Fatalf("stream:\n%s\nflags %v; want\n%s\nflags [0 0 0 2]", strings.Join(msgs, "\n"), flags, strings.Join(want, "\n"))
	}
	// Enums arrive by name from the SDK.
	var sig sendSignalRequest
	if err := json.Unmarshal([]byte(`{"process":{"pid":7},"signal":"SIGNAL_SIGKILL"}`), &sig); err != nil || sig.Signal != 9 || *sig.Process.PID != 7 {
		t.Errorf("SendSignal request decoded as %+v, %v", sig, err)
	}
	if b, _ := json.Marshal(entryInfo{Type: fileTypeDirectory, Size: 5}); !strings.Contains(string(b), `"type":"FILE_TYPE_DIRECTORY"`) || !strings.Contains(string(b), `"size":"5"`) {
		t.Errorf("EntryInfo encodes as %s", b)
	}
}

func TestSignalOfAnUnknownProcessIsNotFound(t *testing.T) {
	w := newWorld(t)
	sb := w.create(`{"templateID":"web"}`)
	c := connectClient[sendSignalRequest, empty](w, "/process.Process/SendSignal", sb.SandboxID, sb.EnvdAccessToken)
	pid := uint32(99)
	_, err := c.CallUnary(context.Background(), connect.NewRequest(&sendSignalRequest{Process: processSelector{PID: &pid}, Signal: 9}))
	if connect.CodeOf(err) != connect.CodeNotFound {
		t.Errorf("kill of an unknown pid: %v, want not found (the SDK answers false)", err)
	}
	var ce *connect.Error
	if !errors.As(err, &ce) {
		t.Fatalf("not a connect error: %v", err)
	}
}
