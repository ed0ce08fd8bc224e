package server

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// SetIdentity gives the guest the hostname name and what a root filesystem
// keeps of a machine's identity, so that clones of one snapshot do not
// share it: /etc/hostname, /etc/hosts (localhost and the hostname), a fresh
// random /etc/machine-id (and /var/lib/dbus/machine-id when the image has
// that file), and no saved random seed (/var/lib/systemd/random-seed), which
// would be the same in every clone. It runs after the hand-off's entropy, so
// the machine-id comes from the reseeded kernel. SSH host keys are left
// alone: an image that has them shares them (see the README).
func SetIdentity(name string) error {
	if err := unix.Sethostname([]byte(name)); err != nil {
		return err
	}
	return WriteIdentityFiles("/", name)
}

// WriteIdentityFiles is SetIdentity's part below root, without the kernel's
// hostname.
func WriteIdentityFiles(root, name string) error {
	id := make([]byte, 16)
	if _, err := rand.Read(id); err != nil {
		return fmt.Errorf("machine-id: %w", err)
	}
	files := map[string]string{
		"etc/hostname":   name + "\n",
		"etc/hosts":      "127.0.0.1\tlocalhost\n127.0.1.1\t" + name + "\n::1\tlocalhost ip6-localhost ip6-loopback\n",
		"etc/machine-id": hex.EncodeToString(id) + "\n",
	}
	if fi, err := os.Lstat(filepath.Join(root, "var/lib/dbus/machine-id")); err == nil && fi.Mode().IsRegular() {
		files["var/lib/dbus/machine-id"] = files["etc/machine-id"]
	}
	for rel, content := range files {
		if err := replaceFile(filepath.Join(root, rel), content); err != nil {
			return err
		}
	}
	if err := os.Remove(filepath.Join(root, "var/lib/systemd/random-seed")); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove the saved random seed: %w", err)
	}
	return nil
}

// replaceFile writes content to path. A regular file there is rewritten in
// place: at hand-off nothing else runs in the guest to see it half written,
// and on an image's root that is one write to a file of the writable layer
// (the template wrote these files at boot) where a new file and a rename
// would be a create, a rename and, under TCG, more kernel code the clone
// runs for the first time. Anything else at path, a symlink above all
// (Debian's /etc/hosts is none, but an image's may be), is replaced through
// a rename, not followed.
func replaceFile(path, content string) error {
	// Not O_TRUNC: the file keeps its blocks and the write lands in them,
	// where a truncate would free them and the write allocate new ones
	// (more of the file system's code a clone runs for the first time).
	if f, err := os.OpenFile(path, os.O_WRONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK, 0); err == nil {
		fi, err := f.Stat()
		if err == nil && fi.Mode().IsRegular() {
			_, err = f.WriteString(content)
			if err == nil && fi.Size() > int64(len(content)) {
				err = f.Truncate(int64(len(content)))
			}
			if cerr := f.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				return fmt.Errorf("identity file %s: %w", path, err)
			}
			return nil
		}
		f.Close()
	}
	return renameFile(path, content)
}

// renameFile writes content to path through a rename, so a reader sees
// the old file or the new one.
func renameFile(path, content string) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("identity file %s: %w", path, err)
	}
	tmp := path + ".warmpool-new"
	if err := os.WriteFile(tmp, []byte(content), 0o644); err != nil {
		return fmt.Errorf("identity file %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("identity file %s: %w", path, err)
	}
	return nil
}
