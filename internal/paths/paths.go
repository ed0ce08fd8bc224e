// Package paths knows where warmpool keeps its state, so that the daemon and
// the CLI agree on it without talking to each other.
package paths

import (
	"os"
	"path/filepath"
)

// SocketName is the daemon's socket inside its state directory.
const SocketName = "warmpool.sock"

// SocketEnv overrides the socket the CLI talks to.
const SocketEnv = "WARMPOOL_SOCKET"

// DefaultStateDir is /var/lib/warmpool for root and
// $XDG_STATE_HOME/warmpool (falling back to ~/.local/state/warmpool)
// for everyone else.
func DefaultStateDir() string {
	if os.Geteuid() == 0 {
		return "/var/lib/warmpool"
	}
	if xdg := os.Getenv("XDG_STATE_HOME"); xdg != "" && filepath.IsAbs(xdg) {
		return filepath.Join(xdg, "warmpool")
	}
	if home, err := os.UserHomeDir(); err == nil {
		return filepath.Join(home, ".local", "state", "warmpool")
	}
	return filepath.Join(os.TempDir(), "warmpool-"+os.Getenv("USER"))
}

// Socket is the daemon socket of stateDir, or of the default state directory
// when stateDir is empty.
func Socket(stateDir string) string {
	if stateDir == "" {
		stateDir = DefaultStateDir()
	}
	return filepath.Join(stateDir, SocketName)
}

// DiscoverSocket applies the CLI's lookup order: the --socket flag, else
// $WARMPOOL_SOCKET, else the socket in --state, else the default state
// directory's socket.
func DiscoverSocket(socketFlag, stateFlag string) string {
	if socketFlag != "" {
		return socketFlag
	}
	if env := os.Getenv(SocketEnv); env != "" {
		return env
	}
	return Socket(stateFlag)
}
