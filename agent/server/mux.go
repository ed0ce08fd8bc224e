package server

import (
	"errors"
	"fmt"
	"io"
	"syscall"

	"github.com/hashicorp/yamux"

	"github.com/warmpool/warmpool/agent/proto"
)

// muxConn is the connection after the switch to yamux: what the line
// reader had buffered comes first.
type muxConn struct {
	io.Reader
	conn io.ReadWriteCloser
}

func (c muxConn) Write(p []byte) (int, error) { return c.conn.Write(p) }
func (c muxConn) Close() error                { return c.conn.Close() }

// serveMux serves streams until the connection ends. Processes attached to
// a stream die with it; detached ones stay.
func (s *session) serveMux(conn io.ReadWriteCloser) error {
	batch := proto.NewBatchConn(conn)
	mux, err := yamux.Server(batch, proto.YamuxConfig())
	if err != nil {
		return fmt.Errorf("start stream session: %w", err)
	}
	defer mux.Close()
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		select {
		case <-s.ctx.Done():
			mux.Close()
		case <-stop:
		}
	}()
	for {
		st, err := mux.AcceptStream()
		if err != nil {
			if s.ctx.Err() != nil || mux.IsClosed() {
				return nil
			}
			return fmt.Errorf("accept stream: %w", err)
		}
		s.wg.Go(func() {
			defer st.Close()
			if s.serveStream(st) {
				// The answer must leave before the session's end
				// drops what is queued.
				_ = batch.Flush()
				mux.Close()
			}
		})
	}
}

// stream is one yamux stream with its framing.
type stream struct {
	st *yamux.Stream
	fr *proto.FrameReader
	fw *proto.FrameWriter
}

func (st *stream) result(r proto.StreamResult) error { return st.fw.JSON(proto.FrameResult, r) }

func (st *stream) fail(err error) error {
	return st.result(proto.StreamResult{Error: err.Error(), Code: errorCode(err)})
}

// serveStream serves one stream; true means the host said bye.
func (s *session) serveStream(ys *yamux.Stream) (bye bool) {
	st := &stream{st: ys, fr: proto.NewFrameReader(ys), fw: proto.NewFrameWriter(ys)}
	var req proto.StreamRequest
	if err := st.fr.Expect(proto.FrameRequest, &req); err != nil {
		s.opts.Logger.Debug("stream without request", "err", err)
		return false
	}
	procs := s.opts.State.procs
	var err error
	switch req.Op {
	case proto.SOpPing:
		err = st.result(proto.StreamResult{})
	case proto.SOpBye:
		_ = st.result(proto.StreamResult{})
		return true
	case proto.SOpStats:
		read := s.opts.Stats
		if read == nil {
			read = ReadProcStats
		}
		stats, rerr := read()
		if rerr != nil {
			err = st.fail(rerr)
			break
		}
		err = st.result(proto.StreamResult{Stats: &stats})
	case proto.SOpExec:
		err = s.serveExec(st, req.Process)
	case proto.SOpList:
		err = st.result(proto.StreamResult{Processes: procs.list()})
	case proto.SOpSignal, proto.SOpResize, proto.SOpWait, proto.SOpInput, proto.SOpLogs, proto.SOpAttach:
		p, gerr := procs.get(req.PID)
		if gerr != nil {
			err = st.fail(gerr)
			break
		}
		err = s.serveProcessOp(st, &req, p)
	case proto.SOpFSRead, proto.SOpFSWrite, proto.SOpFSStat, proto.SOpFSList, proto.SOpFSMkdir, proto.SOpFSRemove, proto.SOpFSRename, proto.SOpFSWatch:
		err = s.serveFS(st, &req)
	default:
		err = st.fail(&codedError{code: proto.CodeUnknownOp, err: fmt.Errorf("unknown stream operation %q", req.Op)})
	}
	if err != nil {
		s.opts.Logger.Debug("stream ended", "op", req.Op, "err", err)
	}
	return false
}

func (s *session) serveProcessOp(st *stream, req *proto.StreamRequest, p *process) error {
	switch req.Op {
	case proto.SOpSignal:
		if req.Signal <= 0 || req.Signal > 64 {
			return st.fail(&codedError{code: proto.CodeBadRequest, err: fmt.Errorf("signal %d", req.Signal)})
		}
		if err := p.signal(syscall.Signal(req.Signal)); err != nil {
			return st.fail(err)
		}
		return st.result(proto.StreamResult{PID: p.pid})
	case proto.SOpResize:
		if err := p.resize(req.Rows, req.Cols); err != nil {
			return st.fail(err)
		}
		return st.result(proto.StreamResult{PID: p.pid})
	case proto.SOpWait:
		// The host going away ends the wait.
		gone := make(chan struct{})
		go func() {
			_, _ = io.Copy(io.Discard, st.st)
			close(gone)
		}()
		select {
		case <-p.done:
			e := p.exit
			return st.result(proto.StreamResult{PID: p.pid, Exit: &e})
		case <-gone:
			return nil
		}
	case proto.SOpInput:
		if err := copyStdin(st.fr, p); err != nil {
			return st.fail(err)
		}
		return st.result(proto.StreamResult{PID: p.pid})
	case proto.SOpLogs, proto.SOpAttach:
		fromStart := req.Op == proto.SOpLogs || req.FromStart
		follow := req.Op == proto.SOpAttach || req.Follow
		cur := p.out.cursor(fromStart, false)
		defer p.out.detach(cur)
		go func() {
			// Anything from the host, or its end, stops the reader.
			_, _ = io.Copy(io.Discard, st.st)
			p.out.detach(cur)
		}()
		if err := st.result(proto.StreamResult{PID: p.pid}); err != nil {
			return err
		}
		dropped, err := sendOutput(st, p.out, cur, follow)
		if err != nil {
			return err
		}
		select {
		case <-p.done:
			if follow || p.out.caughtUp(cur) {
				e := p.exit
				return st.fw.JSON(proto.FrameExit, e)
			}
		default:
		}
		return st.result(proto.StreamResult{PID: p.pid, Dropped: dropped})
	}
	return nil
}

