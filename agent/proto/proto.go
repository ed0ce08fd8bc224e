// Package proto is the wire format spoken between warmpool and its guest
// agent. It is shared by the host-side client (package agent) and the
// guest-side server (package agent/server) and imports nothing of warmpool's
// so that the guest binary stays small.
//
// # Framing
//
// Every message is one JSON object on one line, terminated by '\n'. JSON
// never contains a raw newline, so a reader that lost track of where a
// message began (the host disconnected half-way through a message and a new
// host connected to the same virtio-serial port) finds the next boundary by
// skipping to the next newline. A client therefore starts every connection by
// writing a lone "\n", which ends any fragment a previous connection left in
// the guest's buffer. Lines longer than MaxFrame are rejected and skipped.
//
// Binary fields (entropy, stdin, output chunks) are base64 in JSON.
//
// # Requests and responses
//
// A request carries the protocol version, a client-chosen ID and an
// operation. The agent answers with one or more responses carrying the same
// ID: exec streams "stdout" and "stderr" chunks before its final "exit";
// every other operation has exactly one final response ("ok", "hello",
// "stats" or "error"); a hand-off's "ok" says what the agent did with its
// entropy. Requests are served concurrently, so a ping is answered
// while an exec runs.
package proto

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"
)

// Version is the protocol version this package speaks. A request with another
// version is answered with an error of code CodeUnsupportedVersion.
const Version = 1

// MaxFrame bounds one encoded message, newline included. Exec output is
// chunked well below it; stdin and handoff payloads are checked against the
// limits below before they are sent.
const MaxFrame = 1 << 20

// Payload limits, chosen so that a base64-encoded request stays below MaxFrame.
const (
	MaxStdin   = 512 << 10
	MaxEntropy = 4096
	MaxChunk   = 32 << 10
	MaxEnv     = 64 << 10 // total bytes of keys and values
)

// Operations.
const (
	OpHello    = "hello"
	OpPing     = "ping"
	OpHandoff  = "handoff"
	OpExec     = "exec"
	OpCancel   = "cancel" // cancels the exec whose ID is Request.Target
	OpStats    = "stats"
	OpShutdown = "shutdown"
)

// Response kinds.
const (
	KindOK     = "ok"
	KindError  = "error"
	KindHello  = "hello"
	KindStats  = "stats"
	KindStdout = "stdout"
	KindStderr = "stderr"
	KindExit   = "exit"
)

// Error codes carried in Response.Code.
const (
	CodeUnsupportedVersion = "unsupported_version"
	CodeBadRequest         = "bad_request"
	CodeUnknownOp          = "unknown_op"
	CodeExecFailed         = "exec_failed" // the command could not be started
	CodeTimeout            = "timeout"     // the command outlived ExecRequest.Timeout and was killed
	CodeCanceled           = "canceled"
	CodeInternal           = "internal"
)

// Request is one message from host to guest.
type Request struct {
	Version int    `json:"v"`
	ID      uint64 `json:"id"`
	Op      string `json:"op"`
	// Target is the ID of the exec to cancel (OpCancel).
	Target  uint64   `json:"target,omitempty"`
	Handoff *Handoff `json:"handoff,omitempty"`
	Exec    *Exec    `json:"exec,omitempty"`
}

// Handoff gives a restored guest its own identity.
type Handoff struct {
	Entropy []byte `json:"entropy,omitempty"`
	// UnixNano is the host's wall clock; zero leaves the guest clock alone.
	UnixNano int64  `json:"unix_nano,omitempty"`
	Hostname string `json:"hostname,omitempty"`
	// Env is added to the environment of every later exec.
	Env map[string]string `json:"env,omitempty"`
	// Network is what to do with the guest's network interface: NetworkUp,
	// NetworkNone, or nothing when empty.
	Network string `json:"network,omitempty"`
}

// Hand-off network modes.
const (
	// NetworkUp: the interface is attached to a network the guest has not
	// seen (a clone in its own slot): forget the neighbours the snapshot
	// knew and announce the guest's address.
	NetworkUp = "up"
	// NetworkNone: the interface is attached to nothing; remove it, so the
	// guest has no network interface at all.
	NetworkNone = "none"
)

// HandoffResult is what the agent did with a hand-off's entropy, in the
// answer to it ("ok"). An agent from before this field answers without it.
type HandoffResult struct {
	// EntropyBytes is how many bytes were mixed into the kernel's random
	// pool (and credited as entropy); zero when the hand-off carried none or
	// the agent has no kernel to give them to.
	EntropyBytes int `json:"entropy_bytes"`
	// Reseeded says the kernel's CRNG was reseeded from the pool afterwards,
	// so the guest's random numbers no longer follow the snapshot's.
	Reseeded bool `json:"reseeded"`
	// NotReseeded is why not, when entropy was added but the CRNG was not
	// reseeded.
	NotReseeded string `json:"not_reseeded,omitempty"`
	// StepsMicros is how long each step took in the guest (entropy, clock,
	// hostname, network), in microseconds: where a slow hand-off spends
	// its time.
	StepsMicros map[string]int64 `json:"steps_us,omitempty"`
}

