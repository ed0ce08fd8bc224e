package guest

import (
	"bytes"
	"compress/gzip"
	"context"
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
)

// kernelTree is an unpacked Debian kernel package.
type kernelTree struct {
	pkg     string
	root    string // where the .deb was unpacked
	release string // e.g. 6.1.0-56-cloud-amd64
	vmlinuz string
}

type kernelModule struct {
	name string // with underscores, e.g. virtio_console
	data []byte // uncompressed .ko
}

var kernelDepends = regexp.MustCompile(`(?m)^\s*Depends:\s*(linux-image-\S+)`)

func (b *builder) kernelPackage(ctx context.Context) (string, error) {
	if b.opts.KernelPackage != "" {
		return b.opts.KernelPackage, nil
	}
	if _, err := exec.LookPath("apt-cache"); err != nil {
		return "", fmt.Errorf("resolve the guest kernel: apt-cache not found (Debian's apt package), or name the kernel package (BuildOptions.KernelPackage, warmpool image build --kernel-package)")
	}
	out, err := exec.CommandContext(ctx, "apt-cache", "depends", KernelMetaPackage).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("resolve the guest kernel: apt-cache depends %s: %w: %s (run apt-get update?)", KernelMetaPackage, err, bytes.TrimSpace(out))
	}
	m := kernelDepends.FindSubmatch(out)
	if m == nil {
		return "", fmt.Errorf("resolve the guest kernel: %s depends on no linux-image package; is the package index current (apt-get update)?\n%s", KernelMetaPackage, out)
	}
	return string(m[1]), nil
}

// fetchKernel downloads and unpacks pkg into the cache once.
func (b *builder) fetchKernel(ctx context.Context, pkg string) (*kernelTree, error) {
	if strings.ContainsAny(pkg, "/ ") || strings.Contains(pkg, "..") {
		return nil, fmt.Errorf("bad kernel package name %q", pkg)
	}
	dir := filepath.Join(b.cache, "kernels", pkg)
	root := filepath.Join(dir, "root")
	if _, err := os.Stat(filepath.Join(dir, ".complete")); err != nil {
		for _, tool := range []struct{ cmd, pkg string }{{"apt-get", "apt"}, {"dpkg-deb", "dpkg"}} {
			if _, err := exec.LookPath(tool.cmd); err != nil {
				return nil, fmt.Errorf("fetch guest kernel %s: %s not found (Debian's %s package)", pkg, tool.cmd, tool.pkg)
			}
		}
		if err := os.RemoveAll(dir); err != nil {
			return nil, err
		}
		tmp := dir + ".tmp"
		_ = os.RemoveAll(tmp)
		if err := os.MkdirAll(tmp, 0o755); err != nil {
			return nil, fmt.Errorf("fetch guest kernel %s: %w", pkg, err)
		}
		defer os.RemoveAll(tmp)
		dl := exec.CommandContext(ctx, "apt-get", "download", "-q", pkg)
		dl.Dir = tmp
		if out, err := dl.CombinedOutput(); err != nil {
			return nil, fmt.Errorf("download Debian package %s: apt-get download: %w\n%s", pkg, err, out)
		}
		debs, _ := filepath.Glob(filepath.Join(tmp, "*.deb"))
		if len(debs) != 1 {
			return nil, fmt.Errorf("download Debian package %s: apt-get left %d .deb files", pkg, len(debs))
		}
		if out, err := exec.CommandContext(ctx, "dpkg-deb", "-x", debs[0], filepath.Join(tmp, "root")).CombinedOutput(); err != nil {
			return nil, fmt.Errorf("unpack %s: dpkg-deb -x: %w\n%s", filepath.Base(debs[0]), err, out)
		}
		if err := os.Remove(debs[0]); err != nil {
			return nil, err
		}
		if err := os.WriteFile(filepath.Join(tmp, ".complete"), []byte(filepath.Base(debs[0])+"\n"), 0o644); err != nil {
			return nil, err
		}
		if err := os.Rename(tmp, dir); err != nil {
			return nil, fmt.Errorf("fetch guest kernel %s: %w", pkg, err)
		}
	}
	kernels, _ := filepath.Glob(filepath.Join(root, "boot", "vmlinuz-*"))
	if len(kernels) != 1 {
		return nil, fmt.Errorf("kernel package %s: want one boot/vmlinuz-*, found %d", pkg, len(kernels))
	}
	release := strings.TrimPrefix(filepath.Base(kernels[0]), "vmlinuz-")
	return &kernelTree{pkg: pkg, root: root, release: release, vmlinuz: kernels[0]}, nil
}

