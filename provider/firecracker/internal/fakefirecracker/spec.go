// Package fakefirecracker is a stand-in for the Firecracker VMM that checks
// every API request against Firecracker's own API description and enforces
// the order of operations Firecracker documents, so that the provider can be
// tested on machines where Firecracker cannot run. It boots nothing: the
// "guest" is a guest agent served in-process over a simulated vsock socket.
package fakefirecracker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"strings"

	"github.com/getkin/kin-openapi/openapi2"
	"github.com/getkin/kin-openapi/openapi2conv"
	"github.com/getkin/kin-openapi/openapi3"
	"github.com/getkin/kin-openapi/openapi3filter"
	"github.com/getkin/kin-openapi/routers"
	"github.com/getkin/kin-openapi/routers/legacy"
	"gopkg.in/yaml.v3"
)

// SpecEnv names the environment variable that points at firecracker.yaml.
const SpecEnv = "WARMPOOL_FIRECRACKER_SPEC"

// JailedSpecName is where, relative to the jail root, the fake jailer puts
// the API description for a fake firecracker that cannot see the host's
// file system nor, the jailer having cleared it, its environment.
const JailedSpecName = "fakefirecracker-api.yaml"

// SpecPath finds Firecracker's API description: $WARMPOOL_FIRECRACKER_SPEC,
// else /fakefirecracker-api.yaml when running in the fake jailer's jail,
// else ../shared/firecracker/firecracker.yaml next to the module root this
// package was built from.
func SpecPath() (string, error) {
	if p := os.Getenv(SpecEnv); p != "" {
		return p, nil
	}
	if p := "/" + JailedSpecName; fileExists(p) {
		return p, nil
	}
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		return "", errors.New("cannot locate firecracker.yaml: set " + SpecEnv)
	}
	for dir := filepath.Dir(file); ; dir = filepath.Dir(dir) {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			p := filepath.Join(dir, "..", "shared", "firecracker", "firecracker.yaml")
			if _, err := os.Stat(p); err != nil {
				return "", fmt.Errorf("firecracker API description not found at %s (set %s): %w", p, SpecEnv, err)
			}
			return filepath.Clean(p), nil
		}
		if filepath.Dir(dir) == dir {
			return "", errors.New("cannot locate the module root to find firecracker.yaml: set " + SpecEnv)
		}
	}
}

// Spec validates requests against Firecracker's API description.
type Spec struct {
	doc    *openapi3.T
	router routers.Router
	// Version is info.version of the description, the Firecracker release
	// it describes.
	Version string
}

// LoadSpec reads a Firecracker Swagger 2.0 description and prepares it for
// request validation.
func LoadSpec(path string) (*Spec, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("load firecracker API description: %w", err)
	}
	// Swagger YAML has integer keys (response codes) that JSON cannot carry
	// and kin-openapi's types only decode from JSON, hence the detour.
	var tree any
	if err := yaml.Unmarshal(raw, &tree); err != nil {
		return nil, fmt.Errorf("parse %s: %w", path, err)
	}
	js, err := json.Marshal(stringKeys(tree))
	if err != nil {
		return nil, fmt.Errorf("convert %s to JSON: %w", path, err)
	}
	var doc2 openapi2.T
	if err := json.Unmarshal(js, &doc2); err != nil {
		return nil, fmt.Errorf("decode %s as Swagger 2.0: %w", path, err)
	}
	doc, err := openapi2conv.ToV3(&doc2)
	if err != nil {
		return nil, fmt.Errorf("convert %s to OpenAPI 3: %w", path, err)
	}
	// Firecracker deserialises every body with serde's deny_unknown_fields,
	// which the description does not say: close every object schema that
	// does not explicitly allow extra properties (the MMDS contents do).
	closeObjects(doc)
	// Clients reach the socket with whatever Host header they like.
	doc.Servers = nil
	router, err := legacy.NewRouter(doc)
	if err != nil {
		return nil, fmt.Errorf("route %s: %w", path, err)
	}
	return &Spec{doc: doc, router: router, Version: doc.Info.Version}, nil
}

func stringKeys(v any) any {
	switch x := v.(type) {
	case map[string]any:
		for k, e := range x {
			x[k] = stringKeys(e)
		}
		return x
	case map[any]any:
		m := make(map[string]any, len(x))
		for k, e := range x {
			m[fmt.Sprint(k)] = stringKeys(e)
		}
		return m
	case []any:
		for i, e := range x {
			x[i] = stringKeys(e)
		}
		return x
	}
	return v
}

func closeObjects(doc *openapi3.T) {
	seen := map[*openapi3.Schema]bool{}
	var walk func(ref *openapi3.SchemaRef)
	walk = func(ref *openapi3.SchemaRef) {
		if ref == nil || ref.Value == nil || seen[ref.Value] {
			return
		}
		s := ref.Value
		seen[s] = true
		if s.Type.Is(openapi3.TypeObject) && s.AdditionalProperties.Has == nil && s.AdditionalProperties.Schema == nil {
			closed := false
			s.AdditionalProperties.Has = &closed
		}
		for _, p := range s.Properties {
			walk(p)
		}
		walk(s.Items)
	}
	for _, s := range doc.Components.Schemas {
		walk(s)
	}
	for _, item := range doc.Paths.Map() {
		for _, op := range item.Operations() {
			if op.RequestBody != nil && op.RequestBody.Value != nil {
				for _, mt := range op.RequestBody.Value.Content {
					walk(mt.Schema)
				}
			}
		}
	}
}

// Validate checks method, path and body of r against the description. It
// consumes nothing: r.Body is restored for the handler. The returned error
// reads like a Firecracker fault message.
func (s *Spec) Validate(r *http.Request) error {
	route, params, err := s.router.FindRoute(r)
	if err != nil {
		return &Rejection{Message: fmt.Sprintf("Invalid request method and/or path: %s %s.", r.Method, r.URL.Path)}
	}
	in := &openapi3filter.RequestValidationInput{
		Request:    r,
		PathParams: params,
		Route:      route,
		Options:    &openapi3filter.Options{RejectWhenRequestBodyNotSpecified: true},
	}
	if err := openapi3filter.ValidateRequest(context.Background(), in); err != nil {
		return &Rejection{Message: "An error occurred when deserializing the json body of a request: " + oneLine(err.Error())}
	}
	return nil
}

// Rejection is a request the API description does not allow; Message reads
// like a Firecracker fault message.
type Rejection struct{ Message string }

func (r *Rejection) Error() string { return r.Message }

func oneLine(s string) string {
	s = strings.ReplaceAll(s, "\n", " ")
	return strings.Join(strings.Fields(s), " ")
}

func fileExists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}
