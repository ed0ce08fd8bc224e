package daemon

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/warmpool/warmpool/api"
	"github.com/warmpool/warmpool/vm"
)

// A template or machine naming an image nobody built, or a disk no template
// could have, is refused with a clear error and nothing is recorded.
func TestUnknownImageAndBadDiskAreRefused(t *testing.T) {
	r := startFake(t, t.TempDir(), newFakeProvider(), "")
	c := r.client
	_, err := c.BuildTemplate(ctxT(t), api.TemplateRequest{Name: "py", Image: "wp-images-test-no-such-image"}, nil)
	if err == nil || !strings.Contains(err.Error(), "no image of that name") {
		t.Errorf("template from an unknown image = %v", err)
	}
	_, err = c.BuildTemplate(ctxT(t), api.TemplateRequest{Name: "py", DiskMiB: 8}, nil)
	if !errors.Is(err, vm.ErrInvalid) || !strings.Contains(err.Error(), "disk_mib") {
		t.Errorf("template with an 8 MiB disk = %v, want invalid disk_mib", err)
	}
	_, err = c.BuildTemplate(ctxT(t), api.TemplateRequest{Name: "py", Image: "../images/x"}, nil)
	if !errors.Is(err, vm.ErrInvalid) {
		t.Errorf("template from image ../images/x = %v, want invalid", err)
	}
	if tpls, _ := c.Templates(ctxT(t)); len(tpls) != 0 {
		t.Errorf("refused templates were recorded: %+v", tpls)
	}
	img := "wp-images-test-no-such-image"
	if _, err := c.EnsureMachine(ctxT(t), "dev", api.MachineEnsureRequest{Image: &img}); err == nil || !strings.Contains(err.Error(), "no image of that name") {
		t.Errorf("machine from an unknown image = %v", err)
	}
	if ms, _ := c.Machines(ctxT(t)); len(ms) != 0 {
		t.Errorf("a machine of an unknown image was recorded: %+v", ms)
	}
}

// PUT of a machine and a config's machines are refused alike when they name
// an image nobody built, before anything is recorded: a config with one
// such machine records none of its machines.
func TestMachineOfAnUnknownImageIsNeverRecorded(t *testing.T) {
	dir := t.TempDir()
	r := startFake(t, dir, newFakeProvider(), "")
	c := r.client
	req := api.MachineRequest{VCPUs: 1, MemoryMiB: 256, Image: "wp-images-test-no-such-image"}
	_, err := c.PutMachine(ctxT(t), "dev", req)
	if !errors.Is(err, vm.ErrInvalid) || !strings.Contains(err.Error(), "no image of that name") {
		t.Errorf("PUT of a machine of an unknown image = %v, want invalid image", err)
	}
	if ms, _ := c.Machines(ctxT(t)); len(ms) != 0 {
		t.Errorf("PUT recorded a machine of an unknown image: %+v", ms)
	}
	r.stop(t)

	cfg := "machines:\n  a: {vcpus: 1, memory_mib: 256}\n  b: {vcpus: 1, memory_mib: 256, image: wp-images-test-no-such-image}\n"
	cfgFile := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(cfgFile, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = Open(ctxT(t), Options{StateDir: dir, Provider: "fake", Logger: testLogger(t), provider: newFakeProvider(), ConfigFile: cfgFile})
	if err == nil || !strings.Contains(err.Error(), "machine b") || !strings.Contains(err.Error(), "no image of that name") {
		t.Fatalf("daemon with a config machine of an unknown image = %v, want it refused naming machine b", err)
	}
	r = startFake(t, dir, newFakeProvider(), "")
	if ms, _ := r.client.Machines(ctxT(t)); len(ms) != 0 {
		t.Errorf("the refused config recorded machines: %+v", ms)
	}
}
