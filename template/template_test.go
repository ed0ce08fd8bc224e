package template_test

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/warmpool/warmpool/agent"
	"github.com/warmpool/warmpool/agent/server"
	"github.com/warmpool/warmpool/guest"
	"github.com/warmpool/warmpool/provider/fake"
	"github.com/warmpool/warmpool/template"
	"github.com/warmpool/warmpool/vm"
)

func serveAgent(conn net.Conn) { server.Serve(context.Background(), conn, server.Options{}) }

var img = guest.Image{Dir: "/img", Kernel: "/img/vmlinuz", Initrd: "/img/initrd.img", Cmdline: guest.DefaultCmdline, Digest: "abc123"}

func opts(p vm.Provider, dir string) template.BuildOptions {
	return template.BuildOptions{Name: "py3", Provider: p, Image: img, VCPUs: 1, MemoryMiB: 256, Dir: dir, ReadyTimeout: 5 * time.Second}
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func assertNoVMs(t *testing.T, p *fake.Provider) {
	t.Helper()
	vms, err := p.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(vms) != 0 {
		t.Errorf("build left %d VMs behind: %+v", len(vms), vms)
	}
}

func TestBuild(t *testing.T) {
	p := fake.New(fake.Options{AgentHandler: serveAgent, CreateLatency: 20 * time.Millisecond})
	dir := filepath.Join(t.TempDir(), "tmpl")
	var steps []string
	o := opts(p, dir)
	o.Progress = func(s string) { steps = append(steps, s) }
	tm, err := template.Build(ctxT(t), o)
	if err != nil {
		t.Fatal(err)
	}
	if tm.Name != "py3" || tm.VCPUs != 1 || tm.MemoryMiB != 256 || tm.ImageDigest != "abc123" {
		t.Errorf("template = %+v", tm)
	}
	if tm.Snapshot.Dir != dir || tm.Snapshot.Spec.Kernel != img.Kernel || tm.Snapshot.Spec.Cmdline != img.Cmdline {
		t.Errorf("snapshot = %+v, want the image's spec in %s", tm.Snapshot, dir)
	}
	// Clones of a template must not be able to give memory back into the
	// template's shared memory file.
	if !tm.Snapshot.Spec.NoBalloon {
		t.Errorf("template snapshot spec %+v has a balloon, want NoBalloon", tm.Snapshot.Spec)
	}
	if tm.BootTime < 20*time.Millisecond || tm.CreatedAt.IsZero() {
		t.Errorf("boot time %s, created %v", tm.BootTime, tm.CreatedAt)
	}
	if tm.StackKey() != (vm.StackKey{Template: "py3", VCPUs: 1, MemoryMiB: 256}) {
		t.Errorf("stack key = %v", tm.StackKey())
	}
	assertNoVMs(t, p)
	loaded, err := template.Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	if loaded.Snapshot.ID != tm.Snapshot.ID || loaded.BootTime != tm.BootTime {
		t.Errorf("loaded %+v, built %+v", loaded, tm)
	}
	if strings.Join(steps, ",") != "boot py3,wait for agent,pause,snapshot,done" {
		t.Errorf("progress = %q", steps)
	}
	// The snapshot restores into a VM whose agent answers.
	restored, err := p.Restore(ctxT(t), tm.Snapshot)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Destroy(context.Background(), restored.ID)
	if err := p.Resume(ctxT(t), restored.ID); err != nil {
		t.Fatal(err)
	}
	if err := agent.WaitReady(ctxT(t), p, restored.ID); err != nil {
		t.Errorf("agent of a VM restored from the template: %v", err)
	}
}

func TestBuildRejectsBadInputBeforeBooting(t *testing.T) {
	p := fake.New(fake.Options{AgentHandler: serveAgent})
	dir := t.TempDir()
	for field, mutate := range map[string]func(*template.BuildOptions){
		"name":       func(o *template.BuildOptions) { o.Name = "../etc" },
		"vcpus":      func(o *template.BuildOptions) { o.VCPUs = 0 },
		"memory_mib": func(o *template.BuildOptions) { o.MemoryMiB = 1 },
		"image":      func(o *template.BuildOptions) { o.Image = guest.Image{} },
		"dir":        func(o *template.BuildOptions) { o.Dir = "" },
	} {
		o := opts(p, filepath.Join(dir, field))
		mutate(&o)
		_, err := template.Build(ctxT(t), o)
		var fe *vm.FieldError
		if !errors.As(err, &fe) || fe.Field != field {
			t.Errorf("bad %s: %v, want a FieldError on %s", field, err, field)
		}
	}
	if n := p.Calls(fake.OpCreate); n != 0 {
		t.Errorf("%d VMs booted for invalid requests", n)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Errorf("invalid requests left %d entries in the parent directory", len(entries))
	}
}

func TestBuildNeedsAgentChannel(t *testing.T) {
	p := fake.New(fake.Options{})
	_, err := template.Build(ctxT(t), opts(p, filepath.Join(t.TempDir(), "x")))
	if !errors.Is(err, vm.ErrUnsupported) {
		t.Errorf("build on a provider without agent = %v, want ErrUnsupported", err)
	}
}

func TestBuildRefusesNonEmptyDir(t *testing.T) {
	p := fake.New(fake.Options{AgentHandler: serveAgent})
	dir := t.TempDir()
	keep := filepath.Join(dir, "existing-template.json")
	os.WriteFile(keep, []byte("{}"), 0o644)
	_, err := template.Build(ctxT(t), opts(p, dir))
	if !errors.Is(err, vm.ErrInvalid) {
		t.Errorf("build into a non-empty dir = %v, want ErrInvalid", err)
	}
	if _, err := os.Stat(keep); err != nil {
		t.Errorf("existing file was touched: %v", err)
	}
}

func TestBuildCleansUpOnFailure(t *testing.T) {
	cases := map[string]fake.Options{
		"agent never answers": {AgentHandler: func(c net.Conn) { c.Close() }},
		"snapshot fails":      {AgentHandler: serveAgent, Faults: map[fake.Op]fake.Fault{fake.OpSnapshot: {FailFraction: 1}}},
		"pause fails":         {AgentHandler: serveAgent, Faults: map[fake.Op]fake.Fault{fake.OpPause: {FailFraction: 1}}},
	}
	for name, fo := range cases {
		t.Run(name, func(t *testing.T) {
			p := fake.New(fo)
			for _, preexisting := range []bool{false, true} {
				dir := filepath.Join(t.TempDir(), "tmpl")
				if preexisting {
					os.Mkdir(dir, 0o755)
				}
				o := opts(p, dir)
				o.ReadyTimeout = 300 * time.Millisecond
				if _, err := template.Build(ctxT(t), o); err == nil {
					t.Fatal("build succeeded")
				}
				assertNoVMs(t, p)
				entries, err := os.ReadDir(dir)
				if preexisting && (err != nil || len(entries) != 0) {
					t.Errorf("existing empty dir: %d entries, %v after failure", len(entries), err)
				}
				if !preexisting && !errors.Is(err, os.ErrNotExist) {
					t.Errorf("dir created by the build still exists after failure (%v)", err)
				}
			}
		})
	}
}

func TestBuildCanceledDestroysVM(t *testing.T) {
	p := fake.New(fake.Options{AgentHandler: func(c net.Conn) { c.Close() }})
	ctx, cancel := context.WithCancel(context.Background())
	o := opts(p, filepath.Join(t.TempDir(), "tmpl"))
	go func() {
		for p.Calls(fake.OpCreate) == 0 {
			time.Sleep(time.Millisecond)
		}
		time.Sleep(50 * time.Millisecond)
		cancel()
	}()
	_, err := template.Build(ctx, o)
	if !errors.Is(err, context.Canceled) {
		t.Errorf("canceled build = %v, want context.Canceled", err)
	}
	assertNoVMs(t, p)
}
