package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/warmpool/warmpool/api"
	"github.com/warmpool/warmpool/api/apitest"
	"github.com/warmpool/warmpool/events"
	"github.com/warmpool/warmpool/guest"
	"github.com/warmpool/warmpool/internal/paths"
)

// startDaemon serves a fake backend on warmpool.sock in a fresh state directory
// and returns the directory.
func startDaemon(t *testing.T, b api.Backend) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "wpcli") // short: socket paths are limited
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	serveOn(t, b, "unix:"+paths.Socket(dir), "")
	return dir
}

func serveOn(t *testing.T, b api.Backend, addr, token string) string {
	t.Helper()
	ln, err := api.Listen(addr)
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
	return ln.Addr().String()
}

type result struct {
	code           int
	stdout, stderr string
}

func cli(t *testing.T, stdin string, args ...string) result {
	t.Helper()
	var out, errb bytes.Buffer
	code := run(t.Context(), args, strings.NewReader(stdin), &out, &errb)
	return result{code, out.String(), errb.String()}
}

// assertFailure checks a failed command printed exactly one line on stderr
// mentioning want.
func assertFailure(t *testing.T, r result, wantCode int, want string) {
	t.Helper()
	if r.code != wantCode {
		t.Errorf("exit code %d, want %d (stderr %q)", r.code, wantCode, r.stderr)
	}
	if strings.Count(r.stderr, "\n") != 1 || !strings.HasPrefix(r.stderr, "warmpool: ") {
		t.Errorf("stderr %q is not one line starting with \"warmpool: \"", r.stderr)
	}
	if !strings.Contains(r.stderr, want) {
		t.Errorf("stderr %q does not mention %q", r.stderr, want)
	}
	if r.stdout != "" {
		t.Errorf("stdout %q, want nothing on failure", r.stdout)
	}
}

func TestPoolCommands(t *testing.T) {
	state := startDaemon(t, apitest.New())
	s := "--state=" + state

	r := cli(t, "", s, "pool", "set", "py", "--template", "base", "--min", "2", "--max", "5", "--max-age", "1h")
	if r.code != 0 {
		t.Fatalf("pool set: %+v", r)
	}
	r = cli(t, "", s, "pool", "ls")
	lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
	if r.code != 0 || len(lines) != 3 {
		t.Fatalf("pool ls: %+v", r)
	}
	// Columns line up: every row starts its TEMPLATE cell where the header does.
	col := strings.Index(lines[0], "TEMPLATE")
	for _, l := range lines[1:] {
		if len(l) < col || l[col-1] != ' ' || l[col] == ' ' {
			t.Errorf("row %q is not aligned with header %q", l, lines[0])
		}
	}
	if !regexp.MustCompile(`(?m)^py\s+base\s+-\s+0\s+2\s+0\s+0\s+2\s+5\s+1h0m0s\s+-\s+-\s`).MatchString(r.stdout) {
		t.Errorf("pool ls lacks the new pool's row:\n%s", r.stdout)
	}

	r = cli(t, "", s, "pool", "ls", "-o", "json")
	var pools []api.Pool
	if err := json.Unmarshal([]byte(r.stdout), &pools); err != nil || len(pools) != 2 || pools[0].Name != "py" || pools[0].MaxAge.Std() != time.Hour {
		t.Fatalf("pool ls -o json: %v %+v\n%s", err, pools, r.stdout)
	}

	if r := cli(t, "", s, "pool", "rm", "py"); r.code != 0 || r.stdout != "" {
		t.Fatalf("pool rm: %+v", r)
	}
	assertFailure(t, cli(t, "", s, "pool", "rm", "py"), exitFailure, "py")
	assertFailure(t, cli(t, "", s, "pool", "set", "bad", "--template", "base", "--min", "3", "--max", "1"), exitFailure, "min")
	assertFailure(t, cli(t, "", s, "pool", "set", "a/b", "--template", "base"), exitFailure, `invalid pool "a/b"`)
	assertFailure(t, cli(t, "", s, "pool", "set", "x"), exitUsage, "template")
}

