package api_test

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/warmpool/warmpool/api"
	"github.com/warmpool/warmpool/api/apitest"
)

const testToken = "s3cret-token"

// TestBadInputIsRejected sends every endpoint malformed or hostile input
// over TCP (where the token is required) and checks for a 4xx JSON error
// that names the problem and that the backend changed nothing.
func TestBadInputIsRejected(t *testing.T) {
	huge := `{"template":"base","min":1,"max":2,"max_age":"` + strings.Repeat("9", 2<<20) + `"}`
	cases := []struct {
		name    string
		method  string
		path    string
		body    string
		header  map[string]string // replaces the default headers
		status  int
		code    string
		mention string // the error message must contain this
		// backend reports whether the backend may see the request (for
		// errors only it can know, like an unknown name).
		backend bool
	}{
		{name: "malformed JSON", method: "PUT", path: "/v1/pools/web", body: `{"template":`, status: 400, code: "invalid_argument", mention: "malformed JSON"},
		{name: "broken JSON", method: "PUT", path: "/v1/pools/web", body: `{"template" "base"}`, status: 400, code: "invalid_argument", mention: "malformed JSON"},
		{name: "unknown field", method: "PUT", path: "/v1/pools/web", body: `{"template":"base","min":1,"max":2,"colour":"red"}`, status: 400, code: "invalid_argument", mention: `unknown field "colour"`},
		{name: "two values", method: "PUT", path: "/v1/pools/web", body: `{"template":"base","min":1,"max":2} {}`, status: 400, code: "invalid_argument", mention: "single JSON value"},
		{name: "array body", method: "PUT", path: "/v1/pools/web", body: `[1,2]`, status: 400, code: "invalid_argument", mention: "JSON object"},
		{name: "empty body", method: "PUT", path: "/v1/pools/web", body: ``, status: 400, code: "invalid_argument", mention: "empty"},
		{name: "wrong type", method: "PUT", path: "/v1/pools/web", body: `{"template":"base","min":"1","max":2}`, status: 400, code: "invalid_argument", mention: "min"},
		{name: "negative min", method: "PUT", path: "/v1/pools/web", body: `{"template":"base","min":-1,"max":2}`, status: 400, code: "invalid_argument", mention: "min"},
		{name: "zero max", method: "PUT", path: "/v1/pools/web", body: `{"template":"base","min":0,"max":0}`, status: 400, code: "invalid_argument", mention: "max"},
		{name: "min above max", method: "PUT", path: "/v1/pools/web", body: `{"template":"base","min":5,"max":2}`, status: 400, code: "invalid_argument", mention: "min"},
		{name: "huge max", method: "PUT", path: "/v1/pools/web", body: `{"template":"base","min":1,"max":99999999}`, status: 400, code: "invalid_argument", mention: "max"},
		{name: "unparsable max_age", method: "PUT", path: "/v1/pools/web", body: `{"template":"base","min":1,"max":2,"max_age":"soon"}`, status: 400, code: "invalid_argument", mention: "max_age"},
		{name: "negative max_age", method: "PUT", path: "/v1/pools/web", body: `{"template":"base","min":1,"max":2,"max_age":"-1s"}`, status: 400, code: "invalid_argument", mention: "max_age"},
		{name: "numeric max_age", method: "PUT", path: "/v1/pools/web", body: `{"template":"base","min":1,"max":2,"max_age":30}`, status: 400, code: "invalid_argument", mention: "max_age"},
		{name: "path-like template", method: "PUT", path: "/v1/pools/web", body: `{"template":"../etc","min":1,"max":2}`, status: 400, code: "invalid_argument", mention: "template"},
		{name: "slash in pool name", method: "PUT", path: "/v1/pools/a%2Fb", body: `{"template":"base","min":1,"max":2}`, status: 400, code: "invalid_argument", mention: "pool"},
		{name: "dotdot pool name", method: "PUT", path: "/v1/pools/%2e%2e", body: `{"template":"base","min":1,"max":2}`, status: 400, code: "invalid_argument", mention: "pool"},
		{name: "dash-leading pool name", method: "PUT", path: "/v1/pools/-rf", body: `{"template":"base","min":1,"max":2}`, status: 400, code: "invalid_argument", mention: "pool"},
		{name: "long pool name", method: "PUT", path: "/v1/pools/" + strings.Repeat("a", 64), body: `{"template":"base","min":1,"max":2}`, status: 400, code: "invalid_argument", mention: "pool"},
		{name: "huge body", method: "PUT", path: "/v1/pools/web", body: huge, status: 413, code: "body_too_large", mention: "larger than"},
		{name: "huge body without length", method: "PUT", path: "/v1/pools/web", body: huge, header: map[string]string{"Authorization": "Bearer " + testToken, "X-Chunked": "1"}, status: 413, code: "body_too_large", mention: "larger than"},
		{name: "not JSON content type", method: "PUT", path: "/v1/pools/web", body: `{"template":"base","min":1,"max":2}`, header: map[string]string{"Authorization": "Bearer " + testToken, "Content-Type": "text/plain"}, status: 415, code: "unsupported_media_type", mention: "text/plain"},
		{name: "unknown template", method: "PUT", path: "/v1/pools/web", body: `{"template":"nope","min":1,"max":2}`, status: 400, code: "invalid_argument", mention: "template", backend: true},
		{name: "delete unknown pool", method: "DELETE", path: "/v1/pools/nope", status: 404, code: "not_found", mention: "nope", backend: true},
		{name: "delete path-like pool", method: "DELETE", path: "/v1/pools/..%2Fetc", status: 400, code: "invalid_argument", mention: "pool"},
		{name: "get unknown pool", method: "GET", path: "/v1/pools/nope", status: 404, code: "not_found", mention: "nope", backend: true},

		{name: "acquire unknown pool", method: "POST", path: "/v1/pools/nope/acquire", status: 404, code: "not_found", mention: "nope", backend: true},
		{name: "acquire bad wait", method: "POST", path: "/v1/pools/web/acquire?wait=banana", status: 400, code: "invalid_argument", mention: "wait"},
		{name: "acquire negative wait", method: "POST", path: "/v1/pools/web/acquire?wait=-1s", status: 400, code: "invalid_argument", mention: "wait"},
		{name: "acquire endless wait", method: "POST", path: "/v1/pools/web/acquire?wait=1000h", status: 400, code: "invalid_argument", mention: "wait"},
		{name: "acquire negative ttl", method: "POST", path: "/v1/pools/web/acquire", body: `{"ttl":"-5m"}`, status: 400, code: "invalid_argument", mention: "ttl"},
		{name: "acquire owner with newline", method: "POST", path: "/v1/pools/web/acquire", body: `{"owner":"a\nb"}`, status: 400, code: "invalid_argument", mention: "owner"},
		{name: "acquire unknown field", method: "POST", path: "/v1/pools/web/acquire", body: `{"pool":"web"}`, status: 400, code: "invalid_argument", mention: `unknown field "pool"`},
		{name: "acquire path-like pool", method: "POST", path: "/v1/pools/%2e%2e/acquire", status: 400, code: "invalid_argument", mention: "pool"},

		{name: "release path-like lease", method: "DELETE", path: "/v1/leases/a%2Fb", status: 400, code: "invalid_argument", mention: "lease"},
		{name: "exec without argv", method: "POST", path: "/v1/leases/lease-1/exec", body: `{}`, status: 400, code: "invalid_argument", mention: "argv"},
		{name: "exec empty command", method: "POST", path: "/v1/leases/lease-1/exec", body: `{"argv":[""]}`, status: 400, code: "invalid_argument", mention: "argv"},
		{name: "exec bad env", method: "POST", path: "/v1/leases/lease-1/exec", body: `{"argv":["ls"],"env":["NOEQUALS"]}`, status: 400, code: "invalid_argument", mention: "env"},
		{name: "exec negative timeout", method: "POST", path: "/v1/leases/lease-1/exec", body: `{"argv":["ls"],"timeout":"-1s"}`, status: 400, code: "invalid_argument", mention: "timeout"},
		{name: "exec stdin not base64", method: "POST", path: "/v1/leases/lease-1/exec", body: `{"argv":["ls"],"stdin":"%%%"}`, status: 400, code: "invalid_argument", mention: "stdin"},
		{name: "exec unknown lease", method: "POST", path: "/v1/leases/lease-404/exec", body: `{"argv":["echo","hi"]}`, status: 404, code: "not_found", mention: "lease-404", backend: true},
		{name: "exec path-like lease", method: "POST", path: "/v1/leases/%2e%2e/exec", body: `{"argv":["echo"]}`, status: 400, code: "invalid_argument", mention: "lease"},

		{name: "template path-like name", method: "POST", path: "/v1/templates", body: `{"name":"../../etc"}`, status: 400, code: "invalid_argument", mention: "name"},
		{name: "template relative image", method: "POST", path: "/v1/templates", body: `{"name":"t","image":"images/x"}`, status: 400, code: "invalid_argument", mention: "image"},
		{name: "template unclean image", method: "POST", path: "/v1/templates", body: `{"name":"t","image":"/var/../etc"}`, status: 400, code: "invalid_argument", mention: "image"},
		{name: "template negative memory", method: "POST", path: "/v1/templates", body: `{"name":"t","memory_mib":-256}`, status: 400, code: "invalid_argument", mention: "memory_mib"},
		{name: "template too many vcpus", method: "POST", path: "/v1/templates", body: `{"name":"t","vcpus":1000}`, status: 400, code: "invalid_argument", mention: "vcpus"},

		{name: "machine zero vcpus", method: "PUT", path: "/v1/machines/dev", body: `{"vcpus":0,"memory_mib":512}`, status: 400, code: "invalid_argument", mention: "vcpus"},
		{name: "machine negative memory", method: "PUT", path: "/v1/machines/dev", body: `{"vcpus":1,"memory_mib":-5}`, status: 400, code: "invalid_argument", mention: "memory_mib"},
		{name: "machine negative disk", method: "PUT", path: "/v1/machines/dev", body: `{"vcpus":1,"memory_mib":512,"data_disk_mib":-1}`, status: 400, code: "invalid_argument", mention: "data_disk_mib"},
		{name: "machine negative idle", method: "PUT", path: "/v1/machines/dev", body: `{"vcpus":1,"memory_mib":512,"idle_after":"-1m"}`, status: 400, code: "invalid_argument", mention: "idle_after"},
		{name: "machine path-like name", method: "PUT", path: "/v1/machines/a%2F..%2Fb", body: `{"vcpus":1,"memory_mib":512}`, status: 400, code: "invalid_argument", mention: "machine"},
		{name: "ensure zero vcpus", method: "POST", path: "/v1/machines/dev/ensure", body: `{"vcpus":0}`, status: 400, code: "invalid_argument", mention: "vcpus"},
		{name: "ensure negative suspend", method: "POST", path: "/v1/machines/dev/ensure", body: `{"suspend_after":"-1s"}`, status: 400, code: "invalid_argument", mention: "suspend_after"},
		{name: "ensure unknown field", method: "POST", path: "/v1/machines/dev/ensure", body: `{"memory":512}`, status: 400, code: "invalid_argument", mention: "memory"},
		{name: "stop unknown machine", method: "POST", path: "/v1/machines/dev/stop", status: 404, code: "not_found", mention: "dev", backend: true},
		{name: "stop bad force", method: "POST", path: "/v1/machines/dev/stop?force=maybe", status: 400, code: "invalid_argument", mention: "force"},
		{name: "hold negative ttl", method: "POST", path: "/v1/machines/dev/hold", body: `{"ttl":"-5s"}`, status: 400, code: "invalid_argument", mention: "ttl"},
		{name: "hold unknown machine", method: "POST", path: "/v1/machines/dev/hold", body: `{"owner":"me"}`, status: 404, code: "not_found", mention: "dev", backend: true},
		{name: "release path-like hold", method: "DELETE", path: "/v1/machines/dev/holds/%2e%2e", status: 400, code: "invalid_argument", mention: "hold"},
		{name: "events path-like subject", method: "GET", path: "/v1/events?subject=a/b", status: 400, code: "invalid_argument", mention: "subject"},

		{name: "missing token", method: "PUT", path: "/v1/pools/web", body: `{"template":"base","min":1,"max":2}`, header: map[string]string{}, status: 401, code: "unauthorized", mention: "token"},
		{name: "wrong token", method: "PUT", path: "/v1/pools/web", body: `{"template":"base","min":1,"max":2}`, header: map[string]string{"Authorization": "Bearer " + testToken + "x"}, status: 401, code: "unauthorized", mention: "token"},
		{name: "token prefix only", method: "GET", path: "/v1/pools", header: map[string]string{"Authorization": "Bearer " + testToken[:4]}, status: 401, code: "unauthorized", mention: "token"},
		{name: "basic auth", method: "GET", path: "/metrics", header: map[string]string{"Authorization": "Basic " + testToken}, status: 401, code: "unauthorized", mention: "token"},
		{name: "wrong method", method: "PATCH", path: "/v1/pools/web", body: `{}`, status: 405, code: "method_not_allowed", mention: "PATCH"},
		{name: "unknown endpoint", method: "GET", path: "/v1/volumes", status: 404, code: "not_found", mention: "/v1/volumes"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			fake := apitest.New()
			srv := httptest.NewServer(api.NewServer(api.ServerOptions{Backend: fake, Token: testToken}))
			t.Cleanup(srv.Close)
			before := snapshot(t, fake)
			fake.ResetCalls()

			var body io.Reader = strings.NewReader(tc.body)
			if tc.header["X-Chunked"] != "" {
				body = io.MultiReader(strings.NewReader(tc.body)) // hides the length: chunked upload
			}
			req, err := http.NewRequest(tc.method, srv.URL+tc.path, body)
			if err != nil {
				t.Fatal(err)
			}
			if tc.header == nil {
				req.Header.Set("Authorization", "Bearer "+testToken)
				if tc.body != "" {
					req.Header.Set("Content-Type", "application/json")
				}
			}
			for k, v := range tc.header {
				req.Header.Set(k, v)
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			raw, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != tc.status {
				t.Fatalf("status %d, want %d; body %s", resp.StatusCode, tc.status, raw)
			}
			if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
				t.Errorf("Content-Type %q, want application/json", ct)
			}
			var e struct{ Error, Code string }
			dec := json.NewDecoder(strings.NewReader(string(raw)))
			dec.DisallowUnknownFields()
			if err := dec.Decode(&e); err != nil {
				t.Fatalf("error body %q is not {error, code}: %v", raw, err)
			}
			t.Logf("%d %s: %s", resp.StatusCode, e.Code, e.Error)
			if e.Code != tc.code {
				t.Errorf("code %q, want %q (error %q)", e.Code, tc.code, e.Error)
			}
			if !strings.Contains(e.Error, tc.mention) {
				t.Errorf("error %q does not mention %q", e.Error, tc.mention)
			}
			if calls := fake.Calls(); !tc.backend && len(calls) > 0 {
				t.Errorf("backend was called (%v) for a request the server should have rejected", calls)
			}
			fake.ResetCalls()
			if fake.Mutations() != 0 {
				t.Errorf("backend state changed %d times", fake.Mutations())
			}
			if after := snapshot(t, fake); after != before {
				t.Errorf("backend state changed:\nbefore %s\nafter  %s", before, after)
			}
		})
	}
}

