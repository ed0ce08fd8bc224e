package guest

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func TestCPIOUnpacksWithSystemCpio(t *testing.T) {
	cpio, err := exec.LookPath("cpio")
	if err != nil {
		t.Skip("SKIPPING: cpio not installed (apt-get install cpio), cannot cross-check the archive format")
	}
	entries := []cpioEntry{
		{path: "bin/tool", mode: cpioFile | 0o755, data: []byte("#!/bin/sh\necho hi\n")},
		{path: "bin", mode: cpioDir | 0o755},
		{path: "bin/sh", mode: cpioSymlink | 0o777, data: []byte("tool")},
		{path: "odd", mode: cpioFile | 0o644, data: []byte("abc")}, // not a multiple of 4
		{path: "tmp", mode: cpioDir | 0o1777},
	}
	var a, b bytes.Buffer
	if err := writeCPIO(&a, entries); err != nil {
		t.Fatal(err)
	}
	// Same entries in another order give the same bytes.
	if err := writeCPIO(&b, []cpioEntry{entries[4], entries[3], entries[2], entries[1], entries[0]}); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a.Bytes(), b.Bytes()) {
		t.Error("archive depends on the order entries were given in")
	}
	dir := t.TempDir()
	cmd := exec.Command(cpio, "-idm", "--quiet")
	cmd.Dir = dir
	cmd.Stdin = bytes.NewReader(a.Bytes())
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("cpio -id: %v: %s", err, out)
	}
	got, err := os.ReadFile(filepath.Join(dir, "bin/tool"))
	if err != nil || !strings.Contains(string(got), "echo hi") {
		t.Errorf("bin/tool = %q, %v", got, err)
	}
	if target, err := os.Readlink(filepath.Join(dir, "bin/sh")); err != nil || target != "tool" {
		t.Errorf("bin/sh -> %q, %v", target, err)
	}
	if got, _ := os.ReadFile(filepath.Join(dir, "odd")); string(got) != "abc" {
		t.Errorf("odd = %q", got)
	}
	if fi, err := os.Stat(filepath.Join(dir, "bin/tool")); err != nil || fi.Mode().Perm() != 0o755 {
		t.Errorf("bin/tool mode = %v, %v", fi.Mode(), err)
	}
}

func TestCPIORejectsDuplicatesAndEscapes(t *testing.T) {
	for _, entries := range [][]cpioEntry{
		{{path: "a", mode: cpioFile}, {path: "a", mode: cpioFile}},
		{{path: "../etc/passwd", mode: cpioFile}},
		{{path: "/abs", mode: cpioFile}},
	} {
		if err := writeCPIO(&bytes.Buffer{}, entries); err == nil {
			t.Errorf("writeCPIO(%v) accepted a bad archive", entries)
		}
	}
}
