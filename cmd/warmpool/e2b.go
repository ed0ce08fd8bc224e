package main

import (
	"fmt"
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/warmpool/warmpool/daemon"
	"github.com/warmpool/warmpool/e2b"
	"github.com/warmpool/warmpool/internal/paths"
)

func newE2BCommand(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "e2b", Short: "The E2B-compatible API (warmpool serve --e2b)"}
	key := &cobra.Command{Use: "key", Short: "E2B API keys"}
	var file string
	create := &cobra.Command{
		Use:   "create [--file FILE]",
		Short: "Append a fresh E2B API key to the key file and print it",
		Long: `create appends a fresh random key (e2b_ and 40 hex digits) to the E2B key
file (default: e2b-keys in the state directory, the file warmpool serve --e2b
reads when --e2b-key-file is not given), creating it with mode 0600, and
prints the key. A running daemon reads its keys at start: restart it to
accept the new key.`,
		Args: args(),
		RunE: func(cmd *cobra.Command, _ []string) error {
			path := file
			if path == "" {
				dir := g.stateDir
				if dir == "" {
					dir = paths.DefaultStateDir()
				}
				path = filepath.Join(dir, daemon.E2BKeyFileName)
			}
			k, err := e2b.AppendKey(path)
			if err != nil {
				return err
			}
			if g.json() {
				return printJSON(cmd.OutOrStdout(), map[string]string{"key": k, "file": path})
			}
			_, err = fmt.Fprintln(cmd.OutOrStdout(), k)
			return err
		},
	}
	create.Flags().StringVar(&file, "file", "", "key file (default: e2b-keys in the state directory)")
	key.AddCommand(create)
	cmd.AddCommand(key)
	return cmd
}
