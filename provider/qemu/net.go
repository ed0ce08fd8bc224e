package qemu

import (
	"fmt"
	"os"

	"github.com/warmpool/warmpool/internal/tap"
	"github.com/warmpool/warmpool/vm"
)

// netdevID is the QEMU id of the guest interface's backend.
const netdevID = "net0"

// nicArgs is the guest interface's device, the last virtio device so the
// slots of the others stay where they are with or without it. The device
// (and so its MAC) belongs to the machine's config, which clones inherit
// from their template; its backend does not.
func (c machineConfig) nicArgs() []string {
	if c.NICMAC == "" {
		return nil
	}
	return []string{"-device", "virtio-net-device,netdev=" + netdevID + ",mac=" + c.NICMAC}
}

// netdevArgs attaches the guest interface of a VM being started: to the
// TAP nic names, handed to QEMU as an open descriptor (the TAP lives in a
// network namespace QEMU need not enter), or, when nic names none, to a
// hub port nothing else is on, which carries no traffic. The returned
// file, when not nil, becomes QEMU's fd 3 and is closed by the caller once
// QEMU has started.
func netdevArgs(cfg machineConfig, nic *vm.NIC) ([]string, *os.File, error) {
	if cfg.NICMAC == "" {
		if nic.Attached() {
			return nil, nil, fmt.Errorf("a network interface is asked for but the VM has none (a template built without one must be rebuilt): %w", vm.ErrIncompatible)
		}
		return nil, nil, nil
	}
	if !nic.Attached() {
		return []string{"-netdev", "hubport,id=" + netdevID + ",hubid=0"}, nil, nil
	}
	f, err := tap.Open(nic.Netns, nic.TAP)
	if err != nil {
		return nil, nil, err
	}
	// fd 3 is the first of exec.Cmd.ExtraFiles. vhost needs /dev/vhost-net
	// and KVM; under TCG it would not help.
	return []string{"-netdev", "tap,id=" + netdevID + ",fd=3,vhost=off"}, f, nil
}

// restoredSpec is the spec of a VM restored with machine config cfg from a
// snapshot whose spec the caller gave as spec: the interface is the
// template's, attached as the caller asked.
func restoredSpec(cfg machineConfig, spec vm.Spec) vm.Spec {
	if cfg.NICMAC == "" {
		return spec
	}
	nic := vm.NIC{MAC: cfg.NICMAC}
	if spec.NIC != nil {
		nic.Netns, nic.TAP = spec.NIC.Netns, spec.NIC.TAP
	}
	spec.NIC = &nic
	return spec
}

// snapshotSpec is the spec a snapshot of a VM with spec records: the
// interface without its attachment, which was the VM's own.
func snapshotSpec(spec vm.Spec) vm.Spec {
	if spec.NIC != nil {
		spec.NIC = &vm.NIC{MAC: spec.NIC.MAC}
	}
	return spec
}
