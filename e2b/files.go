package e2b

import (
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"mime"
	"mime/multipart"
	"net/http"
	"path"
	"strings"

	"connectrpc.com/connect"

	"github.com/warmpool/warmpool/agent"
	"github.com/warmpool/warmpool/api"
)

// The filesystem is the guest agent's: every operation is one (rarely
// two) calls on the sandbox's agent session, and transfers stream. The
// agent runs as root, so files written through envd belong to root
// whatever user the request names; the user decides only where a relative
// path points (its home directory).

// entryOf converts an agent file description to envd's.
func entryOf(fi api.FileInfo, o *owners) entryInfo {
	mode := fs.FileMode(fi.Mode & 0o777)
	if fi.Mode&0o4000 != 0 {
		mode |= fs.ModeSetuid
	}
	if fi.Mode&0o2000 != 0 {
		mode |= fs.ModeSetgid
	}
	if fi.Mode&0o1000 != 0 {
		mode |= fs.ModeSticky
	}
	t := fileTypeUnspecified
	switch fi.Type {
	case "file":
		t = fileTypeFile
	case "dir":
		mode |= fs.ModeDir
		t = fileTypeDirectory
	case "symlink":
		mode |= fs.ModeSymlink
		t = fileTypeSymlink
	}
	mt := fi.ModTime().UTC()
	e := entryInfo{
		Name: path.Base(fi.Path), Type: t, Path: fi.Path, Size: int64String(fi.Size),
		Mode: uint32(mode), Permissions: mode.String(), Owner: o.user(fi.UID), Group: o.group(fi.GID),
		ModifiedTime: &mt,
	}
	if fi.Link != "" {
		link := fi.Link
		e.SymlinkTarget = &link
	}
	return e
}

// fsCall is what every filesystem RPC does first: the request's user, the
// sandbox's session and the path made absolute.
func (s *Server) fsCall(ctx context.Context, hdr interface{ Header() http.Header }, paths ...*string) (*api.Guest, func(), error) {
	user, err := requestUser(hdr, "")
	if err != nil {
		return nil, nil, err
	}
	for _, p := range paths {
		if *p == "" {
			return nil, nil, connect.NewError(connect.CodeInvalidArgument, errors.New("path: must not be empty"))
		}
	}
	g, done, err := s.guest(ctx, sandboxFrom(ctx))
	if err != nil {
		return nil, nil, err
	}
	for _, p := range paths {
		if *p, err = resolvePath(ctx, g, user, *p); err != nil {
			done()
			return nil, nil, err
		}
	}
	return g, done, nil
}

func (s *Server) stat(ctx context.Context, req *connect.Request[pathRequest]) (*connect.Response[entryResponse], error) {
	p := req.Msg.Path
	g, done, err := s.fsCall(ctx, req, &p)
	if err != nil {
		return nil, err
	}
	defer done()
	fi, err := g.Stat(ctx, p, true)
	if err != nil {
		return nil, guestError(sandboxFrom(ctx), err)
	}
	e := entryOf(fi, newOwners(ctx, g))
	return connect.NewResponse(&entryResponse{Entry: &e}), nil
}

// maxListDepth bounds a ListDir's recursion.
const maxListDepth = 64

func (s *Server) listDir(ctx context.Context, req *connect.Request[listDirRequest]) (*connect.Response[listDirResponse], error) {
	p := req.Msg.Path
	g, done, err := s.fsCall(ctx, req, &p)
	if err != nil {
		return nil, err
	}
	defer done()
	depth := min(max(int(req.Msg.Depth), 1), maxListDepth)
	o := newOwners(ctx, g)
	out := []entryInfo{}
	var walk func(dir string, level int) error
	walk = func(dir string, level int) error {
		ents, err := g.ListDir(ctx, dir)
		if err != nil {
			return err
		}
		for _, fi := range ents {
			out = append(out, entryOf(fi, o))
			// Symlinks are listed, never followed.
			if fi.Type == "dir" && level+1 < depth {
				// One that went away or cannot be read is listed
				// without its entries.
				_ = walk(fi.Path, level+1)
			}
		}
		return nil
	}
	if err := walk(p, 0); err != nil {
		return nil, guestError(sandboxFrom(ctx), err)
	}
	return connect.NewResponse(&listDirResponse{Entries: out}), nil
}

