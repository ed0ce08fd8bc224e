package api

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/coder/websocket"
)

func (t Target) path() string {
	if t.Machine != "" {
		return "/v1/machines/" + url.PathEscape(t.Machine)
	}
	return "/v1/leases/" + url.PathEscape(t.Lease)
}

// doRaw sends body as it is (not JSON) and returns a 2xx response.
func (c *Client) doRaw(ctx context.Context, method, path string, body io.Reader, contentType string) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, body)
	if err != nil {
		return nil, fmt.Errorf("build %s %s request: %w", method, path, err)
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return nil, fmt.Errorf("%s %s: %w", method, path, ctx.Err())
		}
		return nil, fmt.Errorf("reach warmpool daemon at %s: %w", c.target, unwrapURLError(err))
	}
	if resp.StatusCode/100 != 2 {
		defer resp.Body.Close()
		return nil, readError(resp)
	}
	return resp, nil
}

// ExecIO connects an attached process to the caller.
type ExecIO struct {
	// Stdin is copied to the process (ProcessRequest.Stdin must be set)
	// and closed at its end; nil sends nothing.
	Stdin  io.Reader
	Stdout io.Writer
	Stderr io.Writer
	// Resize and Signal, when not nil, deliver window sizes ([rows, cols])
	// and signal names for the process until it exits.
	Resize <-chan [2]int
	Signal <-chan string
	// Started is called with the process's PID once it runs.
	Started func(pid int)
}

// ExecStream runs a process attached over a WebSocket (GET
// .../exec): stdin streams without a size limit, a terminal can be
// resized, signals reach the process. It returns how the process ended.
func (c *Client) ExecStream(ctx context.Context, t Target, req ProcessRequest, eio ExecIO) (ExitStatus, error) {
	failed := ExitStatus{Code: -1}
	u := "ws" + strings.TrimPrefix(c.base, "http") + t.path() + "/exec"
	hdr := http.Header{}
	if c.token != "" {
		hdr.Set("Authorization", "Bearer "+c.token)
	}
	conn, resp, err := websocket.Dial(ctx, u, &websocket.DialOptions{HTTPClient: c.http, HTTPHeader: hdr, CompressionMode: websocket.CompressionDisabled})
	if err != nil {
		if resp != nil && resp.StatusCode/100 != 2 && resp.StatusCode != http.StatusSwitchingProtocols {
			return failed, readError(resp)
		}
		if ctx.Err() != nil {
			return failed, fmt.Errorf("exec in %s: %w", t, ctx.Err())
		}
		return failed, fmt.Errorf("exec in %s: %w", t, unwrapURLError(err))
	}
	defer conn.CloseNow()
	conn.SetReadLimit(wsReadLimit)
	first, _ := json.Marshal(req)
	if err := conn.Write(ctx, websocket.MessageText, first); err != nil {
		return failed, fmt.Errorf("exec in %s: send request: %w", t, err)
	}
	var wmu sync.Mutex
	send := func(typ websocket.MessageType, b []byte) error {
		wmu.Lock()
		defer wmu.Unlock()
		return conn.Write(ctx, typ, b)
	}
	ictx, stopInput := context.WithCancel(ctx)
	defer stopInput()
	startInput := func() {
		if eio.Stdin != nil && req.Stdin {
			go func() {
				buf := make([]byte, 64<<10)
				for {
					n, err := eio.Stdin.Read(buf)
					if n > 0 {
						msg := append([]byte{WSStdin}, buf[:n]...)
						if send(websocket.MessageBinary, msg) != nil {
							return
						}
					}
					if err != nil {
						if errors.Is(err, io.EOF) {
							b, _ := json.Marshal(ExecControl{Type: "stdin_close"})
							_ = send(websocket.MessageText, b)
						}
						return
					}
				}
			}()
		}
		go func() {
			for {
				var ctl ExecControl
				select {
				case <-ictx.Done():
					return
				case sz, ok := <-eio.Resize:
					if !ok {
						eio.Resize = nil
						continue
					}
					ctl = ExecControl{Type: "resize", Rows: sz[0], Cols: sz[1]}
				case sig, ok := <-eio.Signal:
					if !ok {
						eio.Signal = nil
						continue
					}
					ctl = ExecControl{Type: "signal", Signal: sig}
				}
				b, _ := json.Marshal(ctl)
				if send(websocket.MessageText, b) != nil {
					return
				}
			}
		}()
	}
	for {
		typ, msg, err := conn.Read(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return failed, fmt.Errorf("exec in %s: %w", t, ctx.Err())
			}
			return failed, fmt.Errorf("exec in %s: stream ended before the exit: %w", t, err)
		}
		if typ == websocket.MessageBinary {
			if len(msg) == 0 {
				continue
			}
			w := eio.Stdout
			if msg[0] == WSStderr {
				w = eio.Stderr
			}
			if w != nil {
				if _, err := w.Write(msg[1:]); err != nil {
					return failed, fmt.Errorf("exec in %s: write output: %w", t, err)
				}
			}
			continue
		}
		var ev ExecEvent
		if err := json.Unmarshal(msg, &ev); err != nil {
			return failed, fmt.Errorf("exec in %s: bad event: %w", t, err)
		}
		switch {
		case ev.Error != nil:
			return failed, ev.Error
		case ev.Exit != nil:
			conn.Close(websocket.StatusNormalClosure, "")
			return *ev.Exit, nil
		case ev.PID != 0:
			if eio.Started != nil {
				eio.Started(ev.PID)
			}
			startInput()
		}
	}
}

