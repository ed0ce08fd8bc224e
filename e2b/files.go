package e2b

import (
	"bytes"
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
	"strconv"
	"strings"
	"time"

	"connectrpc.com/connect"

	"github.com/warmpool/warmpool/api"
)

// The filesystem is reached through the Backend's exec: small POSIX shell
// scripts (busybox and Debian both run them) until the Backend has file
// operations of its own. Each script exits with one of these codes when
// the path is wrong, so the answer can say how.
const (
	exitNotFound    = 44
	exitIsDir       = 45
	exitExists      = 46
	exitNotDir      = 47
	maxUploadBytes  = 256 << 20
	uploadChunkSize = 384 << 10 // below the agent's stdin limit
)

// resolve makes $p the absolute path of $1: relative paths are relative to
// the user's home directory, as on E2B.
const resolve = `p=$1; case $p in /*) ;; *) p=${HOME:-/root}/$p ;; esac; `

// statFormat is one entry per line: raw mode (hex), size, owner, group,
// mtime (seconds), path.
const statFormat = `%f %s %U %G %Y %n`

// sh runs script with args in sandbox sbx and returns its exit code and
// stderr; stdout goes to out (nil: kept and returned).
func (s *Server) sh(ctx context.Context, sbx, user, script string, stdin []byte, out io.Writer, args ...string) (int, []byte, string, error) {
	var stdout, stderr bytes.Buffer
	if out == nil {
		out = &stdout
	}
	req := api.ExecRequest{Argv: append([]string{"/bin/sh", "-c", script, "sh"}, args...), Stdin: stdin, User: user, Timeout: api.Duration(execTimeout(ctx))}
	code, err := s.opts.Backend.Exec(ctx, sbx, req, out, &stderr)
	return code, stdout.Bytes(), strings.TrimSpace(stderr.String()), err
}

// fsError maps a script's exit code to the Connect error the SDK expects.
func fsError(code int, p, stderr string) error {
	switch code {
	case 0:
		return nil
	case exitNotFound:
		return connect.NewError(connect.CodeNotFound, fmt.Errorf("%s: no such file or directory", p))
	case exitIsDir:
		return connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("%s is a directory", p))
	case exitExists:
		return connect.NewError(connect.CodeAlreadyExists, fmt.Errorf("%s already exists", p))
	case exitNotDir:
		return connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("%s is not a directory", p))
	}
	return connect.NewError(connect.CodeInternal, fmt.Errorf("%s: exit status %d: %s", p, code, stderr))
}

func (s *Server) statScript(ctx context.Context, sbx string, hdr interface{ Header() http.Header }, script string, args ...string) ([]entryInfo, error) {
	user, err := requestUser(hdr, "")
	if err != nil {
		return nil, err
	}
	if err := s.running(ctx, sbx); err != nil {
		return nil, err
	}
	code, out, stderr, err := s.sh(ctx, sbx, user, script, nil, nil, args...)
	if err != nil {
		return nil, rpcError(err)
	}
	if err := fsError(code, args[0], stderr); err != nil {
		return nil, err
	}
	return parseStat(out)
}

func parseStat(out []byte) ([]entryInfo, error) {
	var entries []entryInfo
	for line := range strings.SplitSeq(strings.TrimRight(string(out), "\n"), "\n") {
		if line == "" {
			continue
		}
		f := strings.SplitN(line, " ", 6)
		if len(f) != 6 {
			return nil, connect.NewError(connect.CodeInternal, fmt.Errorf("unreadable stat line %q", line))
		}
		raw, err1 := strconv.ParseUint(f[0], 16, 32)
		size, err2 := strconv.ParseInt(f[1], 10, 64)
		mtime, err3 := strconv.ParseInt(f[4], 10, 64)
		if err := errors.Join(err1, err2, err3); err != nil {
			return nil, connect.NewError(connect.CodeInternal, fmt.Errorf("unreadable stat line %q: %v", line, err))
		}
		mode := goMode(uint32(raw))
		e := entryInfo{
			Name: path.Base(f[5]), Path: path.Clean(f[5]), Size: int64String(size),
			Mode: uint32(mode), Permissions: mode.String(), Owner: f[2], Group: f[3],
		}
		t := time.Unix(mtime, 0).UTC()
		e.ModifiedTime = &t
		switch {
		case mode.IsDir():
			e.Type = fileTypeDirectory
		case mode&fs.ModeSymlink != 0:
			e.Type = fileTypeSymlink
		case mode.IsRegular():
			e.Type = fileTypeFile
		default:
			e.Type = fileTypeUnspecified
		}
		entries = append(entries, e)
	}
	return entries, nil
}

