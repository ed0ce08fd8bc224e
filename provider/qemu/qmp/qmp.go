// Package qmp is a small client for the QEMU Machine Protocol over a Unix
// socket: it reads the greeting, negotiates capabilities, runs commands
// (optionally handing QEMU a file descriptor) and delivers asynchronous
// events to subscribers.
package qmp

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// maxMessage bounds one QMP line; query results of a small VM are far below it.
const maxMessage = 16 << 20

// ErrClosed is returned by calls on a connection that is closed or whose
// QEMU went away.
var ErrClosed = errors.New("qmp connection closed")

// Error is an error QEMU returned for a command.
type Error struct {
	Command string
	Class   string `json:"class"`
	Desc    string `json:"desc"`
}

func (e *Error) Error() string {
	return fmt.Sprintf("qmp %s: %s: %s", e.Command, e.Class, e.Desc)
}

// Event is an asynchronous QMP event such as STOP, RESUME, SHUTDOWN or
// MIGRATION.
type Event struct {
	Name string          `json:"event"`
	Data json.RawMessage `json:"data"`
	Time time.Time       `json:"-"`
}

// Version is QEMU's version from the greeting.
type Version struct {
	Major, Minor, Micro int
	Package             string
}

func (v Version) String() string {
	return strconv.Itoa(v.Major) + "." + strconv.Itoa(v.Minor) + "." + strconv.Itoa(v.Micro)
}

// Conn is one QMP connection. It is safe for concurrent use.
type Conn struct {
	conn    *net.UnixConn
	version Version

	writeMu sync.Mutex // one command on the wire at a time

	mu      sync.Mutex
	nextID  uint64
	pending map[string]chan response
	subs    map[int]chan Event
	nextSub int
	err     error // why the connection ended

	done chan struct{}
}

type response struct {
	Return json.RawMessage `json:"return"`
	Error  *Error          `json:"error"`
	ID     string          `json:"id"`
}

type message struct {
	QMP *struct {
		Version struct {
			QEMU struct {
				Major int `json:"major"`
				Minor int `json:"minor"`
				Micro int `json:"micro"`
			} `json:"qemu"`
			Package string `json:"package"`
		} `json:"version"`
	} `json:"QMP"`
	Event     string          `json:"event"`
	Data      json.RawMessage `json:"data"`
	Timestamp *struct {
		Seconds      int64 `json:"seconds"`
		Microseconds int64 `json:"microseconds"`
	} `json:"timestamp"`
	Return json.RawMessage `json:"return"`
	Error  *Error          `json:"error"`
	ID     json.RawMessage `json:"id"`
}

// Dial connects to the QMP socket at path, reads the greeting and leaves
// capabilities negotiation mode, so the connection is ready for commands.
func Dial(ctx context.Context, path string) (*Conn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("qmp dial %s: %w", path, err)
	}
	uc := c.(*net.UnixConn)
	// The greeting must arrive before ctx ends; afterwards reads block for
	// as long as the connection lives.
	stop := context.AfterFunc(ctx, func() { uc.SetReadDeadline(time.Unix(1, 0)) })
	r := bufio.NewReaderSize(uc, 64<<10)
	line, err := readLine(r)
	stopped := stop()
	if !stopped {
		err = ctx.Err() // the read failed because ctx ended
	}
	if err != nil {
		uc.Close()
		return nil, fmt.Errorf("qmp greeting from %s: %w", path, err)
	}
	uc.SetReadDeadline(time.Time{})
	var greet message
	if err := json.Unmarshal(line, &greet); err != nil || greet.QMP == nil {
		uc.Close()
		return nil, fmt.Errorf("qmp greeting from %s: not a QMP greeting: %q", path, truncate(line))
	}
	q := greet.QMP.Version.QEMU
	cn := &Conn{
		conn:    uc,
		version: Version{Major: q.Major, Minor: q.Minor, Micro: q.Micro, Package: greet.QMP.Version.Package},
		pending: make(map[string]chan response),
		subs:    make(map[int]chan Event),
		done:    make(chan struct{}),
	}
	go cn.readLoop(r)
	if err := cn.Execute(ctx, "qmp_capabilities", nil, nil); err != nil {
		cn.Close()
		return nil, fmt.Errorf("qmp negotiate with %s: %w", path, err)
	}
	return cn, nil
}

// Version is the QEMU version the greeting announced.
func (c *Conn) Version() Version { return c.version }

// Done is closed when the connection ends (Close, or QEMU exited).
func (c *Conn) Done() <-chan struct{} { return c.done }

// Close closes the connection; pending calls fail with ErrClosed.
func (c *Conn) Close() error {
	err := c.conn.Close()
	<-c.done
	return err
}

// Execute runs cmd with args (nil for none) and decodes the return value
// into result (nil to ignore it).
func (c *Conn) Execute(ctx context.Context, cmd string, args, result any) error {
	return c.execute(ctx, cmd, args, result, nil)
}

// ExecuteWithFile runs cmd while passing f's descriptor to QEMU in the same
// message (SCM_RIGHTS), as getfd and add-fd expect.
func (c *Conn) ExecuteWithFile(ctx context.Context, cmd string, args, result any, f *os.File) error {
	return c.execute(ctx, cmd, args, result, f)
}

