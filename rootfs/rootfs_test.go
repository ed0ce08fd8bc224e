package rootfs_test

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/warmpool/warmpool/guest"
	"github.com/warmpool/warmpool/rootfs"
)

// fakeBase is a stand-in for the busybox image: rootfs.Build only takes
// its kernel and initramfs files and its digest.
func fakeBase(t *testing.T) guest.Image {
	t.Helper()
	dir := t.TempDir()
	img := guest.Image{Dir: dir, Kernel: filepath.Join(dir, "vmlinuz"), Initrd: filepath.Join(dir, "initrd.img"), Cmdline: guest.DefaultCmdline, Digest: "base0123456789abcdef"}
	for _, f := range []string{img.Kernel, img.Initrd} {
		if err := os.WriteFile(f, []byte("not a real "+filepath.Base(f)), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return img
}

func needE2fsprogs(t *testing.T) {
	t.Helper()
	for _, tool := range []string{"mkfs.ext4", "debugfs"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed (Debian's e2fsprogs; scripts/deps.sh installs it)", tool)
		}
	}
}

// debugfs runs one debugfs request against an ext4 image, read-only.
func debugfs(t *testing.T, disk, request string) string {
	t.Helper()
	out, err := exec.Command("debugfs", "-R", request, disk).CombinedOutput()
	if err != nil {
		t.Fatalf("debugfs -R %q %s: %v\n%s", request, disk, err, out)
	}
	return string(out)
}

// assertNothingCached fails when dir holds anything but lock files and the
// directories they are in.
func assertNothingCached(t *testing.T, dir string) {
	t.Helper()
	var left []string
	_ = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || d.Name() == ".lock" {
			return nil
		}
		rel, _ := filepath.Rel(dir, p)
		left = append(left, rel)
		return nil
	})
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		if e.IsDir() && strings.HasPrefix(e.Name(), ".") {
			left = append(left, e.Name()+"/")
		}
	}
	if len(left) > 0 {
		t.Errorf("a failed build left %v in %s", left, dir)
	}
}

type entry struct {
	name     string
	typ      byte
	body     string
	link     string
	mode     int64
	uid, gid int
}

func file(name, body string) entry {
	return entry{name: name, typ: tar.TypeReg, body: body, mode: 0o644}
}
func dir(name string) entry { return entry{name: name, typ: tar.TypeDir, mode: 0o755} }
func symlink(name, to string) entry {
	return entry{name: name, typ: tar.TypeSymlink, link: to, mode: 0o777}
}
func executable(name string) entry {
	return entry{name: name, typ: tar.TypeReg, body: "#!/bin/true\n", mode: 0o755}
}
func whiteout(name string) entry {
	return file(filepath.Join(filepath.Dir(name), ".wh."+filepath.Base(name)), "")
}
func opaque(dirName string) entry       { return file(dirName+"/.wh..wh..opq", "") }
func owned(e entry, uid, gid int) entry { e.uid, e.gid = uid, gid; return e }

