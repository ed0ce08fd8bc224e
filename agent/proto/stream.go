package proto

// # Streams
//
// A host sends OpMux (after hello) to switch its connection to a
// multiplexed session (github.com/hashicorp/yamux, the host is the yamux
// client). The agent answers "ok" in the line format and from the next byte
// on both directions speak yamux; the connection stays in that mode until it
// ends. Every operation is then one yamux stream, which gives each its own
// flow-control window: a command whose output nobody reads stops only its
// own stream, and memory on both sides stays bounded by the windows.
//
// Inside a stream both directions are frames:
//
//	type (1 byte) | length (4 bytes, big endian) | payload (length bytes)
//
// The host's first frame is FrameRequest (a StreamRequest as JSON). What
// follows depends on the operation, and every stream ends with one
// FrameResult (a StreamResult as JSON) from the agent, except an exec,
// which ends with FrameExit:
//
//   - exec: the agent answers FrameResult carrying the PID (or an error),
//     then FrameStdout/FrameStderr chunks, then FrameExit. The host sends
//     FrameStdin chunks and FrameStdinEnd (stdin closed). A detached exec
//     ends after the FrameResult.
//   - attach (follow a process's output) and logs: like exec after its
//     first FrameResult; FrameExit when the process ends, or FrameResult
//     when a non-following read reached the end of what is kept.
//   - input: host sends FrameStdin chunks and FrameStdinEnd; FrameResult.
//   - fs.read: FrameResult (the FileInfo of the path, or an error), then
//     FrameData chunks (the file's bytes, or a tar stream of a directory
//     when Archive is set), then FrameEnd, or FrameResult with an error
//     part way.
//   - fs.write: the host sends FrameData chunks and FrameEnd; the agent
//     answers FrameResult once the file is in place. A stream that ends
//     without FrameEnd is an aborted upload and leaves nothing behind.
//   - fs.watch: FrameResult (the FileInfo of the watched directory, or
//     an error) once the directory is watched, then FrameEvents frames as
//     the guest's kernel reports changes (see WatchEvent), until the host
//     closes the stream or the directory goes away: the agent then sends
//     the event for the directory itself (Name ".") and a FrameResult
//     (with an error when events were lost or the watch broke).
//   - everything else: one FrameResult.

import (
	"bufio"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"time"

	"github.com/hashicorp/yamux"
)

// OpMux switches the connection to multiplexed streams.
const OpMux = "mux"

// Stream operations (StreamRequest.Op).
const (
	SOpPing = "ping"
	// SOpBye ends the session: once answered, the agent reads the
	// connection in the line format again, so the host may close it (or
	// go on with line requests) without a racing reconnect finding the
	// agent still in yamux.
	SOpBye      = "bye"
	SOpStats    = "stats"
	SOpExec     = "exec"
	SOpAttach   = "attach"  // follow a process's output from now on (or from the start of what is kept)
	SOpLogs     = "logs"    // the kept output of a process; Follow keeps streaming until it exits
	SOpInput    = "input"   // write to a process's stdin
	SOpSignal   = "signal"  // send Signal to a process
	SOpResize   = "resize"  // set a terminal process's window size
	SOpWait     = "wait"    // wait for a process to exit
	SOpList     = "ps"      // the agent's processes
	SOpFSRead   = "fs.read" // file bytes, or a tar of a directory
	SOpFSWrite  = "fs.write"
	SOpFSStat   = "fs.stat"
	SOpFSList   = "fs.list"
	SOpFSMkdir  = "fs.mkdir"
	SOpFSRemove = "fs.remove"
	SOpFSRename = "fs.rename"
	SOpFSWatch  = "fs.watch" // stream changes below a directory (inotify)
)

// Frame types.
const (
	FrameRequest  byte = 'q'
	FrameResult   byte = 'r'
	FrameStdin    byte = '0'
	FrameStdout   byte = '1'
	FrameStderr   byte = '2'
	FrameStdinEnd byte = 'c'
	FrameExit     byte = 'x'
	FrameData     byte = 'd'
	FrameEnd      byte = 'e'
	FrameEvents   byte = 'v' // WatchEvents as JSON
)