// sendOutput copies chunks from cur to the stream until the output ends (or,
// without follow, until cur has caught up). It returns the bytes cur missed.
func sendOutput(st *stream, out *outBuf, cur *outCursor, follow bool) (int64, error) {
	var dropped int64
	var batch []byte
	for {
		chunk, d, ok := out.next(cur, follow)
		dropped += d
		if !ok {
			return dropped, nil
		}
		// What else is already there goes in the same frame: a command
		// writing 4 KiB at a time would otherwise cost a frame per write.
		data, batched := chunk.data, false
		for len(data) < proto.DataChunk {
			more, ok := out.peekMore(cur, chunk.fd, proto.DataChunk-len(data))
			if !ok {
				break
			}
			if !batched {
				batch, batched = append(batch[:0], data...), true
			}
			batch = append(batch, more...)
			data = batch
		}
		if err := st.fw.Frame(chunk.fd, data); err != nil {
			return dropped, err
		}
	}
}

// peekMore returns the chunk at c without waiting if it is of stream fd
// and at most max bytes, and moves c past it.
func (b *outBuf) peekMore(c *outCursor, fd byte, max int) ([]byte, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	i := c.seq - b.first
	if c.gone || i < 0 || i >= int64(len(b.chunks)) {
		return nil, false
	}
	chunk := b.chunks[i]
	if chunk.fd != fd || len(chunk.data) > max {
		return nil, false
	}
	c.seq++
	c.off = chunk.off + int64(len(chunk.data))
	b.cond.Broadcast()
	return chunk.data, true
}

func (b *outBuf) caughtUp(c *outCursor) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return c.seq >= b.first+int64(len(b.chunks))
}

// copyStdin writes FrameStdin frames into p's stdin until FrameStdinEnd
// (which closes it) or the end of the stream (which leaves it open).
func copyStdin(fr *proto.FrameReader, p *process) error {
	for {
		typ, data, err := fr.Next()
		if err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		switch typ {
		case proto.FrameStdin:
			if err := p.writeStdin(data); err != nil {
				return err
			}
		case proto.FrameStdinEnd:
			if p.ptmx == nil {
				p.closeStdin()
			}
			return nil
		}
	}
}

// serveExec starts a process. Attached, it streams the output, feeds stdin
// from the stream and kills the process when the host goes away first
// (unless spec.Keep: then the process runs on).
func (s *session) serveExec(st *stream, spec *proto.ProcessSpec) error {
	if spec == nil {
		return st.fail(&codedError{code: proto.CodeBadRequest, err: errors.New("exec without a process")})
	}
	if spec.Spare {
		return s.serveSpare(st, spec)
	}
	p, cur, err := s.startProcess(spec, !spec.Detach)
	if err != nil {
		return st.fail(err)
	}
	// lose ends the host's part in the process: an attached one is
	// killed, a kept one runs on without a holding reader.
	lose := func() {
		p.out.detach(cur)
		if !spec.Keep {
			p.signal(syscall.SIGKILL)
		}
	}
	if err := st.result(proto.StreamResult{PID: p.pid}); err != nil {
		if !spec.Detach {
			lose()
		}
		return err
	}
	if spec.Detach {
		return nil
	}
	defer p.out.detach(cur)
	hostGone := make(chan struct{})
	go func() {
		defer close(hostGone)
		if err := copyStdin(st.fr, p); err != nil {
			p.closeStdin()
			if !errors.Is(err, io.ErrUnexpectedEOF) {
				s.opts.Logger.Debug("exec stdin", "pid", p.pid, "err", err)
			}
		}
		// After stdin, only the host's end of the stream can come.
		_, _ = io.Copy(io.Discard, st.st)
	}()
	go func() {
		select {
		case <-hostGone:
			select {
			case <-p.done:
			default:
				lose()
			}
		case <-p.done:
		}
	}()
	if _, err := sendOutput(st, p.out, cur, true); err != nil {
		lose()
		return err
	}
	select {
	case <-p.done:
	case <-hostGone:
		if spec.Keep {
			return nil // it runs on; nobody is left to tell its exit
		}
		<-p.done
	}
	e := p.exit
	return st.fw.JSON(proto.FrameExit, e)
}

// errorCode maps an error to its protocol code.
func errorCode(err error) string {
	var ce *codedError
	if errors.As(err, &ce) {
		return ce.code
	}
	var errno syscall.Errno
	if errors.As(err, &errno) {
		switch errno {
		case syscall.ENOENT:
			return proto.CodeNotFound
		case syscall.EEXIST:
			return proto.CodeExists
		case syscall.EISDIR:
			return proto.CodeIsDir
		case syscall.ENOTDIR:
			return proto.CodeNotDir
		case syscall.ENOSPC, syscall.EDQUOT:
			return proto.CodeNoSpace
		case syscall.EACCES, syscall.EPERM, syscall.EROFS:
			return proto.CodePermitted
		case syscall.ENOTEMPTY:
			return proto.CodeNotEmpty
		case syscall.EINVAL:
			return proto.CodeBadRequest
		}
	}
	return proto.CodeInternal
}