// StartProcess starts a detached process and returns its PID at once; its
// output is kept for Logs.
func (c *Client) StartProcess(ctx context.Context, t Target, req ProcessRequest) (int, error) {
	var sp StartedProcess
	return sp.PID, c.call(ctx, http.MethodPost, t.path()+"/processes", req, &sp)
}

// Processes lists the processes the guest agent started in t.
func (c *Client) Processes(ctx context.Context, t Target) ([]ProcessInfo, error) {
	var ps []ProcessInfo
	return ps, c.call(ctx, http.MethodGet, t.path()+"/processes", nil, &ps)
}

// Logs copies the output kept for process pid; with follow until it exits.
// exit is nil when the process still runs (without follow).
func (c *Client) Logs(ctx context.Context, t Target, pid int, follow bool, stdout, stderr io.Writer) (exit *int, err error) {
	path := t.path() + "/processes/" + strconv.Itoa(pid) + "/logs"
	if follow {
		path += "?follow=true"
	}
	return c.logs(ctx, t, pid, path, stdout, stderr)
}

// Attach copies what process pid writes from now on until it exits, and
// returns its exit code.
func (c *Client) Attach(ctx context.Context, t Target, pid int, stdout, stderr io.Writer) (exit *int, err error) {
	return c.logs(ctx, t, pid, t.path()+"/processes/"+strconv.Itoa(pid)+"/logs?from=now", stdout, stderr)
}

func (c *Client) logs(ctx context.Context, t Target, pid int, path string, stdout, stderr io.Writer) (exit *int, err error) {
	resp, err := c.do(ctx, http.MethodGet, path, nil, "application/x-ndjson")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	dec := json.NewDecoder(bufio.NewReaderSize(resp.Body, 64<<10))
	for {
		var f ExecFrame
		if err := dec.Decode(&f); err != nil {
			if ctx.Err() != nil {
				return nil, fmt.Errorf("logs of %d in %s: %w", pid, t, ctx.Err())
			}
			return nil, fmt.Errorf("logs of %d in %s: stream ended early: %w", pid, t, err)
		}
		switch {
		case f.Error != nil:
			f.Error.Status = resp.StatusCode
			return nil, f.Error
		case f.ExitCode != nil:
			return f.ExitCode, nil
		case f.Running:
			return nil, nil
		case f.Stream == "stdout" && stdout != nil:
			if _, err := stdout.Write(f.Data); err != nil {
				return nil, err
			}
		case f.Stream == "stderr" && stderr != nil:
			if _, err := stderr.Write(f.Data); err != nil {
				return nil, err
			}
		}
	}
}

