package server

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// execUser is who an exec runs as, resolved from the guest's own account
// files the way container runtimes resolve an image's User.
type execUser struct {
	UID, GID uint32
	Groups   []uint32
	// Name and Home come from the passwd entry; empty for a numeric user
	// the passwd file does not list.
	Name, Home string
}

// errUnknownUser is wrapped when a user or group name is not in the
// guest's account files.
var errUnknownUser = errors.New("not found")

// resolveUser turns spec ("name", "uid", "name:group", "uid:gid" and the
// mixed forms) into ids, reading etc/passwd and etc/group below root. A
// numeric user the passwd file does not list runs with that uid and gid 0
// (or the given group); a name must be listed. Supplementary groups are the
// user's memberships in etc/group.
func resolveUser(root, spec string) (execUser, error) {
	var u execUser
	userPart, groupPart, hasGroup := strings.Cut(spec, ":")
	if userPart == "" || (hasGroup && groupPart == "") {
		return u, fmt.Errorf("user %q: want NAME, UID, NAME:GROUP or UID:GID", spec)
	}
	passwd, err := readAccounts(filepath.Join(root, "etc/passwd"), 7)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return u, err
	}
	entry, found := lookupAccount(passwd, userPart)
	switch {
	case found:
		uid, err1 := parseID(entry[2])
		gid, err2 := parseID(entry[3])
		if err1 != nil || err2 != nil {
			return u, fmt.Errorf("user %q: malformed /etc/passwd entry %q", spec, strings.Join(entry, ":"))
		}
		u.UID, u.GID, u.Name, u.Home = uid, gid, entry[0], entry[5]
	default:
		uid, err := parseID(userPart)
		if err != nil {
			return u, fmt.Errorf("user %q: %w in /etc/passwd", userPart, errUnknownUser)
		}
		u.UID = uid
	}
	groups, err := readAccounts(filepath.Join(root, "etc/group"), 4)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return u, err
	}
	if hasGroup {
		if g, ok := lookupAccount(groups, groupPart); ok {
			gid, err := parseID(g[2])
			if err != nil {
				return u, fmt.Errorf("group %q: malformed /etc/group entry %q", groupPart, strings.Join(g, ":"))
			}
			u.GID = gid
		} else if gid, err := parseID(groupPart); err == nil {
			u.GID = gid
		} else {
			return u, fmt.Errorf("group %q: %w in /etc/group", groupPart, errUnknownUser)
		}
	}
	u.Groups = []uint32{u.GID}
	if u.Name != "" {
		for _, g := range groups {
			gid, err := parseID(g[2])
			if err != nil || gid == u.GID {
				continue
			}
			for _, member := range strings.Split(g[3], ",") {
				if member == u.Name {
					u.Groups = append(u.Groups, gid)
					break
				}
			}
		}
	}
	return u, nil
}

// lookupAccount finds the entry whose name (field 0) or, for a number, id
// (field 2) is key. A name wins over an id, as getpwnam is tried first.
func lookupAccount(entries [][]string, key string) ([]string, bool) {
	for _, e := range entries {
		if e[0] == key {
			return e, true
		}
	}
	if _, err := parseID(key); err != nil {
		return nil, false
	}
	for _, e := range entries {
		if e[2] == key {
			return e, true
		}
	}
	return nil, false
}

func parseID(s string) (uint32, error) {
	n, err := strconv.ParseUint(s, 10, 32)
	return uint32(n), err
}

// readAccounts reads a colon-separated account file, keeping lines with at
// least fields fields (passwd has 7, group 4).
func readAccounts(path string, fields int) ([][]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	defer f.Close()
	var out [][]string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		parts := strings.Split(line, ":")
		if len(parts) < fields {
			continue
		}
		out = append(out, parts)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	return out, nil
}

// environ is what a login would set for u; a numeric user nobody lists
// keeps the base environment's HOME.
func (u execUser) environ() []string {
	if u.Name == "" {
		return nil
	}
	env := []string{"USER=" + u.Name, "LOGNAME=" + u.Name}
	if u.Home != "" {
		env = append(env, "HOME="+u.Home)
	}
	return env
}
