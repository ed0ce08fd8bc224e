package vm_test

import (
	"testing"
	"time"

	"github.com/warmpool/warmpool/vm"
)

func TestExitFeedDeliversToEverySubscriberInOrder(t *testing.T) {
	var f vm.ExitFeed
	block := make(chan struct{})
	slow, fast, gone := make(chan vm.Exit, 4), make(chan vm.Exit, 4), make(chan vm.Exit, 4)
	defer f.OnExit(func(e vm.Exit) { <-block; slow <- e })()
	defer f.OnExit(func(e vm.Exit) { fast <- e })()
	f.OnExit(func(e vm.Exit) { gone <- e })()

	f.Notify(vm.Exit{ID: "a", Reason: "killed"})
	f.Notify(vm.Exit{ID: "b", Reason: "killed"})
	// A subscriber stuck in its callback holds up neither Notify nor the
	// others.
	for _, want := range []string{"a", "b"} {
		select {
		case e := <-fast:
			if e.ID != want || e.At.IsZero() {
				t.Fatalf("fast subscriber got %+v, want %s with a time", e, want)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("fast subscriber never got %s while another one blocked", want)
		}
	}
	close(block)
	for _, want := range []string{"a", "b"} {
		select {
		case e := <-slow:
			if e.ID != want {
				t.Fatalf("slow subscriber got %s, want %s (in order)", e.ID, want)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("slow subscriber never got %s", want)
		}
	}
	select {
	case e := <-gone:
		t.Fatalf("stopped subscriber got %+v", e)
	case <-time.After(20 * time.Millisecond):
	}
}
