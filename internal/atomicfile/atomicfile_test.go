package atomicfile

import (
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"
)

func TestWriteReplacesAndLeavesNoTemp(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "rec.json")
	if err := os.WriteFile(path, []byte("old"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := WriteJSON(path, 0o640, map[string]int{"a": 1}); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if string(b) != "{\n  \"a\": 1\n}\n" {
		t.Fatalf("content %q", b)
	}
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o640 {
		t.Fatalf("mode %v, want 0640", st.Mode().Perm())
	}
	onlyFile(t, dir, "rec.json")
}

func TestFailedWriteKeepsTheOldFile(t *testing.T) {
	boom := errors.New("boom")
	for name, write := range map[string]func(string) error{
		"write fails": func(p string) error {
			return Write(p, 0o600, func(w io.Writer) error {
				_, _ = w.Write([]byte("half"))
				return boom
			}, nil)
		},
		"check refuses": func(p string) error {
			return Write(p, 0o600, func(w io.Writer) error {
				_, err := w.Write([]byte("new"))
				return err
			}, func(*os.File) error { return boom })
		},
	} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "f")
			if err := os.WriteFile(path, []byte("old"), 0o600); err != nil {
				t.Fatal(err)
			}
			if err := write(path); !errors.Is(err, boom) {
				t.Fatalf("err %v, want boom", err)
			}
			if b, _ := os.ReadFile(path); string(b) != "old" {
				t.Fatalf("content %q, want the old one", b)
			}
			onlyFile(t, dir, "f")
		})
	}
}

func TestCheckSeesTheWholeContent(t *testing.T) {
	path := filepath.Join(t.TempDir(), "k")
	var seen string
	err := Write(path, 0o644, func(w io.Writer) error {
		_, err := w.Write([]byte("kernel"))
		return err
	}, func(f *os.File) error {
		b, err := io.ReadAll(io.NewSectionReader(f, 0, 1<<20))
		seen = string(b)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if seen != "kernel" {
		t.Fatalf("check saw %q: the buffer was not flushed before it", seen)
	}
}

func onlyFile(t *testing.T, dir, name string) {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 1 || entries[0].Name() != name {
		var names []string
		for _, e := range entries {
			names = append(names, e.Name())
		}
		t.Fatalf("dir holds %v, want only %s", names, name)
	}
}