func TestAcquireExecRelease(t *testing.T) {
	state := startDaemon(t, apitest.New())
	s := "--state=" + state

	r := cli(t, "", s, "acquire", "web", "--wait", "2s", "--ttl", "1h", "--owner", "ci", "-o", "json")
	var lease map[string]any
	if err := json.Unmarshal([]byte(r.stdout), &lease); r.code != 0 || err != nil {
		t.Fatalf("acquire -o json: %+v (%v)", r, err)
	}
	for _, k := range []string{"id", "pool", "vm_id", "address", "created_at", "expires_at", "timings"} {
		if _, ok := lease[k]; !ok {
			t.Errorf("lease JSON lacks %q", k)
		}
	}
	id := lease["id"].(string)

	r = cli(t, "", s, "acquire", "web", "-q")
	if r.code != 0 || !regexp.MustCompile(`^lease-\d+\n$`).MatchString(r.stdout) {
		t.Fatalf("acquire -q: %+v", r)
	}
	// The fake pool held two ready VMs: now it is empty.
	assertFailure(t, cli(t, "", s, "acquire", "web", "--wait", "10ms"), exitTempFail, "nothing ready")

	r = cli(t, "", s, "exec", id, "--", "echo", "hello", "--not-a-warmpool-flag")
	if r.code != 0 || r.stdout != "hello --not-a-warmpool-flag\n" || r.stderr != "" {
		t.Fatalf("exec echo: %+v", r)
	}
	r = cli(t, "", s, "exec", id, "--", "sh", "-c", "exit 42")
	if r.code != 42 || r.stdout != "" || r.stderr != "" {
		t.Fatalf("exec exit 42: %+v, want exit code 42 and no output", r)
	}
	r = cli(t, "", s, "exec", id, "sh", "-c", "echo failing as asked >&2; exit 1")
	if r.code != 1 || r.stderr != "failing as asked\n" {
		t.Fatalf("exec fail: %+v, want the command's stderr and exit code 1", r)
	}
	assertFailure(t, cli(t, "", s, "exec", "lease-999", "--", "echo"), exitFailure, "lease-999")
	assertFailure(t, cli(t, "", s, "exec", id), exitUsage, "LEASE -- CMD")

	r = cli(t, "", s, "lease", "ls")
	if r.code != 0 || !strings.Contains(r.stdout, id) || !strings.Contains(r.stdout, "ci") {
		t.Fatalf("lease ls: %+v", r)
	}
	for range 2 {
		if r := cli(t, "", s, "release", id); r.code != 0 {
			t.Fatalf("release (idempotent): %+v", r)
		}
	}
	r = cli(t, "", s, "lease", "ls", "-o", "json")
	if r.code != 0 || strings.Contains(r.stdout, id) {
		t.Fatalf("released lease still listed: %+v", r)
	}
}

func TestUsageErrorsExit2(t *testing.T) {
	state := startDaemon(t, apitest.New())
	for _, args := range [][]string{
		{"acquire"},
		{"acquire", "a", "b"},
		{"pool", "ls", "--bogus"},
		{"-o", "yaml", "pool", "ls"},
		{"release"},
		{"machine", "events", "a", "b"},
		{"acquire", "web", "--wait", "soon"},
	} {
		r := cli(t, "", append([]string{"--state", state}, args...)...)
		if r.code != exitUsage || strings.Count(r.stderr, "\n") != 1 || r.stdout != "" {
			t.Errorf("%q: %+v, want exit 2 with one line on stderr", args, r)
		}
	}
}

func TestNoDaemon(t *testing.T) {
	r := cli(t, "", "--socket", filepath.Join(t.TempDir(), "none.sock"), "status")
	assertFailure(t, r, exitFailure, "is the daemon running")
}