// goMode converts a Unix st_mode to the fs.FileMode envd reports.
func goMode(m uint32) fs.FileMode {
	mode := fs.FileMode(m & 0o777)
	switch m & 0o170000 {
	case 0o040000:
		mode |= fs.ModeDir
	case 0o120000:
		mode |= fs.ModeSymlink
	case 0o010000:
		mode |= fs.ModeNamedPipe
	case 0o140000:
		mode |= fs.ModeSocket
	case 0o020000:
		mode |= fs.ModeDevice | fs.ModeCharDevice
	case 0o060000:
		mode |= fs.ModeDevice
	}
	if m&0o4000 != 0 {
		mode |= fs.ModeSetuid
	}
	if m&0o2000 != 0 {
		mode |= fs.ModeSetgid
	}
	if m&0o1000 != 0 {
		mode |= fs.ModeSticky
	}
	return mode
}

func needPath(p string) error {
	if p == "" {
		return connect.NewError(connect.CodeInvalidArgument, errors.New("path: must not be empty"))
	}
	return nil
}

func one(entries []entryInfo, p string) (*entryInfo, error) {
	if len(entries) != 1 {
		return nil, connect.NewError(connect.CodeInternal, fmt.Errorf("stat %s: %d entries", p, len(entries)))
	}
	return &entries[0], nil
}

func (s *Server) stat(ctx context.Context, req *connect.Request[pathRequest]) (*connect.Response[entryResponse], error) {
	if err := needPath(req.Msg.Path); err != nil {
		return nil, err
	}
	es, err := s.statScript(ctx, sandboxFrom(ctx), req, resolve+`[ -e "$p" ] || [ -L "$p" ] || exit 44; exec stat -c '`+statFormat+`' -- "$p"`, req.Msg.Path)
	if err != nil {
		return nil, err
	}
	e, err := one(es, req.Msg.Path)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&entryResponse{Entry: e}), nil
}

func (s *Server) listDir(ctx context.Context, req *connect.Request[listDirRequest]) (*connect.Response[listDirResponse], error) {
	if err := needPath(req.Msg.Path); err != nil {
		return nil, err
	}
	depth := max(req.Msg.Depth, 1)
	es, err := s.statScript(ctx, sandboxFrom(ctx), req, resolve+`[ -e "$p" ] || exit 44; [ -d "$p" ] || exit 47; `+
		`exec find "$p" -mindepth 1 -maxdepth "$2" -exec stat -c '`+statFormat+`' -- {} +`, req.Msg.Path, strconv.Itoa(int(depth)))
	if err != nil {
		return nil, err
	}
	if es == nil {
		es = []entryInfo{}
	}
	return connect.NewResponse(&listDirResponse{Entries: es}), nil
}

func (s *Server) makeDir(ctx context.Context, req *connect.Request[pathRequest]) (*connect.Response[entryResponse], error) {
	if err := needPath(req.Msg.Path); err != nil {
		return nil, err
	}
	es, err := s.statScript(ctx, sandboxFrom(ctx), req, resolve+`[ -e "$p" ] && exit 46; mkdir -p -- "$p" || exit 1; exec stat -c '`+statFormat+`' -- "$p"`, req.Msg.Path)
	if err != nil {
		return nil, err
	}
	e, err := one(es, req.Msg.Path)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&entryResponse{Entry: e}), nil
}