// MaxStreamFrame bounds one frame's payload. Data is sent in chunks of at
// most DataChunk.
const (
	MaxStreamFrame = 1 << 20
	DataChunk      = 128 << 10
)

// More error codes, carried in StreamResult.Code.
const (
	CodeNotFound  = "not_found"
	CodeExists    = "exists"
	CodeIsDir     = "is_dir"
	CodeNotDir    = "not_dir"
	CodeNoSpace   = "no_space"
	CodeNoProcess = "no_process"
	CodePermitted = "not_permitted"
	CodeNotEmpty  = "not_empty"
	// CodeLimit is a kernel limit reached (inotify instances or watches)
	// or a watch's event queue that overflowed, so that events were lost.
	CodeLimit = "limit"
)

// StreamRequest opens a stream.
type StreamRequest struct {
	Op      string       `json:"op"`
	Process *ProcessSpec `json:"process,omitempty"`
	// PID names a process of the agent (not the guest kernel's PID space:
	// the agent only acts on processes it started).
	PID    int  `json:"pid,omitempty"`
	Signal int  `json:"signal,omitempty"`
	Rows   int  `json:"rows,omitempty"`
	Cols   int  `json:"cols,omitempty"`
	Follow bool `json:"follow,omitempty"`
	// FromStart makes attach replay the kept output first.
	FromStart bool `json:"from_start,omitempty"`

	Path string `json:"path,omitempty"`
	// To is the new path of a rename.
	To string `json:"to,omitempty"`
	// Mode is the permission bits of a written file or made directory;
	// zero means 0644 (files) or 0755 (directories).
	Mode uint32 `json:"mode,omitempty"`
	// ModTimeUnixNano sets a written file's modification time.
	ModTimeUnixNano int64 `json:"mtime,omitempty"`
	// Parents creates missing parent directories (write, mkdir).
	Parents bool `json:"parents,omitempty"`
	// Recursive removes a directory with its contents, or makes a watch
	// cover every directory below Path (those made later too).
	Recursive bool `json:"recursive,omitempty"`
	// Archive makes read send a tar stream of Path (file or directory) and
	// write unpack one into the directory Path.
	Archive bool `json:"archive,omitempty"`
	// NoFollow makes stat describe a symlink itself.
	NoFollow bool `json:"no_follow,omitempty"`
}

// ProcessSpec is a process to start.
type ProcessSpec struct {
	Argv []string `json:"argv"`
	Env  []string `json:"env,omitempty"`
	Dir  string   `json:"dir,omitempty"`
	User string   `json:"user,omitempty"`
	// TTY runs the process on a pseudo-terminal of Rows x Cols (0: 24x80);
	// its stdout and stderr are then one stream.
	TTY  bool `json:"tty,omitempty"`
	Rows int  `json:"rows,omitempty"`
	Cols int  `json:"cols,omitempty"`
	// Detach: the process outlives its stream, and its output goes to
	// the kept buffer for logs and attach.
	Detach bool `json:"detach,omitempty"`
	// Keep: an attached process (its output streamed with back-pressure,
	// nothing lost) that keeps running when its stream ends first, as a
	// detached one would; its output from then on goes to the kept buffer.
	Keep bool `json:"keep,omitempty"`
	// Stdin keeps the process's stdin open for FrameStdin/input; without
	// it, stdin is empty.
	Stdin bool `json:"stdin,omitempty"`
	// TimeoutMillis kills the process after that long; zero means no limit.
	TimeoutMillis int64 `json:"timeout_ms,omitempty"`
	// Tag is free text the caller keeps with the process (listed by ps).
	Tag string `json:"tag,omitempty"`
	// Spare starts Argv, a `bash [flags] -c SCRIPT`, as the agent's spare
	// shell instead: the shell reads its profile, runs SCRIPT in a subshell
	// (output discarded) and parks; the exec ends with exit 0 then, and the
	// next command of that shape runs in it. From then on the agent keeps a
	// spare of the last such command's shape.
	Spare bool `json:"spare,omitempty"`
}

