package main

import (
	"fmt"
	"strings"

	"github.com/spf13/cobra"

	"github.com/warmpool/warmpool/guest"
)

func newImageCommand(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "image", Short: "Build the guest image (kernel + initramfs with the agent)"}
	var opts guest.BuildOptions
	build := &cobra.Command{
		Use:   "build [--out DIR]",
		Short: "Build the guest kernel and initramfs locally, with progress",
		Long: `image build fetches the Debian cloud kernel and busybox, compiles the guest
agent and packs the initramfs into --out (default: the user cache directory).
It runs locally, without the daemon; an image already built from the same
inputs is reused.`,
		Args: args(),
		RunE: func(cmd *cobra.Command, _ []string) error {
			p := newProgress(cmd.ErrOrStderr())
			stop := p.spinWhile("building guest image")
			opts.Progress = func(step string, done, total int64) { p.update(step, done, total) }
			img, err := guest.Build(cmd.Context(), opts)
			stop()
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
	cmd.AddCommand(build)
	return cmd
}
