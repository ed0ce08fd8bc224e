package e2etest

import (
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// nobody is the user the daemon runs as without root.
const nobody = 65534

// TestDaemonWithoutRootRunsNetworkNone runs `warmpool serve` (the fake
// provider) with network.cidr set as an unprivileged user: it starts,
// `status` says networking is off because it needs root, a pool whose
// policy is none fills and its lease has no address, and a pool that
// wants a network is refused with the same reason.
func TestDaemonWithoutRootRunsNetworkNone(t *testing.T) {
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	dir, err := os.MkdirTemp("", "wp-nr-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	state := filepath.Join(dir, "state")
	in := installation{bin: filepath.Join(dir, "warmpool"), env: append(os.Environ(), "HOME="+state)}
	if err := os.Mkdir(state, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := copyExecutable(warmpoolBin, in.bin); err != nil {
		t.Fatal(err)
	}
	cfg := filepath.Join(state, "config.yaml")
	if err := os.WriteFile(cfg, []byte("network: {cidr: 10.251.13.0/28}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if os.Geteuid() == 0 {
		// Root drops to nobody for the daemon and the CLI alike.
		for _, p := range []string{dir, state, cfg} {
			if err := os.Chown(p, nobody, nobody); err != nil {
				t.Fatal(err)
			}
		}
		in.cred = &syscall.Credential{Uid: nobody, Gid: nobody}
	}
	d := in.startDaemon(t, state, "--provider", "fake", "--config", cfg)
	status := in.mustCLI(t, state, time.Minute, "status")
	if !strings.Contains(status, "off: network slots need root") {
		t.Errorf("status does not say networking is off for want of root:\n%s", status)
	}
	if log, _ := os.ReadFile(filepath.Join(state, "daemon.log")); !strings.Contains(string(log), "networking is off") {
		t.Errorf("the daemon's log does not say networking is off:\n%s", log)
	}
	in.mustCLI(t, state, time.Minute, "template", "build", "base")
	if _, err := in.cli(t, state, time.Minute, "pool", "set", "iso", "--template", "base", "--max", "1"); err == nil || !strings.Contains(err.Error(), "need root") {
		t.Errorf("pool set with the default network (isolated) = %v, want a refusal saying networking needs root", err)
	}
	in.mustCLI(t, state, time.Minute, "pool", "set", "off", "--template", "base", "--min", "1", "--max", "1", "--network", "none")
	var l netLease
	if err := json.Unmarshal([]byte(in.mustCLI(t, state, time.Minute, "acquire", "off", "--wait", "30s", "-o", "json")), &l); err != nil || l.ID == "" {
		t.Fatalf("acquire output: %v", err)
	}
	if l.Address != nil {
		t.Errorf("a lease of a none pool has address %s", *l.Address)
	}
	d.term(t)
}

func copyExecutable(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o755)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}
