package e2b

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"path"
	"strconv"
	"strings"

	"connectrpc.com/connect"

	"github.com/warmpool/warmpool/agent"
	"github.com/warmpool/warmpool/agent/proto"
	"github.com/warmpool/warmpool/api"
	"github.com/warmpool/warmpool/vm"
)

// guest opens sandbox sbx's agent session (the one the native API's
// processes and files use, with the lease's exec defaults); done ends
// the caller's use of it.
func (s *Server) guest(ctx context.Context, sbx string) (g *api.Guest, done func(), err error) {
	g, err = s.guests.Guest(ctx, api.Target{Lease: sbx})
	if err != nil {
		if errors.Is(err, vm.ErrNotFound) {
			return nil, nil, connect.NewError(connect.CodeUnavailable, fmt.Errorf("sandbox %s is not running: %w", sbx, errNotRunning))
		}
		return nil, nil, rpcError(err)
	}
	done = func() {}
	if g.Release != nil {
		done = g.Release
	}
	return g, done, nil
}

// guestError maps what the agent answered to the Connect code envd would
// use, so that the SDK raises its own error (NotFoundError for a missing
// file or process, InvalidArgumentError, ...).
func guestError(sbx string, err error) error {
	var ce *connect.Error
	if errors.As(err, &ce) {
		return err
	}
	var re *agent.RemoteError
	if errors.As(err, &re) {
		code := connect.CodeInternal
		switch re.Code {
		case proto.CodeNotFound, proto.CodeNoProcess:
			code = connect.CodeNotFound
		case proto.CodeExists:
			code = connect.CodeAlreadyExists
		case proto.CodeIsDir, proto.CodeNotDir, proto.CodeBadRequest, proto.CodeExecFailed, proto.CodeNotEmpty:
			code = connect.CodeInvalidArgument
		case proto.CodePermitted:
			code = connect.CodePermissionDenied
		case proto.CodeNoSpace, proto.CodeLimit:
			code = connect.CodeResourceExhausted
		case proto.CodeUnknownOp:
			// An agent older than the operation: a template built before.
			code = connect.CodeUnimplemented
		case proto.CodeTimeout:
			code = connect.CodeDeadlineExceeded
		}
		return connect.NewError(code, errors.New(re.Message))
	}
	if errors.Is(err, agent.ErrClosed) {
		// The session broke: the VM went away under the request.
		return connect.NewError(connect.CodeUnavailable, fmt.Errorf("sandbox %s: %w", sbx, err))
	}
	return rpcError(err)
}

// runAs is the user an envd request runs as: its own, else the image's.
// The agent runs as root, so an empty answer is root.
func runAs(g *api.Guest, user string) string {
	if user != "" {
		return user
	}
	return g.User
}

// homeOf is user's home directory, read from the guest's /etc/passwd
// (root's needs no read): relative paths and the default working
// directory of a process are the home directory's, as on E2B.
func homeOf(ctx context.Context, g *api.Guest, user string) (string, error) {
	if user == "" || user == "root" || user == "0" {
		return "/root", nil
	}
	ents, err := passwd(ctx, g, "/etc/passwd")
	if err != nil {
		return "", err
	}
	for _, f := range ents {
		if len(f) >= 6 && (f[0] == user || f[2] == user) {
			return f[5], nil
		}
	}
	return "", connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("user %q: not in the sandbox's /etc/passwd", user))
}

// resolvePath makes p absolute: a relative path is relative to the
// user's home directory.
func resolvePath(ctx context.Context, g *api.Guest, user, p string) (string, error) {
	if p == "" {
		return "", connect.NewError(connect.CodeInvalidArgument, errors.New("path: must not be empty"))
	}
	if strings.HasPrefix(p, "/") {
		return path.Clean(p), nil
	}
	if p == "~" || strings.HasPrefix(p, "~/") {
		p = strings.TrimPrefix(strings.TrimPrefix(p, "~"), "/")
	}
	home, err := homeOf(ctx, g, runAs(g, user))
	if err != nil {
		return "", err
	}
	return path.Join(home, p), nil
}

// passwd reads a colon-separated database (/etc/passwd, /etc/group) of
// the guest.
func passwd(ctx context.Context, g *api.Guest, file string) ([][]string, error) {
	_, r, err := g.ReadFile(ctx, file, false)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", file, err)
	}
	defer r.Close()
	var out [][]string
	sc := bufio.NewScanner(io.LimitReader(r, 4<<20))
	for sc.Scan() {
		if line := sc.Text(); line != "" && !strings.HasPrefix(line, "#") {
			out = append(out, strings.Split(line, ":"))
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read %s: %w", file, err)
	}
	return out, nil
}

// owners names the owners and groups of the entries of one answer; it
// reads /etc/passwd and /etc/group at most once, and only for IDs other
// than root's.
type owners struct {
	ctx          context.Context
	g            *api.Guest
	users, grps  map[int]string
	readU, readG bool
}

func newOwners(ctx context.Context, g *api.Guest) *owners {
	return &owners{ctx: ctx, g: g, users: map[int]string{0: "root"}, grps: map[int]string{0: "root"}}
}

func (o *owners) name(id int, names map[int]string, read *bool, file string) string {
	if n, ok := names[id]; ok {
		return n
	}
	if !*read {
		*read = true
		// An unreadable database leaves the IDs as numbers.
		ents, _ := passwd(o.ctx, o.g, file)
		for _, f := range ents {
			if len(f) >= 3 {
				if n, err := strconv.Atoi(f[2]); err == nil {
					if _, ok := names[n]; !ok {
						names[n] = f[0]
					}
				}
			}
		}
		if n, ok := names[id]; ok {
			return n
		}
	}
	return strconv.Itoa(id)
}

func (o *owners) user(uid int) string  { return o.name(uid, o.users, &o.readU, "/etc/passwd") }
func (o *owners) group(gid int) string { return o.name(gid, o.grps, &o.readG, "/etc/group") }
