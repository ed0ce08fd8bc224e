package network

import (
	"fmt"

	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// tapAttached reports whether a process holds the TAP named name in
// namespace ns: a TAP has carrier exactly while a descriptor is attached to
// it. The carrier changes as the holder closes it, where the operational
// state follows only later (the kernel's link watch runs deferred, up to a
// second), so a TAP whose VMM just exited would still look attached.
func tapAttached(ns netns.NsHandle, name string) (bool, error) {
	var attached bool
	err := inNetns(ns, func() error {
		req := nl.NewNetlinkRequest(unix.RTM_GETLINK, unix.NLM_F_ACK)
		req.AddData(nl.NewIfInfomsg(unix.AF_UNSPEC))
		req.AddData(nl.NewRtAttr(unix.IFLA_IFNAME, nl.ZeroTerminated(name)))
		msgs, err := req.Execute(unix.NETLINK_ROUTE, unix.RTM_NEWLINK)
		if err != nil {
			return fmt.Errorf("reading link %s: %w", name, err)
		}
		if len(msgs) != 1 {
			return fmt.Errorf("reading link %s: %d answers", name, len(msgs))
		}
		attrs, err := nl.ParseRouteAttr(msgs[0][unix.SizeofIfInfomsg:])
		if err != nil {
			return fmt.Errorf("reading link %s: %w", name, err)
		}
		for _, a := range attrs {
			if a.Attr.Type == unix.IFLA_CARRIER && len(a.Value) == 1 {
				attached = a.Value[0] == 1
				return nil
			}
		}
		return fmt.Errorf("link %s reports no carrier", name)
	})
	return attached, err
}
