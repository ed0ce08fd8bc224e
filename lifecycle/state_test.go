package lifecycle

import (
	"encoding/json"
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/warmpool/warmpool/vm"
)

func TestTransitionTable(t *testing.T) {
	// Every legal move, written out independently of the implementation's
	// map; every other (state, event) pair must be refused.
	legal := map[State]map[Event]State{
		NotExist:  {EvCreate: Creating},
		Creating:  {EvCreated: Created, EvFail: Failed, EvStop: Stopping},
		Created:   {EvStart: Starting, EvFail: Failed, EvStop: Stopping, EvVanish: NotExist},
		Starting:  {EvReady: Running, EvFail: Failed, EvStop: Stopping, EvVanish: NotExist},
		Running:   {EvShrink: Idle, EvSuspend: Suspended, EvFail: Failed, EvStop: Stopping, EvVanish: NotExist, EvCrash: Failed},
		Idle:      {EvWake: Running, EvSuspend: Suspended, EvFail: Failed, EvStop: Stopping, EvVanish: NotExist, EvCrash: Failed},
		Suspended: {EvResume: Starting, EvStop: Stopping},
		Stopping:  {EvStopped: Stopped, EvFail: Failed},
		Stopped:   {EvCreate: Creating, EvVanish: NotExist},
		Failed:    {EvCreate: Creating, EvStop: Stopping, EvVanish: NotExist},
	}
	if len(States) != 10 || len(Events) != 13 {
		t.Fatalf("table covers %d states and %d events; update the test", len(States), len(Events))
	}
	for _, s := range States {
		for _, ev := range Events {
			got, err := Transition(s, ev)
			want, ok := legal[s][ev]
			switch {
			case ok && err != nil:
				t.Errorf("Transition(%s, %s) = error %v, want %s", s, ev, err, want)
			case ok && got != want:
				t.Errorf("Transition(%s, %s) = %s, want %s", s, ev, got, want)
			case !ok && !errors.Is(err, vm.ErrInvalidState):
				t.Errorf("Transition(%s, %s) = %s, %v; want ErrInvalidState", s, ev, got, err)
			case !ok && got != s:
				t.Errorf("refused Transition(%s, %s) moved to %s", s, ev, got)
			}
		}
	}
}

func TestSpecValidateNamesField(t *testing.T) {
	good := baseSpec("dev")
	if err := good.Validate(); err != nil {
		t.Fatalf("valid spec rejected: %v", err)
	}
	cases := map[string]func(*MachineSpec){
		"name":          func(s *MachineSpec) { s.Name = "../x" },
		"vcpus":         func(s *MachineSpec) { s.VCPUs = 0 },
		"memory_mib":    func(s *MachineSpec) { s.MemoryMiB = 1 },
		"kernel":        func(s *MachineSpec) { s.Kernel = "relative/vmlinuz" },
		"initrd":        func(s *MachineSpec) { s.Initrd = "initrd.img" },
		"cmdline":       func(s *MachineSpec) { s.Cmdline = strings.Repeat("x", 3000) },
		"data_disk_mib": func(s *MachineSpec) { s.DataDiskMiB = -1 },
	}
	for field, mutate := range cases {
		s := good
		mutate(&s)
		var fe *vm.FieldError
		if err := s.Validate(); !errors.As(err, &fe) || fe.Field != field {
			t.Errorf("spec with bad %s: Validate() = %v, want FieldError on %s", field, err, field)
		}
	}
}

func TestDiffNamesEachRecreateField(t *testing.T) {
	base := baseSpec("dev")
	cases := map[string]func(*MachineSpec){
		"vcpus":         func(s *MachineSpec) { s.VCPUs = 2 },
		"memory_mib":    func(s *MachineSpec) { s.MemoryMiB = 512 },
		"kernel":        func(s *MachineSpec) { s.KernelDigest = "sha256:bbb" },
		"cmdline":       func(s *MachineSpec) { s.Cmdline = "quiet" },
		"data_disk_mib": func(s *MachineSpec) { s.DataDiskMiB = 64 },
	}
	for field, mutate := range cases {
		s := base
		mutate(&s)
		if got := Diff(base.Fingerprint(), s.Fingerprint()); !slices.Equal(got, []string{field}) {
			t.Errorf("changing %s: Diff = %v", field, got)
		}
	}
	// The kernel path does not matter when the content digest is known...
	moved := base
	moved.Kernel = "/elsewhere/vmlinuz"
	if got := Diff(base.Fingerprint(), moved.Fingerprint()); len(got) != 0 {
		t.Errorf("moving the kernel with the same digest: Diff = %v, want none", got)
	}
	// ...and stands in for it when it is not.
	noDigest := base
	noDigest.KernelDigest = ""
	movedNoDigest := noDigest
	movedNoDigest.Initrd = "/elsewhere/initrd"
	if got := Diff(noDigest.Fingerprint(), movedNoDigest.Fingerprint()); !slices.Equal(got, []string{"kernel"}) {
		t.Errorf("changing the initrd path without digest: Diff = %v", got)
	}
	if base.Fingerprint().String() != moved.Fingerprint().String() {
		t.Errorf("fingerprint string differs for equal fingerprints")
	}
}

func TestBackoffDelay(t *testing.T) {
	b := Backoff{Initial: time.Second, Max: 10 * time.Second, Jitter: 0}
	var got []time.Duration
	for a := 1; a <= 6; a++ {
		got = append(got, b.Delay(a, 0.5))
	}
	want := []time.Duration{1, 2, 4, 8, 10, 10}
	for i := range want {
		if got[i] != want[i]*time.Second {
			t.Fatalf("delays = %v, want %v seconds", got, want)
		}
	}
	b.Jitter = 0.2
	if lo, hi := b.Delay(2, 0), b.Delay(2, 0.999999); lo != 1600*time.Millisecond || hi < 2399*time.Millisecond || hi > 2400*time.Millisecond {
		t.Errorf("jittered delay of 2s spans [%v, %v], want [1.6s, 2.4s]", lo, hi)
	}
	if d := b.Delay(10, 0.999999); d > b.Max {
		t.Errorf("jitter pushed delay %v above max %v", d, b.Max)
	}
}

func TestMachineJSONShape(t *testing.T) {
	b, err := json.Marshal(Machine{Name: "dev", State: Running, Spec: baseSpec("dev"), Holds: []Hold{}})
	if err != nil {
		t.Fatal(err)
	}
	var got map[string]any
	if err := json.Unmarshal(b, &got); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"name", "state", "spec", "since", "last_error", "holds", "balloon_mib"} {
		if _, ok := got[k]; !ok {
			t.Errorf("machine JSON %s lacks %q", b, k)
		}
	}
	if got["last_error"] != nil || got["balloon_mib"] != nil || got["state"] != "running" {
		t.Errorf("machine JSON %s: want last_error and balloon_mib null, state running", b)
	}
	if h, ok := got["holds"].([]any); !ok || len(h) != 0 {
		t.Errorf("holds = %v, want []", got["holds"])
	}
}
