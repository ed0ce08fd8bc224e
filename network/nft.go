package network

import (
	"encoding/binary"
	"fmt"
	"net/netip"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// slotTable is the table inside every slot namespace; the namespace is
// ours alone, so its name needs no tag.
const slotTable = "warmpool"

// Chains of slotTable, with the number of rules each has whatever the
// policy; egressChain holds the policy's rules and is emptied on release.
const (
	chainPrerouting  = "prerouting"
	chainPostrouting = "postrouting"
	chainForward     = "forward"
	chainInput       = "input"
	chainOutput      = "output"
	egressChain      = "egress"
)

var slotChainRules = map[string]int{
	chainPrerouting:  1,
	chainPostrouting: 1,
	chainForward:     3,
	chainInput:       1,
	chainOutput:      2,
	egressChain:      0,
}

// hostTableName is the table in the host namespace of the daemon with tag.
func hostTableName(tag string) string { return "wp-" + tag }

func ifname(name string) []byte {
	b := make([]byte, unix.IFNAMSIZ)
	copy(b, name)
	return b
}

func matchIIF(name []byte) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: name},
	}
}

func matchOIF(op expr.CmpOp, name []byte) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyOIFNAME, Register: 1},
		&expr.Cmp{Op: op, Register: 1, Data: name},
	}
}

// matchAddr matches the IPv4 source (src) or destination address against
// a prefix.
func matchAddr(src bool, p netip.Prefix) []expr.Any {
	off := uint32(16)
	if src {
		off = 12
	}
	a := p.Masked().Addr().As4()
	mask := netipMask(p.Bits())
	return []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: 4},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: mask, Xor: []byte{0, 0, 0, 0}},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: a[:]},
	}
}

func netipMask(bits int) []byte {
	m := make([]byte, 4)
	binary.BigEndian.PutUint32(m, ^uint32(0)<<(32-bits))
	if bits == 0 {
		binary.BigEndian.PutUint32(m, 0)
	}
	return m
}

func ctState(bits uint32) []expr.Any {
	return []expr.Any{
		&expr.Ct{Register: 1, Key: expr.CtKeySTATE},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binary.NativeEndian.AppendUint32(nil, bits), Xor: make([]byte, 4)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: make([]byte, 4)},
	}
}

func ctStatusDNAT() []expr.Any {
	return []expr.Any{
		&expr.Ct{Register: 1, Key: expr.CtKeySTATUS},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binary.NativeEndian.AppendUint32(nil, ipsDstNAT), Xor: make([]byte, 4)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: make([]byte, 4)},
	}
}

func verdict(k expr.VerdictKind) expr.Any { return &expr.Verdict{Kind: k} }

func nat(t expr.NATType, to netip.Addr) []expr.Any {
	a := to.As4()
	return []expr.Any{
		&expr.Immediate{Register: 1, Data: a[:]},
		&expr.NAT{Type: t, Family: unix.NFPROTO_IPV4, RegAddrMin: 1},
	}
}

