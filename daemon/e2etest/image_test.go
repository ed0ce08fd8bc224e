package e2etest

import (
	"archive/tar"
	"bytes"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/warmpool/warmpool/guest"
	"github.com/warmpool/warmpool/provider/qemu"
	"github.com/warmpool/warmpool/rootfs"
)

// TestQEMUImages runs the daemon on two images with root filesystem disks:
// debian:bookworm with python3 (a template and a pool of 2: exec, private
// writable disks, fresh machine-ids, disk files gone after release) and an
// OCI archive the test builds itself (its Env, WorkingDir and User apply).
func TestQEMUImages(t *testing.T) {
	state := qemuState(t, "real-VM image test", "wp-e2eimg-")
	if _, err := exec.LookPath("debootstrap"); err != nil {
		t.Skip("SKIPPING the image test: debootstrap not installed (scripts/deps.sh installs it)")
	}
	if _, err := rootfs.HostDebianMirror("/"); err != nil {
		t.Skip("SKIPPING the image test: ", err)
	}
	// Names live in the shared image cache (the daemon resolves them
	// there); this test's is prefixed and removed at the end.
	const ociName = "wp-e2eimg-oci"
	t.Cleanup(func() { os.Remove(filepath.Join(guest.DefaultCacheDir(), "names", ociName)) })
	// The Debian image and its template are the package's shared ones: the
	// fixture builds them with `image build --from debian:bookworm
	// --packages python3` and `template build --image --disk 512`.
	useTemplate(t, state, "deb", debianPython)
	oci := writeOCIArchive(t)
	mustCLI(t, state, 5*time.Minute, "image", "build", "--from", "oci-archive:"+oci, "--name", ociName, "-o", "json")

	startDaemon(t, state)
	mustCLI(t, state, time.Minute, "pool", "set", "deb", "--template", "deb", "--min", "2", "--max", "2")
	waitPool(t, state, "deb", 2)

	exec1 := func(lease string, argv ...string) string {
		t.Helper()
		return mustCLI(t, state, 3*time.Minute, append([]string{"exec", lease, "--"}, argv...)...)
	}
	l1 := acquire(t, state, "deb")
	l2 := acquire(t, state, "deb")
	if out := exec1(l1.ID, "python3", "-c", "print(6*7)"); out != "42\n" {
		t.Errorf("python3 in lease 1 printed %q, want 42", out)
	}
	disk1, disk2 := vmDisk(t, state, l1.VMID), vmDisk(t, state, l2.VMID)
	handedOff := diskBytes(t, disk2)
	t.Logf("host disk bytes of lease 2's writable layer after hand-off: %d", handedOff)
	if handedOff > 1<<20 {
		t.Errorf("a handed-off clone's writable layer takes %d bytes on the host, want under 1 MiB", handedOff)
	}
	exec1(l1.ID, "sh", "-c", "head -c 52428800 /dev/urandom > /root/big && sync")
	if n := diskBytes(t, disk1); n < 50<<20 {
		t.Errorf("lease 1's layer is %d bytes after writing 50 MiB", n)
	}
	if out, err := cli(t, state, time.Minute, "exec", l2.ID, "--", "ls", "/root/big"); err == nil {
		t.Errorf("lease 2 sees lease 1's file: %q", out)
	}
	id1 := exec1(l1.ID, "cat", "/etc/machine-id")
	id2 := exec1(l2.ID, "cat", "/etc/machine-id")
	if len(strings.TrimSpace(id1)) != 32 || id1 == id2 {
		t.Errorf("machine-ids %q and %q: want two different ones", id1, id2)
	}
	if out := exec1(l2.ID, "sh", "-c", "hostname; cat /etc/hostname; grep -c "+l2.ID+" /etc/hosts"); out != l2.ID+"\n"+l2.ID+"\n1\n" {
		t.Errorf("lease 2 identity: %q, want hostname %s in hostname, /etc/hostname and /etc/hosts", out, l2.ID)
	}
	mustCLI(t, state, time.Minute, "release", l1.ID)
	if _, err := os.Stat(disk1); !os.IsNotExist(err) {
		t.Errorf("lease 1's writable layer %s after release: %v", disk1, err)
	}
	l3 := acquire(t, state, "deb")
	if out, err := cli(t, state, time.Minute, "exec", l3.ID, "--", "ls", "/root/big"); err == nil {
		t.Errorf("a fresh lease sees the released lease's file: %q", out)
	}
	mustCLI(t, state, time.Minute, "release", l2.ID, l3.ID)
	mustCLI(t, state, time.Minute, "pool", "rm", "deb")

	mustCLI(t, state, 15*time.Minute, "template", "build", "oci", "--image", ociName, "--disk", "64", "--vcpus", "1", "--mem", "256")
	mustCLI(t, state, time.Minute, "pool", "set", "oci", "--template", "oci", "--min", "1", "--max", "1")
	waitPool(t, state, "oci", 1)
	l4 := acquire(t, state, "oci")
	if out := exec1(l4.ID, "sh", "-c", `echo "$GREETING"; pwd; busybox id -u`); out != "hello from the image\n/work\n1000\n" {
		t.Errorf("exec in the OCI image: %q, want its Env, WorkingDir and User", out)
	}
	if out := mustCLI(t, state, time.Minute, "exec", "--workdir", "/", "--user", "root", "--env", "GREETING=overridden", l4.ID, "--", "sh", "-c", `echo "$GREETING"; pwd; busybox id -u`); out != "overridden\n/\n0\n" {
		t.Errorf("exec with overrides: %q", out)
	}
	mustCLI(t, state, time.Minute, "release", l4.ID)
	mustCLI(t, state, time.Minute, "pool", "rm", "oci")
	waitProcesses(t, state)
	// A destroy kills the VM's process before it removes the VM's
	// directory, so the files may outlive the process by a moment.
	waitFor(t, "every writable layer (disks/*.qcow2) and VM directory to go with its VM", func() bool {
		left, _ := filepath.Glob(filepath.Join(state, "disks", "*.qcow2"))
		dirs, _ := filepath.Glob(filepath.Join(qemu.DefaultRunDir(state), "*"))
		return len(left) == 0 && len(dirs) == 0
	})
}

