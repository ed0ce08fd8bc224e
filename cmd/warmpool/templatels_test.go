package main

import (
	"bytes"
	"strings"
	"testing"

	"github.com/warmpool/warmpool/api"
)

// template ls shows which image each template boots: its name and source,
// or the source alone, and the writable disk of an image's template.
func TestTemplateListShowsTheImage(t *testing.T) {
	ts := []api.Template{
		{Name: "py", VCPUs: 1, MemoryMiB: 256, ImageName: "py311", ImageSource: "debian:bookworm", DiskMiB: 1024, Image: "/cache/images/ab12"},
		{Name: "base", VCPUs: 1, MemoryMiB: 256, ImageSource: "busybox", Image: "/cache/images/cd34"},
	}
	var out bytes.Buffer
	if err := printTemplates(&out, &globals{}, ts, false); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) != 3 || !strings.HasSuffix(strings.TrimSpace(lines[0]), "IMAGE") {
		t.Fatalf("template ls:\n%s", out.String())
	}
	if !strings.HasSuffix(lines[1], "py311 (debian:bookworm)") || !strings.Contains(lines[1], "1024MiB") {
		t.Errorf("row of an image's template %q, want its disk and py311 (debian:bookworm)", lines[1])
	}
	if !strings.HasSuffix(lines[2], " busybox") {
		t.Errorf("row of the default image's template %q, want busybox", lines[2])
	}
}
