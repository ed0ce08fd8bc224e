package pool

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/warmpool/warmpool/provider/fake"
)

// A pool that cannot refill says why in its status, until a restore works.
func TestStatusCarriesLastRefillError(t *testing.T) {
	p, prov := newTestPool(t, fake.Options{}, func(c *Config) {
		c.BackoffBase = 5 * time.Millisecond
		c.BackoffMax = 20 * time.Millisecond
	})
	cause := errors.New("kernel image missing")
	prov.SetFault(fake.OpRestore, fake.Fault{FailFraction: 1, Err: cause})
	snap := prov.AddSnapshot(testSpec)
	if err := p.Register(stack("broken", snap, 1, 1)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "a refill error in the status", func() bool { return status(t, p, "broken").LastError != "" })
	if s := status(t, p, "broken"); !strings.Contains(s.LastError, cause.Error()) || !strings.Contains(s.LastError, snap.ID) {
		t.Errorf("LastError = %q, want the restore error naming %s and %q", s.LastError, snap.ID, cause)
	}
	prov.SetFault(fake.OpRestore, fake.Fault{})
	waitReady(t, p, "broken", 1)
	if s := status(t, p, "broken"); s.LastError != "" {
		t.Errorf("LastError = %q after a successful refill, want empty", s.LastError)
	}
}

// A new generation starts without the old one's error.
func TestNewGenerationClearsLastError(t *testing.T) {
	p, prov := newTestPool(t, fake.Options{}, nil)
	bad := prov.AddSnapshot(testSpec)
	good := prov.AddSnapshot(testSpec)
	prov.SetHook(func(_ context.Context, op fake.Op, target string) error {
		if op == fake.OpRestore && target == bad.ID {
			return errors.New("incompatible")
		}
		return nil
	})
	if err := p.Register(stack("s", bad, 1, 1)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "a refill error in the status", func() bool { return status(t, p, "s").LastError != "" })
	// Hold the new generation's restores so the status is read before any
	// of them can succeed or fail.
	prov.SetLatency(fake.OpRestore, time.Hour)
	if err := p.Register(stack("s", good, 1, 1)); err != nil {
		t.Fatal(err)
	}
	if s := status(t, p, "s"); s.LastError != "" {
		t.Errorf("LastError = %q right after the generation changed, want empty", s.LastError)
	}
}
