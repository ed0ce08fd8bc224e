package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/warmpool/warmpool/internal/atomicfile"
	"github.com/warmpool/warmpool/internal/singleuse"
	"github.com/warmpool/warmpool/internal/sparse"
	"github.com/warmpool/warmpool/provider/qemu/qmp"
	"github.com/warmpool/warmpool/vm"
)

// Meta keys of a qemu vm.Snapshot.
const (
	metaConfig = "config" // JSON machineConfig of the template
	metaState  = "state"  // device state (and RAM in copy mode) file name
	metaMemory = "memory" // RAM file name, shared mode only
)

// snapshotMeta is written as snapshot.json next to the snapshot's files.
type snapshotMeta struct {
	Snapshot vm.Snapshot   `json:"snapshot"`
	Config   machineConfig `json:"config"`
}

// errBalloonInSharedTemplate refuses a shared-memory template whose clones
// would have a balloon device. Clones map the template's memory file
// privately, yet QEMU (7.2, and 8.x with only a warning) gives pages from
// balloon inflation and free page reporting back with
// fallocate(PUNCH_HOLE) on that file: one clone's guest, which may drive
// its balloon as it likes, would zero those pages under every other clone.
// Clones must have their template's devices, so the template VM must be
// created without a balloon.
var errBalloonInSharedTemplate = fmt.Errorf("vm has a memory balloon device, which in every clone could punch holes into the template memory file all clones share; "+
	"create template VMs with Spec.NoBalloon (template.Build does), or use snapshot mode %q: %w", SnapshotCopy, vm.ErrUnsupported)

// migrationBandwidth lifts QEMU's default migration bandwidth limit (32
// MiB/s in 7.2), which would make a full-RAM snapshot take seconds.
const migrationBandwidth = 64 << 30

// Snapshot writes the paused VM's state into dir. In shared mode the stream
// holds only device state and the RAM file is copied beside it; that copy
// never changes afterwards, so clones can map it. The VM stays paused and
// may be resumed. A shared snapshot of a VM with a balloon device is
// refused (vm.ErrUnsupported): its clones would have one too.
func (p *Provider) Snapshot(ctx context.Context, id, dir string) (vm.Snapshot, error) {
	m, err := p.lookup(ctx, id)
	if err != nil {
		return vm.Snapshot{}, err
	}
	m.op.Lock()
	defer m.op.Unlock()
	fail := func(err error) (vm.Snapshot, error) {
		return vm.Snapshot{}, fmt.Errorf("snapshot qemu vm %s to %s: %w", id, dir, err)
	}
	rec, err := p.pausedRecord(ctx, m)
	if err != nil {
		return fail(err)
	}
	if rec.Config.DataDisk != "" {
		return fail(fmt.Errorf("vm has a data disk, which clones would share (Suspend keeps it for a single restore): %w", vm.ErrUnsupported))
	}
	// Only a shared mapping has the guest's memory in the file; a clone's
	// private mapping does not, so its RAM goes into the stream.
	shared := p.opts.SnapshotMode == SnapshotShared && rec.Config.MemPath != "" && rec.Config.MemShared
	if shared && !rec.Config.NoBalloon {
		return fail(errBalloonInSharedTemplate)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fail(err)
	}
	c, err := p.conn(ctx, m)
	if err != nil {
		return fail(err)
	}
	start := time.Now()
	statePath := filepath.Join(dir, snapStateFile)
	if err := p.migrateOut(ctx, c, shared, statePath); err != nil {
		return fail(err)
	}
	stateDone := time.Now()
	cfg := rec.Config
	cfg.Incoming, cfg.OwnsMem, cfg.MemShared = true, false, false
	meta := map[string]string{metaState: snapStateFile}
	if shared {
		memPath := filepath.Join(dir, snapMemoryFile)
		if err := sparse.Copy(rec.Config.MemPath, memPath); err != nil {
			return fail(err)
		}
		// Clones map it with share=off: their writes go to private copies of
		// its pages and the file never changes again. (It stays writable
		// because QEMU 7.2 opens memory files read-write even then.)
		cfg.MemPath = snapMemoryFile // relative to the snapshot's dir
		meta[metaMemory] = snapMemoryFile
	} else {
		cfg.MemPath = ""
	}
	if cfg.WritableDisk != "" {
		diskMeta, err := p.freezeWritableDisk(ctx, cfg, dir)
		if err != nil {
			return fail(err)
		}
		for k, v := range diskMeta {
			meta[k] = v
		}
		// Each clone gets its own layer (checkSnapshot, Restore).
		cfg.WritableDisk, cfg.WritableFormat = "", ""
	}
	cfgJSON, err := json.Marshal(cfg)
	if err != nil {
		return fail(err)
	}
	meta[metaConfig] = string(cfgJSON)
	abs, err := filepath.Abs(dir)
	if err != nil {
		return fail(err)
	}
	snap := vm.Snapshot{
		ID:              "snap-" + newID(),
		Provider:        p.Name(),
		Dir:             abs,
		Spec:            snapshotSpec(rec.Spec),
		CreatedAt:       time.Now().UTC(),
		ProviderVersion: p.version,
		SharedMemory:    shared,
		Meta:            meta,
	}
	if err := atomicfile.WriteJSON(filepath.Join(dir, snapMetaFile), 0o600, snapshotMeta{Snapshot: snap, Config: cfg}); err != nil {
		return fail(err)
	}
	p.log.Info("vm snapshotted", "id", id, "dir", abs, "shared", shared,
		"state_ms", stateDone.Sub(start).Milliseconds(), "total_ms", time.Since(start).Milliseconds())
	return snap, nil
}

