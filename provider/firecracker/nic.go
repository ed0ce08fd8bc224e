package firecracker

import (
	"github.com/warmpool/warmpool/vm"
)

// nicIfaceID is the iface_id of the interface vm.Spec.NIC asks for.
const nicIfaceID = "eth0"

// checkNIC refuses what Firecracker cannot do with nic: its network
// devices are always backed by a TAP, so an interface attached to nothing
// (a template built to be attached per clone) has no backend here.
func checkNIC(nic *vm.NIC) error {
	if nic == nil || nic.Attached() {
		return nil
	}
	return &vm.FieldError{Field: "nic", Value: nic.MAC, Reason: "Firecracker backs every network interface with a TAP: give netns and tap"}
}

// interfaces are the network devices of in: the one its spec asks for
// (a TAP in the namespace the process is started in), then those of
// Options.Network.
func (p *Provider) interfaces(in *instance) []NetworkInterface {
	var out []NetworkInterface
	if nic := in.Spec.NIC; nic.Attached() {
		out = append(out, NetworkInterface{ID: nicIfaceID, HostDevName: nic.TAP, GuestMAC: nic.MAC})
	}
	if p.opts.Network != nil {
		out = append(out, p.opts.Network(in.ID)...)
	}
	return out
}

// netns is the network namespace file in's process runs in: its NIC's,
// else (jailed) the jailer's configured one; empty for the daemon's own.
func (p *Provider) netns(in *instance) string {
	if nic := in.Spec.NIC; nic.Attached() {
		return nic.Netns
	}
	if in.Jailed {
		return p.opts.Jailer.NetNS
	}
	return ""
}

// overrides are the network_overrides of a snapshot load into in: every
// interface gets the TAP of in's own, where the snapshot remembers the one
// of the VM it was taken from.
func (p *Provider) overrides(in *instance) []networkOverride {
	var out []networkOverride
	for _, n := range p.interfaces(in) {
		out = append(out, networkOverride{IfaceID: n.ID, HostDevName: n.HostDevName})
	}
	return out
}
