// Command warmpool runs the warmpool daemon (`warmpool serve`) and talks to
// it: every other command is a thin layer over the api package's client.
//
// Exit codes: 0 success; 1 failure; 2 wrong usage; 75 (EX_TEMPFAIL) when the
// daemon had nothing ready or is shutting down, so scripts know a retry may
// succeed; `exec` exits with the command's own exit code.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/warmpool/warmpool/api"
	"github.com/warmpool/warmpool/internal/paths"
)

// Exit codes.
const (
	exitOK       = 0
	exitFailure  = 1
	exitUsage    = 2
	exitTempFail = 75
)

func main() {
	os.Exit(run(context.Background(), os.Args[1:], os.Stdin, os.Stdout, os.Stderr))
}

// run executes the CLI with args and returns the process exit code. Errors
// are printed as one line on stderr.
func run(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	root := newRootCommand()
	root.SetArgs(args)
	root.SetIn(stdin)
	root.SetOut(stdout)
	root.SetErr(stderr)
	err := root.ExecuteContext(ctx)
	if err == nil {
		return exitOK
	}
	var exit *exitCodeError
	if errors.As(err, &exit) {
		return exit.code
	}
	fmt.Fprintln(stderr, "warmpool: "+oneLine(err.Error()))
	var usage *usageError
	switch {
	case errors.As(err, &usage):
		return exitUsage
	case errors.Is(err, api.ErrNothingReady), errors.Is(err, api.ErrShuttingDown), isCode(err, api.CodeUnavailable):
		return exitTempFail
	}
	return exitFailure
}

func isCode(err error, code string) bool {
	var e *api.Error
	return errors.As(err, &e) && e.Code == code
}

// oneLine keeps an error message on one line, as scripts parse stderr.
func oneLine(s string) string {
	return strings.Join(strings.Fields(strings.ReplaceAll(s, "\n", "; ")), " ")
}

// usageError is wrong use of the command line (exit 2).
type usageError struct{ err error }

func (e *usageError) Error() string { return e.err.Error() }
func (e *usageError) Unwrap() error { return e.err }

func usagef(format string, args ...any) error {
	return &usageError{fmt.Errorf(format, args...)}
}

// exitCodeError ends the process with code and prints nothing: exec passes
// the command's exit code through this way.
type exitCodeError struct{ code int }

func (e *exitCodeError) Error() string { return fmt.Sprintf("exit status %d", e.code) }

// globals are the flags every command shares.
type globals struct {
	socket    string
	stateDir  string
	output    string
	tokenFile string
}

// extraCommands lets commands built in other files of this package (for
// example `bench`) add themselves from an init function.
var extraCommands []func() *cobra.Command

func newRootCommand() *cobra.Command {
	g := &globals{}
	root := &cobra.Command{
		Use:   "warmpool",
		Short: "Keep microVMs warm and long-lived machines ready",
		Long: `warmpool keeps microVMs ready before anyone asks for them, and keeps
long-lived machines running only while they are needed.

Client commands find the daemon's socket through --socket, else
$WARMPOOL_SOCKET, else warmpool.sock in --state, else in the default state
directory (` + paths.DefaultStateDir() + `).

Exit codes: 0 success, 1 failure, 2 wrong usage, 75 nothing ready in time or
daemon shutting down (retry later); exec exits with the command's code.`,
		SilenceErrors: true,
		SilenceUsage:  true,
		PersistentPreRunE: func(cmd *cobra.Command, _ []string) error {
			if g.output != "table" && g.output != "json" {
				return usagef("invalid --output %q: must be table or json", g.output)
			}
			return nil
		},
	}
	pf := root.PersistentFlags()
	pf.StringVar(&g.socket, "socket", "", "daemon socket (unix path, unix:PATH, tcp:HOST:PORT or http://URL); default: $"+paths.SocketEnv+", else warmpool.sock in --state")
	pf.StringVar(&g.stateDir, "state", "", "state directory (default "+paths.DefaultStateDir()+")")
	pf.StringVarP(&g.output, "output", "o", "table", "output format: table or json")
	pf.StringVar(&g.tokenFile, "token-file", "", "file holding the bearer token (needed over TCP)")
	root.SetFlagErrorFunc(func(cmd *cobra.Command, err error) error {
		return usagef("%v (see %s --help)", err, cmd.CommandPath())
	})
	_ = root.RegisterFlagCompletionFunc("output", fixedCompletion("table", "json"))

	root.AddCommand(
		newServeCommand(g),
		newControllerCommand(g),
		newImageCommand(g),
		newTemplateCommand(g),
		newPoolCommand(g),
		newAcquireCommand(g),
		newExecCommand(g),
		newShellCommand(g, "shell LEASE|machine:NAME", func(s string) string { return s }),
		newPsCommand(g),
		newLogsCommand(g),
		newKillCommand(g),
		newWaitCommand(g),
		newCpCommand(g),
		newWatchCommand(g),
		newReleaseCommand(g),
		newLeaseCommand(g),
		newMachineCommand(g),
		newEventsCommand(g),
		newStatusCommand(g),
		newE2BCommand(g),
	)
	for _, mk := range extraCommands {
		root.AddCommand(mk())
	}
	return root
}