// pausedRecord returns m's record once QEMU says the VM is paused, unless
// it was suspended: its memory and disk belong to that snapshot now. The
// caller holds m.op, so the VM stays paused until it lets go.
func (p *Provider) pausedRecord(ctx context.Context, m *machine) (record, error) {
	st, err := p.queryStatus(ctx, m)
	if err != nil {
		return record{}, err
	}
	if mapStatus(st) != vm.StatusPaused {
		return record{}, fmt.Errorf("vm is %s, not paused: %w", st, vm.ErrInvalidState)
	}
	m.mu.Lock()
	rec := m.rec
	m.mu.Unlock()
	if rec.SuspendedTo != "" {
		return record{}, fmt.Errorf("vm was already suspended to snapshot %s: %w", rec.SuspendedTo, vm.ErrInvalidState)
	}
	return rec, nil
}

// migrateOut streams the VM's state into path through a descriptor handed
// to QEMU, and waits for the migration to finish.
func (p *Provider) migrateOut(ctx context.Context, c *qmp.Conn, ignoreShared bool, path string) error {
	if err := setIgnoreShared(ctx, c, ignoreShared); err != nil {
		return err
	}
	if err := c.Execute(ctx, "migrate-set-parameters", map[string]any{"max-bandwidth": migrationBandwidth}, nil); err != nil {
		return err
	}
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	defer os.Remove(tmp)
	events, unsubscribe := c.Subscribe()
	defer unsubscribe()
	const fdName = "snapshot"
	err = c.ExecuteWithFile(ctx, "getfd", map[string]any{"fdname": fdName}, nil, f)
	f.Close() // QEMU holds its own copy now
	if err != nil {
		return err
	}
	if err := c.Execute(ctx, "migrate", map[string]any{"uri": "fd:" + fdName}, nil); err != nil {
		c.Execute(context.WithoutCancel(ctx), "closefd", map[string]any{"fdname": fdName}, nil)
		return err
	}
	if err := waitMigration(ctx, c, events, "query-migrate"); err != nil {
		c.Execute(context.WithoutCancel(ctx), "migrate_cancel", nil, nil)
		return err
	}
	return os.Rename(tmp, path)
}

func setIgnoreShared(ctx context.Context, c *qmp.Conn, on bool) error {
	return c.Execute(ctx, "migrate-set-capabilities", map[string]any{
		"capabilities": []map[string]any{{"capability": "x-ignore-shared", "state": on}},
	}, nil)
}

