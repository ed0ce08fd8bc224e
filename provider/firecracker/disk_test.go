package firecracker

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/warmpool/warmpool/provider/firecracker/internal/fakefirecracker"
	"github.com/warmpool/warmpool/vm"
	"github.com/warmpool/warmpool/vm/providertest"
	"golang.org/x/sys/unix"
)

// guestRecord is how many bytes at the start of the writable disk the fake
// guest's Write and Read use.
const guestRecord = 64

// diskFixture gives the conformance suite a root disk, sparse writable
// disks, and a stand-in for the guest's writes: the fake has no guest, so
// the test writes through the very file descriptor the fake process holds
// for the writable drive (from the fake's log and /proc/PID/fd), which is
// the file a real Firecracker's guest would write.
func (e *env) diskFixture(t *testing.T) *providertest.DiskFixture {
	root := filepath.Join(filepath.Dir(e.state), "image-root.ext4")
	if err := os.WriteFile(root, []byte("fake root filesystem"), 0o644); err != nil {
		t.Fatal(err)
	}
	return &providertest.DiskFixture{
		RootDisk: root,
		Cmdline:  "warmpool.root=" + vm.RootDiskSerial + " warmpool.rw=" + vm.WritableDiskSerial,
		NewWritableDisk: func(_ context.Context, path string) error {
			f, err := os.Create(path)
			if err != nil {
				return err
			}
			if err := f.Truncate(64 << 20); err != nil {
				f.Close()
				return err
			}
			return f.Close()
		},
		Write: func(_ context.Context, _ vm.Provider, v vm.VM, data string) error {
			f, err := openGuestDrive(v, writableDriveID)
			if err != nil {
				return err
			}
			defer f.Close()
			rec := make([]byte, guestRecord)
			copy(rec, data)
			_, err = f.WriteAt(rec, 0)
			return err
		},
		Read: func(_ context.Context, _ vm.Provider, v vm.VM) (string, error) {
			f, err := openGuestDrive(v, writableDriveID)
			if err != nil {
				return "", err
			}
			defer f.Close()
			rec := make([]byte, guestRecord)
			if _, err := f.ReadAt(rec, 0); err != nil {
				return "", err
			}
			return string(bytes.TrimRight(rec, "\x00")), nil
		},
		Reopen: func(t *testing.T) vm.Provider {
			p, err := New(e.opts)
			if err != nil {
				t.Fatal(err)
			}
			return p
		},
	}
}

// openGuestDrive opens the file the fake process of v has open for drive id.
func openGuestDrive(v vm.VM, id string) (*os.File, error) {
	log, err := os.ReadFile(filepath.Join(v.Dir, logName))
	if err != nil {
		return nil, err
	}
	re := regexp.MustCompile(`msg="` + fakefirecracker.DriveOpenedMsg + `".* drive=` + regexp.QuoteMeta(id) + ` fd=(\d+)`)
	m := re.FindAllSubmatch(log, -1)
	if len(m) == 0 {
		return nil, fmt.Errorf("the fake of %s opened no drive %s: %s", v.ID, id, log)
	}
	fd := string(m[len(m)-1][1])
	return os.OpenFile(fmt.Sprintf("/proc/%d/fd/%s", v.PID, fd), os.O_RDWR, 0)
}

// A VM booting an image gets its disks as vda and vdb, named so on its
// command line; the root drive is read-only and the writable disk is the
// caller's file, which Destroy leaves alone.
func TestImageDrivesAndCmdline(t *testing.T) {
	e := newEnv(t, nil)
	ctx := testCtx(t)
	fx := e.diskFixture(t)
	rw := filepath.Join(t.TempDir(), "rw.img")
	if err := fx.NewWritableDisk(ctx, rw); err != nil {
		t.Fatal(err)
	}
	data := filepath.Join(t.TempDir(), "data.img")
	if err := fx.NewWritableDisk(ctx, data); err != nil {
		t.Fatal(err)
	}
	spec := e.spec
	spec.RootDisk, spec.WritableDisk, spec.DataDisk = fx.RootDisk, rw, data
	spec.Cmdline = DefaultBootArgs + " " + fx.Cmdline
	v, err := e.p.Create(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	if want := "warmpool.root=/dev/vda warmpool.rw=/dev/vdb"; !strings.Contains(v.Spec.Cmdline, want) {
		t.Errorf("command line %q, want it to name the disks %q", v.Spec.Cmdline, want)
	}
	log, _ := os.ReadFile(filepath.Join(v.Dir, logName))
	order := regexp.MustCompile(` drive=(\w+) fd=\d+ path=(\S+) write=(\w+)`).FindAllStringSubmatch(string(log), -1)
	var got []string
	for _, m := range order {
		got = append(got, m[1]+":"+m[3])
	}
	if want := []string{"root:false", "rw:true", "data:true"}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("drives configured as %v, want %v (the guest names them in this order)", got, want)
	}
	f, err := openGuestDrive(v, writableDriveID)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt([]byte("written by the guest"), 0)
	f.Close()
	if b, _ := os.ReadFile(rw); !bytes.HasPrefix(b, []byte("written by the guest")) {
		t.Error("the guest's writes do not reach the caller's writable disk")
	}
	if err := e.p.Destroy(ctx, v.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(rw); err != nil {
		t.Errorf("Destroy removed the caller's writable disk: %v", err)
	}
}

// A clone's writable disk costs what the template wrote, not the disk's
// size; and a snapshot whose frozen disk is gone is refused as needing a
// rebuild.
func TestCloneDiskIsSparseAndNeedsTheFrozenDisk(t *testing.T) {
	e := newEnv(t, nil)
	ctx := testCtx(t)
	fx := e.diskFixture(t)
	rw := filepath.Join(t.TempDir(), "rw.img")
	if err := fx.NewWritableDisk(ctx, rw); err != nil {
		t.Fatal(err)
	}
	spec := e.spec
	spec.RootDisk, spec.WritableDisk, spec.NoBalloon = fx.RootDisk, rw, true
	v, err := e.p.Create(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	if err := fx.Write(ctx, e.p, v, "template"); err != nil {
		t.Fatal(err)
	}
	if err := e.p.Pause(ctx, v.ID); err != nil {
		t.Fatal(err)
	}
	snap, err := e.p.Snapshot(ctx, v.ID, filepath.Join(t.TempDir(), "snap"))
	if err != nil {
		t.Fatal(err)
	}
	c, err := e.p.Restore(ctx, snap)
	if err != nil {
		t.Fatal(err)
	}
	var st unix.Stat_t
	if err := unix.Stat(c.Spec.WritableDisk, &st); err != nil {
		t.Fatal(err)
	}
	if st.Size != 64<<20 || st.Blocks*512 > 1<<20 {
		t.Errorf("clone's writable disk is %d bytes with %d allocated, want 64 MiB apparent and at most 1 MiB on disk", st.Size, st.Blocks*512)
	}
	if _, err := e.p.Suspend(ctx, c.ID, filepath.Join(t.TempDir(), "susp")); err == nil {
		t.Error("Suspend of a VM with a writable root disk succeeded")
	}
	if err := os.Remove(filepath.Join(snap.Dir, snapWritableName)); err != nil {
		t.Fatal(err)
	}
	before, _ := e.p.List(ctx)
	if _, err := e.p.Restore(ctx, snap); !errors.Is(err, vm.ErrIncompatible) {
		t.Errorf("Restore without the frozen disk = %v, want vm.ErrIncompatible", err)
	}
	if after, _ := e.p.List(ctx); len(after) != len(before) {
		t.Errorf("the failed restore left a VM: %d before, %d after", len(before), len(after))
	}
}
