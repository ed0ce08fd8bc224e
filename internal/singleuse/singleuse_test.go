package singleuse

import (
	"errors"
	"strings"
	"sync"
	"testing"

	"github.com/warmpool/warmpool/vm"
)

func suspended(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	if IsSingleUse(dir) {
		t.Fatal("an empty directory counts as a single-use snapshot")
	}
	if err := Write(dir, Marker{Snapshot: "snap-1", SourceVM: "vm-src", DataDisk: "/disks/data.img"}); err != nil {
		t.Fatal(err)
	}
	if !IsSingleUse(dir) {
		t.Fatal("a written snapshot does not count as single-use")
	}
	return dir
}

func readAndTake(dir string) (*Claim, error) {
	m, err := Read(dir, "snap-1")
	if err != nil {
		return nil, err
	}
	return Take(dir, m)
}

func TestReadReturnsWhatWasWritten(t *testing.T) {
	dir := suspended(t)
	m, err := Read(dir, "snap-1")
	if err != nil {
		t.Fatal(err)
	}
	if want := (Marker{Snapshot: "snap-1", SourceVM: "vm-src", DataDisk: "/disks/data.img"}); m != want {
		t.Errorf("Read = %+v, want %+v", m, want)
	}
}

func TestClaimTwiceFails(t *testing.T) {
	dir := suspended(t)
	m, err := Read(dir, "snap-1")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Take(dir, m); err != nil {
		t.Fatal(err)
	}
	if !IsSingleUse(dir) {
		t.Error("a claimed snapshot no longer counts as single-use")
	}
	if _, err := readAndTake(dir); !errors.Is(err, vm.ErrInvalidState) {
		t.Errorf("second claim = %v, want ErrInvalidState", err)
	}
	// A restore that read the marker before the first claim loses too.
	if _, err := Take(dir, m); !errors.Is(err, vm.ErrInvalidState) {
		t.Errorf("claim with a stale marker = %v, want ErrInvalidState", err)
	}
}

func TestReleasedClaimCanBeClaimedAgain(t *testing.T) {
	dir := suspended(t)
	c, err := readAndTake(dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Release(); err != nil {
		t.Fatal(err)
	}
	c, err = readAndTake(dir)
	if err != nil {
		t.Fatalf("claim after a release: %v", err)
	}
	if err := c.Complete("vm-new"); err != nil {
		t.Fatal(err)
	}
	_, err = readAndTake(dir)
	if !errors.Is(err, vm.ErrInvalidState) || !strings.Contains(err.Error(), "vm-new") {
		t.Errorf("claim after a completed restore = %v, want ErrInvalidState naming vm-new", err)
	}
}

func TestWrongSnapshotIsFieldError(t *testing.T) {
	dir := suspended(t)
	_, err := Read(dir, "snap-other")
	var fe *vm.FieldError
	if !errors.As(err, &fe) || fe.Field != "snapshot.id" || !strings.Contains(fe.Reason, "snap-1") {
		t.Errorf("Read of another snapshot ID = %v, want a FieldError on snapshot.id naming snap-1", err)
	}
	if _, err := readAndTake(dir); err != nil {
		t.Errorf("a rejected read must leave the snapshot claimable: %v", err)
	}
}

func TestConcurrentClaimsOneWins(t *testing.T) {
	dir := suspended(t)
	const n = 16
	var wg sync.WaitGroup
	errs := make([]error, n)
	start := make(chan struct{})
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			_, errs[i] = readAndTake(dir)
		}()
	}
	close(start)
	wg.Wait()
	won := 0
	for _, err := range errs {
		switch {
		case err == nil:
			won++
		case !errors.Is(err, vm.ErrInvalidState):
			t.Errorf("a losing claim failed with %v, want ErrInvalidState", err)
		}
	}
	if won != 1 {
		t.Errorf("%d of %d concurrent claims won, want exactly 1", won, n)
	}
}