// Exec runs a command in the guest.
type Exec struct {
	Argv []string `json:"argv"`
	Env  []string `json:"env,omitempty"` // KEY=VALUE, added after the handoff env
	Dir  string   `json:"dir,omitempty"`
	// User runs the command as NAME, UID, NAME:GROUP or UID:GID, resolved
	// from the guest's /etc/passwd and /etc/group; empty runs it as root.
	// HOME, USER and LOGNAME follow the user unless Env sets them.
	User  string `json:"user,omitempty"`
	Stdin []byte `json:"stdin,omitempty"`
	// TimeoutMillis kills the command after that long; zero means no limit.
	TimeoutMillis int64 `json:"timeout_ms,omitempty"`
}

// Response is one message from guest to host.
type Response struct {
	ID    uint64 `json:"id"`
	Kind  string `json:"kind"`
	Error string `json:"error,omitempty"`
	Code  string `json:"code,omitempty"`
	// Data is an output chunk (stdout, stderr).
	Data     []byte `json:"data,omitempty"`
	ExitCode int    `json:"exit_code,omitempty"`
	Hello    *Hello `json:"hello,omitempty"`
	Stats    *Stats `json:"stats,omitempty"`
	// Handoff is the result of a hand-off (kind "ok").
	Handoff *HandoffResult `json:"handoff,omitempty"`
}

// Final reports whether r ends its request.
func (r *Response) Final() bool { return r.Kind != KindStdout && r.Kind != KindStderr }

// Hello describes the agent.
type Hello struct {
	Version int    `json:"version"`
	Agent   string `json:"agent"` // e.g. "warmpool-agent devel"
	Kernel  string `json:"kernel,omitempty"`
}

// Stats is the guest's view of itself.
type Stats struct {
	MemTotalKiB     uint64  `json:"mem_total_kib"`
	MemFreeKiB      uint64  `json:"mem_free_kib"`
	MemAvailableKiB uint64  `json:"mem_available_kib"`
	UptimeMillis    int64   `json:"uptime_ms"`
	Load1           float64 `json:"load1"`
	Procs           int     `json:"procs"`
	Hostname        string  `json:"hostname,omitempty"`
	// UnixNano is the guest's wall clock when the stats were taken.
	UnixNano int64 `json:"unix_nano"`
}

// Uptime converts UptimeMillis.
func (s Stats) Uptime() time.Duration { return time.Duration(s.UptimeMillis) * time.Millisecond }

// ErrFrameTooLarge is returned by Reader.Next for a line longer than MaxFrame.
// The reader has already skipped the line; the next call reads the next one.
var ErrFrameTooLarge = errors.New("agent protocol: frame larger than 1 MiB")

// Encode returns v as one frame.
func Encode(v any) ([]byte, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return nil, fmt.Errorf("encode agent message: %w", err)
	}
	b = append(b, '\n')
	if len(b) > MaxFrame {
		return nil, fmt.Errorf("encode agent message of %d bytes: %w", len(b), ErrFrameTooLarge)
	}
	return b, nil
}

// Reader splits a stream into frames.
type Reader struct {
	br *bufio.Reader
}

// NewReader reads frames from r.
func NewReader(r io.Reader) *Reader {
	return &Reader{br: bufio.NewReaderSize(r, 64<<10)}
}

// Next returns the next non-empty line without its newline. The slice is
// valid until the following call. A line longer than MaxFrame is consumed and
// reported as ErrFrameTooLarge. io.EOF means the stream ended; a fragment
// without a newline at the end of the stream is dropped.
func (r *Reader) Next() ([]byte, error) {
	var buf []byte
	tooLarge := false
	for {
		chunk, err := r.br.ReadSlice('\n')
		if err == bufio.ErrBufferFull {
			if !tooLarge {
				buf = append(buf, chunk...)
				if len(buf) > MaxFrame {
					tooLarge, buf = true, nil
				}
			}
			continue
		}
		if err != nil {
			return nil, err
		}
		if tooLarge {
			return nil, ErrFrameTooLarge
		}
		if buf != nil {
			buf = append(buf, chunk...)
		} else {
			buf = chunk
		}
		if len(buf) > MaxFrame {
			return nil, ErrFrameTooLarge
		}
		line := bytes.TrimRight(buf, "\r\n")
		if len(line) == 0 {
			buf = nil
			continue
		}
		return line, nil
	}
}

// Buffered returns a copy of what the reader has read from its source but
// not yet returned, so that a connection switching protocols after a line
// loses nothing.
func (r *Reader) Buffered() []byte {
	b, _ := r.br.Peek(r.br.Buffered())
	return bytes.Clone(b)
}
