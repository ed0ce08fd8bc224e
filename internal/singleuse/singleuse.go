// Package singleuse makes a suspended VM's snapshot restorable exactly
// once, whichever provider wrote it. The snapshot's directory holds one of
// two marker files: SuspendedFile while it is unused, RestoredFile once a
// restore has claimed it. A claim renames the first into the second, so of
// any number of restores, in one process or several, exactly one gets it.
package singleuse

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/warmpool/warmpool/internal/atomicfile"
	"github.com/warmpool/warmpool/vm"
)

// The marker files. Exactly one of them exists in a single-use snapshot.
const (
	SuspendedFile = "suspended.json"
	RestoredFile  = "restored.json"
)

// Marker is the content of the marker file.
type Marker struct {
	Snapshot string `json:"snapshot"`
	SourceVM string `json:"source_vm"`
	// DataDisk is the suspended VM's data disk, for providers whose
	// snapshot does not carry it itself.
	DataDisk   string `json:"data_disk,omitempty"`
	RestoredAs string `json:"restored_as,omitempty"`
}

// Write marks the snapshot in dir as single-use and unused. It goes last
// when a snapshot is written: without it the directory is no snapshot.
func Write(dir string, m Marker) error {
	return atomicfile.WriteJSON(filepath.Join(dir, SuspendedFile), 0o600, m)
}

// IsSingleUse reports whether dir holds a single-use snapshot, used or not.
// The files decide, not vm.Snapshot.SingleUse, so a caller cannot restore
// one twice by clearing the field.
func IsSingleUse(dir string) bool {
	for _, f := range []string{SuspendedFile, RestoredFile} {
		if _, err := os.Lstat(filepath.Join(dir, f)); err == nil {
			return true
		}
	}
	return false
}

// Read returns the marker of the unused single-use snapshot snapID in dir.
// A snapshot that is used or being restored is vm.ErrInvalidState (naming
// the VM it became, once known); a directory that holds another snapshot
// is a *vm.FieldError.
func Read(dir, snapID string) (Marker, error) {
	var m Marker
	b, err := os.ReadFile(filepath.Join(dir, SuspendedFile))
	if errors.Is(err, os.ErrNotExist) {
		if b, err := os.ReadFile(filepath.Join(dir, RestoredFile)); err == nil && json.Unmarshal(b, &m) == nil && m.RestoredAs != "" {
			return Marker{}, fmt.Errorf("already restored as vm %s: %w", m.RestoredAs, vm.ErrInvalidState)
		}
		return Marker{}, fmt.Errorf("already restored or being restored: %w", vm.ErrInvalidState)
	}
	if err != nil {
		return Marker{}, err
	}
	if err := json.Unmarshal(b, &m); err != nil {
		return Marker{}, fmt.Errorf("read %s: %w", SuspendedFile, err)
	}
	if m.Snapshot != snapID {
		return Marker{}, &vm.FieldError{Field: "snapshot.id", Value: snapID, Reason: "the directory holds snapshot " + m.Snapshot}
	}
	return m, nil
}

// Claim is a restore's hold on a single-use snapshot: until it is released,
// no other restore can have the snapshot.
type Claim struct {
	dir  string
	mark Marker
}

// Take claims the snapshot in dir whose marker Read returned. Only one of
// any number of concurrent claims succeeds; the others, and every later
// one, fail with vm.ErrInvalidState.
func Take(dir string, m Marker) (*Claim, error) {
	if err := os.Rename(filepath.Join(dir, SuspendedFile), filepath.Join(dir, RestoredFile)); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("restored concurrently: %w", vm.ErrInvalidState)
		}
		return nil, fmt.Errorf("claim snapshot: %w", err)
	}
	return &Claim{dir: dir, mark: m}, nil
}

// Release gives the claim back after a failed restore, so that the
// snapshot can be restored again.
func (c *Claim) Release() error {
	return os.Rename(filepath.Join(c.dir, RestoredFile), filepath.Join(c.dir, SuspendedFile))
}

// Complete records that the snapshot became VM restoredAs, so that later
// restores can say which VM has it.
func (c *Claim) Complete(restoredAs string) error {
	c.mark.RestoredAs = restoredAs
	return atomicfile.WriteJSON(filepath.Join(c.dir, RestoredFile), 0o600, c.mark)
}
