package api_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"net/http"
	"reflect"
	"testing"

	"github.com/warmpool/warmpool/api"
)

// FuzzDecodeRequest feeds arbitrary bodies to the decoder of every request
// type. A body is either rejected with a 4xx *api.Error, or accepted as a
// request that passes its own validation and survives a JSON round trip
// unchanged, so nothing the server accepts is lost or reinterpreted.
func FuzzDecodeRequest(f *testing.F) {
	seeds := []string{
		``, `{}`, `null`, `[]`, `"x"`, `{"template":"base","min":1,"max":2}`,
		`{"template":"base","min":1,"max":2,"max_age":"5m"}`,
		`{"template":"base","min":-1,"max":2}`, `{"template":"../x","min":0,"max":1}`,
		`{"template":"base","min":1,"max":2} {}`, `{"template":"base","extra":1}`,
		`{"owner":"ci","ttl":"1h"}`, `{"ttl":-1}`, `{"ttl":"-1s"}`,
		`{"argv":["echo","hi"],"env":["A=1"],"stdin":"aGk=","timeout":"5s"}`,
		`{"argv":[]}`, `{"argv":["x"],"stdin":"%%"}`,
		`{"name":"t","image":"/srv/img","vcpus":2,"memory_mib":512}`, `{"name":"t","image":"rel"}`,
		`{"vcpus":1,"memory_mib":256,"data_disk_mib":1024,"idle_after":"0s","suspend_after":"1h"}`,
		`{"vcpus":1,"memory_mib":256,"cmdline":"a\u0000b"}`,
		`{"force":true}`, `{"owner":"me","ttl":"30s"}`,
		`{"min":1e999}`, `{"min":18446744073709551616}`, "{\"template\":\"\xff\"}",
	}
	for _, s := range seeds {
		f.Add([]byte(s))
	}
	targets := []func() any{
		func() any { return new(api.PoolRequest) },
		func() any { return new(api.AcquireRequest) },
		func() any { return new(api.ExecRequest) },
		func() any { return new(api.TemplateRequest) },
		func() any { return new(api.MachineRequest) },
		func() any { return new(api.HoldRequest) },
		func() any { return new(api.StopRequest) },
	}
	const limit = 4 << 10
	f.Fuzz(func(t *testing.T, body []byte) {
		for _, newTarget := range targets {
			v := newTarget()
			err := api.DecodeRequest(bytes.NewReader(body), limit, v, false)
			if err != nil {
				var e *api.Error
				if !errors.As(err, &e) {
					t.Fatalf("%T: error %v is not an *api.Error", v, err)
				}
				if e.Status < 400 || e.Status > 499 || e.Code == "" || e.Message == "" {
					t.Fatalf("%T: error %+v is not a complete 4xx", v, e)
				}
				if len(body) > limit && e.Status != http.StatusRequestEntityTooLarge && e.Status != http.StatusBadRequest {
					t.Fatalf("%T: body of %d bytes gave %d", v, len(body), e.Status)
				}
				continue
			}
			if val, ok := v.(api.Validator); ok {
				if err := val.Validate(); err != nil {
					t.Fatalf("%T: accepted a request that fails validation: %v", v, err)
				}
			}
			again, err := json.Marshal(v)
			if err != nil {
				t.Fatalf("%T: accepted request does not encode: %v", v, err)
			}
			w := newTarget()
			if err := api.DecodeRequest(bytes.NewReader(again), 1<<20, w, false); err != nil {
				t.Fatalf("%T: re-encoded request %s is rejected: %v", v, again, err)
			}
			if !reflect.DeepEqual(normalize(v), normalize(w)) {
				t.Fatalf("%T: round trip changed the request:\n%#v\n%#v", v, v, w)
			}
		}
	})
}

// normalize treats nil and empty slices alike: omitempty drops both.
func normalize(v any) any {
	b, _ := json.Marshal(v)
	var m any
	_ = json.Unmarshal(b, &m)
	return m
}

func TestDecodeRequestOptionalBody(t *testing.T) {
	var req api.AcquireRequest
	if err := api.DecodeRequest(bytes.NewReader(nil), 1024, &req, true); err != nil {
		t.Fatalf("empty optional body: %v", err)
	}
	err := api.DecodeRequest(bytes.NewReader(nil), 1024, &req, false)
	var e *api.Error
	if !errors.As(err, &e) || e.Status != http.StatusBadRequest {
		t.Fatalf("empty required body: got %v, want a 400", err)
	}
}