// waitMigration waits for the migration to complete or fail. It watches
// MIGRATION events and polls query-migrate, so a missed event only delays.
func waitMigration(ctx context.Context, c *qmp.Conn, events <-chan qmp.Event, query string) error {
	var info struct {
		Status    string `json:"status"`
		ErrorDesc string `json:"error-desc"`
	}
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		if err := c.Execute(ctx, query, nil, &info); err != nil {
			return err
		}
		switch info.Status {
		case "completed":
			return nil
		case "failed", "cancelled":
			if info.ErrorDesc == "" {
				info.ErrorDesc = "no reason given (see the VM's qemu.log)"
			}
			return fmt.Errorf("migration %s: %s", info.Status, info.ErrorDesc)
		}
		select {
		case _, ok := <-events:
			if !ok {
				return fmt.Errorf("migration: %w", qmp.ErrClosed)
			}
		case <-tick.C:
		case <-ctx.Done():
			return fmt.Errorf("migration: %w", ctx.Err())
		}
	}
}

// Restore starts a new VM from snap and returns it paused.
func (p *Provider) Restore(ctx context.Context, snap vm.Snapshot) (vm.VM, error) {
	fail := func(err error) (vm.VM, error) {
		return vm.VM{}, fmt.Errorf("restore qemu vm from snapshot %s in %s: %w", snap.ID, snap.Dir, err)
	}
	// Whether a snapshot is single-use is decided by its files, not by the
	// caller's copy of it.
	if filepath.IsAbs(snap.Dir) && singleuse.IsSingleUse(snap.Dir) {
		return p.restoreSuspended(ctx, snap)
	}
	cfg, err := p.checkSnapshot(snap)
	if err != nil {
		return fail(err)
	}
	if snap.SharedMemory && !cfg.NoBalloon {
		// A template snapshotted before balloons were refused: its clones
		// would need the balloon too.
		return fail(fmt.Errorf("template built with a balloon device, rebuild it: %w (%w)", errBalloonInSharedTemplate, vm.ErrIncompatible))
	}
	if err := ctx.Err(); err != nil {
		return fail(err)
	}
	id := newID()
	if cfg.Accel == AccelTCG && p.opts.TBSizeMiB > 0 {
		cfg.TBSizeMiB = p.opts.TBSizeMiB
	}
	spec := restoredSpec(cfg, snap.Spec)
	spec.NoBalloon = cfg.NoBalloon // the template's device set, whatever the caller's copy says
	layer, err := checkWritableDisk(snap)
	if err != nil {
		return fail(err)
	}
	var prepare func(dir string) error
	if layer != "" {
		cfg.WritableDisk, cfg.WritableFormat = p.cloneDiskPath(id), "qcow2"
		spec.WritableDisk = cfg.WritableDisk
		prepare = func(string) error { return copyCloneLayer(layer, cfg.WritableDisk) }
	}
	rec := record{ID: id, Spec: spec, CreatedAt: time.Now().UTC(), Snapshot: snap.ID, Config: cfg}
	start := time.Now()
	m, err := p.startPrepared(ctx, rec, prepare)
	if err != nil {
		return fail(err)
	}
	started := time.Now()
	if err := p.migrateIn(ctx, m, snap.SharedMemory, filepath.Join(snap.Dir, snap.Meta[metaState])); err != nil {
		p.remove(m)
		return fail(fmt.Errorf("load state into vm %s: %w (qemu log: %s)", id, err, p.logTail(m.dir)))
	}
	p.log.Info("vm restored", "id", id, "snapshot", snap.ID, "start_ms", started.Sub(start).Milliseconds(),
		"total_ms", time.Since(start).Milliseconds())
	return p.handOver(ctx, m)
}

