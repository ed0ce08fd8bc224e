package firecracker

import (
	"syscall"
	"testing"
	"time"

	"github.com/warmpool/warmpool/vm"
)

// TestAdoptedVMExitIsReported: a VM found running from an earlier process
// is no child of ours, yet its death must be reported like a child's, and
// its Destroy must not be.
func TestAdoptedVMExitIsReported(t *testing.T) {
	e := newEnv(t, nil)
	ctx := testCtx(t)
	killed, err := e.p.Create(ctx, e.spec)
	if err != nil {
		t.Fatal(err)
	}
	destroyed, err := e.p.Create(ctx, e.spec)
	if err != nil {
		t.Fatal(err)
	}
	again, err := New(Options{StateDir: e.state, Binary: fakeBinary})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := again.List(ctx); err != nil {
		t.Fatal(err)
	}
	exits := make(chan vm.Exit, 8)
	defer again.OnExit(func(e vm.Exit) { exits <- e })()
	if err := again.Destroy(ctx, destroyed.ID); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(killed.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	select {
	case ex := <-exits:
		if ex.ID != killed.ID {
			t.Fatalf("exit reported for %s (%s), want only the killed %s", ex.ID, ex.Reason, killed.ID)
		}
		t.Logf("exit of adopted %s: %s", ex.ID, ex.Reason)
	case <-time.After(10 * time.Second):
		t.Fatalf("no exit reported for adopted %s within 10s of SIGKILL", killed.ID)
	}
	if again.Alive(killed.ID) {
		t.Errorf("Alive(%s) = true after its exit", killed.ID)
	}
}
