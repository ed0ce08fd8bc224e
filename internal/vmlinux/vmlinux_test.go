package vmlinux

import (
	"bytes"
	"compress/gzip"
	"crypto/rand"
	"debug/elf"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// debianKernel returns the path of the bzImage from Debian's current cloud
// kernel package, downloaded once into the user's cache directory.
func debianKernel(t *testing.T) string {
	t.Helper()
	for _, tool := range []string{"apt-cache", "apt-get", "dpkg-deb"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("SKIPPING real-kernel test: %s not found, cannot fetch Debian's linux-image-cloud-amd64", tool)
		}
	}
	cache, err := os.UserCacheDir()
	if err != nil {
		t.Fatalf("user cache dir: %v", err)
	}
	dir := filepath.Join(cache, "warmpool", "test-kernel")
	if found, _ := filepath.Glob(filepath.Join(dir, "x", "boot", "vmlinuz-*")); len(found) > 0 {
		return found[0]
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("apt-cache", "depends", "linux-image-cloud-amd64").CombinedOutput()
	if err != nil {
		t.Skipf("SKIPPING real-kernel test: apt-cache depends linux-image-cloud-amd64: %v: %s", err, out)
	}
	m := regexp.MustCompile(`Depends: (linux-image-\S+)`).FindSubmatch(out)
	if m == nil {
		t.Fatalf("no kernel package in apt-cache output:\n%s", out)
	}
	download := exec.Command("apt-get", "download", string(m[1]))
	download.Dir = dir
	if out, err := download.CombinedOutput(); err != nil {
		t.Skipf("SKIPPING real-kernel test: apt-get download %s: %v: %s", m[1], err, out)
	}
	debs, _ := filepath.Glob(filepath.Join(dir, "*.deb"))
	if len(debs) == 0 {
		t.Fatalf("apt-get download left no .deb in %s", dir)
	}
	tmp, err := os.MkdirTemp(dir, "unpack")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(tmp)
	if out, err := exec.Command("dpkg-deb", "-x", debs[0], tmp).CombinedOutput(); err != nil {
		t.Fatalf("dpkg-deb -x %s: %v: %s", debs[0], err, out)
	}
	for _, deb := range debs {
		os.Remove(deb)
	}
	if err := os.Rename(tmp, filepath.Join(dir, "x")); err != nil {
		t.Fatal(err)
	}
	found, _ := filepath.Glob(filepath.Join(dir, "x", "boot", "vmlinuz-*"))
	if len(found) == 0 {
		t.Fatalf("package %s has no /boot/vmlinuz-*", m[1])
	}
	return found[0]
}

func TestExtractFromDebianKernel(t *testing.T) {
	bz := debianKernel(t)
	out := filepath.Join(t.TempDir(), "vmlinux")
	if err := Extract(bz, out); err != nil {
		t.Fatalf("Extract(%s): %v", bz, err)
	}
	f, err := elf.Open(out)
	if err != nil {
		t.Fatalf("output is not ELF: %v", err)
	}
	defer f.Close()
	if f.Machine != elf.EM_X86_64 || f.Type != elf.ET_EXEC {
		t.Errorf("vmlinux is %v %v, want EM_X86_64 ET_EXEC", f.Machine, f.Type)
	}
	// The kernel's version banner lives in .rodata of the uncompressed image;
	// finding the package's version in it proves we decompressed all of it
	// and not just a prefix that happens to start with an ELF header.
	version := strings.TrimPrefix(filepath.Base(bz), "vmlinuz-")
	data, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(data, []byte("Linux version "+version)) {
		t.Errorf("vmlinux (%d bytes) has no %q banner", len(data), "Linux version "+version)
	}
	bzInfo, _ := os.Stat(bz)
	if int64(len(data)) <= bzInfo.Size() {
		t.Errorf("vmlinux is %d bytes, not larger than the %d-byte bzImage", len(data), bzInfo.Size())
	}
}

func TestExtractGzipPayload(t *testing.T) {
	// Any ELF executable stands in for a kernel: the test binary itself.
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	payload, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	if f, err := elf.Open(self); err != nil || f.Type != elf.ET_EXEC {
		t.Skipf("SKIPPING: test binary is not an ELF executable (%v), cannot stand in for a kernel", err)
	}
	var image bytes.Buffer
	junk := make([]byte, 5000)
	rand.Read(junk)
	image.Write(junk)
	zw := gzip.NewWriter(&image)
	zw.Write(payload)
	zw.Close()
	image.Write([]byte{1, 2, 3, 4}) // trailer, as in a bzImage

	dir := t.TempDir()
	bz := filepath.Join(dir, "bzImage")
	if err := os.WriteFile(bz, image.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "vmlinux")
	if err := Extract(bz, out); err != nil {
		t.Fatalf("Extract: %v", err)
	}
	got, _ := os.ReadFile(out)
	if !bytes.Equal(got, payload) {
		t.Errorf("extracted %d bytes, want the %d-byte payload", len(got), len(payload))
	}
}

func TestExtractRejectsNonKernel(t *testing.T) {
	dir := t.TempDir()
	bz := filepath.Join(dir, "bzImage")
	// A gzip stream of something that is not ELF must not be accepted.
	var b bytes.Buffer
	zw := gzip.NewWriter(&b)
	zw.Write([]byte("just some text, not a kernel"))
	zw.Close()
	if err := os.WriteFile(bz, b.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "vmlinux")
	err := Extract(bz, out)
	if err == nil {
		t.Fatal("Extract accepted a gzip of plain text")
	}
	if !strings.Contains(err.Error(), bz) {
		t.Errorf("error %q does not name the input", err)
	}
	if _, statErr := os.Stat(out); !os.IsNotExist(statErr) {
		t.Errorf("a failed extraction left %s behind", out)
	}
	if left, _ := filepath.Glob(filepath.Join(dir, ".vmlinux*")); len(left) > 0 {
		t.Errorf("temporary files left: %v", left)
	}
}

func TestLZ4BlockOverlappingMatch(t *testing.T) {
	// "ab" as literals, then a match of length 6 at offset 2 that copies
	// from its own output: "abababab".
	block := []byte{0x22, 'a', 'b', 0x02, 0x00}
	got, err := lz4Block(block, nil, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != "abababab" {
		t.Errorf("got %q, want %q", got, "abababab")
	}
	if _, err := lz4Block([]byte{0x22, 'a', 'b', 0x09, 0x00}, nil, 1<<20); err == nil {
		t.Error("a match reaching before the start of the output was accepted")
	}
}
