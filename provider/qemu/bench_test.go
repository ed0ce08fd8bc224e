package qemu_test

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"

	"github.com/warmpool/warmpool/agent"
	"github.com/warmpool/warmpool/internal/realvm"
	"github.com/warmpool/warmpool/provider/qemu"
	"github.com/warmpool/warmpool/vm"
)

// BenchmarkColdBoot measures Create until the guest agent answers.
func BenchmarkColdBoot(b *testing.B) {
	spec := testSpec(b)
	p := newProvider(b, realvm.StateDir(b))
	destroyAll(b, p)
	ctx := ctxT(b)
	for b.Loop() {
		v, err := p.Create(ctx, spec)
		if err != nil {
			b.Fatal(err)
		}
		if err := agent.WaitReady(ctx, p, v.ID); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		p.Destroy(ctx, v.ID)
		b.StartTimer()
	}
}

// BenchmarkRestore measures Restore + Resume until the guest agent answers,
// from a shared-memory snapshot and from a full copy.
func BenchmarkRestore(b *testing.B) {
	for _, mode := range []string{qemu.SnapshotShared, qemu.SnapshotCopy} {
		b.Run(mode, func(b *testing.B) {
			spec := testSpec(b)
			p := newProvider(b, realvm.StateDir(b), func(o *qemu.Options) { o.SnapshotMode = mode })
			destroyAll(b, p)
			ctx := ctxT(b)
			tmpl, snap := bootTemplate(b, ctx, p, spec)
			p.Destroy(ctx, tmpl.ID)
			for b.Loop() {
				v, err := p.Restore(ctx, snap)
				if err != nil {
					b.Fatal(err)
				}
				if err := p.Resume(ctx, v.ID); err != nil {
					b.Fatal(err)
				}
				if err := agent.WaitReady(ctx, p, v.ID); err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				p.Destroy(ctx, v.ID)
				b.StartTimer()
			}
		})
	}
}

// BenchmarkCloneMemory restores warm clones (resumed, agent answered, one
// command run) and reports the host memory each costs, from
// /proc/PID/smaps_rollup: Pss and Private (clean + dirty) per clone, in MiB.
// It compares shared-memory and full-copy snapshots, with TCG's translation
// cache bounded (default) and at QEMU's default size.
func BenchmarkCloneMemory(b *testing.B) {
	const clones = 3
	for _, mode := range []string{qemu.SnapshotShared, qemu.SnapshotCopy} {
		for _, tb := range []int{qemu.DefaultTBSizeMiB, -1} {
			b.Run(fmt.Sprintf("%s/tb=%d", mode, tb), func(b *testing.B) {
				spec := testSpec(b)
				p := newProvider(b, realvm.StateDir(b), func(o *qemu.Options) { o.SnapshotMode = mode; o.TBSizeMiB = tb })
				destroyAll(b, p)
				ctx := ctxT(b)
				tmpl, snap := bootTemplate(b, ctx, p, spec)
				p.Destroy(ctx, tmpl.ID)
				var pss, priv float64
				for b.Loop() {
					var ids []vm.VM
					for range clones {
						v, err := p.Restore(ctx, snap)
						if err != nil {
							b.Fatal(err)
						}
						p.Resume(ctx, v.ID)
						if err := agent.WaitReady(ctx, p, v.ID); err != nil {
							b.Fatal(err)
						}
						exec(b, ctx, p, v.ID, "sh", "-c", "ls -R /sys >/dev/null; echo ok")
						ids = append(ids, v)
					}
					pss, priv = 0, 0
					for _, v := range ids {
						r := smapsRollup(b, v.PID)
						pss += r["Pss"]
						priv += r["Private_Clean"] + r["Private_Dirty"]
					}
					for _, v := range ids {
						p.Destroy(ctx, v.ID)
					}
				}
				b.ReportMetric(pss/clones/1024, "PssMiB/clone")
				b.ReportMetric(priv/clones/1024, "PrivateMiB/clone")
			})
		}
	}
}

// smapsRollup returns the kB fields of /proc/PID/smaps_rollup.
func smapsRollup(tb testing.TB, pid int) map[string]float64 {
	tb.Helper()
	f, err := os.Open("/proc/" + strconv.Itoa(pid) + "/smaps_rollup")
	if err != nil {
		tb.Fatal(err)
	}
	defer f.Close()
	out := map[string]float64{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		fields := strings.Fields(v)
		if len(fields) == 2 && fields[1] == "kB" {
			n, _ := strconv.ParseFloat(fields[0], 64)
			out[k] = n
		}
	}
	return out
}
