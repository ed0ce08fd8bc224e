package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/warmpool/warmpool/api"
)

// parseTarget reads LEASE or machine:NAME.
func parseTarget(s string) (api.Target, error) {
	if name, ok := strings.CutPrefix(s, "machine:"); ok {
		if name == "" {
			return api.Target{}, usagef("machine: needs a name (machine:NAME)")
		}
		return api.Target{Machine: name}, nil
	}
	if s == "" {
		return api.Target{}, usagef("empty lease")
	}
	return api.Target{Lease: s}, nil
}

func newExecCommand(g *globals) *cobra.Command {
	var (
		req     api.ProcessRequest
		timeout time.Duration
		stdin   bool
		tty     bool
		detach  bool
	)
	cmd := &cobra.Command{
		Use:               "exec LEASE|machine:NAME -- CMD [ARGS...]",
		ValidArgsFunction: completeNames(g, leaseIDs),
		Short:             "Run a command in a leased VM or a machine; output streams, the exit code passes through",
		Long: `Run a command in a leased VM (or a machine, as machine:NAME). Output
streams as it comes; the command's exit code is warmpool's (128+N when a
signal N killed it, 127 when it could not start, 124 after --timeout).

-i streams this process's stdin to the command, without a size limit.
-t runs the command on a terminal in the guest, sized like this one and
resized with it; the local terminal is in raw mode until the command ends,
so Ctrl-C reaches the guest as a terminal would deliver it. Without -t,
SIGINT and SIGTERM to warmpool are forwarded to the command.
--detach starts the command in the background and prints its PID; see ps,
logs, kill and wait.`,
		Args: func(cmd *cobra.Command, a []string) error {
			if len(a) < 2 || (a[1] == "--" && len(a) < 3) {
				return usagef("%s takes LEASE -- CMD [ARGS...]", subPath(cmd))
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, a []string) error {
			t, err := parseTarget(a[0])
			if err != nil {
				return err
			}
			// Parsing stops at LEASE, so a "--" after it arrives as an argument.
			req.Argv = a[1:]
			if req.Argv[0] == "--" {
				req.Argv = req.Argv[1:]
			}
			req.Timeout = api.Duration(timeout)
			if detach {
				if stdin || tty {
					return usagef("--detach takes neither -i nor -t")
				}
				return g.withClient(func(c *api.Client) error {
					pid, err := c.StartProcess(cmd.Context(), t, req)
					if err != nil {
						return wrapf(err, "start %s in %s", req.Argv[0], t)
					}
					if g.json() {
						return printJSON(cmd.OutOrStdout(), api.StartedProcess{PID: pid})
					}
					fmt.Fprintln(cmd.OutOrStdout(), pid)
					return nil
				})
			}
			return g.withClient(func(c *api.Client) error {
				return runAttached(cmd, c, t, req, stdin, tty)
			})
		},
	}
	cmd.Flags().StringArrayVarP(&req.Env, "env", "e", nil, "KEY=VALUE added to the command's environment (repeatable)")
	cmd.Flags().StringVarP(&req.Dir, "workdir", "w", "", "working directory inside the VM (default: the image's WorkingDir, else /)")
	cmd.Flags().StringVarP(&req.User, "user", "u", "", "run as NAME, UID, NAME:GROUP or UID:GID of the guest's /etc/passwd (default: the image's User, else root)")
	cmd.Flags().DurationVar(&timeout, "timeout", 0, "kill the command after this long (default: never)")
	cmd.Flags().BoolVarP(&stdin, "stdin", "i", false, "stream this process's stdin to the command")
	cmd.Flags().BoolVarP(&tty, "tty", "t", false, "run the command on a terminal in the guest")
	cmd.Flags().BoolVarP(&detach, "detach", "d", false, "run in the background and print the process ID")
	// Flags after the command belong to it, not to warmpool.
	cmd.Flags().SetInterspersed(false)
	return cmd
}

// runAttached runs req over the exec WebSocket and ends the CLI with the
// command's exit code.
func runAttached(cmd *cobra.Command, c *api.Client, t api.Target, req api.ProcessRequest, stdin, tty bool) error {
	in := cmd.InOrStdin()
	inFile, inIsFile := in.(*os.File)
	outFile, outIsFile := cmd.OutOrStdout().(*os.File)
	localTTY := tty && inIsFile && term.IsTerminal(int(inFile.Fd()))
	eio := api.ExecIO{Stdout: cmd.OutOrStdout(), Stderr: cmd.ErrOrStderr()}
	if stdin || tty {
		req.Stdin = true
		eio.Stdin = in
	}
	req.TTY = tty
	// Signals are the command's from here on: they are forwarded instead
	// of cancelling the call.
	ctx := context.WithoutCancel(cmd.Context())
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	sigs := make(chan os.Signal, 4)
	forward := []os.Signal{syscall.SIGTERM, syscall.SIGHUP}
	if !localTTY {
		forward = append(forward, syscall.SIGINT)
	}
	signal.Notify(sigs, forward...)
	defer signal.Stop(sigs)
	names := make(chan string, 4)
	eio.Signal = names
	go func() {
		for {
			select {
			case <-ctx.Done():
				return
			case s := <-sigs:
				names <- unixSignalName(s)
			}
		}
	}()
	if tty {
		resize := make(chan [2]int, 1)
		eio.Resize = resize
		size := func() (int, int, bool) {
			for _, f := range []*os.File{outFile, inFile} {
				if f != nil && term.IsTerminal(int(f.Fd())) {
					if cols, rows, err := term.GetSize(int(f.Fd())); err == nil {
						return rows, cols, true
					}
				}
			}
			return 0, 0, false
		}
		_ = outIsFile
		if rows, cols, ok := size(); ok {
			req.Rows, req.Cols = rows, cols
		}
		winch := make(chan os.Signal, 1)
		signal.Notify(winch, syscall.SIGWINCH)
		defer signal.Stop(winch)
		go func() {
			for {
				select {
				case <-ctx.Done():
					return
				case <-winch:
					if rows, cols, ok := size(); ok {
						select {
						case resize <- [2]int{rows, cols}:
						default:
						}
					}
				}
			}
		}()
	}
	if localTTY {
		old, err := term.MakeRaw(int(inFile.Fd()))
		if err != nil {
			return wrapf(err, "put the terminal in raw mode")
		}
		// Restored on every return; a signal that ends warmpool arrives
		// here as a forwarded one and so returns too.
		defer term.Restore(int(inFile.Fd()), old)
	}
	exit, err := c.ExecStream(ctx, t, req, eio)
	if err != nil {
		return wrapf(err, "exec %s in %s", req.Argv[0], t)
	}
	if exit.ErrCode != "" {
		fmt.Fprintf(cmd.ErrOrStderr(), "warmpool: %s\n", exit.Error)
	}
	if exit.Code != 0 {
		code := exit.Code
		if code < 0 || code > 255 {
			code = 255
		}
		return &exitCodeError{code: code}
	}
	return nil
}

func unixSignalName(s os.Signal) string {
	if n, ok := s.(syscall.Signal); ok {
		return strconv.Itoa(int(n))
	}
	return "TERM"
}

// loginShell runs the guest's login shell: bash where the image has it,
// else /bin/sh.
var loginShell = []string{"/bin/sh", "-c", `if [ -x /bin/bash ]; then exec /bin/bash -l; fi; exec /bin/sh -l`}

func newShellCommand(g *globals, use string, target func(string) string) *cobra.Command {
	var user, dir string
	var env []string
	cmd := &cobra.Command{
		Use:   use,
		Short: "Open an interactive login shell in the VM (bash if the image has it, else /bin/sh)",
		Args:  args("TARGET"),
		RunE: func(cmd *cobra.Command, a []string) error {
			t, err := parseTarget(target(a[0]))
			if err != nil {
				return err
			}
			req := api.ProcessRequest{Argv: loginShell, User: user, Dir: dir, Env: append([]string{"TERM=" + os.Getenv("TERM")}, env...)}
			if os.Getenv("TERM") == "" {
				req.Env = env
			}
			return g.withClient(func(c *api.Client) error { return runAttached(cmd, c, t, req, true, true) })
		},
	}
	cmd.Flags().StringVarP(&user, "user", "u", "", "run as NAME, UID, NAME:GROUP or UID:GID of the guest")
	cmd.Flags().StringVarP(&dir, "workdir", "w", "", "working directory inside the VM")
	cmd.Flags().StringArrayVarP(&env, "env", "e", nil, "KEY=VALUE added to the shell's environment (repeatable)")
	return cmd
}

func parsePID(s string) (int, error) {
	pid, err := strconv.Atoi(s)
	if err != nil || pid <= 0 {
		return 0, usagef("PID %q: must be a positive number", s)
	}
	return pid, nil
}

func newPsCommand(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "ps LEASE|machine:NAME",
		Short: "List the processes started in a VM (by exec, detached or not)",
		Args:  args("TARGET"),
		RunE: func(cmd *cobra.Command, a []string) error {
			t, err := parseTarget(a[0])
			if err != nil {
				return err
			}
			return g.withClient(func(c *api.Client) error {
				ps, err := c.Processes(cmd.Context(), t)
				if err != nil {
					return wrapf(err, "list processes in %s", t)
				}
				if g.json() {
					if ps == nil {
						ps = []api.ProcessInfo{}
					}
					return printJSON(cmd.OutOrStdout(), ps)
				}
				tb := newTable(cmd.OutOrStdout(), "PID", "STATE", "STARTED", "TTY", "COMMAND")
				for _, p := range ps {
					state := "running"
					if !p.Running && p.Exit != nil {
						state = "exited " + strconv.Itoa(p.Exit.Code)
					}
					kind := ""
					if p.Detached {
						kind = " (detached)"
					}
					tb.row(p.PID, state+kind, time.Unix(0, p.StartedUnixNano).UTC().Format(time.RFC3339), yesNo(p.TTY), strings.Join(p.Argv, " "))
				}
				return tb.flush()
			})
		},
	}
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

func newLogsCommand(g *globals) *cobra.Command {
	var follow bool
	cmd := &cobra.Command{
		Use:   "logs LEASE|machine:NAME PID",
		Short: "Print a process's kept output (the last 1 MiB); -f follows it until it exits",
		Args:  args("TARGET", "PID"),
		RunE: func(cmd *cobra.Command, a []string) error {
			t, err := parseTarget(a[0])
			if err != nil {
				return err
			}
			pid, err := parsePID(a[1])
			if err != nil {
				return err
			}
			return g.withClient(func(c *api.Client) error {
				code, err := c.Logs(cmd.Context(), t, pid, follow, cmd.OutOrStdout(), cmd.ErrOrStderr())
				if err != nil {
					return wrapf(err, "logs of %d in %s", pid, t)
				}
				if follow && code != nil && *code != 0 {
					return &exitCodeError{code: min(max(*code, 0), 255)}
				}
				return nil
			})
		},
	}
	cmd.Flags().BoolVarP(&follow, "follow", "f", false, "keep printing until the process exits, then exit with its code")
	return cmd
}

func newKillCommand(g *globals) *cobra.Command {
	var sig string
	cmd := &cobra.Command{
		Use:   "kill LEASE|machine:NAME PID",
		Short: "Send a signal (default TERM) to a process started in the VM, and to its process group",
		Args:  args("TARGET", "PID"),
		RunE: func(cmd *cobra.Command, a []string) error {
			t, err := parseTarget(a[0])
			if err != nil {
				return err
			}
			pid, err := parsePID(a[1])
			if err != nil {
				return err
			}
			if _, err := api.ParseSignal(sig); err != nil {
				return usagef("--signal %q: unknown signal", sig)
			}
			return g.withClient(func(c *api.Client) error {
				return wrapf(c.Signal(cmd.Context(), t, pid, sig), "signal %d in %s", pid, t)
			})
		},
	}
	cmd.Flags().StringVarP(&sig, "signal", "s", "TERM", "signal name (TERM, INT, KILL, ...) or number")
	return cmd
}

func newWaitCommand(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "wait LEASE|machine:NAME PID",
		Short: "Wait for a process started in the VM to exit; exits with its code",
		Args:  args("TARGET", "PID"),
		RunE: func(cmd *cobra.Command, a []string) error {
			t, err := parseTarget(a[0])
			if err != nil {
				return err
			}
			pid, err := parsePID(a[1])
			if err != nil {
				return err
			}
			return g.withClient(func(c *api.Client) error {
				e, err := c.Wait(cmd.Context(), t, pid)
				if err != nil {
					return wrapf(err, "wait for %d in %s", pid, t)
				}
				if g.json() {
					return printJSON(cmd.OutOrStdout(), e)
				}
				if e.Code != 0 {
					return &exitCodeError{code: min(max(e.Code, 0), 255)}
				}
				return nil
			})
		},
	}
}