func tarOf(t *testing.T, entries ...entry) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		hdr := &tar.Header{Name: e.name, Typeflag: e.typ, Mode: e.mode, Linkname: e.link, Size: int64(len(e.body)), Uid: e.uid, Gid: e.gid, ModTime: time.Unix(1700000000, 0)}
		if e.typ != tar.TypeReg {
			hdr.Size = 0
		}
		if err := tw.WriteHeader(hdr); err != nil {
			t.Fatal(err)
		}
		if e.typ == tar.TypeReg {
			if _, err := io.WriteString(tw, e.body); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func layerOf(t *testing.T, entries ...entry) v1.Layer {
	t.Helper()
	data := tarOf(t, entries...)
	l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(data)), nil })
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func imageOf(t *testing.T, cfg v1.Config, layers ...v1.Layer) v1.Image {
	t.Helper()
	img, err := mutate.AppendLayers(empty.Image, layers...)
	if err != nil {
		t.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cf = cf.DeepCopy()
	cf.Config = cfg
	cf.OS, cf.Architecture = "linux", "amd64"
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// writeOCIArchive writes img as skopeo's oci-archive: a tarball of an OCI
// image layout.
func writeOCIArchive(t *testing.T, img v1.Image) string {
	t.Helper()
	return writeOCIArchiveEdited(t, img, nil)
}

// writeOCIArchiveEdited lets edit change the layout before it is packed.
func writeOCIArchiveEdited(t *testing.T, img v1.Image, edit func(layoutDir string)) string {
	t.Helper()
	lay := filepath.Join(t.TempDir(), "layout")
	p, err := layout.Write(lay, empty.Index)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.AppendImage(img); err != nil {
		t.Fatal(err)
	}
	if edit != nil {
		edit(lay)
	}
	out := filepath.Join(t.TempDir(), "image.oci.tar")
	if msg, err := exec.Command("tar", "-C", lay, "-cf", out, ".").CombinedOutput(); err != nil {
		t.Fatalf("tar the layout: %v\n%s", err, msg)
	}
	return out
}

func writeDockerArchive(t *testing.T, img v1.Image) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), "image.docker.tar")
	if err := tarball.WriteToFile(out, name.MustParseReference("warmpool.test/small:1"), img); err != nil {
		t.Fatal(err)
	}
	return out
}

// smallImage has three layers: a base, a layer that deletes a file and
// replaces a directory's contents (whiteout and opaque whiteout), and one
// that adds files; its config sets Env, WorkingDir, User and Cmd.
func smallImage(t *testing.T) v1.Image {
	return imageOf(t,
		v1.Config{Env: []string{"PATH=/usr/bin:/bin", "GREETING=hello from the image"}, WorkingDir: "/work", User: "1000:1000", Entrypoint: []string{"/bin/sh", "-c"}, Cmd: []string{"echo hi"}},
		layerOf(t, dir("bin"), executable("bin/busybox"), symlink("bin/sh", "busybox"), dir("etc"),
			file("etc/removed", "gone in layer 2"), file("etc/kept", "still here"),
			dir("opq"), file("opq/old", "hidden by the opaque whiteout")),
		layerOf(t, whiteout("etc/removed"), opaque("opq"), file("opq/new", "layer 2")),
		layerOf(t, dir("work"), owned(file("work/data.txt", "42\n"), 1000, 1000), file("etc/kept", "replaced in layer 3")),
	)
}

func buildFrom(t *testing.T, cache string, src rootfs.Source, size int) (guest.Image, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	return rootfs.Build(ctx, rootfs.Options{Source: src, Base: fakeBase(t), CacheDir: cache, SizeMiB: size})
}

func TestImageArchivesApplyLayersInOrderAndKeepTheConfig(t *testing.T) {
	needE2fsprogs(t)
	img := smallImage(t)
	for _, src := range []rootfs.Source{
		{Kind: rootfs.KindOCIArchive, Arg: writeOCIArchive(t, img)},
		{Kind: rootfs.KindDockerArchive, Arg: writeDockerArchive(t, img)},
	} {
		t.Run(src.Kind, func(t *testing.T) {
			cache := t.TempDir()
			got, err := buildFrom(t, cache, src, 0)
			if err != nil {
				t.Fatal(err)
			}
			disk := got.Rootfs.Path
			etc := debugfs(t, disk, "ls /etc")
			if strings.Contains(etc, "removed") || !strings.Contains(etc, "kept") {
				t.Errorf("/etc after the whiteout: %s", etc)
			}
			if out := debugfs(t, disk, "cat /etc/kept"); !strings.Contains(out, "replaced in layer 3") {
				t.Errorf("/etc/kept is %q, want layer 3's", out)
			}
			if opq := debugfs(t, disk, "ls /opq"); strings.Contains(opq, "old") || !strings.Contains(opq, "new") {
				t.Errorf("/opq after the opaque whiteout: %s", opq)
			}
			if out := debugfs(t, disk, "stat /work/data.txt"); !strings.Contains(out, "User:  1000") || !strings.Contains(out, "Group:  1000") {
				t.Errorf("owner of /work/data.txt: %s", out)
			}
			if out := debugfs(t, disk, "stat /bin/sh"); !strings.Contains(out, "Fast link dest: \"busybox\"") {
				t.Errorf("/bin/sh: %s", out)
			}
			want := guest.ExecDefaults{Env: []string{"PATH=/usr/bin:/bin", "GREETING=hello from the image"}, WorkingDir: "/work", User: "1000:1000", Entrypoint: []string{"/bin/sh", "-c"}, Cmd: []string{"echo hi"}}
			loaded, err := guest.Load(got.Dir)
			if err != nil {
				t.Fatal(err)
			}
			if e := loaded.Rootfs.Exec; !slices.Equal(e.Env, want.Env) || e.WorkingDir != want.WorkingDir || e.User != want.User || !slices.Equal(e.Entrypoint, want.Entrypoint) || !slices.Equal(e.Cmd, want.Cmd) {
				t.Errorf("exec defaults in image.json: %+v, want %+v", e, want)
			}
			if loaded.Source != src.String() || loaded.Rootfs.Format != "ext4" {
				t.Errorf("source %q format %q", loaded.Source, loaded.Rootfs.Format)
			}
		})
	}
}

