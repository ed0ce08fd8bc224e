package daemon

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/warmpool/warmpool/guest"
)

// vmlinuxMu serialises extractions within this process; across processes
// the content-addressed name and ExtractVMLinux's atomic rename keep every
// reader on a whole file.
var vmlinuxMu sync.Mutex

// forProvider returns img as the daemon's provider boots it. Firecracker on
// x86_64 boots only an uncompressed ELF kernel and describes its devices to
// the kernel itself, so under it the image's bzImage is swapped for the
// vmlinux inside it and the command line for Firecracker's.
func (d *Daemon) forProvider(img guest.Image) (guest.Image, error) {
	if d.prov.Name() != "firecracker" {
		return img, nil
	}
	return firecrackerImage(img, d.stateDir, d.log)
}

// firecrackerImage extracts img's kernel once and reuses the result while
// the bzImage is unchanged: the vmlinux is named after the bzImage's
// SHA-256 and lives next to it, or under stateDir/images when the image
// directory is read-only. img.Digest stays the image's, so templates and
// machines built before and after the extraction agree on what they booted.
func firecrackerImage(img guest.Image, stateDir string, log *slog.Logger) (guest.Image, error) {
	vmlinuxMu.Lock()
	defer vmlinuxMu.Unlock()
	sum, err := kernelSum(img.Kernel)
	if err != nil {
		return guest.Image{}, fmt.Errorf("firecracker kernel from %s: %w", img.Kernel, err)
	}
	name := "vmlinux-" + sum[:16]
	candidates := []string{filepath.Join(filepath.Dir(img.Kernel), name), filepath.Join(stateDir, "images", name)}
	out := img
	out.Cmdline = firecrackerCmdline(img.Cmdline)
	for _, path := range candidates {
		if fi, err := os.Stat(path); err == nil && fi.Mode().IsRegular() {
			out.Kernel = path
			return out, nil
		}
	}
	var errs []error
	for _, path := range candidates {
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			errs = append(errs, err)
			continue
		}
		err := guest.ExtractVMLinux(img.Kernel, path)
		if err == nil {
			log.Info("extracted the uncompressed kernel Firecracker boots", "from", img.Kernel, "to", path)
			out.Kernel = path
			return out, nil
		}
		// The image directory may be read-only; the state directory is not.
		errs = append(errs, err)
	}
	return guest.Image{}, fmt.Errorf("firecracker kernel from %s: %w", img.Kernel, errors.Join(errs...))
}

// kernelSum is the hex SHA-256 of the file at path. It is computed on
// every call (a bzImage hashes in milliseconds): size and modification time
// could miss a kernel rewritten within one clock tick.
func kernelSum(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// qemuOnlyArgs are kernel parameters that describe QEMU's machine and would
// mislead a Firecracker guest (Firecracker adds its own virtio_mmio.device
// entries; the TSC rate hint is for TCG).
var qemuOnlyArgs = map[string]bool{"tsc_early_khz": true, "virtio_mmio.device": true}

// firecrackerCmdline is guest.FirecrackerCmdline followed by the image's own
// parameters that it does not set already (such as quiet), so that what the
// image's init and agent read from the command line still reaches them.
func firecrackerCmdline(imageCmdline string) string {
	key := func(arg string) string {
		k, _, _ := strings.Cut(arg, "=")
		return k
	}
	args := strings.Fields(guest.FirecrackerCmdline)
	have := map[string]bool{}
	for _, a := range args {
		have[key(a)] = true
	}
	for _, a := range strings.Fields(imageCmdline) {
		if k := key(a); !have[k] && !qemuOnlyArgs[k] {
			have[k] = true
			args = append(args, a)
		}
	}
	return strings.Join(args, " ")
}
