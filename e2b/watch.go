package e2b

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"sync"
	"time"

	"connectrpc.com/connect"

	"github.com/warmpool/warmpool/agent"
	"github.com/warmpool/warmpool/agent/proto"
	"github.com/warmpool/warmpool/vm"
)

// Watching is the guest agent's (inotify in the guest): WatchDir streams
// its events as they come; a polling watcher (CreateWatcher) keeps one
// agent watch running in the server and buffers its events until
// GetWatcherEvents collects them.

// Bounds of the polling watchers: per sandbox, and events not collected
// per watcher. A watcher over its bound stops and says so, rather than
// drop events unnoticed.
const (
	maxWatchersPerSandbox = 64
	maxWatcherEvents      = 10000
)

var eventTypes = map[string]eventType{
	proto.WatchCreate: eventTypeCreate, proto.WatchWrite: eventTypeWrite, proto.WatchRemove: eventTypeRemove,
	proto.WatchRename: eventTypeRename, proto.WatchChmod: eventTypeChmod,
}

func eventOf(ev agent.WatchEvent) filesystemEvent {
	return filesystemEvent{Name: ev.Name, Type: eventTypes[ev.Type]}
}

// startWatch checks a watch request and starts the agent's watch on ctx;
// done ends the use of the sandbox's session, after the watch.
func (s *Server) startWatch(ctx, wctx context.Context, hdr interface{ Header() http.Header }, m *watchRequest) (*agent.Watch, func(), error) {
	if m.IncludeEntry {
		return nil, nil, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("includeEntry: not supported by warmpool's envd %s (entries need 0.6.3); stat the named paths instead", EnvdVersion))
	}
	p := m.Path
	g, done, err := s.fsCall(ctx, hdr, &p)
	if err != nil {
		return nil, nil, err
	}
	w, err := g.Watch(wctx, p, m.Recursive)
	if err != nil {
		done()
		return nil, nil, guestError(sandboxFrom(ctx), err)
	}
	return w, done, nil
}

// watchEnd is how a watch that stopped by itself ends its stream: a
// directory that went away (its own event came last) ends it cleanly.
func watchEnd(sbx string, err error) error {
	if errors.Is(err, agent.ErrWatchEnded) {
		return nil
	}
	return guestError(sbx, err)
}

// watchDir is WatchDir: the start event once the guest watches the
// directory (so the SDK's watchDir returns only when nothing after it can
// be missed), then every event, keepalives between them as the SDK asks,
// until the client goes away, its timeout passes or the directory does.
func (s *Server) watchDir(ctx context.Context, req *connect.Request[watchRequest], stream *connect.ServerStream[watchDirResponse]) error {
	sbx := sandboxFrom(ctx)
	w, done, err := s.startWatch(ctx, ctx, req, req.Msg)
	if err != nil {
		return err
	}
	defer done()
	defer w.Close()
	var mu sync.Mutex
	send := func(r *watchDirResponse) error {
		mu.Lock()
		defer mu.Unlock()
		return stream.Send(r)
	}
	if err := send(&watchDirResponse{Start: &struct{}{}}); err != nil {
		return err
	}
	kctx, stop := context.WithCancel(ctx)
	defer stop()
	sendKeepalives(kctx, keepaliveInterval(req.Header()), func() error { return send(&watchDirResponse{Keepalive: &struct{}{}}) })
	for {
		ev, err := w.Next()
		if err != nil {
			if ctx.Err() != nil {
				return rpcError(context.Cause(ctx))
			}
			return watchEnd(sbx, err)
		}
		fe := eventOf(ev)
		if err := send(&watchDirResponse{Filesystem: &fe}); err != nil {
			return err
		}
	}
}

// pollWatcher is one CreateWatcher's watch and the events it holds.
type pollWatcher struct {
	id, sbx string
	stop    context.CancelFunc
	// finished is closed once the watch's goroutine is done.
	finished chan struct{}

	mu     sync.Mutex
	events []filesystemEvent
	// err is why the watch stopped, nil while it runs or when its
	// directory went away.
	err error
}

// watchers are the polling watchers of every sandbox.
type watchers struct {
	mu    sync.Mutex
	bySbx map[string]map[string]*pollWatcher
}

func (ws *watchers) get(sbx, id string) (*pollWatcher, error) {
	ws.mu.Lock()
	defer ws.mu.Unlock()
	if pw := ws.bySbx[sbx][id]; pw != nil {
		return pw, nil
	}
	return nil, connect.NewError(connect.CodeNotFound, fmt.Errorf("watcher %q not found in sandbox %s (removed, or its sandbox ended)", id, sbx))
}

// remove takes watcher id of sbx out and stops it; false if unknown.
func (ws *watchers) remove(sbx, id string) bool {
	ws.mu.Lock()
	pw := ws.bySbx[sbx][id]
	if pw != nil {
		delete(ws.bySbx[sbx], id)
		if len(ws.bySbx[sbx]) == 0 {
			delete(ws.bySbx, sbx)
		}
	}
	ws.mu.Unlock()
	if pw == nil {
		return false
	}
	pw.stop()
	<-pw.finished
	return true
}

