package qemu_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	osexec "os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/warmpool/warmpool/agent"
	"github.com/warmpool/warmpool/guest"
	"github.com/warmpool/warmpool/internal/realvm"
	"github.com/warmpool/warmpool/provider/qemu"
	"github.com/warmpool/warmpool/rootfs"
	"github.com/warmpool/warmpool/template"
	"github.com/warmpool/warmpool/vm"
	"github.com/warmpool/warmpool/vm/providertest"
)

func TestConformance(t *testing.T) {
	spec := testSpec(t)
	disk := diskFixture(t, realvm.Image(t))
	providertest.Run(t, func(t *testing.T) (vm.Provider, providertest.Fixture) {
		// The VMs' directories away from the state directory, as the
		// daemon keeps them, so that the suite's leak checks cover both.
		state, run := realvm.StateDir(t), realvm.StateDir(t)
		withRun := func(o *qemu.Options) { o.RunDir = run }
		p := newProvider(t, state, withRun)
		t.Cleanup(func() { p.Close() })
		disk.Reopen = func(t *testing.T) vm.Provider {
			p2 := newProvider(t, state, withRun)
			t.Cleanup(func() { p2.Close() })
			return p2
		}
		return p, providertest.Fixture{
			Spec: spec,
			AgentPing: func(ctx context.Context, conn net.Conn) error {
				return agent.NewClient(conn).Ping(ctx)
			},
			Disk: disk,
		}
	})
}

// conformanceFile is the file of the guest's root the suite's writes go to.
const conformanceFile = "/wp-conformance"

// diskFixture builds the smallest image with a root filesystem disk: the
// host's static busybox as /bin/sh, into a cache of the test's own, so
// the suite's root-disk case costs one extra boot and no Debian tree.
func diskFixture(t *testing.T, base guest.Image) *providertest.DiskFixture {
	bb, err := osexec.LookPath("busybox")
	if err != nil {
		t.Skip("SKIPPING: the root-disk case needs a static busybox on the host (apt-get install busybox-static)")
	}
	if _, err := osexec.LookPath("mkfs.ext4"); err != nil {
		t.Skip("SKIPPING: the root-disk case needs mkfs.ext4 (apt-get install e2fsprogs)")
	}
	tree := t.TempDir()
	if err := os.MkdirAll(filepath.Join(tree, "bin"), 0o755); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(bb)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(tree, "bin", "busybox"), b, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, applet := range []string{"sh", "cat"} {
		if err := os.Symlink("busybox", filepath.Join(tree, "bin", applet)); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	// The base image must be in the cache the build uses.
	img, err := rootfs.Build(ctx, rootfs.Options{Source: rootfs.Source{Kind: rootfs.KindDir, Arg: tree}, Base: base})
	if err != nil {
		t.Fatal(err)
	}
	run := func(ctx context.Context, p vm.Provider, v vm.VM, script string, args ...string) (string, error) {
		d, ok := vm.As[vm.AgentDialer](p, vm.CapAgent)
		if !ok {
			return "", errors.New("provider has no agent")
		}
		// As the daemon dials: the hello, retried, resynchronises a line
		// protocol the previous connection may have left mid-answer.
		c, err := agent.Dial(ctx, d, v.ID)
		if err != nil {
			return "", fmt.Errorf("%w (guest console: %s)", err, consoleTail(v.Dir))
		}
		defer c.Close()
		var out, errOut bytes.Buffer
		code, err := c.Exec(ctx, agent.ExecRequest{Argv: append([]string{"/bin/sh", "-c", script, "sh"}, args...)}, &out, &errOut)
		if err != nil {
			// A guest that stops answering under load has been seen in
			// CI; its console says what its kernel was doing.
			return "", fmt.Errorf("%w (guest console: %s)", err, consoleTail(v.Dir))
		}
		if code != 0 {
			return "", fmt.Errorf("%s exited %d: %s", script, code, errOut.String())
		}
		return out.String(), nil
	}
	return &providertest.DiskFixture{
		RootDisk:        img.Rootfs.Path,
		Cmdline:         template.RootCmdline(vm.WritableDiskSerial),
		NewWritableDisk: func(ctx context.Context, path string) error { return template.MakeWritableDisk(ctx, path, 64) },
		// The write is synced, as template.Build syncs a guest before its
		// snapshot: a disk request in flight at the pause never completes
		// in the clones (without it, this test hangs when the host is busy).
		Write: func(ctx context.Context, p vm.Provider, v vm.VM, data string) error {
			_, err := run(ctx, p, v, `printf %s "$1" > `+conformanceFile+` && sync`, data)
			return err
		},
		Read: func(ctx context.Context, p vm.Provider, v vm.VM) (string, error) {
			return run(ctx, p, v, `if [ -e `+conformanceFile+` ]; then cat `+conformanceFile+`; fi`)
		},
	}
}

// consoleTail is the end of the console log in a VM's directory.
func consoleTail(dir string) string {
	b, err := os.ReadFile(filepath.Join(dir, "console.log"))
	if err != nil {
		return err.Error()
	}
	const keep = 2000
	if len(b) > keep {
		b = b[len(b)-keep:]
	}
	return fmt.Sprintf("%q", b)
}
