package firecracker

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/warmpool/warmpool/internal/vmlinux"
	"github.com/warmpool/warmpool/vm"
)

// BootCmdline is the kernel command line of a Firecracker guest.
// Firecracker describes its virtio-mmio devices to the kernel itself, so
// nothing device-specific belongs here: a serial console, reboot through the
// keyboard controller (so the guest's reboot ends the Firecracker process)
// and no PCI probing.
const BootCmdline = "console=ttyS0 reboot=k panic=1 pci=off"

// vmlinuxMu serialises extractions within this process; across processes
// the content-addressed name and vmlinux.Extract's atomic rename keep every
// reader on a whole file.
var vmlinuxMu sync.Mutex

// PrepareBoot implements vm.BootPreparer. Firecracker on x86_64 boots only
// an uncompressed ELF kernel and describes its devices to the kernel
// itself, so a guest image's bzImage is swapped for the vmlinux inside it
// and its command line for Firecracker's. The kernel is extracted once and
// reused while the bzImage is unchanged: the vmlinux is named after the
// bzImage's SHA-256 and lives next to it, or under StateDir/images when
// the image directory is read-only. A kernel that is an ELF already is
// booted as it is.
func (p *Provider) PrepareBoot(ctx context.Context, spec vm.Spec) (vm.Spec, error) {
	out := spec
	out.Cmdline = bootCmdline(spec.Cmdline)
	if spec.Kernel == "" || checkELF(spec.Kernel) == nil {
		return out, nil
	}
	kernel, err := p.extractKernel(spec.Kernel)
	if err != nil {
		return vm.Spec{}, err
	}
	out.Kernel = kernel
	return out, nil
}

func (p *Provider) extractKernel(bzImage string) (string, error) {
	vmlinuxMu.Lock()
	defer vmlinuxMu.Unlock()
	sum, err := kernelSum(bzImage)
	if err != nil {
		return "", fmt.Errorf("firecracker kernel from %s: %w", bzImage, err)
	}
	name := "vmlinux-" + sum[:16]
	candidates := []string{filepath.Join(filepath.Dir(bzImage), name), filepath.Join(p.opts.StateDir, "images", name)}
	for _, path := range candidates {
		if fi, err := os.Stat(path); err == nil && fi.Mode().IsRegular() {
			return path, nil
		}
	}
	var errs []error
	for _, path := range candidates {
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			errs = append(errs, err)
			continue
		}
		err := vmlinux.Extract(bzImage, path)
		if err == nil {
			p.log.Info("extracted the uncompressed kernel Firecracker boots", "from", bzImage, "to", path)
			return path, nil
		}
		// The image directory may be read-only; the state directory is not.
		errs = append(errs, err)
	}
	return "", fmt.Errorf("firecracker kernel from %s: %w", bzImage, errors.Join(errs...))
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

// bootCmdline is BootCmdline followed by the image's own
// parameters that it does not set already (such as quiet), so that what the
// image's init and agent read from the command line still reaches them.
func bootCmdline(imageCmdline string) string {
	key := func(arg string) string {
		k, _, _ := strings.Cut(arg, "=")
		return k
	}
	args := strings.Fields(BootCmdline)
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
