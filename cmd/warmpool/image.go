package main

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/spf13/cobra"

	"github.com/warmpool/warmpool/api"
	"github.com/warmpool/warmpool/guest"
	"github.com/warmpool/warmpool/rootfs"
)

func newImageCommand(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "image", Short: "Build, list and prune guest images (kernel + initramfs with the agent)"}
	var opts guest.BuildOptions
	var from, name string
	var packages []string
	var sizeMiB int
	build := &cobra.Command{
		Use:   "build [--from SOURCE] [--name NAME] [--packages A,B] [--size MIB] [--out DIR]",
		Short: "Build a guest image locally, with progress",
		Long: `image build fetches the Debian cloud kernel and busybox, adds the guest
agent (the one embedded in this binary, else --agent, else compiled from the
source tree) and packs the initramfs into --out (default: the user cache
directory): the busybox image, what --from busybox (the default) builds.

Other sources add a read-only ext4 root filesystem disk, made without
mounting anything, to that image's kernel and initramfs:
  dir:PATH             a root filesystem tree
  tar:PATH             a root filesystem tarball (plain, gzip or zstd)
  oci-archive:PATH     an OCI image layout tarball (skopeo copy ... oci-archive:)
  docker-archive:PATH  what docker save writes
  debian:SUITE         debootstrap (minbase) of SUITE from the archive the
                       host's apt uses, with --packages on top; the tree is
                       cached in the image cache for the next build
Layers are applied in order with their whiteouts; the image config's Env,
WorkingDir, User, Entrypoint and Cmd are kept as the image's exec defaults.
A layer path that leaves the root (.., or through a symlink), a missing
/bin/sh, or files that do not fit --size fail the build, leaving nothing in
the cache. --name names the image for later use; image prune keeps named
images. template build --image NAME and machine ensure --image NAME boot
an image's disk as their read-only root.

It runs locally, without the daemon; an image already built from the same
inputs is reused.`,
		Args: args(),
		RunE: func(cmd *cobra.Command, _ []string) error {
			src, err := rootfs.ParseSource(from)
			if err != nil {
				return err
			}
			if name != "" {
				if err := guest.CheckName(name); err != nil {
					return err
				}
			}
			if src.Kind == rootfs.KindBusybox && (len(packages) > 0 || sizeMiB != 0) {
				return fmt.Errorf("--packages and --size need a --from source other than busybox")
			}
			p := newProgress(cmd.ErrOrStderr())
			stop := p.spinWhile("building guest image")
			opts.Progress = func(step string, done, total int64) { p.update(step, done, total) }
			opts.Agent = embeddedAgent()
			img, err := guest.Build(cmd.Context(), opts)
			if err == nil && src.Kind != rootfs.KindBusybox {
				img, err = rootfs.Build(cmd.Context(), rootfs.Options{
					Source: src, Packages: packages, SizeMiB: sizeMiB, Base: img,
					CacheDir: opts.CacheDir, Progress: opts.Progress,
				})
			}
			stop()
			if errors.Is(err, guest.ErrNoAgent) {
				return fmt.Errorf("build guest image: %w; pass --agent with a static warmpool-agent, or use a warmpool binary built with `make build`, which embeds one", err)
			}
			if err != nil {
				return fmt.Errorf("build guest image: %w", err)
			}
			if name != "" {
				if err := nameImage(cmd.Context(), opts.CacheDir, name, img.Dir); err != nil {
					return err
				}
			}
			if g.json() {
				return printJSON(cmd.OutOrStdout(), img)
			}
			kv := []any{
				"name", name,
				"source", cmp.Or(img.Source, rootfs.KindBusybox),
				"dir", img.Dir,
				"kernel", img.Kernel,
				"initrd", img.Initrd,
			}
			if img.Rootfs != nil {
				kv = append(kv, "rootfs", img.Rootfs.Path, "rootfs size", mib(img.Rootfs.SizeBytes))
			}
			kv = append(kv,
				"kernel release", img.KernelRelease,
				"modules", strings.Join(img.Modules, " "),
				"digest", img.Digest,
			)
			return keyValues(cmd.OutOrStdout(), kv...)
		},
	}
	f := build.Flags()
	f.StringVar(&from, "from", rootfs.KindBusybox, "what to build the image from: busybox, dir:PATH, tar:PATH, oci-archive:PATH, docker-archive:PATH or debian:SUITE")
	f.StringVar(&name, "name", "", "name the image (image ls shows it; image prune keeps it)")
	f.StringSliceVar(&packages, "packages", nil, "Debian packages to install on top of the suite's minimal system (debian:SUITE only)")
	f.IntVar(&sizeMiB, "size", 0, "root filesystem disk size in MiB (default: sized to its files)")
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
		Short: "Remove cached guest images that are neither the newest, named, nor used by a template",
		Long: `image prune removes guest images from the local cache, keeping the --keep
newest ones, every named one (image build --name) and every image a template of the daemon (at --socket/--state)
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
	t := newTable(w, "NAME", "SOURCE", "SIZE", "DIGEST", "CREATED", "KERNEL", "DIR")
	for _, img := range imgs {
		names := "-"
		if len(img.Names) > 0 {
			names = strings.Join(img.Names, ",")
		}
		t.row(names, cmp.Or(img.Source, rootfs.KindBusybox), mib(img.SizeBytes), img.Digest[:min(12, len(img.Digest))], age(img.BuiltAt), img.KernelRelease, img.Dir)
	}
	return t.flush()
}

func mib(n int64) string { return fmt.Sprintf("%.1fMiB", float64(n)/(1<<20)) }

// nameImage points name at the image in dir, under the cache's lock.
func nameImage(ctx context.Context, cacheDir, name, dir string) error {
	cacheDir = cmp.Or(cacheDir, guest.DefaultCacheDir())
	unlock, err := guest.LockCache(ctx, cacheDir)
	if err != nil {
		return err
	}
	defer unlock()
	return guest.SetName(cacheDir, name, dir)
}