// StreamResult answers a stream's request or ends the stream.
type StreamResult struct {
	Error     string        `json:"error,omitempty"`
	Code      string        `json:"code,omitempty"`
	PID       int           `json:"pid,omitempty"`
	File      *FileInfo     `json:"file,omitempty"`
	Entries   []FileInfo    `json:"entries,omitempty"`
	Processes []ProcessInfo `json:"processes,omitempty"`
	Stats     *Stats        `json:"stats,omitempty"`
	Exit      *ExitStatus   `json:"exit,omitempty"`
	// Dropped is how many output bytes a logs or attach reader missed
	// because the kept buffer had moved past them.
	Dropped int64 `json:"dropped,omitempty"`
}

// ExitStatus is how a process ended.
type ExitStatus struct {
	// Code is the exit code, or 128+N when the process was killed by signal N.
	Code   int `json:"code"`
	Signal int `json:"signal,omitempty"`
	// Error says why the process could not run to its end (timeout, an
	// attached host that went away); Code is then -1 when it never started.
	Error   string `json:"error,omitempty"`
	ErrCode string `json:"err_code,omitempty"`
}

// FileInfo describes a guest path.
type FileInfo struct {
	Name string `json:"name"`
	Path string `json:"path"`
	// Type is "file", "dir", "symlink" or "other".
	Type string `json:"type"`
	Size int64  `json:"size"`
	// Mode is the permission bits (and setuid/setgid/sticky) in Unix
	// form, e.g. 0o755.
	Mode            uint32 `json:"mode"`
	ModTimeUnixNano int64  `json:"mtime"`
	// Link is a symlink's target.
	Link string `json:"link,omitempty"`
	UID  int    `json:"uid"`
	GID  int    `json:"gid"`
}

// ModTime converts ModTimeUnixNano.
func (f FileInfo) ModTime() time.Time { return time.Unix(0, f.ModTimeUnixNano) }

// FileType names the type of mode as FileInfo.Type does.
func FileType(mode fs.FileMode) string {
	switch {
	case mode.IsRegular():
		return "file"
	case mode.IsDir():
		return "dir"
	case mode&fs.ModeSymlink != 0:
		return "symlink"
	}
	return "other"
}

// Watch event types (WatchEvent.Type), as inotify reports changes: a file
// moved into the watched tree is a create, one moved out of it (or to a
// new name, whose create follows) a rename.
const (
	WatchCreate = "create"
	WatchWrite  = "write"
	WatchRemove = "remove"
	WatchRename = "rename"
	WatchChmod  = "chmod"
)

// WatchEvent is one change below a watched directory.
type WatchEvent struct {
	Type string `json:"type"`
	// Name is the changed path relative to the watched directory ("sub/f");
	// "." is the directory itself, whose removal or move ends the watch.
	Name string `json:"name"`
	// Dir is set when the path is a directory.
	Dir bool `json:"dir,omitempty"`
}

// WatchEvents is the payload of a FrameEvents frame: what one read of
// the kernel's queue returned, in order.
type WatchEvents struct {
	Events []WatchEvent `json:"events"`
}

// ProcessInfo describes one process the agent started.
type ProcessInfo struct {
	PID             int         `json:"pid"`
	Argv            []string    `json:"argv"`
	TTY             bool        `json:"tty,omitempty"`
	Detached        bool        `json:"detached,omitempty"`
	Tag             string      `json:"tag,omitempty"`
	Dir             string      `json:"dir,omitempty"`
	StartedUnixNano int64       `json:"started"`
	Running         bool        `json:"running"`
	Exit            *ExitStatus `json:"exit,omitempty"`
}

// ErrStreamFrameTooLarge is a frame longer than MaxStreamFrame.
var ErrStreamFrameTooLarge = errors.New("agent stream: frame larger than 1 MiB")

// FrameWriter writes frames; it is not safe for concurrent use.
type FrameWriter struct {
	w   io.Writer
	buf []byte
}

