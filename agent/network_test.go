package agent_test

import (
	"context"
	"net"
	"sync"
	"testing"

	"github.com/warmpool/warmpool/agent"
	"github.com/warmpool/warmpool/agent/proto"
	"github.com/warmpool/warmpool/agent/server"
	"github.com/warmpool/warmpool/provider/fake"
	"github.com/warmpool/warmpool/vm"
)

// The hand-off tells the guest what to do with its interface from the
// VM's NIC: refresh its neighbours when it is attached to a TAP, remove it
// when it is attached to nothing, and nothing without one.
func TestHandoffNetworkModeFollowsTheNIC(t *testing.T) {
	var mu sync.Mutex
	var modes []string
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	opts := server.Options{State: server.NewState(), SetNetwork: func(mode string) error {
		mu.Lock()
		defer mu.Unlock()
		modes = append(modes, mode)
		return nil
	}}
	p := fake.New(fake.Options{AgentHandler: func(c net.Conn) { _ = server.Serve(ctx, c, opts) }})
	h := agent.NewHandoffer(p, p)
	t.Cleanup(h.Close)
	for _, tc := range []struct {
		nic  *vm.NIC
		want []string
	}{
		{&vm.NIC{MAC: "02:00:00:00:00:02", Netns: "/run/netns/x", TAP: "tap0"}, []string{proto.NetworkUp}},
		{&vm.NIC{MAC: "02:00:00:00:00:02"}, []string{proto.NetworkNone}},
		{nil, nil},
	} {
		snap := p.AddSnapshot(vm.Spec{Name: "tmpl", VCPUs: 1, MemoryMiB: 128})
		v, err := p.Restore(ctxT(t), snap)
		if err != nil {
			t.Fatal(err)
		}
		if err := p.Resume(ctxT(t), v.ID); err != nil {
			t.Fatal(err)
		}
		v.Spec.NIC = tc.nic
		mu.Lock()
		modes = nil
		mu.Unlock()
		if _, err := h.Handoff(ctxT(t), v, agent.HandoffRequest{}); err != nil {
			t.Fatal(err)
		}
		mu.Lock()
		got := modes
		mu.Unlock()
		if len(got) != len(tc.want) || (len(got) == 1 && got[0] != tc.want[0]) {
			t.Errorf("NIC %+v: the guest was told %q, want %q", tc.nic, got, tc.want)
		}
		_ = p.Destroy(context.Background(), v.ID)
	}
	c, _ := pipeAgent(t, server.Options{})
	if _, err := c.Handoff(ctxT(t), agent.HandoffRequest{Network: "down"}); err == nil {
		t.Error("a hand-off with network mode down was sent")
	}
}
