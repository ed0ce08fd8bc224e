// Command warmpool-agent is warmpool's guest agent. It runs inside every VM
// and answers the host over a virtio-serial port named org.warmpool.agent
// (QEMU) and, when the guest has vsock, on vsock port 1024 (Firecracker). The
// protocol is in package agent/proto.
//
// In the guest image it is also /init: as PID 1 it mounts /proc, /sys and
// /dev, loads the kernel modules listed in /lib/modules/warmpool.order, brings
// up the loopback interface, and then keeps one agent process running
// (`warmpool-agent serve`) while reaping every orphan the guest's commands
// leave behind. The agent runs as a child rather than in PID 1 itself so that
// the reaper never steals the exit status of a command the agent waits for.
//
// It is built static (CGO_ENABLED=0) by package guest.
package main