// snapshot renders the fake's whole state so tests can compare it.
func snapshot(t *testing.T, b *apitest.Backend) string {
	t.Helper()
	ctx := t.Context()
	ts, _ := b.Templates(ctx)
	ps, _ := b.Pools(ctx)
	ls, _ := b.Leases(ctx)
	ms, _ := b.Machines(ctx)
	out, err := json.Marshal([]any{ts, ps, ls, ms})
	if err != nil {
		t.Fatal(err)
	}
	return string(out)
}

func TestHealthzNeedsNoToken(t *testing.T) {
	srv := httptest.NewServer(api.NewServer(api.ServerOptions{Backend: apitest.New(), Token: testToken}))
	t.Cleanup(srv.Close)
	resp, err := http.Get(srv.URL + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /healthz without token: %s, want 200", resp.Status)
	}
}

func TestAcquireNothingReadyIs503WithRetryAfter(t *testing.T) {
	fake := apitest.New()
	ctx := t.Context()
	if _, err := fake.SetPool(ctx, "empty", api.PoolRequest{Template: "base", Min: 0, Max: 1}); err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(api.NewServer(api.ServerOptions{Backend: fake}))
	t.Cleanup(srv.Close)
	resp, err := http.Post(srv.URL+"/v1/pools/empty/acquire?wait=10ms", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var e api.Error
	if err := json.NewDecoder(resp.Body).Decode(&e); err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusServiceUnavailable || e.Code != api.CodeNothingReady {
		t.Fatalf("got %s %q, want 503 nothing_ready", resp.Status, e.Code)
	}
	if ra := resp.Header.Get("Retry-After"); ra != "1" {
		t.Errorf("Retry-After %q, want 1", ra)
	}
}

func TestAcquireReturns201WithLocationAndLeaseShape(t *testing.T) {
	srv := httptest.NewServer(api.NewServer(api.ServerOptions{Backend: apitest.New()}))
	t.Cleanup(srv.Close)
	resp, err := http.Post(srv.URL+"/v1/pools/web/acquire?wait=2s", "application/json", strings.NewReader(`{"owner":"ci","ttl":"1h"}`))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("status %s, want 201", resp.Status)
	}
	var lease map[string]any
	if err := json.NewDecoder(resp.Body).Decode(&lease); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"id", "pool", "vm_id", "address", "created_at", "expires_at", "timings"} {
		if _, ok := lease[k]; !ok {
			t.Errorf("lease JSON lacks %q: %v", k, lease)
		}
	}
	if lease["address"] != nil {
		t.Errorf("address %v, want null", lease["address"])
	}
	timings, _ := lease["timings"].(map[string]any)
	for _, k := range []string{"wait_ms", "handoff_ms", "total_ms"} {
		if _, ok := timings[k]; !ok {
			t.Errorf("timings lack %q: %v", k, timings)
		}
	}
	if loc := resp.Header.Get("Location"); loc != "/v1/leases/"+lease["id"].(string) {
		t.Errorf("Location %q does not point at the lease", loc)
	}
}

