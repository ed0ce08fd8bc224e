package lifecycle

import (
	"fmt"

	"github.com/warmpool/warmpool/vm"
)

// State is where a machine is in its life. The strings are part of the
// external contract (the "state" field of a machine).
type State string

const (
	NotExist  State = "not_exist" // no VM and no snapshot
	Creating  State = "creating"  // the provider is booting a VM
	Created   State = "created"   // the VM process runs; the agent has not been asked yet
	Starting  State = "starting"  // waiting for the guest agent to answer
	Running   State = "running"   // the agent answers; health-watched
	Idle      State = "idle"      // running with its balloon shrunk to what the guest uses
	Suspended State = "suspended" // memory saved to a snapshot; no VM process at all
	Stopping  State = "stopping"  // graceful, then forced, power-off in progress
	Stopped   State = "stopped"   // powered off on request; the data disk remains
	Failed    State = "failed"    // broken; recovery retries unless it gave up
)

// States lists every state, in lifecycle order.
var States = []State{NotExist, Creating, Created, Starting, Running, Idle, Suspended, Stopping, Stopped, Failed}

// Event is an input to the state machine.
type Event string

const (
	EvCreate  Event = "create"  // boot a new VM (destroying a stopped or broken one first)
	EvCreated Event = "created" // the provider returned a running VM
	EvStart   Event = "start"   // begin waiting for the agent
	EvResume  Event = "resume"  // restore a suspended machine from its snapshot
	EvReady   Event = "ready"   // the agent answered
	EvFail    Event = "fail"    // a step failed or the health loop gave up on the VM
	EvShrink  Event = "shrink"  // idle: balloon shrunk
	EvWake    Event = "wake"    // activity on an idle machine: balloon back up
	EvSuspend Event = "suspend" // idle for long: memory saved, VM destroyed
	EvStop    Event = "stop"    // power-off requested (by a caller or for a recreate)
	EvStopped Event = "stopped" // power-off finished
	EvVanish  Event = "vanish"  // the VM disappeared underneath us
	EvCrash   Event = "crash"   // the provider reported that the VM's process exited unasked
)

// Events lists every input of the state machine.
var Events = []Event{EvCreate, EvCreated, EvStart, EvResume, EvReady, EvFail, EvShrink, EvWake, EvSuspend, EvStop, EvStopped, EvVanish, EvCrash}

var transitions = map[State]map[Event]State{
	NotExist: {EvCreate: Creating},
	Creating: {EvCreated: Created, EvFail: Failed, EvStop: Stopping},
	Created:  {EvStart: Starting, EvFail: Failed, EvStop: Stopping, EvVanish: NotExist},
	Starting: {EvReady: Running, EvFail: Failed, EvStop: Stopping, EvVanish: NotExist},
	Running:  {EvShrink: Idle, EvSuspend: Suspended, EvFail: Failed, EvStop: Stopping, EvVanish: NotExist, EvCrash: Failed},
	Idle:     {EvWake: Running, EvSuspend: Suspended, EvFail: Failed, EvStop: Stopping, EvVanish: NotExist, EvCrash: Failed},
	// A suspended machine has no VM: stopping it only discards the snapshot.
	Suspended: {EvResume: Starting, EvStop: Stopping},
	Stopping:  {EvStopped: Stopped, EvFail: Failed},
	Stopped:   {EvCreate: Creating, EvVanish: NotExist},
	Failed:    {EvCreate: Creating, EvStop: Stopping, EvVanish: NotExist},
}

// Transition is the machine's state machine as a pure function: the state
// that follows s on ev, or an error wrapping vm.ErrInvalidState when ev makes
// no sense in s.
func Transition(s State, ev Event) (State, error) {
	if next, ok := transitions[s][ev]; ok {
		return next, nil
	}
	return s, fmt.Errorf("machine in state %s cannot take %q: %w", s, ev, vm.ErrInvalidState)
}
