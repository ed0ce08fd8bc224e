// Package sparse copies files that are mostly holes (guest memory, disks)
// so that a copy costs what the source holds, not its apparent size.
package sparse

import (
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// Copy copies src to dst through a temporary file renamed into place,
// leaving holes where src has holes or whole pages of zeros.
func Copy(src, dst string) error {
	return copyFile(src, dst, false)
}

// Clone is Copy that first asks the file system for a reflink (FICLONE):
// on btrfs, XFS and the like the copy then shares every block with src
// until one of them writes it, and costs nothing up front. Elsewhere it
// falls back to Copy.
func Clone(src, dst string) error {
	return copyFile(src, dst, true)
}

func copyFile(src, dst string, reflink bool) error {
	in, err := os.Open(src)
	if err != nil {
		return fmt.Errorf("copy %s: %w", src, err)
	}
	defer in.Close()
	st, err := in.Stat()
	if err != nil {
		return fmt.Errorf("copy %s: %w", src, err)
	}
	tmp := dst + ".tmp"
	out, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o644)
	if err != nil {
		return fmt.Errorf("copy %s: %w", src, err)
	}
	defer os.Remove(tmp)
	cloned := reflink && unix.IoctlFileClone(int(out.Fd()), int(in.Fd())) == nil
	if !cloned {
		if err := copyData(in, out, st.Size()); err != nil {
			out.Close()
			return fmt.Errorf("copy %s: %w", src, err)
		}
		if err := out.Truncate(st.Size()); err != nil {
			out.Close()
			return fmt.Errorf("copy %s: %w", src, err)
		}
	}
	if err := out.Close(); err != nil {
		return fmt.Errorf("copy %s: %w", src, err)
	}
	if err := os.Rename(tmp, dst); err != nil {
		return fmt.Errorf("copy %s: %w", src, err)
	}
	return nil
}

func copyData(in, out *os.File, size int64) error {
	const chunk = 1 << 20
	const page = 4096
	buf := make([]byte, chunk)
	fd := int(in.Fd())
	for off := int64(0); off < size; {
		data, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			return nil // only a hole remains
		}
		if err != nil {
			return err
		}
		hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
		if err != nil {
			return err
		}
		for pos := data; pos < hole; {
			n, err := in.ReadAt(buf[:min(int64(chunk), hole-pos)], pos)
			if err != nil && !errors.Is(err, io.EOF) {
				return err
			}
			if n == 0 {
				break
			}
			for i := 0; i < n; i += page {
				pg := buf[i:min(i+page, n)]
				if isZero(pg) {
					continue
				}
				if _, err := out.WriteAt(pg, pos+int64(i)); err != nil {
					return err
				}
			}
			pos += int64(n)
		}
		off = hole
	}
	return nil
}

func isZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
