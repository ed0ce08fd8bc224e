package qemu

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/warmpool/warmpool/internal/atomicfile"
	"github.com/warmpool/warmpool/provider/qemu/qmp"
	"github.com/warmpool/warmpool/vm"
	"golang.org/x/sys/unix"
)

// kvmDevice is a variable so tests can point the probe at a file that is not
// a working KVM.
var kvmDevice = "/dev/kvm"

// probeDeadline bounds the KVM probe boot. A guest under working KVM opens
// its agent port well within it; on hosts where KVM initialises but cannot
// run a standard guest, the boot hangs and the deadline decides.
var probeDeadline = 15 * time.Second

const accelCacheFile = "accel.json"

type accelCache struct {
	Key   string `json:"key"` // QEMU version + host kernel release
	Accel string `json:"accel"`
	At    time.Time
}

// resolveAccel decides the accelerator once per provider: the configured one,
// or for "auto" TCG when /dev/kvm cannot be opened, else the result of a
// probe boot under KVM, cached in the state directory per QEMU version and
// host kernel.
func (p *Provider) resolveAccel(ctx context.Context, spec vm.Spec) (string, error) {
	if p.opts.Accel != AccelAuto {
		return p.opts.Accel, nil
	}
	p.accelOnce.Do(func() {
		p.accel, p.accelErr = p.probeAccel(ctx, spec)
		if p.accelErr == nil {
			p.accelChosen.Store(&p.accel)
		}
	})
	return p.accel, p.accelErr
}

// Accel is the accelerator VMs run under: the configured one, or with
// "auto" the probe's answer, which is known once the first VM was created
// (until then it is "auto").
func (p *Provider) Accel() string {
	if p.opts.Accel != AccelAuto {
		return p.opts.Accel
	}
	if a := p.accelChosen.Load(); a != nil {
		return *a
	}
	return AccelAuto
}

func (p *Provider) probeAccel(ctx context.Context, spec vm.Spec) (string, error) {
	f, err := os.OpenFile(kvmDevice, os.O_RDWR, 0)
	if err != nil {
		p.log.Info("accelerator tcg", "reason", err.Error())
		return AccelTCG, nil
	}
	f.Close()
	var uts unix.Utsname
	unix.Uname(&uts)
	key := p.version + " " + unix.ByteSliceToString(uts.Release[:])
	caches := []string{filepath.Join(p.opts.StateDir, accelCacheFile)}
	if p.opts.AccelCache != "" {
		caches = append(caches, p.opts.AccelCache)
	}
	for _, path := range caches {
		if accel, ok := readAccelCache(path, key); ok {
			if path != caches[0] {
				p.log.Info("accelerator from this host's probe", "accel", accel, "cache", path)
				p.writeAccelCache(caches[0], key, accel)
			}
			return accel, nil
		}
	}
	ok, err := p.probeKVM(ctx, spec)
	if err != nil {
		return "", fmt.Errorf("probe kvm: %w", err)
	}
	accel := AccelTCG
	if ok {
		accel = AccelKVM
	}
	p.log.Info("accelerator probed", "accel", accel)
	for _, path := range caches {
		p.writeAccelCache(path, key, accel)
	}
	return accel, nil
}

func readAccelCache(path, key string) (string, bool) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", false
	}
	var c accelCache
	if json.Unmarshal(b, &c) != nil || c.Key != key || (c.Accel != AccelKVM && c.Accel != AccelTCG) {
		return "", false
	}
	return c.Accel, true
}

func (p *Provider) writeAccelCache(path, key, accel string) {
	if err := atomicfile.WriteJSON(path, 0o600, accelCache{Key: key, Accel: accel, At: time.Now().UTC()}); err != nil {
		p.log.Warn("cannot cache accelerator probe", "path", path, "err", err)
	}
}

// probeKVM boots spec's kernel under KVM and reports whether the guest came
// far enough to open its agent port (QEMU's VSERPORT_CHANGE event), which
// needs no agent protocol. Errors are only for things that say nothing
// about KVM (no room for the probe's directory, a cancelled ctx).
func (p *Provider) probeKVM(ctx context.Context, spec vm.Spec) (bool, error) {
	id := "probe-" + newID()[:6]
	rec := record{ID: id, Spec: spec, CreatedAt: time.Now().UTC(), Config: machineConfig{
		Accel: AccelKVM, VCPUs: 1, MemoryMiB: spec.MemoryMiB,
		Kernel: spec.Kernel, Initrd: spec.Initrd, Append: strings.TrimSpace(spec.Cmdline),
	}}
	pctx, cancel := context.WithTimeout(ctx, probeDeadline)
	defer cancel()
	m, err := p.start(pctx, rec)
	if err != nil {
		if ctx.Err() != nil {
			return false, ctx.Err()
		}
		p.log.Info("kvm probe did not start", "err", err)
		return false, nil
	}
	defer p.remove(m)
	m.mu.Lock()
	c := m.qmp
	m.mu.Unlock()
	events, unsubscribe := c.Subscribe()
	defer unsubscribe()
	for {
		select {
		case ev, ok := <-events:
			if !ok {
				return false, nil // QEMU died
			}
			if ev.Name == "VSERPORT_CHANGE" && portOpened(ev) {
				return true, nil
			}
		case <-pctx.Done():
			if ctx.Err() != nil {
				return false, ctx.Err()
			}
			return false, nil
		}
	}
}

func portOpened(ev qmp.Event) bool {
	var d struct {
		Open bool `json:"open"`
	}
	return json.Unmarshal(ev.Data, &d) == nil && d.Open
}
