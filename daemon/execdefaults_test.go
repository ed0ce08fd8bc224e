package daemon

import (
	"slices"
	"testing"

	"github.com/warmpool/warmpool/agent"
	"github.com/warmpool/warmpool/store"
)

func TestExecDefaultsYieldToTheRequest(t *testing.T) {
	image := &store.ExecDefaults{Env: []string{"PATH=/app/bin:/bin", "MODE=image"}, WorkingDir: "/app", User: "app"}
	got := applyExecDefaults(image, agent.ProcessRequest{Argv: []string{"x"}})
	if !slices.Equal(got.Env, image.Env) || got.Dir != "/app" || got.User != "app" {
		t.Errorf("defaults not applied: %+v", got)
	}
	got = applyExecDefaults(image, agent.ProcessRequest{Argv: []string{"x"}, Env: []string{"MODE=request"}, Dir: "/tmp", User: "root"})
	// The agent keeps the last of two entries of one key: the request's.
	if !slices.Equal(got.Env, []string{"PATH=/app/bin:/bin", "MODE=image", "MODE=request"}) || got.Dir != "/tmp" || got.User != "root" {
		t.Errorf("request did not override: %+v", got)
	}
	if len(image.Env) != 2 {
		t.Errorf("the template's defaults were changed: %v", image.Env)
	}
	if got := applyExecDefaults(nil, agent.ProcessRequest{Argv: []string{"x"}, Dir: "/d"}); got.Dir != "/d" || got.Env != nil || got.User != "" {
		t.Errorf("busybox template changed the request: %+v", got)
	}
}