func TestSocketDiscovery(t *testing.T) {
	state := startDaemon(t, apitest.New())
	sock := paths.Socket(state)
	t.Setenv(paths.SocketEnv, sock)
	if r := cli(t, "", "status"); r.code != 0 {
		t.Fatalf("$%s: %+v", paths.SocketEnv, r)
	}
	// --socket wins over the environment, the environment over --state.
	elsewhere := filepath.Join(t.TempDir(), "none.sock")
	if r := cli(t, "", "--socket", elsewhere, "status"); r.code == 0 {
		t.Fatal("--socket did not take precedence over the environment")
	}
	if r := cli(t, "", "--state", t.TempDir(), "status"); r.code != 0 {
		t.Fatalf("the environment should win over --state: %+v", r)
	}
	t.Setenv(paths.SocketEnv, "")
	if r := cli(t, "", "--state", state, "status", "-o", "json"); r.code != 0 || !strings.Contains(r.stdout, `"provider": "fake"`) {
		t.Fatalf("--state: %+v", r)
	}
}

func TestTokenOverTCP(t *testing.T) {
	addr := serveOn(t, apitest.New(), "tcp:127.0.0.1:0", "tok3n")
	tokenFile := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tokenFile, []byte("tok3n\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if r := cli(t, "", "--socket", "tcp:"+addr, "--token-file", tokenFile, "pool", "ls"); r.code != 0 {
		t.Fatalf("with token: %+v", r)
	}
	assertFailure(t, cli(t, "", "--socket", "tcp:"+addr, "pool", "ls"), exitFailure, "token")
}

func TestMachineCommands(t *testing.T) {
	fake := apitest.New()
	state := startDaemon(t, fake)
	s := "--state=" + state

	// A bare ensure of a new machine gives it the default shape.
	r := cli(t, "", s, "machine", "ensure", "bare", "-o", "json")
	var bare api.Machine
	if err := json.Unmarshal([]byte(r.stdout), &bare); err != nil || r.code != 0 || bare.State != api.MachineRunning ||
		bare.Spec.VCPUs != api.DefaultMachineVCPUs || bare.Spec.MemoryMiB != api.DefaultMachineMemoryMiB {
		t.Fatalf("bare machine ensure: %+v %v", r, err)
	}
	r = cli(t, "", s, "machine", "ensure", "dev", "--mem", "1024", "--disk", "2048")
	if r.code != 0 || !regexp.MustCompile(`(?m)^dev\s+running\s+\S+\s+1\s+1024MiB\s+-\s+2048MiB\s+0\s+-\s+-$`).MatchString(r.stdout) {
		t.Fatalf("machine ensure: %+v", r)
	}
	// Changing one field keeps the others.
	r = cli(t, "", s, "machine", "ensure", "dev", "--vcpus", "2", "-o", "json")
	var m api.Machine
	if err := json.Unmarshal([]byte(r.stdout), &m); err != nil || m.Spec.VCPUs != 2 || m.Spec.MemoryMiB != 1024 || m.Spec.DataDiskMiB != 2048 {
		t.Fatalf("machine ensure --vcpus 2: %+v %v", m, err)
	}
	r = cli(t, "", s, "machine", "hold", "dev", "--ttl", "1m", "-o", "json")
	var h api.Hold
	if err := json.Unmarshal([]byte(r.stdout), &h); err != nil || h.ExpiresAt == nil {
		t.Fatalf("machine hold: %+v %v", r, err)
	}
	r = cli(t, "", s, "machine", "ls", "-o", "json")
	var ms []api.Machine
	if err := json.Unmarshal([]byte(r.stdout), &ms); err != nil || len(ms) != 2 || ms[1].Name != "dev" || ms[1].Holds != 1 {
		t.Fatalf("machine ls: %+v %v", r, err)
	}
	if r := cli(t, "", s, "machine", "unhold", "dev", h.ID); r.code != 0 {
		t.Fatalf("machine unhold: %+v", r)
	}
	if r := cli(t, "", s, "machine", "stop", "dev", "--force"); r.code != 0 {
		t.Fatalf("machine stop: %+v", r)
	}
	assertFailure(t, cli(t, "", s, "machine", "stop", "nope"), exitFailure, "nope")
	assertFailure(t, cli(t, "", s, "machine", "hold", "dev", "--ttl", "-1s"), exitFailure, "ttl")
}

