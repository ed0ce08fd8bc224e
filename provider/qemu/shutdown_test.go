package qemu

import (
	"context"
	"net"
	"testing"
	"time"

	agentserver "github.com/warmpool/warmpool/agent/server"
)

// The provider asks the guest to power off through the real agent server,
// with no help from the caller.
func TestAgentShutdownPowersTheGuestOff(t *testing.T) {
	host, guest := net.Pipe()
	defer host.Close()
	poweredOff := make(chan struct{})
	go func() {
		_ = agentserver.Serve(context.Background(), guest, agentserver.Options{PowerOff: func() error {
			close(poweredOff)
			return nil
		}})
	}()
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	if err := agentShutdown(ctx, host); err != nil {
		t.Fatalf("agentShutdown: %v", err)
	}
	select {
	case <-poweredOff:
	case <-ctx.Done():
		t.Fatal("the agent acknowledged but never powered off")
	}
}

// An agent that never answers holds Stop up only until its context ends,
// so Stop can fall back to ACPI.
func TestAgentShutdownGivesUpWithItsContext(t *testing.T) {
	host, guest := net.Pipe()
	defer host.Close()
	defer guest.Close()
	go func() {
		buf := make([]byte, 4096)
		for {
			if _, err := guest.Read(buf); err != nil {
				return
			}
		}
	}()
	ctx, cancel := context.WithTimeout(t.Context(), 50*time.Millisecond)
	defer cancel()
	if err := agentShutdown(ctx, host); err == nil {
		t.Fatal("agentShutdown with a silent agent returned nil")
	}
}