func newWatchCommand(g *globals) *cobra.Command {
	var recursive bool
	cmd := &cobra.Command{
		Use:               "watch LEASE|machine:NAME PATH",
		ValidArgsFunction: completeNames(g, leaseIDs),
		Short:             "Print the changes below a directory in the VM as they happen, until Ctrl-C",
		Long: `Print the changes below a directory in the VM (or a machine, as
machine:NAME) as the guest's kernel reports them (inotify), one line each:
the type (create, write, remove, rename, chmod) and the path relative to
PATH, a directory's with a trailing /. A file moved in is a create, one
moved away or renamed a rename (its new name's create follows). Files
written through warmpool (cp, the API, the E2B SDK) land in a temporary
file renamed into place, so they show as the temporary file's create,
writes and rename, then the create of their name.

-r also watches every directory below PATH, those made later too.
-o json prints one JSON object per line: {"type":T,"name":N,"dir":true}.
"warmpool: watching PATH" on stderr says the watch is in place. Ctrl-C
ends it (exit 0); so does the removal or move of PATH itself, after its
event (name ".").`,
		Args: args("TARGET", "PATH"),
		RunE: func(cmd *cobra.Command, a []string) error {
			t, err := parseTarget(a[0])
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			return g.withClient(func(c *api.Client) error {
				w, err := c.Watch(ctx, t, a[1], recursive)
				if err != nil {
					return wrapf(err, "watch %s in %s", a[1], t)
				}
				defer w.Close()
				fmt.Fprintf(cmd.ErrOrStderr(), "warmpool: watching %s\n", w.Dir.Path)
				out := cmd.OutOrStdout()
				enc := json.NewEncoder(out)
				for {
					ev, err := w.Next()
					switch {
					case errors.Is(err, api.ErrWatchEnded):
						return nil
					case err != nil && ctx.Err() != nil:
						return nil // Ctrl-C
					case err != nil:
						return wrapf(err, "watch %s in %s", a[1], t)
					}
					if g.json() {
						err = enc.Encode(ev)
					} else {
						name := ev.Name
						if ev.Dir && name != "." {
							name += "/"
						}
						_, err = fmt.Fprintf(out, "%-6s %s\n", ev.Type, name)
					}
					if err != nil {
						return fmt.Errorf("watch %s in %s: write output: %w", a[1], t, err)
					}
				}
			})
		},
	}
	cmd.Flags().BoolVarP(&recursive, "recursive", "r", false, "watch every directory below PATH too, those made later included")
	return cmd
}