func TestMachineEventsFollows(t *testing.T) {
	fake := apitest.New()
	state := startDaemon(t, fake)
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	out := &syncBuffer{}
	done := make(chan int, 1)
	go func() {
		done <- run(ctx, []string{"--state", state, "machine", "events", "dev", "-o", "json"}, strings.NewReader(""), out, &bytes.Buffer{})
	}()
	// Publish until the follower shows one: it may not have subscribed yet.
	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(out.String(), "\n") {
		if time.Now().After(deadline) {
			t.Fatal("machine events printed nothing")
		}
		fake.Bus.Publish(events.Event{Kind: "pool.evicted", Subject: "dev"})    // wrong kind
		fake.Bus.Publish(events.Event{Kind: "machine.state", Subject: "other"}) // wrong subject
		fake.Bus.Publish(events.Event{Kind: "machine.state", Subject: "dev", Detail: map[string]any{"to": "running"}})
		time.Sleep(50 * time.Millisecond)
	}
	cancel()
	if code := <-done; code != 0 {
		t.Errorf("machine events exit code %d after interrupt, want 0", code)
	}
	first := strings.SplitN(out.String(), "\n", 2)[0]
	var e events.Event
	if err := json.Unmarshal([]byte(first), &e); err != nil || e.Kind != "machine.state" || e.Subject != "dev" || e.Detail["to"] != "running" {
		t.Fatalf("first event line %q: %+v %v", first, e, err)
	}
	for _, line := range strings.Split(strings.TrimSpace(out.String()), "\n") {
		if !strings.Contains(line, `"subject":"dev"`) || !strings.Contains(line, `"kind":"machine.state"`) {
			t.Errorf("event not matching the filter printed: %s", line)
		}
	}
}

func TestTemplateBuildAndStatus(t *testing.T) {
	state := startDaemon(t, apitest.New())
	s := "--state=" + state
	r := cli(t, "", s, "template", "build", "py", "--vcpus", "2", "--mem", "512")
	if r.code != 0 || r.stderr != "" || !regexp.MustCompile(`(?m)^py\s+2\s+512MiB\s+-\s+1\s`).MatchString(r.stdout) {
		t.Fatalf("template build (no progress off a terminal): %+v", r)
	}
	assertFailure(t, cli(t, "", s, "template", "build", "..", "--mem", "512"), exitFailure, "name")
	r = cli(t, "", s, "template", "ls", "-o", "json")
	var ts []api.Template
	if err := json.Unmarshal([]byte(r.stdout), &ts); err != nil || len(ts) != 2 {
		t.Fatalf("template ls: %+v %v", r, err)
	}
	r = cli(t, "", s, "status")
	if r.code != 0 || !regexp.MustCompile(`(?m)^provider:\s+fake$`).MatchString(r.stdout) || !regexp.MustCompile(`(?m)^templates:\s+2$`).MatchString(r.stdout) {
		t.Fatalf("status: %+v", r)
	}
}

func TestCompletion(t *testing.T) {
	r := cli(t, "", "completion", "bash")
	if r.code != 0 || !strings.Contains(r.stdout, "__start_warmpool") {
		t.Fatalf("completion bash: code %d, stderr %q", r.code, r.stderr)
	}
}

// syncBuffer is a bytes.Buffer safe for one writer and one reader.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func TestCompletionAsksTheDaemon(t *testing.T) {
	state := startDaemon(t, apitest.New())
	r := cli(t, "", "--state", state, "__complete", "acquire", "")
	if r.code != 0 || !strings.HasPrefix(r.stdout, "web\n") {
		t.Fatalf("completing acquire: %+v, want the pool web", r)
	}
	// Without a daemon, completion offers nothing and does not fail.
	r = cli(t, "", "--socket", filepath.Join(t.TempDir(), "none.sock"), "__complete", "acquire", "")
	if r.code != 0 || strings.Contains(r.stdout, "web") {
		t.Fatalf("completing without a daemon: %+v", r)
	}
}

