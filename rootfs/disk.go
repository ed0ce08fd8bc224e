package rootfs

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// ErrTooBig is returned (wrapped) when the files do not fit the disk size
// asked for.
var ErrTooBig = errors.New("root filesystem does not fit the disk size")

const blockSize = 4096

// usage is what a tree needs on an ext4 disk, roughly: its files' blocks
// and its inodes.
type usage struct {
	bytes  int64 // file content rounded up to blocks, plus a block per directory
	inodes int64
}

func measure(dir string) (usage, error) {
	var u usage
	err := filepath.WalkDir(dir, func(_ string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		u.inodes++
		switch {
		case d.Type().IsRegular():
			fi, err := d.Info()
			if err != nil {
				return err
			}
			u.bytes += (fi.Size() + blockSize - 1) / blockSize * blockSize
		case d.IsDir():
			u.bytes += blockSize
		}
		return nil
	})
	if err != nil {
		return usage{}, fmt.Errorf("measure root filesystem %s: %w", dir, err)
	}
	return u, nil
}

// diskSize is the disk size in MiB: sizeMiB when given (after checking the
// tree fits), else the tree's size with room for ext4's metadata.
func diskSize(u usage, sizeMiB int) (int, error) {
	// Inode tables (256 bytes an inode), a quarter more inodes than
	// files, group descriptors and bitmaps: a tenth on top, and 8 MiB.
	need := u.bytes + u.bytes/10 + (u.inodes+u.inodes/4+1024)*256 + 8<<20
	needMiB := int((need + 1<<20 - 1) >> 20)
	if sizeMiB == 0 {
		return needMiB, nil
	}
	if needMiB > sizeMiB {
		return 0, fmt.Errorf("%w: its files need about %d MiB, --size is %d MiB", ErrTooBig, needMiB, sizeMiB)
	}
	return sizeMiB, nil
}

// makeExt4 writes dir's files into a new ext4 image at out, without
// mounting anything: mkfs.ext4 -d copies the tree (owners, modes, times,
// symlinks, devices) into the filesystem it creates. uuid fixes the
// filesystem's UUID and directory hash seed, and E2FSPROGS_FAKE_TIME its
// timestamps, so equal trees give equal images. No journal: the disk is
// read-only.
func makeExt4(ctx context.Context, dir, out string, u usage, sizeMiB int, uuid string, progress func(string, int64, int64)) error {
	mkfs, err := exec.LookPath("mkfs.ext4")
	if err != nil {
		if _, statErr := os.Stat("/usr/sbin/mkfs.ext4"); statErr != nil {
			return fmt.Errorf("building a root filesystem needs mkfs.ext4 (Debian's e2fsprogs): %w", err)
		}
		mkfs = "/usr/sbin/mkfs.ext4"
	}
	inodes := u.inodes + u.inodes/4 + 1024
	cmd := exec.CommandContext(ctx, mkfs, "-q", "-F", "-t", "ext4", "-b", fmt.Sprint(blockSize), "-m", "0",
		"-N", fmt.Sprint(inodes), "-O", "^has_journal", "-U", uuid, "-L", "warmpool-root",
		"-E", "root_owner=0:0,hash_seed="+uuid+",lazy_itable_init=0,nodiscard",
		"-d", dir, out, fmt.Sprintf("%dM", sizeMiB))
	cmd.Env = append(os.Environ(), "E2FSPROGS_FAKE_TIME=1")
	done := make(chan struct{})
	go func() {
		t := time.NewTicker(200 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				if fi, err := os.Stat(out); err == nil {
					if st, ok := fi.Sys().(*syscall.Stat_t); ok {
						progress("write ext4 disk", min(st.Blocks*512, u.bytes), u.bytes)
					}
				}
			}
		}
	}()
	msg, err := cmd.CombinedOutput()
	close(done)
	if err != nil {
		text := strings.TrimSpace(string(msg))
		if strings.Contains(text, "Could not allocate") || strings.Contains(text, "No space left") || strings.Contains(text, "inodes") && strings.Contains(text, "not enough") {
			return fmt.Errorf("%w: %d MiB: mkfs.ext4: %s", ErrTooBig, sizeMiB, text)
		}
		return fmt.Errorf("build ext4 disk from %s: %s: %w", dir, text, err)
	}
	progress("write ext4 disk", u.bytes, u.bytes)
	return settleTimes(ctx, mkfs, dir, out)
}

// settleTimes gives every inode of the image at out the access and change
// times of its modification time in dir. mkfs.ext4 -d copies all three
// from the tree, and the tree's change times (and access times, which
// reading it for the copy updates) are those of the build, so without this
// two builds of the same inputs would differ in them.
func settleTimes(ctx context.Context, mkfs, dir, out string) error {
	var script strings.Builder
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(dir, path)
		if err != nil {
			return err
		}
		name := "/" + filepath.ToSlash(rel)
		if rel == "." {
			name = "/"
		}
		// debugfs reads one command per line and strips quotes; a name
		// it cannot be given keeps the build's times.
		if strings.ContainsAny(name, "\"\n\r\\") {
			return nil
		}
		when := fmt.Sprintf("@%d", fi.ModTime().Unix())
		fmt.Fprintf(&script, "sif \"%s\" atime %s\nsif \"%s\" ctime %s\n", name, when, name, when)
		return nil
	})
	if err != nil {
		return fmt.Errorf("settle times of %s: %w", out, err)
	}
	debugfs := filepath.Join(filepath.Dir(mkfs), "debugfs")
	if _, err := os.Stat(debugfs); err != nil {
		if debugfs, err = exec.LookPath("debugfs"); err != nil {
			return fmt.Errorf("building a root filesystem needs debugfs (Debian's e2fsprogs): %w", err)
		}
	}
	cmd := exec.CommandContext(ctx, debugfs, "-w", "-f", "-", out)
	cmd.Stdin = strings.NewReader(script.String())
	cmd.Env = append(os.Environ(), "E2FSPROGS_FAKE_TIME=1")
	if msg, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("settle times of %s: debugfs: %s: %w", out, strings.TrimSpace(string(msg)), err)
	}
	return nil
}

func owner(fi fs.FileInfo) (uint32, uint32) {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Uid, st.Gid
	}
	return 0, 0
}
