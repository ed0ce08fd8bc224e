package daemon

import (
	"errors"
	"log/slog"
	"testing"

	"github.com/warmpool/warmpool/provider/fake"
	"github.com/warmpool/warmpool/vm"
)

// noBalloonFake is the fake provider without its balloon capability; its
// type still has the Ballooner methods.
type noBalloonFake struct{ *fake.Provider }

func (p noBalloonFake) Capabilities() vm.Capabilities {
	caps := p.Provider.Capabilities()
	delete(caps, vm.CapBalloon)
	return caps
}

// The wrapper implements every optional interface; what it offers is what
// its inner provider advertises, also when a caller asks the wrapper
// directly.
func TestWrapperOffersOnlyWhatItsProviderAdvertises(t *testing.T) {
	p := &ownedProvider{inner: noBalloonFake{fake.New(fake.Options{})}, log: slog.New(slog.DiscardHandler)}
	if _, ok := vm.As[vm.Ballooner](p, vm.CapBalloon); ok {
		t.Error("vm.As gave a Ballooner through the wrapper of a provider without the balloon capability")
	}
	if _, ok := vm.As[vm.Snapshotter](p, vm.CapSnapshot); !ok {
		t.Error("vm.As refused the Snapshotter of a provider that advertises snapshots")
	}
	if err := p.SetBalloon(t.Context(), "no-such-vm", 128); !errors.Is(err, vm.ErrUnsupported) {
		t.Errorf("SetBalloon through the wrapper = %v, want vm.ErrUnsupported", err)
	}
}