func TestImagePruneKeepsImagesOfTemplates(t *testing.T) {
	cache := t.TempDir()
	mkImage := func(name string, age time.Duration) string {
		dir := filepath.Join(cache, "images", name)
		os.MkdirAll(dir, 0o755)
		for _, f := range []string{"vmlinuz", "initrd.img"} {
			os.WriteFile(filepath.Join(dir, f), []byte("x"), 0o644)
		}
		manifest := filepath.Join(dir, "image.json")
		os.WriteFile(manifest, []byte(`{"digest":"`+name+`"}`), 0o644)
		when := time.Now().Add(-age)
		os.Chtimes(manifest, when, when)
		return dir
	}
	mkImage("newest", time.Minute)
	used := mkImage("used", time.Hour)
	mkImage("unused", 2*time.Hour)
	left := func() string {
		r := cli(t, "", "image", "ls", "--out", cache, "-o", "json")
		var imgs []struct{ Digest string }
		if err := json.Unmarshal([]byte(r.stdout), &imgs); err != nil {
			t.Fatalf("image ls: %+v: %v", r, err)
		}
		var names []string
		for _, img := range imgs {
			names = append(names, img.Digest)
		}
		return strings.Join(names, " ")
	}

	noDaemon := "--state=" + t.TempDir()
	assertFailure(t, cli(t, "", noDaemon, "image", "prune", "--out", cache), exitFailure, "--ignore-daemon")
	if got := left(); got != "newest used unused" {
		t.Fatalf("images after a refused prune: %s", got)
	}

	state := startDaemon(t, apitest.New())
	s := "--state=" + state
	if r := cli(t, "", s, "template", "build", "py", "--image", used); r.code != 0 {
		t.Fatalf("template build: %+v", r)
	}
	r := cli(t, "", s, "image", "prune", "--out", cache, "--dry-run")
	if r.code != 0 || !strings.Contains(r.stdout, "unused") || regexp.MustCompile(`(?m)^(used|newest)\s`).MatchString(r.stdout) || !strings.Contains(r.stderr, "would remove 1 image,") {
		t.Fatalf("prune --dry-run: %+v", r)
	}
	if got := left(); got != "newest used unused" {
		t.Fatalf("images after a dry run: %s", got)
	}
	if r := cli(t, "", s, "image", "prune", "--out", cache, "-o", "json"); r.code != 0 || !strings.Contains(r.stdout, `"digest": "unused"`) {
		t.Fatalf("prune: %+v", r)
	}
	if got := left(); got != "newest used" {
		t.Errorf("images after prune: %s, want the newest and the template's", got)
	}
}

// requestLog records every request a server receives, with its body.
type requestLog struct {
	mu   sync.Mutex
	reqs []string // "METHOD PATH BODY"
}

func (l *requestLog) wrap(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		r.Body = io.NopCloser(bytes.NewReader(body))
		l.mu.Lock()
		l.reqs = append(l.reqs, r.Method+" "+r.URL.Path+" "+strings.TrimSpace(string(body)))
		l.mu.Unlock()
		h.ServeHTTP(w, r)
	})
}

func (l *requestLog) take() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := l.reqs
	l.reqs = nil
	return out
}