func TestSameInputsSameImage(t *testing.T) {
	needE2fsprogs(t)
	src := rootfs.Source{Kind: rootfs.KindOCIArchive, Arg: writeOCIArchive(t, smallImage(t))}
	cacheA, cacheB := t.TempDir(), t.TempDir()
	a, err := buildFrom(t, cacheA, src, 0)
	if err != nil {
		t.Fatal(err)
	}
	diskA, err := os.ReadFile(a.Rootfs.Path)
	if err != nil {
		t.Fatal(err)
	}
	again, err := buildFrom(t, cacheA, src, 0)
	if err != nil || again.Dir != a.Dir || again.Digest != a.Digest {
		t.Fatalf("second build in the same cache: %v, %s; want the cached %s", err, again.Dir, a.Dir)
	}
	// The same archive at another path is the same image, which now says
	// where it was last built from.
	moved := filepath.Join(t.TempDir(), "moved.tar")
	if err := os.Link(src.Arg, moved); err != nil {
		t.Fatal(err)
	}
	movedSrc := rootfs.Source{Kind: rootfs.KindOCIArchive, Arg: moved}
	fromMoved, err := buildFrom(t, cacheA, movedSrc, 0)
	if err != nil || fromMoved.Dir != a.Dir {
		t.Fatalf("build of the moved archive: %v, %s; want the cached %s", err, fromMoved.Dir, a.Dir)
	}
	if reloaded, err := guest.Load(a.Dir); err != nil || fromMoved.Source != movedSrc.String() || reloaded.Source != movedSrc.String() || reloaded.Digest != a.Digest {
		t.Errorf("image built again from %s: source %q, in image.json %q (%v); want the new source and digest %s kept", moved, fromMoved.Source, reloaded.Source, err, a.Digest)
	}
	b, err := buildFrom(t, cacheB, src, 0)
	if err != nil {
		t.Fatal(err)
	}
	diskB, err := os.ReadFile(b.Rootfs.Path)
	if err != nil {
		t.Fatal(err)
	}
	if a.Digest != b.Digest || !bytes.Equal(diskA, diskB) {
		t.Errorf("two builds of one archive: digests %s and %s, disks equal: %v", a.Digest, b.Digest, bytes.Equal(diskA, diskB))
	}
	bigger, err := buildFrom(t, cacheB, src, 64)
	if err != nil {
		t.Fatal(err)
	}
	if bigger.Digest == b.Digest {
		t.Error("a different --size gave the same digest")
	}
}

