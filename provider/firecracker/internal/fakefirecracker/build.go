package fakefirecracker

import (
	"fmt"
	"os/exec"
	"path/filepath"
)

// Build compiles the fake firecracker binary into dir and returns its path,
// so that tests exercise the provider's real process handling.
func Build(dir string) (string, error) {
	out := filepath.Join(dir, "firecracker")
	goBin, err := exec.LookPath("go")
	if err != nil {
		return "", fmt.Errorf("build fake firecracker: %w", err)
	}
	cmd := exec.Command(goBin, "build", "-o", out, "github.com/warmpool/warmpool/provider/firecracker/internal/fakefirecracker/cmd/fakefirecracker")
	if msg, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build fake firecracker: %v: %s", err, msg)
	}
	return out, nil
}