func (s *Server) move(ctx context.Context, req *connect.Request[moveRequest]) (*connect.Response[entryResponse], error) {
	if err := errors.Join(needPath(req.Msg.Source), needPath(req.Msg.Destination)); err != nil {
		return nil, err
	}
	es, err := s.statScript(ctx, sandboxFrom(ctx), req, resolve+`src=$p; set -- "$2"; `+resolve+
		`[ -e "$src" ] || [ -L "$src" ] || exit 44; mkdir -p -- "$(dirname -- "$p")" && mv -- "$src" "$p" || exit 1; exec stat -c '`+statFormat+`' -- "$p"`,
		req.Msg.Source, req.Msg.Destination)
	if err != nil {
		return nil, err
	}
	e, err := one(es, req.Msg.Destination)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&entryResponse{Entry: e}), nil
}

func (s *Server) remove(ctx context.Context, req *connect.Request[pathRequest]) (*connect.Response[empty], error) {
	if err := needPath(req.Msg.Path); err != nil {
		return nil, err
	}
	if _, err := s.statScript(ctx, sandboxFrom(ctx), req, resolve+`[ -e "$p" ] || [ -L "$p" ] || exit 44; exec rm -rf -- "$p"`, req.Msg.Path); err != nil {
		return nil, err
	}
	return connect.NewResponse(&empty{}), nil
}

// httpFail answers a plain-HTTP envd request (GET/POST /files) with E2B's
// error body; the SDK maps 404 to FileNotFoundError, 400 to
// InvalidArgumentError, 401 to AuthenticationError and 502 to a sandbox
// that is gone.
func (s *Server) httpFail(w http.ResponseWriter, r *http.Request, err error) {
	status := http.StatusInternalServerError
	var ce *connect.Error
	if errors.As(err, &ce) {
		switch ce.Code() {
		case connect.CodeNotFound:
			status = http.StatusNotFound
		case connect.CodeInvalidArgument, connect.CodeAlreadyExists:
			status = http.StatusBadRequest
		case connect.CodeUnavailable:
			status = http.StatusBadGateway
		case connect.CodeUnauthenticated:
			status = http.StatusUnauthorized
		}
		err = errors.New(ce.Message())
	} else {
		status = restStatus(err)
	}
	if status >= 500 && status != http.StatusBadGateway {
		s.log.Error("e2b envd request failed", "method", r.Method, "path", r.URL.Path, "err", err)
	}
	writeAPIError(w, status, err.Error())
}

// headerOnFirstWrite answers 200 only once the file's first byte comes,
// so that a script failing before any output can still answer 404.
type headerOnFirstWrite struct {
	w       http.ResponseWriter
	written bool
}

func (h *headerOnFirstWrite) Write(b []byte) (int, error) {
	if !h.written {
		h.written = true
		h.w.Header().Set("Content-Type", "application/octet-stream")
		h.w.WriteHeader(http.StatusOK)
	}
	return h.w.Write(b)
}