func (c *Conn) execute(ctx context.Context, cmd string, args, result any, f *os.File) error {
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return fmt.Errorf("qmp %s: %w", cmd, err)
	}
	c.nextID++
	id := strconv.FormatUint(c.nextID, 10)
	ch := make(chan response, 1)
	c.pending[id] = ch
	c.mu.Unlock()
	forget := func() {
		c.mu.Lock()
		delete(c.pending, id)
		c.mu.Unlock()
	}

	req := map[string]any{"execute": cmd, "id": id}
	if args != nil {
		req["arguments"] = args
	}
	b, err := json.Marshal(req)
	if err != nil {
		forget()
		return fmt.Errorf("qmp %s: encode arguments: %w", cmd, err)
	}
	b = append(b, '\n')
	if err := c.write(ctx, b, f); err != nil {
		forget()
		return fmt.Errorf("qmp %s: %w", cmd, err)
	}
	select {
	case resp := <-ch:
		if resp.Error != nil {
			resp.Error.Command = cmd
			return resp.Error
		}
		if result != nil && len(resp.Return) > 0 {
			if err := json.Unmarshal(resp.Return, result); err != nil {
				return fmt.Errorf("qmp %s: decode result: %w", cmd, err)
			}
		}
		return nil
	case <-c.done:
		forget()
		return fmt.Errorf("qmp %s: %w", cmd, c.closedErr())
	case <-ctx.Done():
		// The answer may still come; the read loop drops it.
		forget()
		return fmt.Errorf("qmp %s: %w", cmd, ctx.Err())
	}
}

func (c *Conn) write(ctx context.Context, b []byte, f *os.File) error {
	c.writeMu.Lock()
	defer c.writeMu.Unlock()
	if dl, ok := ctx.Deadline(); ok {
		c.conn.SetWriteDeadline(dl)
		defer c.conn.SetWriteDeadline(time.Time{})
	}
	if f == nil {
		_, err := c.conn.Write(b)
		return err
	}
	oob := unix.UnixRights(int(f.Fd()))
	n, oobn, err := c.conn.WriteMsgUnix(b, oob, nil)
	if err != nil {
		return err
	}
	if oobn != len(oob) {
		return fmt.Errorf("descriptor not sent")
	}
	if n < len(b) {
		_, err = c.conn.Write(b[n:])
	}
	return err
}

func (c *Conn) closedErr() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return c.err
	}
	return ErrClosed
}

// Subscribe returns a channel that receives every event from now on, and a
// function that ends the subscription. Events are dropped for a subscriber
// whose buffer is full rather than stalling the connection; the channel is
// closed when the connection ends.
func (c *Conn) Subscribe() (<-chan Event, func()) {
	ch := make(chan Event, 64)
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		close(ch)
		return ch, func() {}
	}
	id := c.nextSub
	c.nextSub++
	c.subs[id] = ch
	c.mu.Unlock()
	return ch, func() {
		c.mu.Lock()
		if _, ok := c.subs[id]; ok {
			delete(c.subs, id)
			close(ch)
		}
		c.mu.Unlock()
	}
}

func (c *Conn) readLoop(r *bufio.Reader) {
	var err error
	for {
		var line []byte
		line, err = readLine(r)
		if err != nil {
			break
		}
		var m message
		if json.Unmarshal(line, &m) != nil {
			continue
		}
		switch {
		case m.Event != "":
			ev := Event{Name: m.Event, Data: m.Data}
			if m.Timestamp != nil {
				ev.Time = time.Unix(m.Timestamp.Seconds, m.Timestamp.Microseconds*1000)
			}
			c.mu.Lock()
			for _, s := range c.subs {
				select {
				case s <- ev:
				default:
				}
			}
			c.mu.Unlock()
		case m.ID != nil:
			var id string
			if json.Unmarshal(m.ID, &id) != nil {
				continue
			}
			c.mu.Lock()
			ch := c.pending[id]
			delete(c.pending, id)
			c.mu.Unlock()
			if ch != nil {
				ch <- response{Return: m.Return, Error: m.Error, ID: id}
			}
		}
	}
	c.mu.Lock()
	if errors.Is(err, net.ErrClosed) || err == nil {
		err = ErrClosed
	} else {
		err = fmt.Errorf("%w: %v", ErrClosed, err)
	}
	c.err = err
	for id, s := range c.subs {
		delete(c.subs, id)
		close(s)
	}
	c.mu.Unlock()
	c.conn.Close()
	close(c.done)
}

func readLine(r *bufio.Reader) ([]byte, error) {
	var buf []byte
	for {
		chunk, isPrefix, err := r.ReadLine()
		if err != nil {
			return nil, err
		}
		buf = append(buf, chunk...)
		if len(buf) > maxMessage {
			return nil, fmt.Errorf("qmp message longer than %d bytes", maxMessage)
		}
		if !isPrefix {
			return buf, nil
		}
	}
}

func truncate(b []byte) string {
	if len(b) > 200 {
		return string(b[:200]) + "..."
	}
	return string(b)
}
