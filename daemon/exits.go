package daemon

import "github.com/warmpool/warmpool/vm"

// watchPoolExits hands every VM exit the provider reports to the pools, so
// that a dead warm VM is evicted and replaced at once rather than at the
// next acquire or health check. (The machine manager subscribes itself.)
func (d *Daemon) watchPoolExits() (stop func()) {
	n, ok := vm.As[vm.ExitNotifier](d.prov, vm.CapExitEvents)
	if !ok {
		return func() {}
	}
	return n.OnExit(func(e vm.Exit) { d.pools.VMExited(e.ID) })
}

// The wrapper passes the inner provider's exit feed through, so that the
// machine manager (and the pool) hear of a dead VM when it dies.
var _ vm.ExitNotifier = (*ownedProvider)(nil)

// OnExit implements vm.ExitNotifier. Without CapExitEvents on the inner
// provider nothing is ever reported.
func (p *ownedProvider) OnExit(fn func(vm.Exit)) (stop func()) {
	if n, ok := vm.As[vm.ExitNotifier](p.inner, vm.CapExitEvents); ok {
		return n.OnExit(fn)
	}
	return func() {}
}

// Alive implements vm.ExitNotifier; true when the inner provider cannot
// tell, which callers only ask when it advertises CapExitEvents.
func (p *ownedProvider) Alive(id string) bool {
	if n, ok := vm.As[vm.ExitNotifier](p.inner, vm.CapExitEvents); ok {
		return n.Alive(id)
	}
	return true
}
