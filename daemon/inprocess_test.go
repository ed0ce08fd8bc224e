package daemon

import (
	"context"
	"os"
	"testing"
	"time"

	"github.com/warmpool/warmpool/api"
	"github.com/warmpool/warmpool/internal/paths"
	"github.com/warmpool/warmpool/vm"
)

// An in-process daemon serves no socket, does through its methods what the
// API would, and a stop-all Close leaves no VM running: not the warm ones,
// not the leased ones, not the machines, nor one booted by hand through its
// provider.
func TestOpenCloseStopAllLeavesNothing(t *testing.T) {
	dir := t.TempDir()
	prov := newFakeProvider()
	l, err := Open(ctxT(t), Options{StateDir: dir, Provider: "fake", StopAll: true, Logger: testLogger(t), provider: prov})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close(context.Background())
	if _, err := os.Stat(paths.Socket(dir)); !os.IsNotExist(err) {
		t.Errorf("in-process daemon made its socket (%v)", err)
	}
	if _, err := l.BuildTemplate(ctxT(t), api.TemplateRequest{Name: "base"}, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := l.SetPool(ctxT(t), "py", api.PoolRequest{Template: "base", Min: 2, Max: 2}); err != nil {
		t.Fatal(err)
	}
	if _, err := l.Acquire(ctxT(t), "py", api.AcquireRequest{Wait: time.Minute}); err != nil {
		t.Fatal(err)
	}
	if _, err := l.EnsureMachine(ctxT(t), "box", api.MachineEnsureRequest{}); err != nil {
		t.Fatal(err)
	}
	if _, err := l.Provider().Create(ctxT(t), vm.Spec{Name: "by-hand", VCPUs: 1, MemoryMiB: 256}); err != nil {
		t.Fatal(err)
	}
	l.Close(ctxT(t))
	if left, err := prov.List(ctxT(t)); err != nil || len(left) != 0 {
		t.Errorf("after a stop-all Close the provider runs %d VMs (%v): %+v", len(left), err, left)
	}
}
