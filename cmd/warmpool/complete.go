package main

import (
	"context"
	"time"

	"github.com/spf13/cobra"

	"github.com/warmpool/warmpool/api"
)

// completeNames completes the first argument with names the daemon knows;
// with no daemon it completes nothing rather than failing the shell.
func completeNames(g *globals, list func(context.Context, *api.Client) ([]string, error)) cobra.CompletionFunc {
	return func(cmd *cobra.Command, a []string, _ string) ([]string, cobra.ShellCompDirective) {
		if len(a) > 0 {
			return nil, cobra.ShellCompDirectiveNoFileComp
		}
		c, err := g.client()
		if err != nil {
			return nil, cobra.ShellCompDirectiveNoFileComp
		}
		defer c.Close()
		ctx, cancel := context.WithTimeout(cmd.Context(), 2*time.Second)
		defer cancel()
		names, err := list(ctx, c)
		if err != nil {
			return nil, cobra.ShellCompDirectiveNoFileComp
		}
		return names, cobra.ShellCompDirectiveNoFileComp
	}
}

func poolNames(ctx context.Context, c *api.Client) ([]string, error) {
	ps, err := c.Pools(ctx)
	names := make([]string, 0, len(ps))
	for _, p := range ps {
		names = append(names, p.Name)
	}
	return names, err
}

func leaseIDs(ctx context.Context, c *api.Client) ([]string, error) {
	ls, err := c.Leases(ctx)
	ids := make([]string, 0, len(ls))
	for _, l := range ls {
		ids = append(ids, l.ID)
	}
	return ids, err
}

func machineNames(ctx context.Context, c *api.Client) ([]string, error) {
	ms, err := c.Machines(ctx)
	names := make([]string, 0, len(ms))
	for _, m := range ms {
		names = append(names, m.Name)
	}
	return names, err
}

func templateNames(ctx context.Context, c *api.Client) ([]string, error) {
	ts, err := c.Templates(ctx)
	names := make([]string, 0, len(ts))
	for _, t := range ts {
		names = append(names, t.Name)
	}
	return names, err
}