func cat(parts ...[]expr.Any) []expr.Any {
	var out []expr.Any
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

// addSlotRules queues the whole of slotTable for slot s: the translation
// between the slot's address and the guest's, and the filter that lets in
// what the host starts and lets out only what the policy allows (in
// egressChain, filled by addPolicyRules).
func addSlotRules(c *nftables.Conn, s Slot) {
	t := c.AddTable(&nftables.Table{Family: nftables.TableFamilyIPv4, Name: slotTable})
	c.FlushTable(t)
	accept, drop := nftables.ChainPolicyAccept, nftables.ChainPolicyDrop
	pre := c.AddChain(&nftables.Chain{Name: chainPrerouting, Table: t, Type: nftables.ChainTypeNAT,
		Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityNATDest, Policy: &accept})
	post := c.AddChain(&nftables.Chain{Name: chainPostrouting, Table: t, Type: nftables.ChainTypeNAT,
		Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityNATSource, Policy: &accept})
	fwd := c.AddChain(&nftables.Chain{Name: chainForward, Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookForward, Priority: nftables.ChainPriorityFilter, Policy: &drop})
	in := c.AddChain(&nftables.Chain{Name: chainInput, Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookInput, Priority: nftables.ChainPriorityFilter, Policy: &accept})
	out := c.AddChain(&nftables.Chain{Name: chainOutput, Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookOutput, Priority: nftables.ChainPriorityFilter, Policy: &accept})
	eg := c.AddChain(&nftables.Chain{Name: egressChain, Table: t})

	veth, tap := ifname(slotVeth), ifname(TAPName)
	// Ingress: the slot's address is the guest's.
	c.AddRule(&nftables.Rule{Table: t, Chain: pre, Exprs: cat(matchIIF(veth),
		matchAddr(false, netip.PrefixFrom(s.Address, 32)), nat(expr.NATTypeDestNAT, GuestIP))})
	// Egress: the guest's address becomes the slot's.
	c.AddRule(&nftables.Rule{Table: t, Chain: post, Exprs: cat(matchOIF(expr.CmpOpEq, veth),
		matchAddr(true, netip.PrefixFrom(GuestIP, 32)), nat(expr.NATTypeSourceNAT, s.Address))})
	c.AddRule(&nftables.Rule{Table: t, Chain: fwd, Exprs: cat(
		ctState(expr.CtStateBitESTABLISHED|expr.CtStateBitRELATED), []expr.Any{verdict(expr.VerdictAccept)})})
	c.AddRule(&nftables.Rule{Table: t, Chain: fwd, Exprs: cat(matchIIF(veth), matchOIF(expr.CmpOpEq, tap),
		ctStatusDNAT(), []expr.Any{verdict(expr.VerdictAccept)})})
	c.AddRule(&nftables.Rule{Table: t, Chain: fwd, Exprs: cat(matchIIF(tap), matchOIF(expr.CmpOpEq, veth),
		[]expr.Any{&expr.Verdict{Kind: expr.VerdictJump, Chain: egressChain}})})
	// The guest has no business with the namespace itself (its gateway
	// address, the slot's address untranslated).
	c.AddRule(&nftables.Rule{Table: t, Chain: in, Exprs: cat(matchIIF(tap), []expr.Any{verdict(expr.VerdictDrop)})})
	// Nor may what runs in the namespace itself (the VMM) start anything
	// through the host.
	c.AddRule(&nftables.Rule{Table: t, Chain: out, Exprs: cat(matchOIF(expr.CmpOpEq, veth),
		ctState(expr.CtStateBitESTABLISHED|expr.CtStateBitRELATED), []expr.Any{verdict(expr.VerdictAccept)})})
	c.AddRule(&nftables.Rule{Table: t, Chain: out, Exprs: cat(matchOIF(expr.CmpOpEq, veth), []expr.Any{verdict(expr.VerdictDrop)})})
	addPolicyRules(c, t, eg, s)
}

// addPolicyRules queues the policy's rules into egressChain, which must be
// empty; what they do not accept falls back to the forward chain's drop.
func addPolicyRules(c *nftables.Conn, t *nftables.Table, eg *nftables.Chain, s Slot) {
	if s.Policy != PolicyEgress {
		return
	}
	if len(s.Allow) == 0 {
		c.AddRule(&nftables.Rule{Table: t, Chain: eg, Exprs: []expr.Any{verdict(expr.VerdictAccept)}})
		return
	}
	for _, a := range s.Allow {
		if a.Port == 0 {
			c.AddRule(&nftables.Rule{Table: t, Chain: eg, Exprs: cat(matchAddr(false, a.Prefix), []expr.Any{verdict(expr.VerdictAccept)})})
			continue
		}
		for _, proto := range []byte{unix.IPPROTO_TCP, unix.IPPROTO_UDP} {
			c.AddRule(&nftables.Rule{Table: t, Chain: eg, Exprs: cat(matchAddr(false, a.Prefix), []expr.Any{
				&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
				&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{proto}},
				&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
				&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binary.BigEndian.AppendUint16(nil, a.Port)},
				verdict(expr.VerdictAccept),
			})})
		}
	}
}

// policyRuleCount is how many rules addPolicyRules gives s.
func policyRuleCount(s Slot) int {
	if s.Policy != PolicyEgress {
		return 0
	}
	if len(s.Allow) == 0 {
		return 1
	}
	n := 0
	for _, a := range s.Allow {
		if a.Port == 0 {
			n++
		} else {
			n += 2
		}
	}
	return n
}

