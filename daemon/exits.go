package daemon

import "github.com/warmpool/warmpool/vm"

// The wrapper passes the inner provider's exit feed through, so that the
// machine manager (and the pool) hear of a dead VM when it dies.
var _ vm.ExitNotifier = (*ownedProvider)(nil)

// OnExit implements vm.ExitNotifier. Without CapExitEvents on the inner
// provider nothing is ever reported.
func (p *ownedProvider) OnExit(fn func(vm.Exit)) (stop func()) {
	if n, ok := p.inner.(vm.ExitNotifier); ok {
		return n.OnExit(fn)
	}
	return func() {}
}

// Alive implements vm.ExitNotifier; true when the inner provider cannot
// tell, which callers only ask when it advertises CapExitEvents.
func (p *ownedProvider) Alive(id string) bool {
	if n, ok := p.inner.(vm.ExitNotifier); ok {
		return n.Alive(id)
	}
	return true
}