// vmDisk is the writable layer of VM id in the daemon's state.
func vmDisk(t *testing.T, state, id string) string {
	t.Helper()
	m, _ := filepath.Glob(filepath.Join(state, "disks", id+".qcow2"))
	if len(m) != 1 {
		t.Fatalf("writable layer of vm %s: found %v", id, m)
	}
	return m[0]
}

// diskBytes is what path takes on the host's disk.
func diskBytes(t *testing.T, path string) int64 {
	t.Helper()
	out, err := exec.Command("du", "-B1", path).Output()
	if err != nil {
		t.Fatalf("du %s: %v", path, err)
	}
	n, err := strconv.ParseInt(strings.Fields(string(out))[0], 10, 64)
	if err != nil {
		t.Fatalf("du %s: %q", path, out)
	}
	return n
}

// writeOCIArchive builds a small image from the host's static busybox, as
// skopeo's oci-archive would hold it: Env, WorkingDir and User set.
func writeOCIArchive(t *testing.T) string {
	t.Helper()
	bb, err := os.ReadFile("/bin/busybox")
	if err != nil {
		t.Skip("SKIPPING the OCI part: no /bin/busybox: ", err)
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	add := func(h *tar.Header, body []byte) {
		h.ModTime = time.Unix(1700000000, 0)
		h.Size = int64(len(body))
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write(body); err != nil {
			t.Fatal(err)
		}
	}
	add(&tar.Header{Name: "bin/", Typeflag: tar.TypeDir, Mode: 0o755}, nil)
	add(&tar.Header{Name: "bin/busybox", Typeflag: tar.TypeReg, Mode: 0o755}, bb)
	add(&tar.Header{Name: "bin/sh", Typeflag: tar.TypeSymlink, Linkname: "busybox", Mode: 0o777}, nil)
	add(&tar.Header{Name: "etc/", Typeflag: tar.TypeDir, Mode: 0o755}, nil)
	add(&tar.Header{Name: "etc/passwd", Typeflag: tar.TypeReg, Mode: 0o644}, []byte("root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/work:/bin/sh\n"))
	add(&tar.Header{Name: "etc/group", Typeflag: tar.TypeReg, Mode: 0o644}, []byte("root:x:0:\napp:x:1000:\n"))
	add(&tar.Header{Name: "work/", Typeflag: tar.TypeDir, Mode: 0o755, Uid: 1000, Gid: 1000}, nil)
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	data := buf.Bytes()
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(data)), nil })
	if err != nil {
		t.Fatal(err)
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		t.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", "amd64"
	cf.Config = v1.Config{Env: []string{"PATH=/bin", "GREETING=hello from the image"}, WorkingDir: "/work", User: "app"}
	if img, err = mutate.ConfigFile(img, cf); err != nil {
		t.Fatal(err)
	}
	lay := filepath.Join(t.TempDir(), "layout")
	p, err := layout.Write(lay, empty.Index)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.AppendImage(img); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(t.TempDir(), "image.oci.tar")
	if msg, err := exec.Command("tar", "-C", lay, "-cf", out, ".").CombinedOutput(); err != nil {
		t.Fatalf("tar the layout: %v\n%s", err, msg)
	}
	return out
}
