package e2etest

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestQEMUE2BSDK drives `warmpool serve --e2b` with the official E2B SDK
// (npm e2b 2.51.0, installed by make deps into e2b/sdktest) against real
// VMs restored from a Debian image: e2b/sdktest/sdk.mjs runs every check
// and prints one JSON line each.
func TestQEMUE2BSDK(t *testing.T) {
	node, err := exec.LookPath("node")
	if err != nil {
		t.Skip("SKIPPING the E2B SDK test: node is not installed (Node.js 20 runs the official E2B SDK)")
	}
	sdkDir, err := filepath.Abs("../../e2b/sdktest")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(sdkDir, "node_modules", "e2b", "package.json")); err != nil {
		t.Fatalf("the E2B SDK is not installed in %s (make deps runs npm ci there): %v", sdkDir, err)
	}
	state := qemuState(t, "E2B SDK test", "wp-e2b-")
	start := time.Now()
	// A Debian image: commands.run sends /bin/bash -l -c CMD, which the
	// busybox image cannot run. The package's shared template of it is the
	// config's template deb, so the daemon finds it built.
	useTemplate(t, state, "deb", debianPython)
	t.Logf("template deb ready after %s", time.Since(start).Round(time.Millisecond))

	cfg := filepath.Join(state, "config.yaml")
	// warm_exec as the README's E2B section sets it up.
	if err := os.WriteFile(cfg, []byte(fmt.Sprintf(`warm_exec: [/bin/bash, -l, -c, "true"]
templates:
  deb: {image: %s, memory_mib: 256}
pools:
  deb: {template: deb, min: 2, max: 3}
`, debianPython.Image)), 0o600); err != nil {
		t.Fatal(err)
	}
	key := strings.TrimSpace(mustCLI(t, state, 10*time.Second, "e2b", "key", "create"))
	addr := freeAddr(t)
	d := startDaemon(t, state, "--config", cfg, "--e2b", "tcp:"+addr)
	waitPool(t, state, "deb", 2)
	t.Logf("pool deb ready after %s", time.Since(start).Round(time.Millisecond))

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, node, "sdk.mjs")
	cmd.Dir = sdkDir
	cmd.Env = append(os.Environ(),
		"E2B_API_URL=http://"+addr, "E2B_SANDBOX_URL=http://"+addr, "E2B_API_KEY="+key, "TEMPLATE=deb")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	runErr := cmd.Run()
	checks := 0
	sc := bufio.NewScanner(&stdout)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		var r struct {
			Check string `json:"check"`
			OK    bool   `json:"ok"`
			Error string `json:"error"`
			Stack string `json:"stack"`
		}
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			t.Errorf("unreadable line from sdk.mjs: %s", sc.Text())
			continue
		}
		checks++
		if !r.OK {
			t.Errorf("SDK check %q failed: %s\n%s", r.Check, r.Error, r.Stack)
			continue
		}
		t.Logf("SDK: %s", sc.Text())
	}
	if runErr != nil || checks < 17 {
		t.Errorf("node sdk.mjs: %v after %d checks\nstderr:\n%s", runErr, checks, stderr.String())
	}
	// Every sandbox the script made it killed; none may be left.
	out := mustCLI(t, state, 10*time.Second, "lease", "ls", "-o", "json")
	var leases []leaseJSON
	if err := json.Unmarshal([]byte(out), &leases); err != nil || len(leases) != 0 {
		t.Errorf("leases left after the SDK killed its sandboxes: %s (%v)", out, err)
	}
	d.term(t)
}

// freeAddr returns a loopback address nothing listens on.
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}
