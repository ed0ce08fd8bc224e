package events

import "testing"

func TestBusDeliversFilteredAndNeverBlocks(t *testing.T) {
	b := NewBus()
	all := b.Subscribe(10, nil)
	onlyA := b.Subscribe(1, func(e Event) bool { return e.Subject == "a" })
	b.Publish(Event{Kind: "k", Subject: "a"})
	b.Publish(Event{Kind: "k", Subject: "b"})
	b.Publish(Event{Kind: "k", Subject: "a"}) // onlyA's buffer is full: dropped, not blocked
	if got := len(all.C); got != 3 {
		t.Fatalf("all got %d events, want 3", got)
	}
	e := <-onlyA.C
	if e.Subject != "a" || e.Time.IsZero() || e.Detail == nil {
		t.Fatalf("unexpected event %+v", e)
	}
	if onlyA.Dropped() != 1 {
		t.Fatalf("dropped = %d, want 1", onlyA.Dropped())
	}
	onlyA.Close()
	onlyA.Close()
	b.Close()
	for range all.C {
	}
}
