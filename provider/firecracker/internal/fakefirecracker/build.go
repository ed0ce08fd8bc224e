package fakefirecracker

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
)

// Build compiles the fake firecracker binary into dir and returns its path,
// so that tests exercise the provider's real process handling. It is
// statically linked, as Firecracker is, so that it also runs inside a jail.
func Build(dir string) (string, error) {
	return build(filepath.Join(dir, "firecracker"), "fakefirecracker")
}

// BuildJailer compiles the fake jailer into dir and returns its path.
func BuildJailer(dir string) (string, error) {
	return build(filepath.Join(dir, "jailer"), "fakejailer")
}

func build(out, cmdName string) (string, error) {
	goBin, err := exec.LookPath("go")
	if err != nil {
		return "", fmt.Errorf("build %s: %w", cmdName, err)
	}
	cmd := exec.Command(goBin, "build", "-o", out, "github.com/warmpool/warmpool/provider/firecracker/internal/fakefirecracker/cmd/"+cmdName)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if msg, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build %s: %v: %s", cmdName, err, msg)
	}
	return out, nil
}
