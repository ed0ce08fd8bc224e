package tarball

import (
	"archive/tar"
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func archive(t *testing.T, entries ...tar.Header) *bytes.Buffer {
	t.Helper()
	var b bytes.Buffer
	tw := tar.NewWriter(&b)
	for _, h := range entries {
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatal(err)
		}
		if h.Typeflag == tar.TypeReg {
			tw.Write(bytes.Repeat([]byte("x"), int(h.Size)))
		}
	}
	tw.Close()
	return &b
}

// Nothing in an archive lands outside the directory it is unpacked into:
// not through "..", not through a symlink the archive made first.
func TestExtractRefusesEscapes(t *testing.T) {
	outside := t.TempDir()
	for name, entries := range map[string][]tar.Header{
		"dotdot": {{Name: "../evil", Typeflag: tar.TypeReg, Mode: 0o644, Size: 1}},
		"absolute-symlink": {
			{Name: "link", Typeflag: tar.TypeSymlink, Linkname: outside},
			{Name: "link/evil", Typeflag: tar.TypeReg, Mode: 0o644, Size: 1},
		},
		"relative-symlink": {
			{Name: "up", Typeflag: tar.TypeSymlink, Linkname: "../../../../../../../../" + outside},
			{Name: "up/evil", Typeflag: tar.TypeReg, Mode: 0o644, Size: 1},
		},
	} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			root, err := os.OpenRoot(dir)
			if err != nil {
				t.Fatal(err)
			}
			defer root.Close()
			if err := Extract(root, archive(t, entries...), 0, false, nil); err == nil {
				t.Error("an escaping archive unpacked without an error")
			}
			if _, err := os.Stat(filepath.Join(outside, "evil")); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("%s/evil exists: %v", outside, err)
			}
			if _, err := os.Stat(filepath.Join(filepath.Dir(dir), "evil")); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("../evil exists: %v", err)
			}
		})
	}
}

func TestWriteExtractRoundTrip(t *testing.T) {
	src := t.TempDir()
	os.MkdirAll(filepath.Join(src, "d"), 0o711)
	os.WriteFile(filepath.Join(src, "d", "f"), []byte("hello"), 0o755)
	os.Chmod(filepath.Join(src, "d", "f"), 0o755|os.ModeSetuid)
	os.Symlink("d/f", filepath.Join(src, "l"))
	old := time.Date(2019, 1, 1, 0, 0, 0, 0, time.UTC)
	os.Chtimes(filepath.Join(src, "d", "f"), old, old)
	os.Chtimes(filepath.Join(src, "d"), old, old)
	var b bytes.Buffer
	if err := Write(&b, src, "top", nil); err != nil {
		t.Fatal(err)
	}
	dst := t.TempDir()
	root, _ := os.OpenRoot(dst)
	defer root.Close()
	if err := Extract(root, &b, 1, false, nil); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(filepath.Join(dst, "d", "f"))
	if err != nil || fi.Mode() != 0o755|os.ModeSetuid || !fi.ModTime().Equal(old) {
		t.Errorf("d/f: %v %v", fi, err)
	}
	if di, err := os.Stat(filepath.Join(dst, "d")); err != nil || di.Mode().Perm() != 0o711 || !di.ModTime().Equal(old) {
		t.Errorf("d: %v %v", di, err)
	}
	if l, err := os.Readlink(filepath.Join(dst, "l")); err != nil || l != "d/f" {
		t.Errorf("l: %q %v", l, err)
	}
}
