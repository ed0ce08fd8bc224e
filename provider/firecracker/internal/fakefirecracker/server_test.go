package fakefirecracker

import (
	"bufio"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

type fakeVM struct {
	t    *testing.T
	srv  *Server
	http *httptest.Server
	dir  string
}

// newFake serves a fresh fake process's API over HTTP in-process, with its
// working directory files under a temp dir.
func newFake(t *testing.T, version string) *fakeVM {
	t.Helper()
	dir := t.TempDir()
	srv := New(Options{
		ID: "test-vm", Spec: loadTestSpec(t), Version: version,
		Agent: func(ctx context.Context, conn io.ReadWriteCloser) error {
			// Echo one line: enough to see data cross the vsock.
			line, err := bufio.NewReader(conn).ReadString('\n')
			if err == nil {
				_, err = conn.Write([]byte("echo " + line))
			}
			return err
		},
	})
	h := httptest.NewServer(srv)
	t.Cleanup(func() { h.Close(); srv.Close() })
	for _, f := range []string{"vmlinux", "initrd", "disk"} {
		content := "data"
		if f == "vmlinux" {
			content = "\x7fELF"
		}
		if err := os.WriteFile(filepath.Join(dir, f), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return &fakeVM{t: t, srv: srv, http: h, dir: dir}
}

// call sends one request and returns the status and fault message.
func (f *fakeVM) call(method, path, body string) (int, string) {
	f.t.Helper()
	req, err := http.NewRequest(method, f.http.URL+path, strings.NewReader(body))
	if err != nil {
		f.t.Fatal(err)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := f.http.Client().Do(req)
	if err != nil {
		f.t.Fatal(err)
	}
	defer resp.Body.Close()
	var fault struct {
		FaultMessage string `json:"fault_message"`
	}
	b, _ := io.ReadAll(resp.Body)
	json.Unmarshal(b, &fault)
	if resp.StatusCode == http.StatusOK {
		return resp.StatusCode, string(b)
	}
	return resp.StatusCode, fault.FaultMessage
}

func (f *fakeVM) mustOK(method, path, body string) {
	f.t.Helper()
	if code, msg := f.call(method, path, body); code/100 != 2 {
		f.t.Fatalf("%s %s %s: %d %s", method, path, body, code, msg)
	}
}

func (f *fakeVM) mustFail(method, path, body, want string) {
	f.t.Helper()
	code, msg := f.call(method, path, body)
	if code != http.StatusBadRequest {
		f.t.Errorf("%s %s %s: status %d, want 400", method, path, body, code)
		return
	}
	if !strings.Contains(msg, want) {
		f.t.Errorf("%s %s %s: fault %q does not mention %q", method, path, body, msg, want)
	}
}

func (f *fakeVM) path(name string) string { return filepath.Join(f.dir, name) }

func (f *fakeVM) boot() {
	f.t.Helper()
	f.mustOK("PUT", "/machine-config", `{"vcpu_count": 1, "mem_size_mib": 128}`)
	f.mustOK("PUT", "/boot-source", `{"kernel_image_path": "`+f.path("vmlinux")+`", "initrd_path": "`+f.path("initrd")+`"}`)
	f.mustOK("PUT", "/vsock", `{"guest_cid": 3, "uds_path": "`+f.path("v.sock")+`"}`)
	f.mustOK("PUT", "/actions", `{"action_type": "InstanceStart"}`)
}

func TestRejectsWhatTheDescriptionRejects(t *testing.T) {
	f := newFake(t, "")
	f.mustFail("PUT", "/machine-config", `{"vcpu_count": 1, "mem_size_mib": 128, "turbo": true}`, "turbo")
	f.mustFail("PUT", "/machine-config", `{"vcpu_count": "one", "mem_size_mib": 128}`, "vcpu_count")
	f.mustFail("PUT", "/boot-source", `{"boot_args": "console=ttyS0"}`, "kernel_image_path")
	f.mustFail("DELETE", "/machine-config", ``, "DELETE /machine-config")
	f.mustFail("PUT", "/snapshots/create", `{}`, "/snapshots/create")
	// Accepted by the description, refused by Firecracker's own checks.
	f.mustFail("PUT", "/boot-source", `{"kernel_image_path": "/no/such/kernel"}`, "kernel")
	f.mustFail("PUT", "/drives/a", `{"drive_id": "b", "is_root_device": false, "path_on_host": "`+f.path("disk")+`", "is_read_only": false}`, "does not match")
}

func TestDocumentedOrder(t *testing.T) {
	f := newFake(t, "")
	f.mustFail("PATCH", "/vm", `{"state": "Paused"}`, "before starting")
	f.mustFail("PUT", "/actions", `{"action_type": "InstanceStart"}`, "kernel")
	f.boot()
	// Pre-boot configuration is refused once the guest runs.
	f.mustFail("PUT", "/machine-config", `{"vcpu_count": 2, "mem_size_mib": 128}`, "after starting")
	f.mustFail("PUT", "/drives/data", `{"drive_id": "data", "is_root_device": false, "path_on_host": "`+f.path("disk")+`", "is_read_only": false}`, "after starting")
	f.mustFail("PUT", "/actions", `{"action_type": "InstanceStart"}`, "after starting")
	// Snapshots only of a paused VM.
	snap := `{"snapshot_type": "Full", "snapshot_path": "` + f.path("vmstate") + `", "mem_file_path": "` + f.path("mem") + `"}`
	f.mustFail("PUT", "/snapshot/create", snap, "pause")
	f.mustOK("PATCH", "/vm", `{"state": "Paused"}`)
	if _, info := f.call("GET", "/", ""); !strings.Contains(info, `"Paused"`) {
		t.Errorf("GET / after pause: %s", info)
	}
	f.mustOK("PUT", "/snapshot/create", snap)
	if st, err := os.Stat(f.path("mem")); err != nil || st.Size() != 128<<20 {
		t.Errorf("memory file: %v, size %v, want 128 MiB", err, st)
	}
	// A load is for fresh processes only.
	load := `{"snapshot_path": "` + f.path("vmstate") + `", "mem_backend": {"backend_type": "File", "backend_path": "` + f.path("mem") + `"}}`
	f.mustFail("PUT", "/snapshot/load", load, "not allowed")

	// The snapshotted vsock socket is still taken by the template: like
	// Firecracker, the load fails unless the clone gets its own.
	g := newFake(t, "")
	g.mustOK("PUT", "/logger", `{"level": "Info"}`)
	g.mustOK("PUT", "/snapshot/load", strings.TrimSuffix(load, "}")+`, "vsock_override": {"uds_path": "`+g.path("v.sock")+`"}}`)
	if _, info := g.call("GET", "/", ""); !strings.Contains(info, `"Paused"`) {
		t.Errorf("GET / after load: %s", info)
	}

	h := newFake(t, "")
	h.mustOK("PUT", "/machine-config", `{"vcpu_count": 1, "mem_size_mib": 128}`)
	h.mustFail("PUT", "/snapshot/load", load, "not allowed after configuring")
}

func TestFailedLoadLeavesProcessUnusable(t *testing.T) {
	f := newFake(t, "")
	f.mustFail("PUT", "/snapshot/load", `{"snapshot_path": "`+f.path("nothing")+`", "mem_backend": {"backend_type": "File", "backend_path": "`+f.path("nothing")+`"}}`, "snapshot")
	f.mustFail("PUT", "/machine-config", `{"vcpu_count": 1, "mem_size_mib": 128}`, "unusable")
}

func TestOlderVersionRejectsNewerFields(t *testing.T) {
	f := newFake(t, "1.10.0")
	f.mustFail("PUT", "/snapshot/load", `{"snapshot_path": "/s", "mem_backend": {"backend_type": "File", "backend_path": "/m"}, "vsock_override": {"uds_path": "v.sock"}}`, "vsock_override")
}

func TestVsockHandshake(t *testing.T) {
	f := newFake(t, "")
	f.boot()
	dial := func(port string) (*bufio.Reader, net.Conn) {
		c, err := net.Dial("unix", f.path("v.sock"))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		c.SetDeadline(time.Now().Add(10 * time.Second))
		c.Write([]byte("CONNECT " + port + "\n"))
		return bufio.NewReader(c), c
	}
	r, c := dial("1024")
	if line, err := r.ReadString('\n'); err != nil || !strings.HasPrefix(line, "OK ") {
		t.Fatalf("handshake answer %q, %v", line, err)
	}
	c.Write([]byte("hello\n"))
	if line, _ := r.ReadString('\n'); line != "echo hello\n" {
		t.Errorf("agent answered %q", line)
	}
	r, _ = dial("52")
	if line, err := r.ReadString('\n'); err == nil {
		t.Errorf("CONNECT to a port nobody listens on answered %q", line)
	}
}
