//go:build !linux

package server

// setSparePriority has no idle class to use outside Linux; the guest agent
// only runs in Linux guests.
func setSparePriority(int, bool) error { return nil }

func normalPriorityGroup(int) {}
