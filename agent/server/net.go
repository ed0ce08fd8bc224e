package server

import (
	"fmt"

	"github.com/warmpool/warmpool/agent/proto"
)

func (s *session) setNetwork(mode string) error {
	switch mode {
	case "":
		return nil
	case proto.NetworkUp, proto.NetworkNone:
	default:
		return fmt.Errorf("hand-off network mode %q: want %q or %q", mode, proto.NetworkUp, proto.NetworkNone)
	}
	if s.opts.SetNetwork == nil {
		return nil
	}
	if err := s.opts.SetNetwork(mode); err != nil {
		return fmt.Errorf("network %s: %w", mode, err)
	}
	return nil
}