// addHostRules queues the host table of tag: a guest reaches none of the
// host's own addresses (only replies to what the host started come back
// in), no slot reaches another, and what an egress slot sends to the rest
// of the world leaves masqueraded as the host. Matching every slot by the
// host veth prefix keeps the table the same whatever the slots.
func addHostRules(c *nftables.Conn, tag string, cidr netip.Prefix) {
	t := c.AddTable(&nftables.Table{Family: nftables.TableFamilyIPv4, Name: hostTableName(tag)})
	c.FlushTable(t)
	accept := nftables.ChainPolicyAccept
	in := c.AddChain(&nftables.Chain{Name: "input", Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookInput, Priority: nftables.ChainPriorityFilter, Policy: &accept})
	fwd := c.AddChain(&nftables.Chain{Name: "forward", Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookForward, Priority: nftables.ChainPriorityFilter, Policy: &accept})
	post := c.AddChain(&nftables.Chain{Name: "postrouting", Table: t, Type: nftables.ChainTypeNAT,
		Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityNATSource, Policy: &accept})
	ours := []byte(hostVethPrefix(tag)) // no NUL: a prefix match, like nft's "wp<tag>*"
	c.AddRule(&nftables.Rule{Table: t, Chain: in, Exprs: cat(matchIIF(ours),
		ctState(expr.CtStateBitESTABLISHED|expr.CtStateBitRELATED), []expr.Any{verdict(expr.VerdictAccept)})})
	c.AddRule(&nftables.Rule{Table: t, Chain: in, Exprs: cat(matchIIF(ours), []expr.Any{verdict(expr.VerdictDrop)})})
	c.AddRule(&nftables.Rule{Table: t, Chain: fwd, Exprs: cat(matchIIF(ours), matchOIF(expr.CmpOpEq, ours),
		[]expr.Any{verdict(expr.VerdictDrop)})})
	c.AddRule(&nftables.Rule{Table: t, Chain: post, Exprs: cat(matchAddr(true, cidr),
		matchOIF(expr.CmpOpNeq, ours), []expr.Any{&expr.Masq{}})})
}

// removeTable deletes the table name if it exists.
func removeTable(c *nftables.Conn, name string) error {
	tables, err := c.ListTablesOfFamily(nftables.TableFamilyIPv4)
	if err != nil {
		return fmt.Errorf("listing nftables tables: %w", err)
	}
	for _, t := range tables {
		if t.Name == name {
			c.DelTable(t)
			if err := c.Flush(); err != nil {
				return fmt.Errorf("deleting nftables table %s: %w", name, err)
			}
		}
	}
	return nil
}

// checkSlotRules says what is wrong with the ruleset of a slot's
// namespace, if anything: any table but slotTable, a missing or extra
// chain, or a chain with other than its number of rules.
func checkSlotRules(c *nftables.Conn, s Slot) error {
	tables, err := c.ListTables()
	if err != nil {
		return fmt.Errorf("listing nftables tables: %w", err)
	}
	var ours *nftables.Table
	for _, t := range tables {
		if t.Name != slotTable || t.Family != nftables.TableFamilyIPv4 {
			return fmt.Errorf("unexpected nftables table %s", t.Name)
		}
		ours = t
	}
	if ours == nil {
		return fmt.Errorf("nftables table %s is missing", slotTable)
	}
	chains, err := c.ListChainsOfTableFamily(nftables.TableFamilyIPv4)
	if err != nil {
		return fmt.Errorf("listing nftables chains: %w", err)
	}
	seen := 0
	for _, ch := range chains {
		want, ok := slotChainRules[ch.Name]
		if !ok {
			return fmt.Errorf("unexpected nftables chain %s", ch.Name)
		}
		if ch.Name == egressChain {
			want = policyRuleCount(s)
		}
		rules, err := c.GetRules(ours, ch)
		if err != nil {
			return fmt.Errorf("listing the rules of chain %s: %w", ch.Name, err)
		}
		if len(rules) != want {
			return fmt.Errorf("nftables chain %s has %d rules, want %d", ch.Name, len(rules), want)
		}
		seen++
	}
	if seen != len(slotChainRules) {
		return fmt.Errorf("nftables table %s has %d chains, want %d", slotTable, seen, len(slotChainRules))
	}
	return nil
}

// ipsDstNAT is the conntrack status bit of a destination-translated
// connection (IPS_DST_NAT).
const ipsDstNAT = 1 << 5