func (p *Provider) checkSnapshot(snap vm.Snapshot) (machineConfig, error) {
	var cfg machineConfig
	if snap.Provider != p.Name() {
		return cfg, &vm.FieldError{Field: "snapshot.provider", Value: snap.Provider, Reason: "not a qemu snapshot"}
	}
	if !filepath.IsAbs(snap.Dir) {
		return cfg, &vm.FieldError{Field: "snapshot.dir", Value: snap.Dir, Reason: "must be an absolute path"}
	}
	if _, err := os.Stat(snap.Dir); errors.Is(err, fs.ErrNotExist) {
		return cfg, fmt.Errorf("snapshot %s: directory %s: %w", snap.ID, snap.Dir, vm.ErrNotFound)
	}
	if snap.ProviderVersion != p.version {
		// QEMU's migration stream is only guaranteed to load into the
		// version that wrote it.
		return cfg, fmt.Errorf("snapshot taken with QEMU %q, this is QEMU %s: %w", snap.ProviderVersion, p.version, vm.ErrIncompatible)
	}
	if err := json.Unmarshal([]byte(snap.Meta[metaConfig]), &cfg); err != nil {
		return cfg, &vm.FieldError{Field: "snapshot.meta.config", Value: snap.Meta[metaConfig], Reason: "unreadable: " + err.Error()}
	}
	state := snap.Meta[metaState]
	if state == "" || filepath.Base(state) != state {
		return cfg, &vm.FieldError{Field: "snapshot.meta.state", Value: state, Reason: "must be a file name"}
	}
	if _, err := os.Stat(filepath.Join(snap.Dir, state)); err != nil {
		return cfg, fmt.Errorf("snapshot state: %w (%w)", err, vm.ErrIncompatible)
	}
	if snap.SharedMemory {
		mem := snap.Meta[metaMemory]
		if mem == "" || filepath.Base(mem) != mem {
			return cfg, &vm.FieldError{Field: "snapshot.meta.memory", Value: mem, Reason: "must be a file name"}
		}
		cfg.MemPath = filepath.Join(snap.Dir, mem)
		if _, err := os.Stat(cfg.MemPath); err != nil {
			return cfg, fmt.Errorf("snapshot memory: %w (%w)", err, vm.ErrIncompatible)
		}
	} else {
		cfg.MemPath = ""
	}
	for _, f := range []string{cfg.Kernel, cfg.Initrd, cfg.RootDisk} {
		if f == "" {
			continue
		}
		// The kernel is part of the machine (its boot ROM is in the device
		// state), so a clone needs it even though it does not boot it.
		if _, err := os.Stat(f); err != nil {
			return cfg, fmt.Errorf("template's guest image: %w (%w)", err, vm.ErrIncompatible)
		}
	}
	if cfg.DataDisk != "" {
		// Migration needs the same devices: without its disk the VM cannot
		// come back.
		if _, err := os.Stat(cfg.DataDisk); err != nil {
			return cfg, fmt.Errorf("data disk: %w", err)
		}
	}
	cfg.Incoming, cfg.MemShared, cfg.OwnsMem = true, false, false
	return cfg, nil
}

func (p *Provider) migrateIn(ctx context.Context, m *machine, ignoreShared bool, statePath string) error {
	c, err := p.conn(ctx, m)
	if err != nil {
		return err
	}
	if err := setIgnoreShared(ctx, c, ignoreShared); err != nil {
		return err
	}
	f, err := os.Open(statePath)
	if err != nil {
		return err
	}
	events, unsubscribe := c.Subscribe()
	defer unsubscribe()
	const fdName = "restore"
	err = c.ExecuteWithFile(ctx, "getfd", map[string]any{"fdname": fdName}, nil, f)
	f.Close()
	if err != nil {
		return err
	}
	if err := c.Execute(ctx, "migrate-incoming", map[string]any{"uri": "fd:" + fdName}, nil); err != nil {
		return err
	}
	if err := waitMigration(ctx, c, events, "query-migrate"); err != nil {
		return err
	}
	m.mu.Lock()
	noBalloon := m.rec.Config.NoBalloon
	m.mu.Unlock()
	if noBalloon {
		return nil
	}
	return p.enableStats(ctx, c)
}