// Signal sends a signal (name or number; empty: TERM) to process pid.
func (c *Client) Signal(ctx context.Context, t Target, pid int, sig string) error {
	return c.call(ctx, http.MethodPost, t.path()+"/processes/"+strconv.Itoa(pid)+"/signal", SignalRequest{Signal: sig}, nil)
}

// Resize sets the window size of process pid's terminal.
func (c *Client) Resize(ctx context.Context, t Target, pid, rows, cols int) error {
	return c.call(ctx, http.MethodPost, t.path()+"/processes/"+strconv.Itoa(pid)+"/resize", ResizeRequest{Rows: rows, Cols: cols}, nil)
}

// WriteStdin streams r into process pid's stdin, closing it at the end
// when closeAtEnd is set.
func (c *Client) WriteStdin(ctx context.Context, t Target, pid int, r io.Reader, closeAtEnd bool) error {
	path := t.path() + "/processes/" + strconv.Itoa(pid) + "/stdin"
	if closeAtEnd {
		path += "?close=true"
	}
	resp, err := c.doRaw(ctx, http.MethodPost, path, r, "application/octet-stream")
	if err != nil {
		return err
	}
	resp.Body.Close()
	return nil
}

// Wait waits for process pid to exit.
func (c *Client) Wait(ctx context.Context, t Target, pid int) (ExitStatus, error) {
	var e ExitStatus
	return e, c.call(ctx, http.MethodPost, t.path()+"/processes/"+strconv.Itoa(pid)+"/wait", nil, &e)
}

// ReadFile streams a guest file (or, with archive, a tar of a file or
// directory tree). The reader fails with the guest's error if the read
// breaks part way.
func (c *Client) ReadFile(ctx context.Context, t Target, path string, archive bool) (FileInfo, io.ReadCloser, error) {
	q := url.Values{"path": {path}}
	if archive {
		q.Set("archive", "tar")
	}
	resp, err := c.doRaw(ctx, http.MethodGet, t.path()+"/files?"+q.Encode(), nil, "")
	if err != nil {
		return FileInfo{}, nil, err
	}
	var fi FileInfo
	if h := resp.Header.Get(FileHeader); h != "" {
		_ = json.Unmarshal([]byte(h), &fi)
	}
	return fi, &trailerReader{resp: resp}, nil
}

// trailerReader turns the error trailer of a download into a read error.
type trailerReader struct {
	resp *http.Response
}

func (r *trailerReader) Read(p []byte) (int, error) {
	n, err := r.resp.Body.Read(p)
	if errors.Is(err, io.EOF) {
		if t := r.resp.Trailer.Get(ErrorTrailer); t != "" {
			e := &Error{}
			if json.Unmarshal([]byte(t), e) != nil {
				e.Message = t
			}
			return n, e
		}
	}
	return n, err
}

func (r *trailerReader) Close() error { return r.resp.Body.Close() }

// WriteFileOptions say where and how an upload lands.
type WriteFileOptions struct {
	Path string
	// Mode is the permission bits; zero means 0644.
	Mode    uint32
	ModTime time.Time
	Parents bool
	// Archive unpacks a tar stream into the directory Path.
	Archive bool
}

// WriteFile streams r into a guest file, which appears only once complete.
func (c *Client) WriteFile(ctx context.Context, t Target, o WriteFileOptions, r io.Reader) (FileInfo, error) {
	q := url.Values{"path": {o.Path}}
	if o.Mode != 0 {
		q.Set("mode", "0"+strconv.FormatUint(uint64(o.Mode), 8))
	}
	if !o.ModTime.IsZero() {
		q.Set("mtime", o.ModTime.UTC().Format(time.RFC3339Nano))
	}
	if o.Parents {
		q.Set("parents", "true")
	}
	ct := "application/octet-stream"
	if o.Archive {
		q.Set("archive", "tar")
		ct = "application/x-tar"
	}
	resp, err := c.doRaw(ctx, http.MethodPut, t.path()+"/files?"+q.Encode(), r, ct)
	if err != nil {
		return FileInfo{}, err
	}
	defer resp.Body.Close()
	var fi FileInfo
	if err := json.NewDecoder(resp.Body).Decode(&fi); err != nil {
		return FileInfo{}, fmt.Errorf("decode write response: %w", err)
	}
	return fi, nil
}

