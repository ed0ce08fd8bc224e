package daemon

import (
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/warmpool/warmpool/api"
	"github.com/warmpool/warmpool/store"
	"github.com/warmpool/warmpool/vm"
)

func ptr[T any](v T) *T { return &v }

// machineVM returns the shape of the VM a machine runs on.
func machineVM(t *testing.T, r *running, m api.Machine) vm.Spec {
	t.Helper()
	v, err := r.prov.Inspect(ctxT(t), m.VMID)
	if err != nil {
		t.Fatalf("machine %s's vm %q: %v", m.Name, m.VMID, err)
	}
	return v.Spec
}

// An ensure changes the fields it gives and keeps every other one the
// daemon recorded, across restarts: the record in the store is the spec.
func TestEnsureMergesIntoRecordedSpec(t *testing.T) {
	dir := t.TempDir()
	prov := newFakeProvider()
	r := startWrapped(t, dir, prov, diskFake{prov}, "machines:\n  cfg: {vcpus: 2}\n")
	c := r.client
	ensure := func(name string, req api.MachineEnsureRequest) api.Machine {
		t.Helper()
		m, err := c.EnsureMachine(ctxT(t), name, req)
		if err != nil {
			t.Fatalf("ensure %s %+v: %v", name, req, err)
		}
		return m
	}

	first := ensure("box", api.MachineEnsureRequest{})
	if first.Spec.VCPUs != 1 || first.Spec.MemoryMiB != 512 {
		t.Fatalf("new machine: %+v, want the default 1 vCPU and 512 MiB", first.Spec)
	}
	bigger := ensure("box", api.MachineEnsureRequest{MemoryMiB: ptr(1024), DataDiskMiB: ptr(16)})
	if bigger.Spec.VCPUs != 1 || bigger.Spec.MemoryMiB != 1024 || bigger.Spec.DataDiskMiB != 16 || bigger.VMID == first.VMID {
		t.Fatalf("after --mem 1024 --disk 16: %+v, want 1 vCPU kept and a new vm", bigger)
	}
	if s := machineVM(t, r, bigger); s.VCPUs != 1 || s.MemoryMiB != 1024 {
		t.Errorf("vm after --mem 1024: %d vCPUs %d MiB", s.VCPUs, s.MemoryMiB)
	}

	// Nothing new: no recreate, and nothing written.
	rec, err := store.Get(r.d.st, store.Machines, "box")
	if err != nil {
		t.Fatal(err)
	}
	same := ensure("box", api.MachineEnsureRequest{})
	if same.VMID != bigger.VMID || !same.Spec.Equal(bigger.Spec) {
		t.Errorf("bare ensure of a running machine: %+v, want %+v unchanged", same, bigger)
	}
	if again, err := store.Get(r.d.st, store.Machines, "box"); err != nil || !again.UpdatedAt.Equal(rec.UpdatedAt) {
		t.Errorf("bare ensure rewrote the machine's record (%v -> %v, %v)", rec.UpdatedAt, again.UpdatedAt, err)
	}

	// An idle policy applies without a recreate and stays when the shape changes.
	idle := ensure("box", api.MachineEnsureRequest{IdleAfter: ptr(api.Duration(time.Hour)), SuspendAfter: ptr(api.Duration(0))})
	if idle.VMID != bigger.VMID || idle.IdleAfter.Std() != time.Hour || idle.SuspendAfter != 0 || idle.Spec.MemoryMiB != 1024 {
		t.Errorf("after --idle-after 1h --suspend-after 0s: %+v, want vm %s kept", idle, bigger.VMID)
	}
	two := ensure("box", api.MachineEnsureRequest{VCPUs: ptr(2)})
	if two.Spec.VCPUs != 2 || two.Spec.MemoryMiB != 1024 || two.Spec.DataDiskMiB != 16 || two.IdleAfter.Std() != time.Hour || two.VMID == bigger.VMID {
		t.Errorf("after --vcpus 2: %+v", two)
	}

	// A request that would make the spec invalid changes nothing.
	if _, err := c.EnsureMachine(ctxT(t), "box", api.MachineEnsureRequest{MemoryMiB: ptr(1)}); !errors.Is(err, vm.ErrInvalid) {
		t.Errorf("ensure with 1 MiB: %v, want invalid", err)
	}
	// A configured machine starts from its configuration.
	if cfg := ensure("cfg", api.MachineEnsureRequest{MemoryMiB: ptr(768)}); cfg.Spec.VCPUs != 2 || cfg.Spec.MemoryMiB != 768 {
		t.Errorf("config machine with --mem 768: %+v, want its configured 2 vCPUs kept", cfg.Spec)
	}

	r.stop(t)
	r = startWrapped(t, dir, prov, diskFake{prov}, "")
	after := ensure2(t, r, "box")
	if !after.Spec.Equal(two.Spec) || after.VMID != two.VMID {
		t.Errorf("after a restart a bare ensure gives %+v, want %+v on vm %s", after.Spec, two.Spec, two.VMID)
	}
}

func ensure2(t *testing.T, r *running, name string) api.Machine {
	t.Helper()
	m, err := r.client.EnsureMachine(ctxT(t), name, api.MachineEnsureRequest{})
	if err != nil {
		t.Fatalf("ensure %s: %v", name, err)
	}
	return m
}

// Two ensures of one machine at once, each changing another field, both
// land: the spec recorded and the VM the machine runs on have both.
func TestConcurrentEnsuresKeepEveryField(t *testing.T) {
	r := startFake(t, t.TempDir(), newFakeProvider(), "")
	c := r.client
	if _, err := c.EnsureMachine(ctxT(t), "box", api.MachineEnsureRequest{}); err != nil {
		t.Fatal(err)
	}
	for round := range 40 {
		vcpus, mem := 1+(round+1)%2, 256+64*((round+1)%4)
		var wg sync.WaitGroup
		errs := make([]error, 2)
		for i, req := range []api.MachineEnsureRequest{{VCPUs: &vcpus}, {MemoryMiB: &mem}} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				_, errs[i] = c.EnsureMachine(ctxT(t), "box", req)
			}()
		}
		wg.Wait()
		if err := errors.Join(errs...); err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		m, err := c.Machine(ctxT(t), "box")
		if err != nil {
			t.Fatal(err)
		}
		want := fmt.Sprintf("%d vCPUs %d MiB", vcpus, mem)
		if got := fmt.Sprintf("%d vCPUs %d MiB", m.Spec.VCPUs, m.Spec.MemoryMiB); got != want {
			t.Fatalf("round %d: recorded spec %s, want %s", round, got, want)
		}
		if s := machineVM(t, r, m); s.VCPUs != vcpus || s.MemoryMiB != mem {
			t.Fatalf("round %d: machine runs on a vm of %d vCPUs %d MiB, want %s", round, s.VCPUs, s.MemoryMiB, want)
		}
	}
}
