package e2b

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/warmpool/warmpool/agent"
	"github.com/warmpool/warmpool/agent/proto"
	"github.com/warmpool/warmpool/internal/procfs/procfstest"
)

// The fake backend's guest agent runs in this process, so its watches are
// this host's inotify and these paths are this host's.

func openWatch(t *testing.T, w *world, sb sandbox, req *watchRequest) (*connect.ServerStreamForClient[watchDirResponse], context.CancelFunc, error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	c := connectClient[watchRequest, watchDirResponse](w, "/filesystem.Filesystem/WatchDir", sb.SandboxID, sb.EnvdAccessToken)
	stream, err := c.CallServerStream(ctx, connect.NewRequest(req))
	if err != nil {
		return nil, cancel, err
	}
	if !stream.Receive() {
		stream.Close()
		return nil, cancel, stream.Err()
	}
	if stream.Msg().Start == nil {
		t.Fatalf("first WatchDir message %+v, want start", stream.Msg())
	}
	return stream, cancel, nil
}

// WatchDir answers start once the directory is watched, then each change
// with its name relative to the directory and E2B's event type; a
// missing directory is NotFound, a file InvalidArgument.
func TestWatchDirStreamsEvents(t *testing.T) {
	w := newWorld(t)
	sb := w.create(`{"templateID":"web"}`)
	dir := t.TempDir()
	if _, _, err := openWatch(t, w, sb, &watchRequest{Path: dir + "/missing"}); connect.CodeOf(err) != connect.CodeNotFound {
		t.Errorf("WatchDir of a missing directory: %v, want not found (the SDK's FileNotFoundError)", err)
	}
	if err := os.WriteFile(dir+"/file", nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, _, err := openWatch(t, w, sb, &watchRequest{Path: dir + "/file"}); connect.CodeOf(err) != connect.CodeInvalidArgument {
		t.Errorf("WatchDir of a file: %v, want invalid argument", err)
	}
	if _, _, err := openWatch(t, w, sb, &watchRequest{Path: dir, IncludeEntry: true}); connect.CodeOf(err) != connect.CodeInvalidArgument {
		t.Errorf("WatchDir with includeEntry: %v, want invalid argument", err)
	}
	stream, cancel, err := openWatch(t, w, sb, &watchRequest{Path: dir, Recursive: true})
	if err != nil {
		t.Fatal(err)
	}
	defer stream.Close()
	got := make(chan filesystemEvent, 256)
	go func() {
		for stream.Receive() {
			if fe := stream.Msg().Filesystem; fe != nil {
				got <- *fe
			}
		}
		close(got)
	}()
	var seen []filesystemEvent
	expect := func(want ...filesystemEvent) {
		t.Helper()
		timeout := time.After(10 * time.Second)
		for len(want) > 0 {
			select {
			case fe, ok := <-got:
				if !ok {
					t.Fatalf("stream ended after %+v: %v", seen, stream.Err())
				}
				seen = append(seen, fe)
				if fe == want[0] {
					want = want[1:]
				}
			case <-timeout:
				t.Fatalf("events %+v, still waiting for %+v", seen, want)
			}
		}
	}
	if err := os.MkdirAll(dir+"/sub", 0o755); err != nil {
		t.Fatal(err)
	}
	// Once its create is reported, the new directory is watched too.
	expect(filesystemEvent{"sub", eventTypeCreate})
	if err := os.WriteFile(dir+"/sub/new.txt", []byte("hi"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(dir + "/file"); err != nil {
		t.Fatal(err)
	}
	expect(filesystemEvent{"sub/new.txt", eventTypeCreate}, filesystemEvent{"sub/new.txt", eventTypeWrite}, filesystemEvent{"file", eventTypeRemove})
	cancel()
	if b, _ := json.Marshal(watchDirResponse{Filesystem: &filesystemEvent{Name: "a/b", Type: eventTypeRename}}); string(b) != `{"filesystem":{"name":"a/b","type":"EVENT_TYPE_RENAME"}}` {
		t.Errorf("a filesystem event encodes as %s", b)
	}
	var req watchRequest
	if err := json.Unmarshal([]byte(`{"path":"/x","recursive":true,"allowNetworkMounts":false}`), &req); err != nil || req.Path != "/x" || !req.Recursive {
		t.Errorf("the SDK's WatchDirRequest decodes as %+v, %v", req, err)
	}
}

// A polling watcher buffers events until they are collected, is gone
// after RemoveWatcher, and every watcher of a sandbox ends with it.
func TestPollingWatchers(t *testing.T) {
	w := newWorld(t)
	sb := w.create(`{"templateID":"web"}`)
	dir := t.TempDir()
	base := procfstest.InotifyFDs(t)
	create := func(p string) string {
		t.Helper()
		r, err := call[watchRequest, createWatcherResponse](t, w, sb, "/filesystem.Filesystem/CreateWatcher", &watchRequest{Path: p})
		if err != nil {
			t.Fatal(err)
		}
		if r.WatcherID == "" {
			t.Fatal("CreateWatcher answered no id")
		}
		return r.WatcherID
	}
	events := func(id string) ([]filesystemEvent, error) {
		r, err := call[watcherRequest, getWatcherEventsResponse](t, w, sb, "/filesystem.Filesystem/GetWatcherEvents", &watcherRequest{WatcherID: id})
		if err != nil {
			return nil, err
		}
		return r.Events, nil
	}
	if _, err := call[watchRequest, createWatcherResponse](t, w, sb, "/filesystem.Filesystem/CreateWatcher", &watchRequest{Path: dir + "/missing"}); connect.CodeOf(err) != connect.CodeNotFound {
		t.Errorf("CreateWatcher of a missing directory: %v, want not found", err)
	}
	id := create(dir)
	// Made before the first poll: kept until collected.
	for _, n := range []string{"a", "b"} {
		if err := os.WriteFile(filepath.Join(dir, n), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	var all []filesystemEvent
	deadline := time.Now().Add(10 * time.Second)
	for len(all) < 2 {
		evs, err := events(id)
		if err != nil {
			t.Fatal(err)
		}
		all = append(all, evs...)
		if time.Now().After(deadline) {
			t.Fatalf("events %+v, want the creates of a and b", all)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if all[0] != (filesystemEvent{"a", eventTypeCreate}) || all[1] != (filesystemEvent{"b", eventTypeCreate}) {
		t.Errorf("events %+v, want the creates of a and b in order", all)
	}
	if evs, err := events(id); err != nil || len(evs) != 0 {
		t.Errorf("a second poll with nothing new: %+v, %v; want none", evs, err)
	}
	if _, err := call[watcherRequest, empty](t, w, sb, "/filesystem.Filesystem/RemoveWatcher", &watcherRequest{WatcherID: id}); err != nil {
		t.Fatal(err)
	}
	if _, err := events(id); connect.CodeOf(err) != connect.CodeNotFound {
		t.Errorf("events of a removed watcher: %v, want not found", err)
	}
	if _, err := call[watcherRequest, empty](t, w, sb, "/filesystem.Filesystem/RemoveWatcher", &watcherRequest{WatcherID: id}); connect.CodeOf(err) != connect.CodeNotFound {
		t.Errorf("removing a watcher twice: %v, want not found", err)
	}
	procfstest.WaitInotifyFDs(t, base, "after RemoveWatcher")
	ids := []string{create(dir), create(dir)}
	if n := procfstest.InotifyFDs(t); n != base+2 {
		t.Errorf("two watchers hold %d inotify descriptors, want %d", n, base+2)
	}
	w.rest("DELETE", "/sandboxes/"+sb.SandboxID, "", nil)
	procfstest.WaitInotifyFDs(t, base, "after the sandbox was killed")
	for _, id := range ids {
		if _, err := events(id); connect.CodeOf(err) != connect.CodeNotFound {
			t.Errorf("events of a killed sandbox's watcher: %v, want not found", err)
		}
	}
}

// A polling watcher over its bound stops and says so once its events are
// collected, instead of losing events unnoticed.
func TestPollingWatcherBound(t *testing.T) {
	w := newWorld(t)
	sb := w.create(`{"templateID":"web"}`)
	dir := t.TempDir()
	r, err := call[watchRequest, createWatcherResponse](t, w, sb, "/filesystem.Filesystem/CreateWatcher", &watchRequest{Path: dir})
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Create(dir + "/f")
	if err != nil {
		t.Fatal(err)
	}
	// The kernel merges identical events in a row: alternate two kinds.
	for i := 0; i < maxWatcherEvents; i++ {
		f.Write([]byte("x"))
		f.Chmod(0o600 + os.FileMode(i%2))
	}
	f.Close()
	// Collected only once the watcher had them all.
	time.Sleep(2 * time.Second)
	var n int
	deadline := time.Now().Add(20 * time.Second)
	for {
		got, err := call[watcherRequest, getWatcherEventsResponse](t, w, sb, "/filesystem.Filesystem/GetWatcherEvents", &watcherRequest{WatcherID: r.WatcherID})
		if err != nil {
			if connect.CodeOf(err) != connect.CodeResourceExhausted || !strings.Contains(err.Error(), "lost") {
				t.Fatalf("after %d events: %v, want resource exhausted saying events were lost", n, err)
			}
			break
		}
		n += len(got.Events)
		if time.Now().After(deadline) {
			t.Fatalf("%d events and no error", n)
		}
		if len(got.Events) == 0 {
			time.Sleep(20 * time.Millisecond)
		}
	}
	if n != maxWatcherEvents {
		t.Errorf("collected %d events before the error, want the %d kept", n, maxWatcherEvents)
	}
}

// A guest at its inotify limits, and an agent older than watching, are
// told apart from a failure of warmpool's.
func TestWatchErrorCodes(t *testing.T) {
	for code, want := range map[string]connect.Code{proto.CodeLimit: connect.CodeResourceExhausted, proto.CodeUnknownOp: connect.CodeUnimplemented} {
		if got := connect.CodeOf(guestError("sbx", &agent.RemoteError{Op: proto.SOpFSWatch, Code: code, Message: "m"})); got != want {
			t.Errorf("agent code %s answers %v, want %v", code, got, want)
		}
	}
}

// A lease that ends other than by the SDK's kill (its TTL, a native
// release) takes its sandbox's watchers with it.
func TestPollingWatchersEndWithTheLease(t *testing.T) {
	w := newWorld(t)
	sb := w.create(`{"templateID":"web"}`)
	base := procfstest.InotifyFDs(t)
	r, err := call[watchRequest, createWatcherResponse](t, w, sb, "/filesystem.Filesystem/CreateWatcher", &watchRequest{Path: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	if err := w.b.Release(t.Context(), sb.SandboxID); err != nil {
		t.Fatal(err)
	}
	procfstest.WaitInotifyFDs(t, base, "after the lease was released")
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err := call[watcherRequest, getWatcherEventsResponse](t, w, sb, "/filesystem.Filesystem/GetWatcherEvents", &watcherRequest{WatcherID: r.WatcherID})
		if connect.CodeOf(err) == connect.CodeNotFound {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("events of an ended lease's watcher: %v, want not found", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