// machine ensure is one request whatever its flags: the daemon merges the
// flags given into the recorded spec, so the CLI sends only those and reads
// nothing first.
func TestMachineEnsureIsOneRequest(t *testing.T) {
	dir, err := os.MkdirTemp("", "wpcli")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	ln, err := api.Listen("unix:" + paths.Socket(dir))
	if err != nil {
		t.Fatal(err)
	}
	var log requestLog
	srv := &http.Server{Handler: log.wrap(api.NewServer(api.ServerOptions{Backend: apitest.New()}))}
	go srv.Serve(ln) //nolint:errcheck // ends with Close below
	t.Cleanup(func() { srv.Close() })
	s := "--state=" + dir

	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"dev"}, "POST /v1/machines/dev/ensure {}"},
		{[]string{"dev", "--mem", "1024", "--disk", "2048"}, `POST /v1/machines/dev/ensure {"memory_mib":1024,"data_disk_mib":2048}`},
		{[]string{"dev", "--vcpus", "2"}, `POST /v1/machines/dev/ensure {"vcpus":2}`},
		{[]string{"dev", "--suspend-after", "0s"}, `POST /v1/machines/dev/ensure {"suspend_after":"0s"}`},
	} {
		r := cli(t, "", append([]string{s, "machine", "ensure", "-o", "json"}, tc.args...)...)
		if r.code != 0 {
			t.Fatalf("machine ensure %v: %+v", tc.args, r)
		}
		if got := log.take(); len(got) != 1 || got[0] != tc.want {
			t.Errorf("machine ensure %v sent %q, want exactly [%s]", tc.args, got, tc.want)
		}
	}
	// The fields given changed; the others kept what was recorded.
	r := cli(t, "", s, "machine", "ls", "-o", "json")
	var ms []api.Machine
	if err := json.Unmarshal([]byte(r.stdout), &ms); err != nil || len(ms) != 1 {
		t.Fatalf("machine ls: %+v %v", r, err)
	}
	if got := ms[0].Spec; got.VCPUs != 2 || got.MemoryMiB != 1024 || got.DataDiskMiB != 2048 || got.SuspendAfter == nil || *got.SuspendAfter != 0 {
		t.Errorf("spec after the ensures: %+v", got)
	}
}

func TestImageBuildRefusesBadSourcesBeforeBuilding(t *testing.T) {
	cache := t.TempDir()
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--from", "docker:alpine"}, `unknown kind "docker"`},
		{[]string{"--from", "debian:"}, "want busybox, dir:PATH"},
		{[]string{"--packages", "python3"}, "--packages and --size need a --from source other than busybox"},
		{[]string{"--from", "tar:x.tar", "--name", "Not/A/Name"}, `image name "Not/A/Name"`},
	} {
		r := cli(t, "", append([]string{"image", "build", "--out", cache}, tc.args...)...)
		assertFailure(t, r, exitFailure, tc.want)
	}
	if entries, _ := os.ReadDir(cache); len(entries) != 0 {
		t.Errorf("a refused build wrote %v into the cache", entries)
	}
}

func TestImageLsShowsNameSourceSizeDigestCreated(t *testing.T) {
	cache := t.TempDir()
	dir := filepath.Join(cache, "images", "0123456789abcdef")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	manifest := `{"digest":"0123456789abcdef00","source":"oci-archive:/srv/app.tar","rootfs":{"file":"rootfs.ext4","format":"ext4","size_bytes":3145728,"base_digest":"b","exec":{}}}`
	for name, size := range map[string]int{"image.json": 0, "vmlinuz": 1 << 20, "initrd.img": 1 << 20, "rootfs.ext4": 3 << 20} {
		data := make([]byte, size)
		if name == "image.json" {
			data = []byte(manifest)
		}
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := guest.SetName(cache, "app", dir); err != nil {
		t.Fatal(err)
	}
	r := cli(t, "", "image", "ls", "--out", cache)
	lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
	if r.code != 0 || len(lines) != 2 {
		t.Fatalf("image ls: %+v", r)
	}
	if got := strings.Fields(lines[0]); !slices.Equal(got[:5], []string{"NAME", "SOURCE", "SIZE", "DIGEST", "CREATED"}) {
		t.Errorf("header %q", lines[0])
	}
	if got := strings.Fields(lines[1]); !slices.Equal(got[:4], []string{"app", "oci-archive:/srv/app.tar", "5.0MiB", "0123456789ab"}) {
		t.Errorf("row %q", lines[1])
	}
}
