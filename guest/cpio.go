package guest

import (
	"fmt"
	"io"
	"slices"
	"strings"
)

// cpioEntry is one file of an initramfs. Paths are relative ("bin/sh").
type cpioEntry struct {
	path     string
	mode     uint32 // type bits included (cpioDir, cpioFile, ...)
	data     []byte // file contents, or the target of a symlink
	devMajor uint32 // character devices
	devMinor uint32
}

// File type bits of a cpio newc mode.
const (
	cpioDir     = 0o040000
	cpioFile    = 0o100000
	cpioSymlink = 0o120000
	cpioCharDev = 0o020000
)

// writeCPIO writes entries as a cpio archive in the "newc" format the kernel
// unpacks into its initial root filesystem. Entries are written sorted by
// path, so parents precede children; inode numbers are assigned in that
// order and every timestamp and owner is zero, so equal inputs give equal
// bytes.
func writeCPIO(w io.Writer, entries []cpioEntry) error {
	sorted := slices.Clone(entries)
	slices.SortFunc(sorted, func(a, b cpioEntry) int { return strings.Compare(a.path, b.path) })
	for i := 1; i < len(sorted); i++ {
		if sorted[i].path == sorted[i-1].path {
			return fmt.Errorf("initramfs: %s added twice", sorted[i].path)
		}
	}
	cw := &countingWriter{w: w}
	for i, e := range sorted {
		if e.path == "" || strings.HasPrefix(e.path, "/") || strings.Contains(e.path, "..") {
			return fmt.Errorf("initramfs: bad path %q", e.path)
		}
		nlink := uint32(1)
		if e.mode&0o170000 == cpioDir {
			nlink = 2
		}
		if err := writeCPIOHeader(cw, uint32(i+1), e.mode, nlink, uint32(len(e.data)), e.devMajor, e.devMinor, e.path); err != nil {
			return err
		}
		if _, err := cw.Write(e.data); err != nil {
			return err
		}
		if err := cw.pad4(); err != nil {
			return err
		}
	}
	return writeCPIOHeader(cw, 0, 0, 1, 0, 0, 0, "TRAILER!!!")
}

func writeCPIOHeader(cw *countingWriter, ino, mode, nlink, size, rmajor, rminor uint32, name string) error {
	// Fields: magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor,
	// devminor, rdevmajor, rdevminor, namesize (with NUL), check.
	hdr := fmt.Sprintf("070701%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x",
		ino, mode, 0, 0, nlink, 0, size, 0, 0, rmajor, rminor, len(name)+1, 0)
	if _, err := io.WriteString(cw, hdr+name+"\x00"); err != nil {
		return err
	}
	return cw.pad4()
}

type countingWriter struct {
	w io.Writer
	n int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

func (c *countingWriter) pad4() error {
	if r := c.n % 4; r != 0 {
		_, err := c.Write(make([]byte, 4-r))
		return err
	}
	return nil
}
