package vm_test

import (
	"context"
	"testing"
	"time"

	"github.com/warmpool/warmpool/vm"
)

// snapshotter implements Snapshotter and advertises what caps says.
type snapshotter struct{ caps vm.Capabilities }

func (p snapshotter) Name() string                                   { return "test" }
func (p snapshotter) Capabilities() vm.Capabilities                  { return p.caps }
func (p snapshotter) Info(context.Context) vm.Info                   { return vm.Info{Name: "test"} }
func (p snapshotter) Create(context.Context, vm.Spec) (vm.VM, error) { return vm.VM{}, nil }
func (p snapshotter) Pause(context.Context, string) error            { return nil }
func (p snapshotter) Resume(context.Context, string) error           { return nil }
func (p snapshotter) Stop(context.Context, string, time.Duration) error {
	return nil
}
func (p snapshotter) Destroy(context.Context, string) error          { return nil }
func (p snapshotter) Inspect(context.Context, string) (vm.VM, error) { return vm.VM{}, nil }
func (p snapshotter) List(context.Context) ([]vm.VM, error)          { return nil, nil }
func (p snapshotter) Snapshot(context.Context, string, string) (vm.Snapshot, error) {
	return vm.Snapshot{}, nil
}
func (p snapshotter) Restore(context.Context, vm.Snapshot) (vm.VM, error) { return vm.VM{}, nil }

func TestAsGivesTheInterfaceOnlyWhenAdvertised(t *testing.T) {
	if _, ok := vm.As[vm.Snapshotter](snapshotter{caps: vm.Capabilities{vm.CapSnapshot: true}}, vm.CapSnapshot); !ok {
		t.Error("As refused a Snapshotter that advertises snapshot")
	}
	if _, ok := vm.As[vm.Snapshotter](snapshotter{caps: vm.Capabilities{}}, vm.CapSnapshot); ok {
		t.Error("As gave a Snapshotter that does not advertise snapshot")
	}
	if _, ok := vm.As[vm.Ballooner](snapshotter{caps: vm.Capabilities{vm.CapBalloon: true}}, vm.CapBalloon); ok {
		t.Error("As gave a Ballooner the provider does not implement")
	}
	if _, ok := vm.As[vm.Snapshotter](nil, vm.CapSnapshot); ok {
		t.Error("As of a nil provider answered ok")
	}
}
