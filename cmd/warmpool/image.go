package main

import (
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/spf13/cobra"

	"github.com/warmpool/warmpool/api"
	"github.com/warmpool/warmpool/guest"
)

func newImageCommand(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "image", Short: "Build, list and prune guest images (kernel + initramfs with the agent)"}
	var opts guest.BuildOptions
	build := &cobra.Command{
		Use:   "build [--out DIR]",
		Short: "Build the guest kernel and initramfs locally, with progress",
		Long: `image build fetches the Debian cloud kernel and busybox, adds the guest
agent (the one embedded in this binary, else --agent, else compiled from the
source tree) and packs the initramfs into --out (default: the user cache
directory).
It runs locally, without the daemon; an image already built from the same
inputs is reused.`,
		Args: args(),
		RunE: func(cmd *cobra.Command, _ []string) error {
			p := newProgress(cmd.ErrOrStderr())
			stop := p.spinWhile("building guest image")
			opts.Progress = func(step string, done, total int64) { p.update(step, done, total) }
			opts.Agent = embeddedAgent()
			img, err := guest.Build(cmd.Context(), opts)
			stop()
			if errors.Is(err, guest.ErrNoAgent) {
				return fmt.Errorf("build guest image: %w; pass --agent with a static warmpool-agent, or use a warmpool binary built with `make build`, which embeds one", err)
			}
			if err != nil {
				return fmt.Errorf("build guest image: %w", err)
			}
			if g.json() {
				return printJSON(cmd.OutOrStdout(), img)
			}
			return keyValues(cmd.OutOrStdout(),
				"dir", img.Dir,
				"kernel", img.Kernel,
				"initrd", img.Initrd,
				"kernel release", img.KernelRelease,
				"modules", strings.Join(img.Modules, " "),
				"digest", img.Digest,
			)
		},
	}
	f := build.Flags()
	f.StringVar(&opts.CacheDir, "out", "", "directory for downloads and finished images (default: "+guest.DefaultCacheDir()+")")
	f.StringVar(&opts.KernelPackage, "kernel-package", "", "Debian kernel package to use instead of the current cloud kernel")
	f.StringVar(&opts.AgentBinary, "agent", "", "prebuilt static warmpool-agent instead of compiling one")
	f.StringVar(&opts.Busybox, "busybox", "", "static busybox to include (default /bin/busybox)")
	cmd.AddCommand(build, newImageListCommand(g), newImagePruneCommand(g))
	return cmd
}

func newImageListCommand(g *globals) *cobra.Command {
	var cache string
	cmd := &cobra.Command{
		Use:   "ls [--out DIR]",
		Short: "List the guest images in the local cache, newest first",
		Args:  args(),
		RunE: func(cmd *cobra.Command, _ []string) error {
			imgs, err := guest.ListCached(cache)
			if err != nil {
				return err
			}
			return printCachedImages(cmd.OutOrStdout(), g, imgs)
		},
	}
	cmd.Flags().StringVar(&cache, "out", "", "image cache directory (default: "+guest.DefaultCacheDir()+")")
	return cmd
}

func newImagePruneCommand(g *globals) *cobra.Command {
	opts := guest.PruneOptions{KeepNewest: 1}
	var ignoreDaemon bool
	cmd := &cobra.Command{
		Use:   "prune [--keep N] [--dry-run]",
		Short: "Remove cached guest images that are neither the newest nor used by a template",
		Long: `image prune removes guest images from the local cache, keeping the --keep
newest ones and every image a template of the daemon (at --socket/--state)
was built from: a template's automatic rebuild needs its image. When no
daemon answers, prune refuses unless --ignore-daemon is given.`,
		Args: args(),
		RunE: func(cmd *cobra.Command, _ []string) error {
			if !ignoreDaemon {
				err := g.withClient(func(c *api.Client) error {
					tpls, err := c.Templates(cmd.Context())
					if err != nil {
						return err
					}
					for _, t := range tpls {
						if t.Image != "" {
							opts.InUse = append(opts.InUse, t.Image)
						}
					}
					return nil
				})
				if err != nil {
					return fmt.Errorf("prune guest images: ask the daemon which images its templates use (--ignore-daemon prunes without asking): %w", err)
				}
			}
			removed, err := guest.Prune(cmd.Context(), opts)
			if err != nil {
				return err
			}
			if g.json() || len(removed) > 0 {
				if err := printCachedImages(cmd.OutOrStdout(), g, removed); err != nil {
					return err
				}
			}
			if !g.json() {
				var freed int64
				for _, img := range removed {
					freed += img.SizeBytes
				}
				verb := "removed"
				if opts.DryRun {
					verb = "would remove"
				}
				noun := "images"
				if len(removed) == 1 {
					noun = "image"
				}
				fmt.Fprintf(cmd.ErrOrStderr(), "%s %d %s, %.1f MiB\n", verb, len(removed), noun, float64(freed)/(1<<20))
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&opts.CacheDir, "out", "", "image cache directory (default: "+guest.DefaultCacheDir()+")")
	f.IntVar(&opts.KeepNewest, "keep", 1, "how many of the newest images to keep (at least 1)")
	f.BoolVar(&opts.DryRun, "dry-run", false, "list what would be removed and remove nothing")
	f.BoolVar(&ignoreDaemon, "ignore-daemon", false, "do not ask the daemon which images its templates use")
	return cmd
}

func printCachedImages(w io.Writer, g *globals, imgs []guest.CachedImage) error {
	if g.json() {
		if imgs == nil {
			imgs = []guest.CachedImage{}
		}
		return printJSON(w, imgs)
	}
	t := newTable(w, "DIGEST", "KERNEL", "SIZE", "AGE", "DIR")
	for _, img := range imgs {
		t.row(img.Digest[:min(12, len(img.Digest))], img.KernelRelease, fmt.Sprintf("%.1fMiB", float64(img.SizeBytes)/(1<<20)), age(img.BuiltAt), img.Dir)
	}
	return t.flush()
}