// readFile is GET /files?path=P: the file's bytes.
func (s *Server) readFile(w http.ResponseWriter, r *http.Request) {
	ctx, sbx, p := r.Context(), sandboxFrom(r.Context()), r.URL.Query().Get("path")
	if err := needPath(p); err != nil {
		s.httpFail(w, r, err)
		return
	}
	if err := s.running(ctx, sbx); err != nil {
		s.httpFail(w, r, err)
		return
	}
	user, err := requestUser(headers(r.Header), r.URL.Query().Get("username"))
	if err != nil {
		s.httpFail(w, r, err)
		return
	}
	out := &headerOnFirstWrite{w: w}
	code, _, stderr, err := s.sh(ctx, sbx, user, resolve+`[ -e "$p" ] || exit 44; [ -d "$p" ] && exit 45; exec cat -- "$p"`, nil, out, p)
	if out.written {
		// Too late for a status: a failure shows as a short body.
		if err != nil || code != 0 {
			s.log.Warn("e2b file read failed midway", "sandbox", sbx, "path", p, "code", code, "err", err)
		}
		return
	}
	if err == nil {
		err = fsError(code, p, stderr)
	}
	if err != nil {
		s.httpFail(w, r, rpcErrorKeep(err))
		return
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Length", "0")
	w.WriteHeader(http.StatusOK)
}

func rpcErrorKeep(err error) error {
	var ce *connect.Error
	if errors.As(err, &ce) {
		return err
	}
	return rpcError(err)
}

// upload is one file of a POST /files.
type upload struct {
	path string
	data []byte
}

// writeFile is POST /files: multipart/form-data (field "file", the file
// name its path when ?path= is absent) or application/octet-stream (the
// body is the file at ?path=), optionally gzip-encoded.
func (s *Server) writeFile(w http.ResponseWriter, r *http.Request) {
	ctx, sbx := r.Context(), sandboxFrom(r.Context())
	uploads, err := readUploads(r)
	if err != nil {
		s.httpFail(w, r, connect.NewError(connect.CodeInvalidArgument, err))
		return
	}
	if err := s.running(ctx, sbx); err != nil {
		s.httpFail(w, r, err)
		return
	}
	user, err := requestUser(headers(r.Header), r.URL.Query().Get("username"))
	if err != nil {
		s.httpFail(w, r, err)
		return
	}
	out := []writeInfo{}
	for _, u := range uploads {
		full, err := s.upload(ctx, sbx, user, u)
		if err != nil {
			s.httpFail(w, r, err)
			return
		}
		out = append(out, writeInfo{Name: path.Base(full), Type: "file", Path: full})
	}
	writeJSON(w, http.StatusOK, out)
}

func readUploads(r *http.Request) ([]upload, error) {
	body := io.Reader(http.MaxBytesReader(nil, r.Body, maxUploadBytes))
	if strings.EqualFold(r.Header.Get("Content-Encoding"), "gzip") {
		zr, err := gzip.NewReader(body)
		if err != nil {
			return nil, fmt.Errorf("gzip body: %v", err)
		}
		body = io.LimitReader(zr, maxUploadBytes+1)
	}
	qpath := r.URL.Query().Get("path")
	mt, params, _ := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if mt != "multipart/form-data" {
		if qpath == "" {
			return nil, errors.New("path: an octet-stream upload needs ?path=")
		}
		b, err := io.ReadAll(body)
		if err != nil {
			return nil, fmt.Errorf("read upload: %v", err)
		}
		if len(b) > maxUploadBytes {
			return nil, fmt.Errorf("upload larger than %d bytes", maxUploadBytes)
		}
		return []upload{{path: qpath, data: b}}, nil
	}
	mr := multipart.NewReader(body, params["boundary"])
	var out []upload
	for {
		part, err := mr.NextPart()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("read multipart upload: %v", err)
		}
		if part.FormName() != "file" {
			continue
		}
		p := qpath
		if p == "" {
			p = part.FileName()
		}
		if p == "" {
			return nil, errors.New("path: a file part needs ?path= or a file name")
		}
		b, err := io.ReadAll(part)
		if err != nil {
			return nil, fmt.Errorf("read multipart upload: %v", err)
		}
		out = append(out, upload{path: p, data: b})
	}
	if len(out) == 0 {
		return nil, errors.New(`no "file" part in the multipart upload`)
	}
	return out, nil
}

// upload writes u in chunks the agent's stdin takes and returns the
// file's absolute path.
func (s *Server) upload(ctx context.Context, sbx, user string, u upload) (string, error) {
	first := true
	data := u.data
	var full string
	for first || len(data) > 0 {
		n := min(len(data), uploadChunkSize)
		chunk := data[:n]
		data = data[n:]
		script := resolve + `[ -d "$p" ] && exit 45; cat >> "$p" || exit 1; printf %s "$p"`
		if first {
			script = resolve + `[ -d "$p" ] && exit 45; mkdir -p -- "$(dirname -- "$p")" && cat > "$p" || exit 1; printf %s "$p"`
		}
		code, out, stderr, err := s.sh(ctx, sbx, user, script, chunk, nil, u.path)
		if err != nil {
			return "", rpcError(err)
		}
		if err := fsError(code, u.path, stderr); err != nil {
			return "", err
		}
		full, first = string(out), false
	}
	return full, nil
}