func fixedCompletion(values ...string) func(*cobra.Command, []string, string) ([]string, cobra.ShellCompDirective) {
	return func(*cobra.Command, []string, string) ([]string, cobra.ShellCompDirective) {
		return values, cobra.ShellCompDirectiveNoFileComp
	}
}

// client connects to the daemon named by the global flags.
func (g *globals) client() (*api.Client, error) {
	target := paths.DiscoverSocket(g.socket, g.stateDir)
	token := ""
	if g.tokenFile != "" {
		b, err := os.ReadFile(g.tokenFile)
		if err != nil {
			return nil, fmt.Errorf("read token: %w", err)
		}
		token = strings.TrimSpace(string(b))
		if token == "" {
			return nil, fmt.Errorf("read token: %s is empty", g.tokenFile)
		}
	}
	return api.NewClient(target, token), nil
}

// withClient runs fn with a client and closes it after.
func (g *globals) withClient(fn func(*api.Client) error) error {
	c, err := g.client()
	if err != nil {
		return err
	}
	defer c.Close()
	return fn(c)
}

func (g *globals) json() bool { return g.output == "json" }

// args checks the number of positional arguments and names the missing
// ones in the error.
func args(names ...string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, a []string) error {
		if len(a) != len(names) {
			if len(names) == 0 {
				return usagef("%s takes no arguments, got %q (see %s --help)", subPath(cmd), a, cmd.CommandPath())
			}
			return usagef("%s takes %s, got %d argument(s) (see %s --help)",
				subPath(cmd), strings.Join(names, " "), len(a), cmd.CommandPath())
		}
		return nil
	}
}

// optionalArg allows zero or one argument.
func optionalArg(name string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, a []string) error {
		if len(a) > 1 {
			return usagef("%s takes at most one %s, got %d arguments", subPath(cmd), name, len(a))
		}
		return nil
	}
}

// wrapf adds what the CLI was doing to err, unless the daemon's message
// already starts with it (the daemon names what failed too).
func wrapf(err error, format string, a ...any) error {
	if err == nil {
		return nil
	}
	what := fmt.Sprintf(format, a...)
	if strings.HasPrefix(err.Error(), what) {
		return err
	}
	var opErr *net.OpError
	if errors.As(err, &opErr) && opErr.Op == "dial" {
		return fmt.Errorf("%s: %w (is the daemon running? start it with `warmpool serve`)", what, err)
	}
	return fmt.Errorf("%s: %w", what, err)
}

// subPath is the command's path without the program name, which the error
// prefix already gives.
func subPath(cmd *cobra.Command) string {
	return strings.TrimPrefix(cmd.CommandPath(), cmd.Root().Name()+" ")
}