// Stat describes a guest path; noFollow describes a symlink itself.
func (c *Client) Stat(ctx context.Context, t Target, path string, noFollow bool) (FileInfo, error) {
	q := url.Values{"path": {path}}
	if noFollow {
		q.Set("nofollow", "true")
	}
	var fi FileInfo
	return fi, c.call(ctx, http.MethodGet, t.path()+"/files/stat?"+q.Encode(), nil, &fi)
}

// ListDir lists a guest directory.
func (c *Client) ListDir(ctx context.Context, t Target, path string) ([]FileInfo, error) {
	var ents []FileInfo
	return ents, c.call(ctx, http.MethodGet, t.path()+"/files/list?"+url.Values{"path": {path}}.Encode(), nil, &ents)
}

// Mkdir makes a guest directory.
func (c *Client) Mkdir(ctx context.Context, t Target, req MkdirRequest) (FileInfo, error) {
	var fi FileInfo
	return fi, c.call(ctx, http.MethodPost, t.path()+"/files/mkdir", req, &fi)
}

// Remove removes a guest path (a whole tree with recursive).
func (c *Client) Remove(ctx context.Context, t Target, path string, recursive bool) error {
	q := url.Values{"path": {path}}
	if recursive {
		q.Set("recursive", "true")
	}
	return c.call(ctx, http.MethodDelete, t.path()+"/files?"+q.Encode(), nil, nil)
}

// Rename moves a guest path.
func (c *Client) Rename(ctx context.Context, t Target, from, to string) (FileInfo, error) {
	var fi FileInfo
	return fi, c.call(ctx, http.MethodPost, t.path()+"/files/rename", RenameRequest{From: from, To: to}, &fi)
}

// FileWatch is a running watch of a guest directory (Client.Watch).
type FileWatch struct {
	// Dir describes the watched directory.
	Dir  FileInfo
	resp *http.Response
	dec  *json.Decoder
	ctx  context.Context
	what string
	err  error
}

// Watch starts watching the guest directory path (and every directory
// below it, with recursive) and returns once the guest watches it: every
// change from then on is reported by Next. ctx ending ends the watch.
func (c *Client) Watch(ctx context.Context, t Target, path string, recursive bool) (*FileWatch, error) {
	q := url.Values{"path": {path}}
	if recursive {
		q.Set("recursive", "true")
	}
	resp, err := c.do(ctx, http.MethodGet, t.path()+"/files/watch?"+q.Encode(), nil, "application/x-ndjson")
	if err != nil {
		return nil, err
	}
	w := &FileWatch{resp: resp, dec: json.NewDecoder(bufio.NewReaderSize(resp.Body, 64<<10)), ctx: ctx, what: fmt.Sprintf("watch %s in %s", path, t)}
	if h := resp.Header.Get(FileHeader); h != "" {
		_ = json.Unmarshal([]byte(h), &w.Dir)
	}
	return w, nil
}

// Next waits for the next event. It returns an error wrapping
// ErrWatchEnded once the directory went away (its own event came last),
// the guest's error when the watch broke (one wrapping vm.ErrExhausted
// when events were lost), or ctx's.
func (w *FileWatch) Next() (WatchEvent, error) {
	if w.err != nil {
		return WatchEvent{}, w.err
	}
	var f WatchFrame
	if err := w.dec.Decode(&f); err != nil {
		if w.ctx.Err() != nil {
			w.err = fmt.Errorf("%s: %w", w.what, w.ctx.Err())
		} else {
			w.err = fmt.Errorf("%s: stream ended early: %w", w.what, err)
		}
		return WatchEvent{}, w.err
	}
	switch {
	case f.Error != nil:
		w.err = f.Error
		return WatchEvent{}, w.err
	case f.End:
		w.err = fmt.Errorf("%s: %w", w.what, ErrWatchEnded)
		return WatchEvent{}, w.err
	}
	return WatchEvent{Type: f.Type, Name: f.Name, Dir: f.Dir}, nil
}

// Close ends the watch.
func (w *FileWatch) Close() error { return w.resp.Body.Close() }