// removeSandbox stops every watcher of a sandbox that ended.
func (ws *watchers) removeSandbox(sbx string) {
	ws.mu.Lock()
	byID := ws.bySbx[sbx]
	delete(ws.bySbx, sbx)
	ws.mu.Unlock()
	for _, pw := range byID {
		pw.stop()
		<-pw.finished
	}
}

// count is how many watchers sbx has.
func (ws *watchers) count(sbx string) int {
	ws.mu.Lock()
	defer ws.mu.Unlock()
	return len(ws.bySbx[sbx])
}

func newWatcherID() string {
	b := make([]byte, 12)
	_, _ = rand.Read(b) // crypto/rand.Read does not fail
	return hex.EncodeToString(b)
}

// createWatcher is CreateWatcher: a watch that runs on in the server,
// beyond the request, until RemoveWatcher, the sandbox's end or its
// event bound.
func (s *Server) createWatcher(ctx context.Context, req *connect.Request[watchRequest]) (*connect.Response[createWatcherResponse], error) {
	sbx := sandboxFrom(ctx)
	tooMany := connect.NewError(connect.CodeResourceExhausted, fmt.Errorf("sandbox %s has %d watchers, the most warmpool keeps: remove one first", sbx, maxWatchersPerSandbox))
	if s.watchers.count(sbx) >= maxWatchersPerSandbox {
		return nil, tooMany
	}
	wctx, stop := context.WithCancel(context.WithoutCancel(ctx))
	w, done, err := s.startWatch(ctx, wctx, req, req.Msg)
	if err != nil {
		stop()
		return nil, err
	}
	pw := &pollWatcher{id: newWatcherID(), sbx: sbx, stop: stop, finished: make(chan struct{})}
	s.watchers.mu.Lock()
	if s.watchers.bySbx == nil {
		s.watchers.bySbx = map[string]map[string]*pollWatcher{}
	}
	if s.watchers.bySbx[sbx] == nil {
		s.watchers.bySbx[sbx] = map[string]*pollWatcher{}
	}
	if len(s.watchers.bySbx[sbx]) >= maxWatchersPerSandbox {
		// Another create got the last place meanwhile.
		s.watchers.mu.Unlock()
		w.Close()
		done()
		stop()
		return nil, tooMany
	}
	s.watchers.bySbx[sbx][pw.id] = pw
	s.watchers.mu.Unlock()
	go s.runWatcher(wctx, pw, w, done)
	return connect.NewResponse(&createWatcherResponse{WatcherID: pw.id}), nil
}

// runWatcher moves a polling watcher's events into its buffer until the
// watch ends.
func (s *Server) runWatcher(ctx context.Context, pw *pollWatcher, w *agent.Watch, done func()) {
	defer close(pw.finished)
	defer done()
	defer w.Close()
	for {
		ev, err := w.Next()
		if err != nil {
			if ctx.Err() != nil {
				return // removed
			}
			pw.mu.Lock()
			if !errors.Is(err, agent.ErrWatchEnded) {
				pw.err = watchEnd(pw.sbx, err)
			}
			pw.mu.Unlock()
			if errors.Is(err, agent.ErrClosed) {
				// The session ended: with the sandbox's lease (expired,
				// released natively), its watchers go too.
				lctx, cancel := withoutCancel(ctx, 10*time.Second)
				_, lerr := s.lease(lctx, pw.sbx)
				cancel()
				if errors.Is(lerr, vm.ErrNotFound) {
					go s.watchers.remove(pw.sbx, pw.id)
				}
			}
			return
		}
		pw.mu.Lock()
		if len(pw.events) >= maxWatcherEvents {
			pw.err = connect.NewError(connect.CodeResourceExhausted, fmt.Errorf("watcher %s of sandbox %s: %d events were not collected, so it stopped: later events were lost; remove it and create another", pw.id, pw.sbx, maxWatcherEvents))
			pw.mu.Unlock()
			return
		}
		pw.events = append(pw.events, eventOf(ev))
		pw.mu.Unlock()
	}
}

// getWatcherEvents is GetWatcherEvents: the events since the last call;
// once a watcher stopped on an error and its events are collected, that
// error.
func (s *Server) getWatcherEvents(ctx context.Context, req *connect.Request[watcherRequest]) (*connect.Response[getWatcherEventsResponse], error) {
	pw, err := s.watchers.get(sandboxFrom(ctx), req.Msg.WatcherID)
	if err != nil {
		return nil, err
	}
	pw.mu.Lock()
	defer pw.mu.Unlock()
	evs := pw.events
	pw.events = nil
	if len(evs) == 0 && pw.err != nil {
		return nil, pw.err
	}
	if evs == nil {
		evs = []filesystemEvent{}
	}
	return connect.NewResponse(&getWatcherEventsResponse{Events: evs}), nil
}

func (s *Server) removeWatcher(ctx context.Context, req *connect.Request[watcherRequest]) (*connect.Response[empty], error) {
	sbx := sandboxFrom(ctx)
	if !s.watchers.remove(sbx, req.Msg.WatcherID) {
		return nil, connect.NewError(connect.CodeNotFound, fmt.Errorf("watcher %q not found in sandbox %s", req.Msg.WatcherID, sbx))
	}
	return connect.NewResponse(&empty{}), nil
}
