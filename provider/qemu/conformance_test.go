package qemu_test

import (
	"context"
	"net"
	"testing"

	"github.com/warmpool/warmpool/agent"
	"github.com/warmpool/warmpool/internal/realvm"
	"github.com/warmpool/warmpool/vm"
	"github.com/warmpool/warmpool/vm/providertest"
)

func TestConformance(t *testing.T) {
	spec := testSpec(t)
	providertest.Run(t, func(t *testing.T) (vm.Provider, providertest.Fixture) {
		p := newProvider(t, realvm.StateDir(t))
		t.Cleanup(func() { p.Close() })
		return p, providertest.Fixture{
			Spec: spec,
			AgentPing: func(ctx context.Context, conn net.Conn) error {
				return agent.NewClient(conn).Ping(ctx)
			},
		}
	})
}
