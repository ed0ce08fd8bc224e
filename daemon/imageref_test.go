package daemon

import (
	"errors"
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
