package firecracker

import (
	"github.com/warmpool/warmpool/internal/tap"
	"github.com/warmpool/warmpool/vm"
)

// nicIfaceID is the iface_id of the interface vm.Spec.NIC asks for.
const nicIfaceID = "eth0"

// UnattachedTAP is the TAP an interface attached to nothing is backed by,
// in a namespace of its own. It has the name network slots give theirs,
// so a clone of a template built with it finds a TAP of that name in its
// slot even where Firecracker (before 1.12) cannot override the name the
// snapshot remembers.
const UnattachedTAP = "tap0"

// scratchNetnsName is the namespace that holds the TAP of VM id's
// interface attached to nothing.
func scratchNetnsName(id string) string { return "wpfc-" + id }

// checkNIC refuses what this provider cannot do with nic. Firecracker
// backs every network device with a TAP, so an interface attached to
// nothing (a template built to be attached per clone, a clone whose
// network policy is none) gets one the provider makes in a namespace of
// the VM's own, with no other device: the device exists and carries no
// traffic. Making the namespace needs root.
func (p *Provider) checkNIC(nic *vm.NIC) error {
	if nic == nil || nic.Attached() || p.canUnattached {
		return nil
	}
	return &vm.FieldError{Field: "nic", Value: nic.MAC, Reason: "Firecracker backs every network interface with a TAP: give netns and tap, or run as root so the provider can make a TAP of the VM's own"}
}

// nic is the TAP in's interface is backed by and the namespace file that
// holds it: the spec's, or for an interface attached to nothing the
// provider's own; empty when in has no interface.
func (in *instance) nic() (netnsPath, tapName string) {
	switch nic := in.Spec.NIC; {
	case nic.Attached():
		return nic.Netns, nic.TAP
	case nic != nil && in.ScratchNetns != "":
		return tap.NetnsPath(in.ScratchNetns), UnattachedTAP
	}
	return "", ""
}

// interfaces are the network devices of in: the one its spec asks for
// (a TAP in the namespace the process is started in), then those of
// Options.Network.
func (p *Provider) interfaces(in *instance) []NetworkInterface {
	var out []NetworkInterface
	if _, t := in.nic(); t != "" {
		out = append(out, NetworkInterface{ID: nicIfaceID, HostDevName: t, GuestMAC: in.Spec.NIC.MAC})
	}
	if p.opts.Network != nil {
		out = append(out, p.opts.Network(in.ID)...)
	}
	return out
}

// netns is the network namespace file in's process runs in: its NIC's,
// else (jailed) the jailer's configured one; empty for the daemon's own.
func (p *Provider) netns(in *instance) string {
	if ns, _ := in.nic(); ns != "" {
		return ns
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
