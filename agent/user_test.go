package agent_test

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/warmpool/warmpool/agent"
	"github.com/warmpool/warmpool/agent/server"
)

// accountRoot writes the account files an image would carry.
func accountRoot(t *testing.T) string {
	t.Helper()
	root := t.TempDir()
	if err := os.MkdirAll(filepath.Join(root, "etc"), 0o755); err != nil {
		t.Fatal(err)
	}
	passwd := "root:x:0:0:root:/root:/bin/sh\n# a comment\napp:x:1234:2345:App:/home/app:/bin/sh\n"
	group := "root:x:0:\napp:x:2345:\ntools:x:3456:app,other\nstaff:x:4567:\n"
	for name, body := range map[string]string{"passwd": passwd, "group": group} {
		if err := os.WriteFile(filepath.Join(root, "etc", name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

func TestExecAsUserFromGuestAccounts(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("changing the user of a command needs root")
	}
	root := accountRoot(t)
	c, _ := pipeAgent(t, server.Options{Root: root, Env: []string{"PATH=/usr/bin:/bin", "HOME=/root"}})
	cases := []struct {
		user, want string
		env        []string
	}{
		{"app", "1234 2345 2345 3456 app /home/app", nil},
		{"1234", "1234 2345 2345 3456 app /home/app", nil},
		{"app:staff", "1234 4567 4567 3456 app /home/app", nil},
		{"777:888", "777 888 888 - /root", nil},
		{"app", "1234 2345 2345 3456 app /override", []string{"HOME=/override"}},
		{"", "0 0 0 - /root", nil},
	}
	script := `printf '%s %s %s %s\n' "$(id -u)" "$(id -g)" "$(id -G)" "${USER:--} $HOME"`
	for _, tc := range cases {
		var out, errb bytes.Buffer
		code, err := c.Exec(ctxT(t), agent.ExecRequest{Argv: []string{"sh", "-c", script}, User: tc.user, Env: tc.env}, &out, &errb)
		if err != nil || code != 0 {
			t.Errorf("exec as %q = %d, %v (%s)", tc.user, code, err, errb.String())
			continue
		}
		if got := out.String(); got != tc.want+"\n" {
			t.Errorf("exec as %q printed %q, want %q", tc.user, got, tc.want)
		}
	}
}

func TestExecAsUnknownUserFailsToStart(t *testing.T) {
	root := accountRoot(t)
	c, _ := pipeAgent(t, server.Options{Root: root})
	for _, user := range []string{"nobody-here", "app:nogroup", ":1", "app:"} {
		code, err := c.Exec(ctxT(t), agent.ExecRequest{Argv: []string{"true"}, User: user}, nil, nil)
		if !errors.Is(err, agent.ErrExecFailed) || code != -1 {
			t.Errorf("exec as %q = %d, %v, want ErrExecFailed", user, code, err)
		}
	}
}
