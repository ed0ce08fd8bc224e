// Package atomicfile replaces a file through a temporary file next to it
// and a rename, so that a reader, or the next start after a crash, finds
// the old content or the new, never part of it, and a failed write leaves
// no temporary file behind.
package atomicfile

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
)

// Write replaces path with what write produces, with permissions perm.
// check, when set, sees the finished temporary file before it is renamed
// into place; its error keeps the old file.
func Write(path string, perm fs.FileMode, write func(io.Writer) error, check func(*os.File) error) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*.tmp")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	defer os.Remove(tmp.Name())
	fail := func(err error) error {
		tmp.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	bw := bufio.NewWriterSize(tmp, 1<<20)
	if err := write(bw); err != nil {
		return fail(err)
	}
	if err := bw.Flush(); err != nil {
		return fail(err)
	}
	if check != nil {
		if err := check(tmp); err != nil {
			return fail(err)
		}
	}
	if err := tmp.Chmod(perm); err != nil {
		return fail(err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

// WriteBytes replaces path with b.
func WriteBytes(path string, perm fs.FileMode, b []byte) error {
	return Write(path, perm, func(w io.Writer) error {
		_, err := w.Write(b)
		return err
	}, nil)
}

// WriteJSON replaces path with v as indented JSON and a final newline.
func WriteJSON(path string, perm fs.FileMode, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return fmt.Errorf("encode %s: %w", filepath.Base(path), err)
	}
	return WriteBytes(path, perm, append(b, '\n'))
}