// makeDir makes a directory and its parents; one that exists already
// answers AlreadyExists (the SDK's makeDir then answers false).
func (s *Server) makeDir(ctx context.Context, req *connect.Request[pathRequest]) (*connect.Response[entryResponse], error) {
	p := req.Msg.Path
	g, done, err := s.fsCall(ctx, req, &p)
	if err != nil {
		return nil, err
	}
	defer done()
	fi, err := g.Mkdir(ctx, p, 0, false)
	if isCode(err, connect.CodeNotFound) {
		// Parents missing: made too. One call when they are there.
		fi, err = g.Mkdir(ctx, p, 0, true)
	}
	if err != nil {
		return nil, guestError(sandboxFrom(ctx), err)
	}
	e := entryOf(fi, newOwners(ctx, g))
	return connect.NewResponse(&entryResponse{Entry: &e}), nil
}

func isCode(err error, code connect.Code) bool {
	if err == nil {
		return false
	}
	return connect.CodeOf(guestError("", err)) == code
}

// move renames, making the destination's parent directories, as envd.
func (s *Server) move(ctx context.Context, req *connect.Request[moveRequest]) (*connect.Response[entryResponse], error) {
	src, dst := req.Msg.Source, req.Msg.Destination
	g, done, err := s.fsCall(ctx, req, &src, &dst)
	if err != nil {
		return nil, err
	}
	defer done()
	sbx := sandboxFrom(ctx)
	fi, err := g.Rename(ctx, src, dst)
	if isCode(err, connect.CodeNotFound) {
		// The source is missing, or the destination's directory.
		if _, serr := g.Stat(ctx, src, true); serr != nil {
			return nil, guestError(sbx, serr)
		}
		if _, err := g.Mkdir(ctx, path.Dir(dst), 0, true); err != nil {
			return nil, guestError(sbx, err)
		}
		fi, err = g.Rename(ctx, src, dst)
	}
	if err != nil {
		return nil, guestError(sbx, err)
	}
	e := entryOf(fi, newOwners(ctx, g))
	return connect.NewResponse(&entryResponse{Entry: &e}), nil
}

func (s *Server) remove(ctx context.Context, req *connect.Request[pathRequest]) (*connect.Response[empty], error) {
	p := req.Msg.Path
	g, done, err := s.fsCall(ctx, req, &p)
	if err != nil {
		return nil, err
	}
	defer done()
	if err := g.Remove(ctx, p, true); err != nil {
		return nil, guestError(sandboxFrom(ctx), err)
	}
	return connect.NewResponse(&empty{}), nil
}

// httpFail answers a plain-HTTP envd request (GET/POST /files) with E2B's
// error body; the SDK maps 404 to FileNotFoundError, 400 to
// InvalidArgumentError, 401 to AuthenticationError, 507 to
// NotEnoughSpaceError and 502 to a sandbox that is gone.
func (s *Server) httpFail(w http.ResponseWriter, r *http.Request, err error) {
	status := http.StatusInternalServerError
	var ce *connect.Error
	if errors.As(err, &ce) {
		switch ce.Code() {
		case connect.CodeNotFound:
			status = http.StatusNotFound
		case connect.CodeInvalidArgument, connect.CodeAlreadyExists, connect.CodeFailedPrecondition:
			status = http.StatusBadRequest
		case connect.CodeUnavailable:
			status = http.StatusBadGateway
		case connect.CodeUnauthenticated:
			status = http.StatusUnauthorized
		case connect.CodePermissionDenied:
			status = http.StatusForbidden
		case connect.CodeResourceExhausted:
			status = http.StatusInsufficientStorage
		}
		err = errors.New(ce.Message())
	} else {
		status = restStatus(err)
	}
	if status >= 500 && status != http.StatusBadGateway && status != http.StatusInsufficientStorage {
		s.log.Error("e2b envd request failed", "method", r.Method, "path", r.URL.Path, "err", err)
	}
	writeAPIError(w, status, err.Error())
}

