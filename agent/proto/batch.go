package proto

import (
	"io"
	"sync"
)

// maxBatch bounds what a BatchConn holds before a Write waits.
const maxBatch = 512 << 10

// BatchConn coalesces writes: a Write only queues its bytes, and one
// goroutine writes out everything queued since its last write in one go.
// yamux writes each frame's header and body separately, and on the guest's
// virtio-serial port every write is a trip through the hypervisor, so
// without this the channel's cost is per frame, not per byte. A write
// error is returned by the Writes after it.
type BatchConn struct {
	conn io.ReadWriteCloser

	mu      sync.Mutex
	cond    *sync.Cond
	buf     []byte
	spare   []byte
	err     error
	closed  bool
	writing bool
	stopped chan struct{}
}

// NewBatchConn wraps conn; Close closes conn.
func NewBatchConn(conn io.ReadWriteCloser) *BatchConn {
	b := &BatchConn{conn: conn, stopped: make(chan struct{})}
	b.cond = sync.NewCond(&b.mu)
	go b.flushLoop()
	return b
}

func (b *BatchConn) Read(p []byte) (int, error) { return b.conn.Read(p) }

func (b *BatchConn) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for len(b.buf) >= maxBatch && b.err == nil && !b.closed {
		b.cond.Wait()
	}
	if b.err != nil {
		return 0, b.err
	}
	if b.closed {
		return 0, io.ErrClosedPipe
	}
	b.buf = append(b.buf, p...)
	b.cond.Broadcast()
	return len(p), nil
}

func (b *BatchConn) flushLoop() {
	defer close(b.stopped)
	b.mu.Lock()
	defer b.mu.Unlock()
	for {
		for len(b.buf) == 0 && !b.closed {
			b.cond.Wait()
		}
		if len(b.buf) == 0 {
			return
		}
		out := b.buf
		b.buf = b.spare[:0]
		b.writing = true
		b.mu.Unlock()
		_, err := b.conn.Write(out)
		b.mu.Lock()
		b.writing = false
		b.spare = out[:0]
		if cap(b.spare) > 2*maxBatch {
			b.spare = nil
		}
		if err != nil {
			b.err = err
			b.buf = nil
			b.cond.Broadcast()
			return
		}
		b.cond.Broadcast()
	}
}

// Flush waits until everything queued has been written.
func (b *BatchConn) Flush() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	for (len(b.buf) > 0 || b.writing) && b.err == nil && !b.closed {
		b.cond.Wait()
	}
	return b.err
}

// Close closes the connection; queued bytes not yet written are dropped.
func (b *BatchConn) Close() error {
	b.mu.Lock()
	b.closed = true
	b.buf = nil
	b.cond.Broadcast()
	b.mu.Unlock()
	return b.conn.Close()
}