// NewFrameWriter writes frames to w, each in one Write.
func NewFrameWriter(w io.Writer) *FrameWriter { return &FrameWriter{w: w} }

// Frame writes one frame.
func (fw *FrameWriter) Frame(typ byte, payload []byte) error {
	if len(payload) > MaxStreamFrame {
		return fmt.Errorf("write frame of %d bytes: %w", len(payload), ErrStreamFrameTooLarge)
	}
	fw.buf = append(fw.buf[:0], typ, 0, 0, 0, 0)
	binary.BigEndian.PutUint32(fw.buf[1:5], uint32(len(payload)))
	fw.buf = append(fw.buf, payload...)
	_, err := fw.w.Write(fw.buf)
	if cap(fw.buf) > 2*DataChunk {
		fw.buf = nil
	}
	return err
}

// JSON writes v as one frame of type typ.
func (fw *FrameWriter) JSON(typ byte, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("encode frame: %w", err)
	}
	return fw.Frame(typ, b)
}

// Data returns an io.Writer whose writes become frames of type typ (split
// at DataChunk).
func (fw *FrameWriter) Data(typ byte) io.Writer { return dataWriter{fw, typ} }

type dataWriter struct {
	fw  *FrameWriter
	typ byte
}

func (d dataWriter) Write(p []byte) (int, error) {
	n := 0
	for len(p) > 0 {
		chunk := p[:min(len(p), DataChunk)]
		if err := d.fw.Frame(d.typ, chunk); err != nil {
			return n, err
		}
		n += len(chunk)
		p = p[len(chunk):]
	}
	return n, nil
}

// FrameReader reads frames.
type FrameReader struct {
	br  *bufio.Reader
	buf []byte
}

// NewFrameReader reads frames from r.
func NewFrameReader(r io.Reader) *FrameReader {
	return &FrameReader{br: bufio.NewReaderSize(r, 64<<10)}
}

// Next returns the next frame. The payload is valid until the next call.
// io.EOF means the stream ended between frames, io.ErrUnexpectedEOF
// inside one.
func (fr *FrameReader) Next() (byte, []byte, error) {
	var hdr [5]byte
	if _, err := io.ReadFull(fr.br, hdr[:]); err != nil {
		return 0, nil, err
	}
	n := binary.BigEndian.Uint32(hdr[1:])
	if n > MaxStreamFrame {
		return 0, nil, fmt.Errorf("read frame %q of %d bytes: %w", hdr[0], n, ErrStreamFrameTooLarge)
	}
	if cap(fr.buf) < int(n) {
		fr.buf = make([]byte, n)
	}
	fr.buf = fr.buf[:n]
	if _, err := io.ReadFull(fr.br, fr.buf); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return 0, nil, err
	}
	return hdr[0], fr.buf, nil
}

// Expect reads the next frame, which must be of type typ, into v (JSON).
func (fr *FrameReader) Expect(typ byte, v any) error {
	t, p, err := fr.Next()
	if err != nil {
		return err
	}
	if t != typ {
		return fmt.Errorf("agent stream: got frame %q, want %q", t, typ)
	}
	if err := json.Unmarshal(p, v); err != nil {
		return fmt.Errorf("agent stream: decode frame %q: %w", t, err)
	}
	return nil
}

// DefaultWindow is each stream's receive window: at most this many bytes
// are in flight, and buffered by the receiver, per stream and direction.
const DefaultWindow = 1 << 20

// YamuxConfig is the session configuration both sides use. No keepalive:
// a paused VM answers nothing, and the connection ends with the VM anyway.
func YamuxConfig() *yamux.Config {
	c := yamux.DefaultConfig()
	c.EnableKeepAlive = false
	c.MaxStreamWindowSize = DefaultWindow
	c.AcceptBacklog = 256
	// A write blocked this long means the other side is gone or frozen.
	c.ConnectionWriteTimeout = 2 * time.Minute
	c.StreamOpenTimeout = 0
	c.StreamCloseTimeout = time.Minute
	c.LogOutput = io.Discard
	return c
}
