package kube

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	"github.com/warmpool/warmpool/api"
)

// kubeconfig writes a kubeconfig of an admin of the test API server.
func kubeconfig(t *testing.T) string {
	t.Helper()
	u, err := testEnv.AddUser(envtest.User{Name: "admin", Groups: []string{"system:masters"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	b, err := u.KubeConfig()
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "kubeconfig")
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func kubectl(t *testing.T, kc string, args ...string) string {
	t.Helper()
	out, err := kubectlErr(kc, args...)
	if err != nil {
		t.Fatalf("kubectl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

func kubectlErr(kc string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "kubectl", append([]string{"--kubeconfig", kc}, args...)...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	return out.String(), err
}

// TestManifestsApply: kubectl apply -f deploy/ and the examples are accepted
// by a real API server as the README shows them.
func TestManifestsApply(t *testing.T) {
	if testCfg == nil {
		t.Skip(skipReason)
	}
	if _, err := exec.LookPath("kubectl"); err != nil {
		t.Skip("kubectl is not installed")
	}
	kc := kubeconfig(t)
	out := kubectl(t, kc, "apply", "-f", "../deploy/")
	for _, want := range []string{"namespace/warmpool-system", "customresourcedefinition.apiextensions.k8s.io/warmpools.warmpool.dev",
		"daemonset.apps/warmpool-node", "deployment.apps/warmpool-controller", "clusterrole.rbac.authorization.k8s.io/warmpool-node"} {
		if !strings.Contains(out, want) {
			t.Errorf("kubectl apply -f deploy/ does not mention %s:\n%s", want, out)
		}
	}
	ns := "manifests"
	kubectl(t, kc, "create", "namespace", ns)
	out = kubectl(t, kc, "apply", "-n", ns, "-f", "../deploy/examples/")
	if !strings.Contains(out, "warmpool.warmpool.dev/busybox created") || !strings.Contains(out, "vmclaim.warmpool.dev/example created") {
		t.Errorf("kubectl apply -f deploy/examples/:\n%s", out)
	}
	// The schema rejects what it can see is wrong.
	bad := filepath.Join(t.TempDir(), "bad.yaml")
	if err := os.WriteFile(bad, []byte("apiVersion: warmpool.dev/v1alpha1\nkind: WarmPool\nmetadata: {name: bad}\nspec: {min: -1, network: wifi}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := kubectlErr(kc, "apply", "-n", ns, "-f", bad); err == nil || !strings.Contains(out, "spec.min") || !strings.Contains(out, "spec.network") {
		t.Errorf("a WarmPool with min -1 and network wifi: err %v\n%s", err, out)
	}
	kubectl(t, kc, "delete", "-n", ns, "-f", "../deploy/examples/", "--wait=false")
}

// TestQEMUClaim runs `warmpool serve --kubernetes` on the QEMU provider and
// `warmpool controller` as a user would, applies the examples with kubectl,
// waits for the claim to be Ready and runs `warmpool exec` on its lease.
func TestQEMUClaim(t *testing.T) {
	if testCfg == nil {
		t.Skip(skipReason)
	}
	for _, bin := range []string{"qemu-system-x86_64", "kubectl"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Skipf("%s is not installed", bin)
		}
	}
	start := time.Now()
	dir := t.TempDir()
	warmpool := warmpoolBinary(t)
	kc := kubeconfig(t)
	ns := "qemu"
	kubectl(t, kc, "create", "namespace", ns)
	state := filepath.Join(dir, "state")
	node := "qemu-node"
	// Registered first, so it runs last: the daemon leaves nothing of the test's behind: no QEMU process of
	// this state directory after the serve process stopped.
	t.Cleanup(func() {
		if out, _ := exec.Command("pgrep", "-af", state).Output(); len(bytes.TrimSpace(out)) > 0 {
			t.Errorf("processes of the test's state left:\n%s", out)
		}
	})
	run := func(name string, args ...string) {
		logf, err := os.Create(filepath.Join(dir, name+".log"))
		if err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command(warmpool, args...)
		cmd.Stdout, cmd.Stderr = logf, logf
		cmd.Env = append(os.Environ(), "WARMPOOL_SOCKET=")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		exited := make(chan struct{})
		go func() { _ = cmd.Wait(); close(exited) }()
		t.Cleanup(func() {
			_ = cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-exited:
			case <-time.After(time.Minute):
				_ = cmd.Process.Kill()
				<-exited
			}
			logf.Close()
			if t.Failed() {
				b, _ := os.ReadFile(logf.Name())
				t.Logf("%s log:\n%s", name, tail(string(b), 60))
			}
		})
	}
	run("serve", "serve", "--state", state, "--provider", "qemu", "--stop-all",
		"--kubernetes", "--kubeconfig", kc, "--node", node, "--kube-namespace", ns,
		"--heartbeat-interval", "1s", "--heartbeat-timeout", "15s")
	run("controller", "controller", "--kubeconfig", kc, "--namespace", ns)

	kubectl(t, kc, "apply", "-n", ns, "-f", "../deploy/examples/warmpool.yaml")
	kubectl(t, kc, "wait", "-n", ns, "warmpool/busybox", "--for=condition=Ready", "--timeout=180s")
	t.Logf("WarmPool Ready (template built, 2 VMs restored) %s after the start", time.Since(start).Round(time.Millisecond))
	applied := time.Now()
	kubectl(t, kc, "apply", "-n", ns, "-f", "../deploy/examples/vmclaim.yaml")
	kubectl(t, kc, "wait", "-n", ns, "vmclaim/example", "--for=jsonpath={.status.phase}=Ready", "--timeout=60s")
	t.Logf("claim Ready %s after kubectl apply (kubectl included)", time.Since(applied).Round(time.Millisecond))
	out := kubectl(t, kc, "get", "-n", ns, "vmclaim", "example", "-o", "json")
	var claim struct {
		Status struct {
			Node, LeaseID string
			Timings       map[string]int64
		}
	}
	if err := json.Unmarshal([]byte(out), &claim); err != nil {
		t.Fatal(err)
	}
	if claim.Status.Node != node || claim.Status.LeaseID == "" {
		t.Fatalf("claim status: %+v", claim.Status)
	}
	t.Logf("claim timings: %v", claim.Status.Timings)
	t.Logf("kubectl get warmpools,vmclaims:\n%s", kubectl(t, kc, "get", "-n", ns, "warmpools,vmclaims", "-o", "wide"))

	execOut, err := exec.Command(warmpool, "exec", "--state", state, claim.Status.LeaseID, "--", "sh", "-c", `echo "$GREETING"; hostname`).CombinedOutput()
	if err != nil || !strings.Contains(string(execOut), "hello from a VMClaim") {
		t.Fatalf("warmpool exec %s: %v\n%s", claim.Status.LeaseID, err, execOut)
	}
	t.Logf("warmpool exec on the claim's lease: %q", strings.TrimSpace(string(execOut)))

	kubectl(t, kc, "delete", "-n", ns, "vmclaim", "example", "--timeout=60s")
	noLeases := func(after string) {
		t.Helper()
		var leases []api.Lease
		cliJSON(t, warmpool, state, &leases, "lease", "ls")
		if len(leases) != 0 {
			t.Errorf("leases after %s: %+v", after, leases)
		}
	}
	noLeases("the claim was deleted")
	kubectl(t, kc, "delete", "-n", ns, "warmpool", "busybox", "--timeout=60s")

	// A root filesystem image from a directory, a writable disk per VM and
	// an adaptive pool: the node builds the image and the template and
	// boots them.
	tree := filepath.Join(dir, "tree")
	writeTree(t, tree, "a tree of the WarmPool's own")
	manifests := filepath.Join(dir, "tree.yaml")
	yaml := fmt.Sprintf(`apiVersion: warmpool.dev/v1alpha1
kind: WarmPool
metadata: {name: tree}
spec:
  image: dir:%s
  template: {vcpus: 1, memoryMiB: 256, diskMiB: 64}
  adaptive: true
  min: 1
  max: 2
---
apiVersion: warmpool.dev/v1alpha1
kind: VMClaim
metadata: {name: tree}
spec:
  poolRef: {name: tree}
`, tree)
	if err := os.WriteFile(manifests, []byte(yaml), 0o600); err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	kubectl(t, kc, "apply", "-n", ns, "-f", manifests)
	kubectl(t, kc, "wait", "-n", ns, "vmclaim/tree", "--for=jsonpath={.status.phase}=Ready", "--timeout=300s")
	t.Logf("dir: image, template with a 64 MiB disk and adaptive pool built and the claim Ready %s after kubectl apply", time.Since(start).Round(time.Millisecond))
	var tclaim struct{ Status struct{ LeaseID string } }
	if err := json.Unmarshal([]byte(kubectl(t, kc, "get", "-n", ns, "vmclaim", "tree", "-o", "json")), &tclaim); err != nil {
		t.Fatal(err)
	}
	execOut, err = exec.Command(warmpool, "exec", "--state", state, tclaim.Status.LeaseID, "--", "sh", "-c", `cat /etc/tree-marker && echo written > /etc/new && cat /etc/new`).CombinedOutput()
	if err != nil || string(execOut) != "a tree of the WarmPool's own\nwritten\n" {
		t.Fatalf("warmpool exec %s in the tree image: %v\n%s", tclaim.Status.LeaseID, err, execOut)
	}
	var tpls []api.Template
	cliJSON(t, warmpool, state, &tpls, "template", "ls")
	var pools []api.Pool
	cliJSON(t, warmpool, state, &pools, "pool", "ls")
	local := localName(ns, "tree")
	for _, tp := range tpls {
		if tp.Name == local && (tp.ImageSource != "dir:"+tree || tp.DiskMiB != 64) {
			t.Errorf("template %s: image source %q, disk %d MiB; want dir:%s and 64", local, tp.ImageSource, tp.DiskMiB, tree)
		}
	}
	for _, p := range pools {
		if p.Name == local && !p.Adaptive {
			t.Errorf("pool %s is not adaptive", local)
		}
	}
	kubectl(t, kc, "delete", "-n", ns, "-f", manifests, "--timeout=60s")
	noLeases("the tree claim was deleted")
}

// cliJSON runs `warmpool ARGS -o json` against the daemon at state into v.
func cliJSON(t *testing.T, warmpool, state string, v any, args ...string) {
	t.Helper()
	out, err := exec.Command(warmpool, append(args, "--state", state, "-o", "json")...).Output()
	if err != nil {
		t.Fatalf("warmpool %s: %v", strings.Join(args, " "), err)
	}
	if err := json.Unmarshal(out, v); err != nil {
		t.Fatalf("warmpool %s -o json: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// writeTree writes a root filesystem tree: busybox as /bin/sh, and marker
// in /etc/tree-marker.
func writeTree(t *testing.T, root, marker string) {
	t.Helper()
	bb, err := os.ReadFile("/bin/busybox")
	if err != nil {
		t.Skip("no /bin/busybox for the tree image: ", err)
	}
	for _, d := range []string{"bin", "etc", "root"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	files := map[string]string{"bin/busybox": string(bb), "etc/tree-marker": marker + "\n", "etc/passwd": "root:x:0:0:root:/root:/bin/sh\n", "etc/group": "root:x:0:\n"}
	for name, body := range files {
		mode := os.FileMode(0o644)
		if name == "bin/busybox" {
			mode = 0o755
		}
		if err := os.WriteFile(filepath.Join(root, name), []byte(body), mode); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink("busybox", filepath.Join(root, "bin/sh")); err != nil {
		t.Fatal(err)
	}
	// Images are content-addressed and their digest covers file times:
	// fixed times make every run build the same image, so runs reuse one
	// cached image instead of leaving a new one in the cache each time.
	fixed := []unix.Timespec{{Sec: 1_700_000_000}, {Sec: 1_700_000_000}}
	err = filepath.WalkDir(root, func(path string, _ fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		return unix.UtimesNanoAt(unix.AT_FDCWD, path, fixed, unix.AT_SYMLINK_NOFOLLOW)
	})
	if err != nil {
		t.Fatal(err)
	}
}