func TestDirAndTarSources(t *testing.T) {
	needE2fsprogs(t)
	layer := tarOf(t, dir("bin"), executable("bin/sh"), dir("etc"), file("etc/motd", "from a tarball\n"))
	tarPath := filepath.Join(t.TempDir(), "root.tar")
	if err := os.WriteFile(tarPath, layer, 0o644); err != nil {
		t.Fatal(err)
	}
	tree := t.TempDir()
	if err := os.MkdirAll(filepath.Join(tree, "usr/bin"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(tree, "usr/bin/dash"), []byte("#!/bin/true\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	// merged /usr, with an absolute link as some images have
	if err := os.Symlink("usr/bin", filepath.Join(tree, "bin")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("/usr/bin/dash", filepath.Join(tree, "usr/bin/sh")); err != nil {
		t.Fatal(err)
	}
	cache := t.TempDir()
	fromTar, err := buildFrom(t, cache, rootfs.Source{Kind: rootfs.KindTar, Arg: tarPath}, 0)
	if err != nil {
		t.Fatal(err)
	}
	if out := debugfs(t, fromTar.Rootfs.Path, "cat /etc/motd"); !strings.Contains(out, "from a tarball") {
		t.Errorf("/etc/motd: %q", out)
	}
	fromDir, err := buildFrom(t, cache, rootfs.Source{Kind: rootfs.KindDir, Arg: tree}, 0)
	if err != nil {
		t.Fatal(err)
	}
	if out := debugfs(t, fromDir.Rootfs.Path, "stat /usr/bin/sh"); !strings.Contains(out, `"/usr/bin/dash"`) {
		t.Errorf("/usr/bin/sh: %s", out)
	}
	// A changed file in the tree is a different image.
	if err := os.WriteFile(filepath.Join(tree, "usr/bin/dash"), []byte("#!/bin/false\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	changed, err := buildFrom(t, cache, rootfs.Source{Kind: rootfs.KindDir, Arg: tree}, 0)
	if err != nil {
		t.Fatal(err)
	}
	if changed.Digest == fromDir.Digest {
		t.Error("changing a file of the dir: source kept the digest")
	}
}

func TestBadInputFailsAndLeavesNothingCached(t *testing.T) {
	needE2fsprogs(t)
	shell := []entry{dir("bin"), executable("bin/sh")}
	oci := func(layers ...[]entry) string {
		var ls []v1.Layer
		for _, l := range layers {
			ls = append(ls, layerOf(t, l...))
		}
		return writeOCIArchive(t, imageOf(t, v1.Config{}, ls...))
	}
	good := writeDockerArchive(t, smallImage(t))
	goodBytes, err := os.ReadFile(good)
	if err != nil {
		t.Fatal(err)
	}
	truncated := filepath.Join(t.TempDir(), "truncated.tar")
	if err := os.WriteFile(truncated, goodBytes[:len(goodBytes)*2/3], 0o644); err != nil {
		t.Fatal(err)
	}
	garbage := filepath.Join(t.TempDir(), "garbage.tar")
	if err := os.WriteFile(garbage, bytes.Repeat([]byte("not a tarball "), 100), 0o644); err != nil {
		t.Fatal(err)
	}
	big := strings.Repeat("x", 12<<20)
	// The largest blob is the layer with the big file; cut it in half.
	truncatedLayer := writeOCIArchiveEdited(t, imageOf(t, v1.Config{}, layerOf(t, append(shell, file("big", big))...)), func(lay string) {
		blobs, _ := filepath.Glob(filepath.Join(lay, "blobs/sha256/*"))
		var largest string
		var size int64
		for _, b := range blobs {
			if fi, err := os.Stat(b); err == nil && fi.Size() > size {
				largest, size = b, fi.Size()
			}
		}
		if err := os.Truncate(largest, size/2); err != nil {
			t.Fatal(err)
		}
	})
	for _, tc := range []struct {
		name string
		src  rootfs.Source
		size int
		is   error
		want string
	}{
		{name: "dot-dot entry", src: rootfs.Source{Kind: rootfs.KindOCIArchive, Arg: oci(append(shell, file("../../escaped", "x")))}, is: rootfs.ErrEscape},
		{name: "write through an escaping symlink", src: rootfs.Source{Kind: rootfs.KindOCIArchive, Arg: oci(append(shell, symlink("evil", "../../../../tmp"), file("evil/escaped", "x")))}, is: rootfs.ErrEscape},
		{name: "escaping symlink from a lower layer", src: rootfs.Source{Kind: rootfs.KindOCIArchive, Arg: oci(append(shell, symlink("evil", "../../../../tmp")), []entry{file("evil/escaped", "x")})}, is: rootfs.ErrEscape},
		{name: "hard link out of the root", src: rootfs.Source{Kind: rootfs.KindOCIArchive, Arg: oci(append(shell, entry{name: "link", typ: tar.TypeLink, link: "../../../etc/passwd"}))}, is: rootfs.ErrEscape},
		{name: "no /bin/sh", src: rootfs.Source{Kind: rootfs.KindOCIArchive, Arg: oci([]entry{dir("etc"), file("etc/motd", "no shell")})}, is: rootfs.ErrNoShell},
		{name: "/bin/sh removed by a whiteout", src: rootfs.Source{Kind: rootfs.KindOCIArchive, Arg: oci(shell, []entry{whiteout("bin/sh")})}, is: rootfs.ErrNoShell},
		{name: "does not fit --size", src: rootfs.Source{Kind: rootfs.KindOCIArchive, Arg: oci(append(shell, file("big", big)))}, size: 16, is: rootfs.ErrTooBig},
		{name: "truncated docker archive", src: rootfs.Source{Kind: rootfs.KindDockerArchive, Arg: truncated}, want: "docker"},
		{name: "truncated layer", src: rootfs.Source{Kind: rootfs.KindOCIArchive, Arg: truncatedLayer}, want: "corrupt or truncated"},
		{name: "not an archive", src: rootfs.Source{Kind: rootfs.KindOCIArchive, Arg: garbage}, want: "corrupt or truncated"},
		{name: "missing archive", src: rootfs.Source{Kind: rootfs.KindTar, Arg: filepath.Join(t.TempDir(), "nope.tar")}, want: "no such file"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cache := t.TempDir()
			_, err := buildFrom(t, cache, tc.src, tc.size)
			if err == nil {
				t.Fatal("build succeeded")
			}
			t.Log(err)
			if tc.is != nil && !errors.Is(err, tc.is) {
				t.Errorf("error %v, want %v", err, tc.is)
			}
			if tc.want != "" && !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %v, want it to say %q", err, tc.want)
			}
			assertNothingCached(t, cache)
		})
	}
	if _, err := os.Lstat("/tmp/escaped"); err == nil {
		t.Error("/tmp/escaped exists: a layer wrote outside its root")
	}
}

func TestParseSource(t *testing.T) {
	for in, want := range map[string]string{
		"":                   "busybox",
		"busybox":            "busybox",
		"debian:bookworm":    "debian:bookworm",
		"dir:/srv/root":      "dir:/srv/root",
		"oci-archive:/a.tar": "oci-archive:/a.tar",
	} {
		got, err := rootfs.ParseSource(in)
		if err != nil || got.String() != want {
			t.Errorf("ParseSource(%q) = %v, %v; want %s", in, got, err, want)
		}
	}
	for _, bad := range []string{"docker:alpine", "debian:", "debian:Bookworm/../x", "tar"} {
		if _, err := rootfs.ParseSource(bad); err == nil {
			t.Errorf("ParseSource(%q) accepted", bad)
		}
	}
}

func TestHostDebianMirror(t *testing.T) {
	root := t.TempDir()
	write := func(name, text string) {
		p := filepath.Join(root, "etc/apt", name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := rootfs.HostDebianMirror(root); err == nil {
		t.Error("no sources: got a mirror")
	}
	write("sources.list.d/debian.sources", `Types: deb
URIs: http://security.example/debian-security
Suites: bookworm-security
Components: main

Types: deb
# a comment
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
`)
	write("sources.list.d/other.list", "deb [arch=amd64] https://vendor.example/apt stable main\n")
	got, err := rootfs.HostDebianMirror(root)
	if err != nil || got != "http://mirror.example/debian" {
		t.Errorf("deb822: %q, %v", got, err)
	}
	write("sources.list", "# old style\ndeb http://old.example/debian bookworm main contrib\n")
	if got, err := rootfs.HostDebianMirror(root); err != nil || got != "http://old.example/debian" {
		t.Errorf("sources.list first: %q, %v", got, err)
	}
}