func TestPoolAndMachineJSONShapes(t *testing.T) {
	fake := apitest.New()
	if _, err := fake.PutMachine(t.Context(), "dev", api.MachineRequest{VCPUs: 1, MemoryMiB: 512}); err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(api.NewServer(api.ServerOptions{Backend: fake}))
	t.Cleanup(srv.Close)
	check := func(path string, keys []string, nested string, nestedKeys []string) {
		t.Helper()
		resp, err := http.Get(srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var list []map[string]any
		if err := json.NewDecoder(resp.Body).Decode(&list); err != nil || len(list) == 0 {
			t.Fatalf("GET %s: %v, %d items", path, err, len(list))
		}
		for _, k := range keys {
			if _, ok := list[0][k]; !ok {
				t.Errorf("GET %s: item lacks %q: %v", path, k, list[0])
			}
		}
		inner, _ := list[0][nested].(map[string]any)
		for _, k := range nestedKeys {
			if _, ok := inner[k]; !ok {
				t.Errorf("GET %s: %s lacks %q: %v", path, nested, k, inner)
			}
		}
	}
	check("/v1/pools", []string{"name", "template", "min", "max", "ready", "restoring", "generation", "counters"},
		"counters", []string{"acquired", "hits", "waits", "timeouts", "evicted", "validation_failures"})
	check("/v1/machines", []string{"name", "state", "spec", "since", "last_error", "holds", "balloon_mib"},
		"spec", []string{"vcpus", "memory_mib"})
}

func TestMetricsServesTheGivenRegistry(t *testing.T) {
	reg := prometheus.NewRegistry()
	c := prometheus.NewCounter(prometheus.CounterOpts{Name: "warmpool_test_acquires_total", Help: "test"})
	reg.MustRegister(c)
	c.Add(3)
	srv := httptest.NewServer(api.NewServer(api.ServerOptions{Backend: apitest.New(), Gatherer: reg, Token: testToken}))
	t.Cleanup(srv.Close)
	req, _ := http.NewRequest("GET", srv.URL+"/metrics", nil)
	req.Header.Set("Authorization", "Bearer "+testToken)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(b), "warmpool_test_acquires_total 3") {
		t.Fatalf("GET /metrics: %s\n%s", resp.Status, b)
	}
}
