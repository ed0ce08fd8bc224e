package providertest

import (
	"context"
	"errors"
	"fmt"
	"syscall"
	"testing"
	"time"

	"github.com/warmpool/warmpool/vm"
)

// testExitEvents kills one VM's process from outside and checks that every
// subscriber hears of it in time, while VMs the caller stopped or destroyed
// itself, and subscribers that left, hear nothing.
func (s *suite) testExitEvents(t *testing.T) {
	n, ok := s.p.(vm.ExitNotifier)
	if !s.p.Capabilities().Has(vm.CapExitEvents) {
		t.Skip("provider has no exit-events capability")
	}
	if !ok {
		t.Fatal("capability exit-events advertised but vm.ExitNotifier is not implemented")
	}
	ctx := s.ctx(t)
	killed, stopped, destroyed := s.exitVM(t), s.exitVM(t), s.exitVM(t)
	if s.fx.Kill == nil && killed.PID <= 0 {
		t.Skip("the VM has no PID and the fixture no Kill")
	}
	for _, v := range []vm.VM{killed, stopped, destroyed} {
		if !n.Alive(v.ID) {
			t.Fatalf("Alive(%s) = false for a VM that runs", v.ID)
		}
	}
	if n.Alive("no-such-vm") {
		t.Error("Alive of an unknown ID = true")
	}

	first, second, left := make(chan vm.Exit, 16), make(chan vm.Exit, 16), make(chan vm.Exit, 16)
	defer n.OnExit(func(e vm.Exit) { first <- e })()
	defer n.OnExit(func(e vm.Exit) { second <- e })()
	n.OnExit(func(e vm.Exit) { left <- e })()

	if err := s.p.Stop(ctx, stopped.ID, s.fx.StopGrace); err != nil {
		t.Fatalf("Stop %s: %v", stopped.ID, err)
	}
	if err := s.p.Destroy(ctx, stopped.ID); err != nil {
		t.Fatalf("Destroy stopped %s: %v", stopped.ID, err)
	}
	if err := s.p.Destroy(ctx, destroyed.ID); err != nil {
		t.Fatalf("Destroy %s: %v", destroyed.ID, err)
	}
	start := time.Now()
	if err := s.kill(ctx, killed); err != nil {
		t.Fatalf("kill the process of %s: %v", killed.ID, err)
	}
	// Before any notification: a caller checking Alive right after the
	// kill must not be told the VM runs while its process dies.
	if n.Alive(killed.ID) {
		t.Errorf("Alive(%s) = true right after its process was killed", killed.ID)
	}
	// Each subscriber gets exits in order: by the time the killed VM's
	// arrives, any wrongly reported stop or destroy has arrived too.
	for name, ch := range map[string]chan vm.Exit{"first": first, "second": second} {
		select {
		case e := <-ch:
			if e.ID != killed.ID {
				t.Errorf("%s subscriber: exit reported for %s (%q), which the caller stopped or destroyed itself; want only %s", name, e.ID, e.Reason, killed.ID)
				continue
			}
			if e.At.IsZero() || e.Reason == "" {
				t.Errorf("%s subscriber: exit of %s has time %v and reason %q; want both set", name, e.ID, e.At, e.Reason)
			}
			t.Logf("%s subscriber: exit of %s after %v: %s", name, e.ID, time.Since(start), e.Reason)
		case <-time.After(s.fx.ExitTimeout):
			t.Fatalf("%s subscriber: no exit reported within %v of killing %s", name, s.fx.ExitTimeout, killed.ID)
		}
	}
	if n.Alive(killed.ID) {
		t.Errorf("Alive(%s) = true after its exit was reported", killed.ID)
	}
	wantStatus(ctx, t, s.p, killed.ID, vm.StatusStopped)
	if err := s.p.Destroy(ctx, killed.ID); err != nil {
		t.Fatalf("Destroy killed %s: %v", killed.ID, err)
	}
	select {
	case e := <-left:
		t.Errorf("a subscriber that stopped listening got the exit of %s", e.ID)
	case e := <-first:
		t.Errorf("second exit reported (%s, %q) after the only one", e.ID, e.Reason)
	default:
	}
}

// exitVM is a running VM for testExitEvents: restored from the suite's
// snapshot when there is one (cheap), else booted.
func (s *suite) exitVM(t *testing.T) vm.VM {
	t.Helper()
	ctx := s.ctx(t)
	var v vm.VM
	var err error
	sn, ok := s.p.(vm.Snapshotter)
	s.mu.Lock()
	snap := s.snap
	s.mu.Unlock()
	if ok && snap.ID != "" {
		v, err = sn.Restore(ctx, snap)
	} else {
		v, err = s.p.Create(ctx, s.templateSpec())
	}
	if err != nil {
		t.Fatalf("make a VM to kill: %v", err)
	}
	s.track(v.ID)
	if v.Status == vm.StatusPaused {
		if err := s.p.Resume(ctx, v.ID); err != nil {
			t.Fatalf("Resume %s: %v", v.ID, err)
		}
	}
	if v, err = s.p.Inspect(ctx, v.ID); err != nil {
		t.Fatalf("Inspect %s: %v", v.ID, err)
	}
	return v
}

func (s *suite) kill(ctx context.Context, v vm.VM) error {
	if s.fx.Kill != nil {
		return s.fx.Kill(ctx, v)
	}
	if err := syscall.Kill(v.PID, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("SIGKILL pid %d: %w", v.PID, err)
	}
	return nil
}