// resolveModules returns the modules to load, dependencies first, each
// decompressed. Dependencies come from each module's own .modinfo, since the
// package ships no modules.dep (depmod runs at install time).
func (k *kernelTree) resolveModules(ctx context.Context, required, optional []string) ([]kernelModule, error) {
	modDir := filepath.Join(k.root, "lib", "modules", k.release)
	files := map[string]string{} // name -> path
	err := filepath.WalkDir(filepath.Join(modDir, "kernel"), func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		base := d.Name()
		if i := strings.Index(base, ".ko"); i > 0 && !d.IsDir() {
			files[strings.ReplaceAll(base[:i], "-", "_")] = path
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("modules of %s: %w", k.pkg, err)
	}
	builtin := map[string]bool{}
	if b, err := os.ReadFile(filepath.Join(modDir, "modules.builtin")); err == nil {
		for _, line := range strings.Fields(string(b)) {
			base := filepath.Base(line)
			if i := strings.Index(base, ".ko"); i > 0 {
				builtin[strings.ReplaceAll(base[:i], "-", "_")] = true
			}
		}
	}
	var order []kernelModule
	state := map[string]int{} // 1 visiting, 2 done
	var visit func(name string, chain []string) error
	visit = func(name string, chain []string) error {
		switch state[name] {
		case 1:
			return fmt.Errorf("kernel %s: module dependency cycle %s", k.pkg, strings.Join(append(chain, name), " -> "))
		case 2:
			return nil
		}
		path, ok := files[name]
		if !ok {
			if builtin[name] {
				state[name] = 2
				return nil
			}
			return fmt.Errorf("kernel package %s has no module %s (needed by %s) and does not build it in", k.pkg, name, strings.Join(append(chain, name), " -> "))
		}
		state[name] = 1
		data, err := readModule(ctx, path)
		if err != nil {
			return err
		}
		deps, err := moduleDepends(data)
		if err != nil {
			return fmt.Errorf("module %s of %s: %w", name, k.pkg, err)
		}
		for _, d := range deps {
			if err := visit(d, append(chain, name)); err != nil {
				return err
			}
		}
		state[name] = 2
		order = append(order, kernelModule{name: name, data: data})
		return nil
	}
	for _, m := range required {
		if err := visit(m, nil); err != nil {
			return nil, err
		}
	}
	for _, m := range optional {
		if _, ok := files[m]; ok {
			if err := visit(m, nil); err != nil {
				return nil, err
			}
		}
	}
	return order, nil
}

// readModule returns the uncompressed contents of a .ko, .ko.gz, .ko.xz or
// .ko.zst file. Compressed modules are unpacked on the host because the
// guest's busybox and kernel may not handle the compression.
func readModule(ctx context.Context, path string) ([]byte, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var tool, debPkg string
	switch {
	case strings.HasSuffix(path, ".ko"):
		return raw, nil
	case strings.HasSuffix(path, ".ko.gz"):
		zr, err := gzip.NewReader(bytes.NewReader(raw))
		if err != nil {
			return nil, fmt.Errorf("decompress %s: %w", path, err)
		}
		return io.ReadAll(zr)
	case strings.HasSuffix(path, ".ko.xz"):
		tool, debPkg = "xz", "xz-utils"
	case strings.HasSuffix(path, ".ko.zst"):
		tool, debPkg = "zstd", "zstd"
	default:
		return nil, fmt.Errorf("module %s: unknown compression", path)
	}
	if _, err := exec.LookPath(tool); err != nil {
		return nil, fmt.Errorf("module %s is compressed with %s: install Debian's %s package", filepath.Base(path), tool, debPkg)
	}
	cmd := exec.CommandContext(ctx, tool, "-dc")
	cmd.Stdin = bytes.NewReader(raw)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("decompress %s: %s -dc: %w: %s", path, tool, err, stderr.Bytes())
	}
	return out, nil
}

// moduleDepends reads the depends= entry of a module's .modinfo section.
func moduleDepends(ko []byte) ([]string, error) {
	f, err := elf.NewFile(bytes.NewReader(ko))
	if err != nil {
		return nil, fmt.Errorf("not an ELF module: %w", err)
	}
	sec := f.Section(".modinfo")
	if sec == nil {
		return nil, errors.New("no .modinfo section")
	}
	info, err := sec.Data()
	if err != nil {
		return nil, err
	}
	for _, kv := range bytes.Split(info, []byte{0}) {
		if v, ok := bytes.CutPrefix(kv, []byte("depends=")); ok {
			var deps []string
			for _, d := range strings.Split(string(v), ",") {
				if d = strings.TrimSpace(d); d != "" {
					deps = append(deps, strings.ReplaceAll(d, "-", "_"))
				}
			}
			return deps, nil
		}
	}
	return nil, nil
}

// isStaticELF reports whether b is an ELF executable without an interpreter.
func isStaticELF(b []byte) bool {
	f, err := elf.NewFile(bytes.NewReader(b))
	if err != nil {
		return false
	}
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return false
		}
	}
	return true
}
