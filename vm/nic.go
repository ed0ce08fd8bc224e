package vm

import (
	"net"
	"path/filepath"
)

// CapNetwork: the provider honours Spec.NIC attached to a TAP.
// CapNetworkUnattached: also a NIC attached to nothing, which templates
// need: they are built with the interface their clones are each attached
// to a TAP of their own by.
const (
	CapNetwork           Capability = "network"
	CapNetworkUnattached Capability = "network-unattached"
)

// NIC is a VM's one network interface (a virtio-net device). The device
// belongs to the guest and its snapshot; what carries its traffic on the
// host is chosen anew for every process that runs it, so every clone of a
// template has the template's interface and each is attached to a TAP of
// its own.
type NIC struct {
	// MAC is the guest's hardware address, part of the device.
	MAC string `json:"mac"`
	// Netns is the network namespace file (/run/netns/NAME) that holds
	// the TAP device named TAP. Both empty: the interface is attached to
	// nothing and carries no traffic (a template being built, a VM whose
	// network policy is none).
	Netns string `json:"netns,omitempty"`
	TAP   string `json:"tap,omitempty"`
}

// Attached reports whether the interface is attached to a TAP.
func (n *NIC) Attached() bool { return n != nil && n.TAP != "" }

// Validate reports the first field no provider could honour.
func (n *NIC) Validate() error {
	if n == nil {
		return nil
	}
	hw, err := net.ParseMAC(n.MAC)
	if err != nil || len(hw) != 6 {
		return &FieldError{Field: "nic.mac", Value: n.MAC, Reason: "must be a 48-bit MAC address like 02:00:00:00:00:01"}
	}
	if hw[0]&1 != 0 {
		return &FieldError{Field: "nic.mac", Value: n.MAC, Reason: "must be a unicast address"}
	}
	if (n.Netns == "") != (n.TAP == "") {
		return &FieldError{Field: "nic", Value: n.Netns + " " + n.TAP, Reason: "netns and tap are set together or not at all"}
	}
	if n.Netns != "" && !filepath.IsAbs(n.Netns) {
		return &FieldError{Field: "nic.netns", Value: n.Netns, Reason: "must be an absolute path"}
	}
	if n.TAP != "" {
		if err := ValidateName("nic.tap", n.TAP); err != nil {
			return err
		}
		if len(n.TAP) > 15 {
			return &FieldError{Field: "nic.tap", Value: n.TAP, Reason: "must be at most 15 bytes, as interface names are"}
		}
	}
	return nil
}

// WithNIC returns snap with its template's interface attached to TAP tap
// in the namespace file netnsPath (both empty: attached to nothing); a
// snapshot without an interface is returned as it is. The MAC is the template's: a
// restored guest keeps the device it was snapshotted with.
func (snap Snapshot) WithNIC(netnsPath, tap string) Snapshot {
	if snap.Spec.NIC == nil {
		return snap
	}
	n := *snap.Spec.NIC
	n.Netns, n.TAP = netnsPath, tap
	snap.Spec.NIC = &n
	return snap
}
