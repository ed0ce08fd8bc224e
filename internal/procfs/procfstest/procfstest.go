// Package procfstest counts what a test process holds open, from /proc.
package procfstest

import (
	"os"
	"testing"
	"time"
)

// InotifyFDs counts the inotify descriptors this process holds open (the
// entries of /proc/self/fd that link to anon_inode:inotify); the test is
// skipped without /proc.
func InotifyFDs(t testing.TB) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skipf("no /proc/self/fd: %v", err)
	}
	n := 0
	for _, e := range ents {
		if l, _ := os.Readlink("/proc/self/fd/" + e.Name()); l == "anon_inode:inotify" {
			n++
		}
	}
	return n
}

// WaitInotifyFDs waits up to 10 s for the count to be want, and fails the
// test saying what should have freed them when it is not.
func WaitInotifyFDs(t testing.TB, want int, what string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for InotifyFDs(t) != want {
		if time.Now().After(deadline) {
			t.Fatalf("%s: %d inotify descriptors open, want %d", what, InotifyFDs(t), want)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
