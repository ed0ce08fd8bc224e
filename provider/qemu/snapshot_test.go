package qemu_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/warmpool/warmpool/agent"
	"github.com/warmpool/warmpool/internal/realvm"
	"github.com/warmpool/warmpool/provider/qemu"
	"github.com/warmpool/warmpool/vm"
	"golang.org/x/sys/unix"
)

// bootTemplate cold-boots a VM, waits for its agent, runs setup in it, then
// pauses and snapshots it into a new directory. When the provider shares
// template memory the VM has no balloon, as template.Build makes it.
func bootTemplate(t testing.TB, ctx context.Context, p *qemu.Provider, spec vm.Spec, setup ...string) (vm.VM, vm.Snapshot) {
	t.Helper()
	if p.Capabilities().Has(vm.CapSharedMemory) {
		spec.NoBalloon = true
	}
	v, err := p.Create(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	if err := agent.WaitReady(ctx, p, v.ID); err != nil {
		t.Fatalf("agent of %s never answered: %v", v.ID, err)
	}
	if len(setup) > 0 {
		if out, code := exec(t, ctx, p, v.ID, setup...); code != 0 {
			t.Fatalf("setup %v: exit %d, %q", setup, code, out)
		}
	}
	if _, err := p.Snapshot(ctx, v.ID, t.TempDir()); !errors.Is(err, vm.ErrInvalidState) {
		t.Errorf("Snapshot of a running VM = %v, want ErrInvalidState", err)
	}
	if err := p.Pause(ctx, v.ID); err != nil {
		t.Fatal(err)
	}
	snap, err := p.Snapshot(ctx, v.ID, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	return v, snap
}

// blobSize is the guest file a template writes before its snapshot: large
// enough that a clone freeing it gives back many whole 2 MiB blocks, which
// is what balloon free page reporting hands to the host.
const blobSize = 32 << 20

// blobSHA256 is the SHA-256 of the blob the guest writes with
// `yes warmpool-pattern | head -c blobSize`.
func blobSHA256() string {
	line := []byte("warmpool-pattern\n")
	h := sha256.New()
	for n := 0; n < blobSize; n += len(line) {
		h.Write(line[:min(len(line), blobSize-n)])
	}
	return hex.EncodeToString(h.Sum(nil))
}

// TestSnapshotRestoreKeepsGuestMemory restores clones from a template and
// checks what they see. In shared mode it is also the regression test for
// clones giving memory back into the template's memory file (issue 3): QEMU
// 7.2 punches holes into a privately mapped backing file for balloon
// inflation and free page reporting, so one clone freeing memory zeroed it
// for the next. Clone A frees the template's 32 MiB blob and drops its
// caches; the memory file must not change and clone B must read the blob
// intact. In copy mode clones have private anonymous RAM and keep their
// balloon, which clone A inflates before clone B reads the blob.
func TestSnapshotRestoreKeepsGuestMemory(t *testing.T) {
	wantBlob := blobSHA256()
	for _, mode := range []string{qemu.SnapshotShared, qemu.SnapshotCopy} {
		t.Run(mode, func(t *testing.T) {
			shared := mode == qemu.SnapshotShared
			spec := testSpec(t)
			p := newProvider(t, realvm.StateDir(t), func(o *qemu.Options) { o.SnapshotMode = mode })
			destroyAll(t, p)
			ctx := ctxT(t)
			if shared {
				refuseBalloonInSharedTemplate(t, ctx, p, spec)
			}
			// /run is a tmpfs in the guest: the files live only in guest RAM.
			tmpl, snap := bootTemplate(t, ctx, p, spec, "sh", "-c",
				fmt.Sprintf("mkdir -p /run/t && echo remembered-42 > /run/t/value && yes warmpool-pattern | head -c %d > /run/t/blob", blobSize))
			if snap.SharedMemory != shared {
				t.Errorf("snapshot SharedMemory = %v in mode %s", snap.SharedMemory, mode)
			}
			memFile := filepath.Join(snap.Dir, "memory")
			var memBefore fileState
			if shared {
				memBefore = statFile(t, memFile)
				t.Logf("template memory file: %d MiB allocated", memBefore.blocks*512>>20)
				if err := p.SetBalloon(ctx, tmpl.ID, 128); !errors.Is(err, vm.ErrUnsupported) {
					t.Errorf("SetBalloon on the template VM = %v, want ErrUnsupported", err)
				}
			} else if _, err := os.Stat(memFile); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("copy-mode snapshot has a memory file: %v", err)
			}
			if st, _ := p.Inspect(ctx, tmpl.ID); st.Status != vm.StatusPaused {
				t.Errorf("template after Snapshot is %s, want paused", st.Status)
			}
			// The template may go on; its changes must not reach clones.
			if err := p.Resume(ctx, tmpl.ID); err != nil {
				t.Fatalf("resume template after snapshot: %v", err)
			}
			if _, code := exec(t, ctx, p, tmpl.ID, "sh", "-c", "echo changed > /run/t/value; rm /run/t/blob"); code != 0 {
				t.Fatal("template exec failed")
			}

			for i, name := range []string{"A", "B"} {
				clone, err := p.Restore(ctx, snap)
				if err != nil {
					t.Fatal(err)
				}
				if clone.Status != vm.StatusPaused || clone.Snapshot != snap.ID {
					t.Errorf("restored VM %+v, want paused from %s", clone, snap.ID)
				}
				checkCloneRAM(t, clone.PID, snap.Dir, shared)
				if err := p.Resume(ctx, clone.ID); err != nil {
					t.Fatal(err)
				}
				if err := agent.WaitReady(ctx, p, clone.ID); err != nil {
					t.Fatalf("clone %s agent: %v", name, err)
				}
				out, _ := exec(t, ctx, p, clone.ID, "cat", "/run/t/value")
				if out != "remembered-42\n" {
					t.Errorf("clone %s reads %q, want the value written before the snapshot", name, out)
				}
				out, _ = exec(t, ctx, p, clone.ID, "sha256sum", "/run/t/blob")
				if got, _, _ := strings.Cut(out, " "); got != wantBlob {
					t.Errorf("clone %s: template's blob has SHA-256 %q, want %s", name, out, wantBlob)
				}
				// Devices as the template had them: no balloon in a shared clone.
				out, _ = exec(t, ctx, p, clone.ID, "sh", "-c", "cat /sys/bus/virtio/devices/*/device")
				if hasBalloon := strings.Contains(out, "0x0005"); hasBalloon == shared {
					t.Errorf("clone %s: guest sees virtio device IDs %q, balloon (0x0005) present = %v in mode %s", name, out, hasBalloon, mode)
				}
				if i == 0 {
					checkClocksource(t, ctx, p, clone.ID)
				}
				// A clone's writes stay its own.
				exec(t, ctx, p, clone.ID, "sh", "-c", "echo clone > /run/t/value")
				if i > 0 {
					continue
				}
				// Clone A frees the blob and gives back what it can.
				if _, code := exec(t, ctx, p, clone.ID, "sh", "-c", "rm /run/t/blob && sync && echo 3 > /proc/sys/vm/drop_caches"); code != 0 {
					t.Fatal("clone A could not free the blob")
				}
				if shared {
					if err := p.SetBalloon(ctx, clone.ID, 128); !errors.Is(err, vm.ErrUnsupported) {
						t.Errorf("SetBalloon on a shared-memory clone = %v, want ErrUnsupported", err)
					}
					if _, err := p.BalloonStats(ctx, clone.ID); !errors.Is(err, vm.ErrUnsupported) {
						t.Errorf("BalloonStats on a shared-memory clone = %v, want ErrUnsupported", err)
					}
					// Free page reporting, where a balloon exists, reports
					// freed blocks after 2 s: give it the time to do harm.
					time.Sleep(3 * time.Second)
					if after := statFile(t, memFile); after != memBefore {
						t.Errorf("template memory file changed after clone A freed memory: %d -> %d blocks, sha256 %s -> %s",
							memBefore.blocks, after.blocks, memBefore.sum, after.sum)
					}
				} else {
					inflateBalloon(t, ctx, p, clone.ID, 128)
				}
			}
			if err := p.Destroy(ctx, tmpl.ID); err != nil {
				t.Fatal(err)
			}
			// Clones keep working without their template VM.
			clone, err := p.Restore(ctx, snap)
			if err != nil {
				t.Fatalf("restore after the template VM is gone: %v", err)
			}
			p.Resume(ctx, clone.ID)
			if out, _ := exec(t, ctx, p, clone.ID, "cat", "/run/t/value"); out != "remembered-42\n" {
				t.Errorf("late clone reads %q", out)
			}
			if shared {
				if after := statFile(t, memFile); after != memBefore {
					t.Errorf("template memory file changed while clones ran: %+v -> %+v", memBefore, after)
				}
				refuseOldBalloonTemplate(t, ctx, p, snap)
			}
		})
	}
}

// checkClocksource checks that the guest of VM id keeps the TSC as its
// clocksource: on jiffies (where the clocksource watchdog falls back when a
// loaded host makes jiffies lose ticks) the tick can never stop while idle,
// and every tick is emulated under TCG.
func checkClocksource(t *testing.T, ctx context.Context, p *qemu.Provider, id string) {
	t.Helper()
	out, _ := exec(t, ctx, p, id, "cat", "/sys/devices/system/clocksource/clocksource0/current_clocksource")
	if cs := strings.TrimSpace(out); strings.Contains(cs, "jiffies") || cs == "" {
		t.Errorf("guest clocksource is %q: its tick cannot stop while idle", cs)
	}
}

// refuseBalloonInSharedTemplate checks that a VM with a balloon cannot
// become a shared-memory template, and that the refusal writes nothing.
func refuseBalloonInSharedTemplate(t *testing.T, ctx context.Context, p *qemu.Provider, spec vm.Spec) {
	t.Helper()
	spec.NoBalloon = false
	v, err := p.Create(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	// The guest need not boot: the refusal is about the device set.
	if err := p.Pause(ctx, v.ID); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(t.TempDir(), "refused")
	_, err = p.Snapshot(ctx, v.ID, dir)
	if !errors.Is(err, vm.ErrUnsupported) || !strings.Contains(err.Error(), "NoBalloon") {
		t.Errorf("shared snapshot of a VM with a balloon = %v, want ErrUnsupported naming Spec.NoBalloon", err)
	}
	if entries, _ := os.ReadDir(dir); len(entries) > 0 {
		t.Errorf("refused snapshot left %d files in %s", len(entries), dir)
	}
	if err := p.Destroy(ctx, v.ID); err != nil {
		t.Fatal(err)
	}
}

// refuseOldBalloonTemplate checks that a shared-memory snapshot whose
// template had a balloon (taken before such snapshots were refused) is not
// restored.
func refuseOldBalloonTemplate(t *testing.T, ctx context.Context, p *qemu.Provider, snap vm.Snapshot) {
	t.Helper()
	var cfg map[string]any
	if err := json.Unmarshal([]byte(snap.Meta["config"]), &cfg); err != nil {
		t.Fatal(err)
	}
	delete(cfg, "no_balloon")
	b, _ := json.Marshal(cfg)
	old := snap
	old.Meta = maps.Clone(snap.Meta)
	old.Meta["config"] = string(b)
	if v, err := p.Restore(ctx, old); !errors.Is(err, vm.ErrUnsupported) {
		t.Errorf("restore of a shared template with a balloon = %+v, %v; want ErrUnsupported", v, err)
	}
}

// inflateBalloon shrinks the guest to targetMiB and waits until it has
// handed the memory over.
func inflateBalloon(t *testing.T, ctx context.Context, p *qemu.Provider, id string, targetMiB int) {
	t.Helper()
	if err := p.SetBalloon(ctx, id, targetMiB); err != nil {
		t.Fatalf("SetBalloon on %s: %v", id, err)
	}
	for {
		st, err := p.BalloonStats(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		if st.ActualMiB <= targetMiB {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("balloon of %s never inflated to %d MiB: %+v", id, targetMiB, st)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// fileState is what a clone must never change about the template's memory
// file: its allocated blocks and its content.
type fileState struct {
	blocks int64
	sum    string
}

func statFile(t *testing.T, path string) fileState {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return fileState{blocks: st.Blocks, sum: hex.EncodeToString(h.Sum(nil))}
}

// checkCloneRAM checks how a clone's QEMU maps files of the snapshot: a
// shared-memory clone maps the memory file privately, never shared; a
// copy-mode clone maps nothing of the snapshot (its RAM is anonymous, so
// its balloon can only discard its own pages).
func checkCloneRAM(t *testing.T, pid int, snapDir string, shared bool) {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/maps", pid))
	if err != nil {
		t.Fatal(err)
	}
	mapped := false
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 6 || !strings.HasPrefix(f[5], snapDir+"/") {
			continue
		}
		mapped = true
		if !shared {
			t.Errorf("copy-mode clone maps %s", f[5])
		} else if !strings.HasSuffix(f[1], "p") {
			t.Errorf("clone maps %s with %s, want a private mapping", f[5], f[1])
		}
	}
	if shared && !mapped {
		t.Errorf("shared-memory clone does not map the template's memory file")
	}
}

func TestRestoreRejectsForeignSnapshots(t *testing.T) {
	realvm.RequireQEMU(t)
	p := newProvider(t, realvm.StateDir(t))
	defer p.Close()
	dir := t.TempDir()
	good := vm.Snapshot{ID: "s", Provider: "qemu", Dir: dir, ProviderVersion: p.Version(),
		Spec: vm.Spec{VCPUs: 1, MemoryMiB: 256}, Meta: map[string]string{"state": "state", "config": "{}"}}
	os.WriteFile(filepath.Join(dir, "state"), nil, 0o644)
	for name, mutate := range map[string]func(*vm.Snapshot){
		"firecracker": func(s *vm.Snapshot) { s.Provider = "firecracker" },
		"old qemu":    func(s *vm.Snapshot) { s.ProviderVersion = "1.0.0" },
		"escape":      func(s *vm.Snapshot) { s.Meta = map[string]string{"state": "../../etc/passwd", "config": "{}"} },
		"no state":    func(s *vm.Snapshot) { s.Meta = map[string]string{"state": "missing", "config": "{}"} },
	} {
		s := good
		mutate(&s)
		if _, err := p.Restore(context.Background(), s); err == nil {
			t.Errorf("%s: Restore accepted %+v", name, s)
		}
	}
	entries, _ := os.ReadDir(filepath.Join(p.StateDir(), "vms"))
	if len(entries) != 0 {
		t.Errorf("rejected restores left %d VM directories", len(entries))
	}
}

func TestBalloonInflateDeflate(t *testing.T) {
	spec := testSpec(t)
	p := newProvider(t, realvm.StateDir(t), func(o *qemu.Options) { o.StatsPollInterval = time.Second })
	destroyAll(t, p)
	ctx := ctxT(t)
	v, err := p.Create(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	if err := agent.WaitReady(ctx, p, v.ID); err != nil {
		t.Fatal(err)
	}
	waitStats := func(what string, ok func(vm.BalloonStats) bool) vm.BalloonStats {
		t.Helper()
		var st vm.BalloonStats
		for ctx.Err() == nil {
			st, err = p.BalloonStats(ctx, v.ID)
			if err != nil {
				t.Fatal(err)
			}
			if ok(st) {
				return st
			}
			time.Sleep(200 * time.Millisecond)
		}
		t.Fatalf("balloon never %s: last %+v", what, st)
		return st
	}
	before := waitStats("reported guest stats", func(s vm.BalloonStats) bool { return s.TotalMiB > 0 && s.ActualMiB == 256 })
	if err := p.SetBalloon(ctx, v.ID, 128); err != nil {
		t.Fatal(err)
	}
	inflated := waitStats("inflated", func(s vm.BalloonStats) bool {
		return s.ActualMiB == 128 && s.TotalMiB <= before.TotalMiB-100
	})
	if inflated.TargetMiB != 128 {
		t.Errorf("target = %d, want 128", inflated.TargetMiB)
	}
	if err := p.SetBalloon(ctx, v.ID, 256); err != nil {
		t.Fatal(err)
	}
	waitStats("deflated", func(s vm.BalloonStats) bool { return s.ActualMiB == 256 && s.TotalMiB >= before.TotalMiB-4 })
	if err := p.SetBalloon(ctx, v.ID, 512); !errors.Is(err, vm.ErrInvalid) {
		t.Errorf("balloon above the VM's memory = %v, want ErrInvalid", err)
	}
}

func TestListAdoptsVMsOfAnEarlierProcess(t *testing.T) {
	spec := testSpec(t)
	dir := realvm.StateDir(t)
	first := newProvider(t, dir)
	destroyAll(t, first)
	ctx := ctxT(t)
	running, err := first.Create(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	dead, err := first.Create(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	if err := agent.WaitReady(ctx, first, running.ID); err != nil {
		t.Fatal(err)
	}
	// The daemon goes away; one of its VMs dies while nobody watches.
	first.Close()
	if p, err := os.FindProcess(dead.PID); err == nil {
		p.Kill()
	}

	second := newProvider(t, dir)
	destroyAll(t, second)
	var vms []vm.VM
	for ctx.Err() == nil { // the killed process may take a moment to go
		vms, err = second.List(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(vms) == 2 && statusOf(vms, dead.ID) == vm.StatusStopped {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if got := statusOf(vms, running.ID); got != vm.StatusRunning {
		t.Errorf("adopted running VM has status %q, want running (list %+v)", got, vms)
	}
	if got := statusOf(vms, dead.ID); got != vm.StatusStopped {
		t.Errorf("VM killed behind our back has status %q, want stopped", got)
	}
	if err := agent.WaitReady(ctx, second, running.ID); err != nil {
		t.Errorf("agent of adopted VM: %v", err)
	}
	if err := second.Pause(ctx, running.ID); err != nil {
		t.Errorf("pause adopted VM: %v", err)
	}
	for _, v := range vms {
		if err := second.Destroy(ctx, v.ID); err != nil {
			t.Fatalf("destroy %s: %v", v.ID, err)
		}
	}
	processGone(t, running.PID)
	assertEmpty(t, filepath.Join(dir, "vms"))
	if vms, _ := second.List(ctx); len(vms) != 0 {
		t.Errorf("List after destroying everything = %+v", vms)
	}
}

func statusOf(vms []vm.VM, id string) vm.Status {
	for _, v := range vms {
		if v.ID == id {
			return v.Status
		}
	}
	return ""
}

// TestLateCancellationLosesNoVM cancels Create's and Restore's context in the
// moment after the VM exists: the caller must get the VM back, since the pool
// or daemon cancelling a restore at shutdown would otherwise never learn the
// ID of a VM that keeps running.
func TestLateCancellationLosesNoVM(t *testing.T) {
	realvm.RequireQEMU(t)
	p := newProvider(t, realvm.StateDir(t))
	defer p.Close()
	ctx := ctxT(t)
	template, snap := bootTemplate(t, ctx, p, testSpec(t))
	if err := p.Destroy(ctx, template.ID); err != nil {
		t.Fatal(err)
	}

	for name, newVM := range map[string]func(context.Context) (vm.VM, error){
		"create":  func(ctx context.Context) (vm.VM, error) { return p.Create(ctx, testSpec(t)) },
		"restore": func(ctx context.Context) (vm.VM, error) { return p.Restore(ctx, snap) },
	} {
		cctx, cancel := context.WithCancel(ctx)
		var made string
		qemu.SetBeforeHandOver(p, func(id string) { made = id; cancel() })
		v, err := newVM(cctx)
		cancel()
		qemu.SetBeforeHandOver(p, nil)
		listed, lerr := p.List(ctx)
		if lerr != nil {
			t.Fatal(lerr)
		}
		if made == "" {
			t.Fatalf("%s: no VM was made (err %v)", name, err)
		}
		if err != nil || v.ID != made {
			t.Errorf("%s cancelled after VM %s existed = (%q, %v), want that VM", name, made, v.ID, err)
		}
		if statusOf(listed, made) == "" && err == nil {
			t.Errorf("%s returned VM %s, which the provider does not list", name, made)
		}
		for _, l := range listed {
			if err := p.Destroy(ctx, l.ID); err != nil {
				t.Errorf("destroy %s: %v", l.ID, err)
			}
		}
	}
}
