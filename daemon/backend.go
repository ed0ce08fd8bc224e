package daemon

import (
	"context"
	"sort"

	"github.com/warmpool/warmpool/api"
	"github.com/warmpool/warmpool/events"
	"github.com/warmpool/warmpool/store"
)

var _ api.Backend = (*Daemon)(nil)

// Subscribe implements api.Backend.
func (d *Daemon) Subscribe(filter func(events.Event) bool) *events.Subscription {
	return d.bus.Subscribe(256, filter)
}

// Status implements api.Backend.
func (d *Daemon) Status(ctx context.Context) (api.Status, error) {
	caps := []string{}
	for c, ok := range d.prov.Capabilities() {
		if ok {
			caps = append(caps, string(c))
		}
	}
	sort.Strings(caps)
	info := d.prov.Info(ctx)
	out := api.Status{
		Version:      Version(),
		Provider:     info.Name,
		Accel:        info.Accel,
		Capabilities: caps,
		StateDir:     d.stateDir,
		StartedAt:    d.started,
		Leases:       d.leaseCount(),
		Network:      d.net.status(d.cfg.Network.CIDR),
	}
	err := d.st.View(func(tx *store.Tx) error {
		for _, c := range []struct {
			n    *int
			list func(*store.Tx) (int, error)
		}{
			{&out.Templates, count(store.Templates)},
			{&out.Pools, count(store.Pools)},
			{&out.Machines, count(store.Machines)},
			{&out.VMs, count(store.VMs)},
		} {
			n, err := c.list(tx)
			if err != nil {
				return err
			}
			*c.n = n
		}
		return nil
	})
	return out, err
}

func count[T store.Keyed](k store.Kind[T]) func(*store.Tx) (int, error) {
	return func(tx *store.Tx) (int, error) {
		l, err := k.List(tx)
		return len(l), err
	}
}
