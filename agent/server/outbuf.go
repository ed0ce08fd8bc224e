package server

import "sync"

// outBuf keeps the recent output of one process, tagged by stream, for the
// readers that follow it (an attached exec, logs, attach). It never holds
// more than max bytes. When it is full, a write either drops the oldest
// chunk or, while a holding reader (an attached exec's host) has not read
// that chunk yet, waits: that is how a host that stops reading slows the
// process down instead of the agent buffering without bound.
type outBuf struct {
	mu     sync.Mutex
	cond   *sync.Cond
	chunks []outChunk
	first  int64 // sequence number of chunks[0]
	size   int
	max    int
	end    int64 // byte offset after the last chunk
	closed bool
	holds  map[*outCursor]struct{}
}

type outChunk struct {
	fd   byte // proto.FrameStdout or proto.FrameStderr
	off  int64
	data []byte
}

// outCursor is one reader's position.
type outCursor struct {
	seq  int64
	off  int64
	hold bool
	gone bool
}

func newOutBuf(max int) *outBuf {
	b := &outBuf{max: max, holds: map[*outCursor]struct{}{}}
	b.cond = sync.NewCond(&b.mu)
	return b
}

// write appends a copy of p as one chunk of stream fd.
func (b *outBuf) write(fd byte, p []byte) {
	if len(p) == 0 {
		return
	}
	data := append([]byte(nil), p...)
	b.mu.Lock()
	defer b.mu.Unlock()
	for b.size+len(data) > b.max && len(b.chunks) > 0 {
		if b.heldBack() {
			b.cond.Wait()
			continue
		}
		b.size -= len(b.chunks[0].data)
		b.chunks[0] = outChunk{}
		b.chunks = b.chunks[1:]
		b.first++
	}
	b.chunks = append(b.chunks, outChunk{fd: fd, off: b.end, data: data})
	b.size += len(data)
	b.end += int64(len(data))
	b.cond.Broadcast()
}

// heldBack reports whether a holding reader still needs the oldest chunk.
func (b *outBuf) heldBack() bool {
	for c := range b.holds {
		if c.seq <= b.first {
			return true
		}
	}
	return false
}

// close marks the end of the output: readers that caught up see it.
func (b *outBuf) close() {
	b.mu.Lock()
	b.closed = true
	b.cond.Broadcast()
	b.mu.Unlock()
}

// cursor returns a reader positioned at the oldest kept chunk (fromStart)
// or after the newest. A holding cursor makes writers wait for it; it must
// be released with detach.
func (b *outBuf) cursor(fromStart, hold bool) *outCursor {
	b.mu.Lock()
	defer b.mu.Unlock()
	c := &outCursor{seq: b.first + int64(len(b.chunks)), off: b.end, hold: hold}
	if fromStart {
		c.seq, c.off = b.first, b.end-int64(b.size)
	}
	if hold {
		b.holds[c] = struct{}{}
	}
	return c
}

// detach releases c: a reader blocked in next returns, writers no longer
// wait for it.
func (b *outBuf) detach(c *outCursor) {
	b.mu.Lock()
	c.gone = true
	delete(b.holds, c)
	b.cond.Broadcast()
	b.mu.Unlock()
}

// next returns the chunk at c and moves c past it, waiting for one when
// wait is set. dropped counts bytes c missed because they were dropped
// before it read them. ok is false at the end of the output (or when c was
// detached, or nothing is there and wait is off).
func (b *outBuf) next(c *outCursor, wait bool) (chunk outChunk, dropped int64, ok bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for {
		if c.gone {
			return outChunk{}, 0, false
		}
		if c.seq < b.first {
			first := b.end - int64(b.size)
			dropped, c.seq, c.off = first-c.off, b.first, first
		}
		if i := c.seq - b.first; i < int64(len(b.chunks)) {
			chunk = b.chunks[i]
			c.seq++
			c.off = chunk.off + int64(len(chunk.data))
			b.cond.Broadcast()
			return chunk, dropped, true
		}
		if b.closed || !wait {
			return outChunk{}, dropped, false
		}
		b.cond.Wait()
	}
}
