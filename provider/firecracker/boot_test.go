package firecracker

import (
	"bytes"
	"compress/gzip"
	"debug/elf"
	"encoding/binary"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/warmpool/warmpool/guest"
	"github.com/warmpool/warmpool/vm"
)

// bootProvider is a Provider with only what PrepareBoot uses: no
// Firecracker binary is needed to prepare a guest image.
func bootProvider(t *testing.T, stateDir string) *Provider {
	return &Provider{opts: Options{StateDir: stateDir}, log: slog.New(slog.NewTextHandler(t.Output(), nil))}
}

// tinyELF is the smallest executable ELF that passes for a kernel: a header
// and one loadable segment; entry marks it apart from other ones.
func tinyELF(entry uint64) []byte {
	var b bytes.Buffer
	h := elf.Header64{
		Type: uint16(elf.ET_EXEC), Machine: uint16(elf.EM_X86_64), Version: uint32(elf.EV_CURRENT),
		Entry: entry, Phoff: 64, Ehsize: 64, Phentsize: 56, Phnum: 1,
	}
	copy(h.Ident[:], elf.ELFMAG)
	h.Ident[elf.EI_CLASS] = byte(elf.ELFCLASS64)
	h.Ident[elf.EI_DATA] = byte(elf.ELFDATA2LSB)
	h.Ident[elf.EI_VERSION] = byte(elf.EV_CURRENT)
	binary.Write(&b, binary.LittleEndian, h)
	binary.Write(&b, binary.LittleEndian, elf.Prog64{Type: uint32(elf.PT_LOAD), Flags: uint32(elf.PF_R | elf.PF_X), Filesz: 120, Memsz: 120, Align: 0x1000})
	return b.Bytes()
}

// writeBzImage writes a stand-in bzImage: bytes that are not ELF, then a
// gzip stream of the kernel.
func writeBzImage(t *testing.T, path string, kernel []byte) {
	t.Helper()
	var b bytes.Buffer
	b.WriteString("MZ setup code stand-in\x00")
	zw := gzip.NewWriter(&b)
	zw.Write(kernel)
	zw.Close()
	if err := os.WriteFile(path, b.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestPrepareBootExtractsOnceAndFollowsTheKernel(t *testing.T) {
	dir, state := t.TempDir(), t.TempDir()
	ctx := t.Context()
	p := bootProvider(t, state)
	img := vm.Spec{Name: "t", VCPUs: 1, MemoryMiB: 128, Kernel: filepath.Join(dir, "vmlinuz"), Initrd: filepath.Join(dir, "initrd.img"), Cmdline: guest.DefaultCmdline}
	writeBzImage(t, img.Kernel, tinyELF(1))

	got, err := p.PrepareBoot(ctx, img)
	if err != nil {
		t.Fatal(err)
	}
	if filepath.Dir(got.Kernel) != dir || !strings.HasPrefix(filepath.Base(got.Kernel), "vmlinux-") {
		t.Fatalf("kernel %s, want a vmlinux-* next to the bzImage", got.Kernel)
	}
	if b, _ := os.ReadFile(got.Kernel); !bytes.Equal(b, tinyELF(1)) {
		t.Errorf("extracted kernel is not the bzImage's payload")
	}
	if got.Initrd != img.Initrd || got.Name != img.Name || got.VCPUs != img.VCPUs || got.MemoryMiB != img.MemoryMiB {
		t.Errorf("spec %+v changed more than kernel and command line of %+v", got, img)
	}
	if got.Cmdline != "console=ttyS0 reboot=k panic=1 pci=off quiet" {
		t.Errorf("command line %q", got.Cmdline)
	}

	// A second call reuses the file: a marker written into it survives.
	if err := os.WriteFile(got.Kernel, []byte("reused"), 0o644); err != nil {
		t.Fatal(err)
	}
	again, err := p.PrepareBoot(ctx, img)
	if err != nil || again.Kernel != got.Kernel {
		t.Fatalf("second call = %s, %v; want %s", again.Kernel, err, got.Kernel)
	}
	if b, _ := os.ReadFile(got.Kernel); string(b) != "reused" {
		t.Errorf("second call extracted again")
	}

	// A new bzImage gets its own vmlinux.
	writeBzImage(t, img.Kernel, tinyELF(2))
	newer, err := p.PrepareBoot(ctx, img)
	if err != nil {
		t.Fatal(err)
	}
	if newer.Kernel == got.Kernel {
		t.Fatalf("changed bzImage still boots %s", got.Kernel)
	}
	if b, _ := os.ReadFile(newer.Kernel); !bytes.Equal(b, tinyELF(2)) {
		t.Errorf("kernel of the changed bzImage is not its payload")
	}
}

func TestPrepareBootKeepsAnELFKernel(t *testing.T) {
	dir := t.TempDir()
	kernel := filepath.Join(dir, "vmlinux")
	if err := os.WriteFile(kernel, tinyELF(3), 0o644); err != nil {
		t.Fatal(err)
	}
	got, err := bootProvider(t, t.TempDir()).PrepareBoot(t.Context(), vm.Spec{Kernel: kernel, Cmdline: guest.DefaultCmdline})
	if err != nil || got.Kernel != kernel || got.Cmdline != BootCmdline+" quiet" {
		t.Fatalf("PrepareBoot of a vmlinux = %+v, %v; want %s booted as it is with Firecracker's command line", got, err, kernel)
	}
}

func TestPrepareBootRejectsWhatIsNoKernel(t *testing.T) {
	dir := t.TempDir()
	img := vm.Spec{Kernel: filepath.Join(dir, "vmlinuz")}
	if err := os.WriteFile(img.Kernel, []byte("neither ELF nor compressed"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := bootProvider(t, t.TempDir()).PrepareBoot(t.Context(), img); err == nil || !strings.Contains(err.Error(), img.Kernel) {
		t.Errorf("PrepareBoot of a non-kernel = %v, want an error naming %s", err, img.Kernel)
	}
	if left, _ := filepath.Glob(filepath.Join(dir, "*vmlinux*")); len(left) != 0 {
		t.Errorf("failed extraction left %v", left)
	}
}

func TestBootCmdline(t *testing.T) {
	for _, c := range []struct{ image, want string }{
		{"", BootCmdline},
		{guest.DefaultCmdline, BootCmdline + " quiet"},
		// QEMU's machine description and TSC hint do not apply; the
		// image's own parameters pass, once.
		{"console=hvc0 tsc_early_khz=2000 virtio_mmio.device=4K@0xd0000000:5 warmpool.debug quiet quiet", BootCmdline + " warmpool.debug quiet"},
	} {
		if got := bootCmdline(c.image); got != c.want {
			t.Errorf("bootCmdline(%q) = %q, want %q", c.image, got, c.want)
		}
	}
}