// fileCall is fsCall for GET and POST /files, whose user may also come
// as ?username=.
func (s *Server) fileCall(r *http.Request, p *string) (*api.Guest, func(), error) {
	ctx := r.Context()
	user, err := requestUser(headers(r.Header), r.URL.Query().Get("username"))
	if err != nil {
		return nil, nil, err
	}
	g, done, err := s.guest(ctx, sandboxFrom(ctx))
	if err != nil {
		return nil, nil, err
	}
	if p != nil {
		if *p, err = resolvePath(ctx, g, user, *p); err != nil {
			done()
			return nil, nil, err
		}
	}
	return g, done, nil
}

// readFile is GET /files?path=P: the file's bytes as they come from the
// guest.
func (s *Server) readFile(w http.ResponseWriter, r *http.Request) {
	ctx, sbx, p := r.Context(), sandboxFrom(r.Context()), r.URL.Query().Get("path")
	g, done, err := s.fileCall(r, &p)
	if err != nil {
		s.httpFail(w, r, err)
		return
	}
	defer done()
	fi, body, err := g.ReadFile(ctx, p, false)
	if err != nil {
		s.httpFail(w, r, guestError(sbx, err))
		return
	}
	defer body.Close()
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Last-Modified", fi.ModTime().UTC().Format(http.TimeFormat))
	w.WriteHeader(http.StatusOK)
	if _, err := io.CopyBuffer(onlyWriter{w}, body, make([]byte, 128<<10)); err != nil && ctx.Err() == nil {
		// Too late for a status: the client sees a short body.
		s.log.Warn("e2b file read failed midway", "sandbox", sbx, "path", p, "err", err)
	}
}

type onlyWriter struct{ io.Writer }

// writeFile is POST /files: multipart/form-data (field "file", the file
// name its path when ?path= is absent) or application/octet-stream (the
// body is the file at ?path=), optionally gzip-encoded. Each file streams
// to the guest and appears there whole or not at all.
func (s *Server) writeFile(w http.ResponseWriter, r *http.Request) {
	ctx, sbx := r.Context(), sandboxFrom(r.Context())
	g, done, err := s.fileCall(r, nil)
	if err != nil {
		s.httpFail(w, r, err)
		return
	}
	defer done()
	user, _ := requestUser(headers(r.Header), r.URL.Query().Get("username"))
	out := []writeInfo{}
	err = eachUpload(r, func(p string, body io.Reader) error {
		full, err := resolvePath(ctx, g, user, p)
		if err != nil {
			return err
		}
		fi, err := g.WriteFile(ctx, agent.WriteRequest{Path: full, Parents: true}, body)
		if err != nil {
			return guestError(sbx, err)
		}
		out = append(out, writeInfo{Name: path.Base(fi.Path), Type: "file", Path: fi.Path})
		return nil
	})
	if err != nil {
		s.httpFail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, out)
}

// eachUpload calls put for each file of a POST /files, with its path and
// its bytes as they arrive.
func eachUpload(r *http.Request, put func(p string, body io.Reader) error) error {
	invalid := func(format string, a ...any) error {
		return connect.NewError(connect.CodeInvalidArgument, fmt.Errorf(format, a...))
	}
	body := io.Reader(r.Body)
	if strings.EqualFold(r.Header.Get("Content-Encoding"), "gzip") {
		zr, err := gzip.NewReader(body)
		if err != nil {
			return invalid("gzip body: %v", err)
		}
		body = zr
	}
	qpath := r.URL.Query().Get("path")
	mt, params, _ := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if mt != "multipart/form-data" {
		if qpath == "" {
			return invalid("path: an octet-stream upload needs ?path=")
		}
		return put(qpath, body)
	}
	mr := multipart.NewReader(body, params["boundary"])
	n := 0
	for {
		part, err := mr.NextPart()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return invalid("read multipart upload: %v", err)
		}
		if part.FormName() != "file" {
			continue
		}
		p := qpath
		if p == "" {
			p = part.FileName()
		}
		if p == "" {
			return invalid("path: a file part needs ?path= or a file name")
		}
		if err := put(p, part); err != nil {
			return err
		}
		n++
	}
	if n == 0 {
		return invalid(`no "file" part in the multipart upload`)
	}
	return nil
}
