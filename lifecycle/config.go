package lifecycle

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"path/filepath"
	"time"

	"github.com/warmpool/warmpool/events"
	"github.com/warmpool/warmpool/vm"
)

// Config wires a Manager to its provider, its guest agent and its owner.
type Config struct {
	Provider vm.Provider
	// StateDir holds each machine's persistent files:
	// StateDir/machines/<name>/data.img is the data disk, a sparse file that
	// is never deleted, not even on recreate.
	StateDir string

	// Ping asks the guest agent whether it answers (real: agent.Dial + Ping).
	// Nil means "the provider says the VM is running" counts as healthy.
	Ping func(ctx context.Context, v vm.VM) error
	// Shutdown asks the guest to power off through its agent. Nil, or an
	// error, falls back to the provider's Stop with the remaining grace.
	Shutdown func(ctx context.Context, v vm.VM) error
	// GuestMemUsed reports how much memory the guest really uses (real: agent
	// Stats), to size the idle balloon. Nil falls back to the provider's
	// balloon statistics.
	GuestMemUsed func(ctx context.Context, v vm.VM) (usedMiB int, err error)

	Events events.Publisher
	Logger *slog.Logger
	Clock  Clock

	// StartTimeout bounds one start attempt, from Create until the agent
	// answers. Default 60s (TCG boots are slow).
	StartTimeout time.Duration
	// HealthInterval is how often a running machine is pinged; default 5s.
	HealthInterval time.Duration
	// PingTimeout bounds one health ping; default 2s.
	PingTimeout time.Duration
	// HealthFailures is how many consecutive failed pings make a machine
	// Failed; default 3. A VM whose process is gone fails at once.
	HealthFailures int
	// LivenessWindow is how long an agent answer vouches for a running
	// machine: an Ensure on a machine whose agent last answered longer ago,
	// or whose last ping failed, pings it before answering. Default
	// HealthInterval.
	LivenessWindow time.Duration
	// StopTimeout is the graceful-stop deadline before a forced stop;
	// default 30s.
	StopTimeout time.Duration

	Backoff Backoff
	Idle    IdlePolicy

	// SnapshotDir holds suspended machines' snapshots, one directory per
	// machine. Default StateDir/snapshots.
	SnapshotDir string

	// OnChange receives a machine every time something worth persisting
	// changed. It is called from that machine's goroutine, in order for one
	// machine, concurrently for different machines; it must not block long.
	OnChange func(Machine)

	// Rand returns a number in [0,1) for backoff jitter; tests pin it.
	Rand func() float64
}

// Backoff paces recovery attempts: Initial, doubling per failed attempt up
// to Max, each spread by ±Jitter (0..1) of itself. After MaxAttempts failed
// attempts in a row the machine stays Failed until the next Ensure.
type Backoff struct {
	Initial     time.Duration
	Max         time.Duration
	MaxAttempts int
	Jitter      float64
}

// Delay is the wait before retry number attempt (1 = after the first failure).
func (b Backoff) Delay(attempt int, random float64) time.Duration {
	d := b.Initial
	for i := 1; i < attempt && d < b.Max; i++ {
		d *= 2
	}
	if d > b.Max {
		d = b.Max
	}
	if b.Jitter > 0 {
		d = time.Duration(float64(d) * (1 + b.Jitter*(2*random-1)))
	}
	if d > b.Max {
		d = b.Max
	}
	return d
}

// IdlePolicy says what happens to a machine nobody uses. Zero durations turn
// a step off. Both are measured from the last activity (or the release of the
// last hold). Config.Idle is every machine's default; MachineSpec.Idle
// replaces it for one machine.
type IdlePolicy struct {
	// ShrinkAfter: shrink the balloon to what the guest uses plus ReserveMiB.
	ShrinkAfter time.Duration `json:"shrink_after"`
	// SuspendAfter: save the machine to a snapshot and free its memory and CPU.
	SuspendAfter time.Duration `json:"suspend_after"`
	ReserveMiB   int           `json:"reserve_mib"`
}

func (p IdlePolicy) validate() error {
	if p.ShrinkAfter < 0 || p.SuspendAfter < 0 || p.ReserveMiB < 0 {
		return &vm.FieldError{Field: "idle", Value: p, Reason: "durations and reserve must not be negative"}
	}
	return nil
}

func (c *Config) setDefaults() error {
	if c.Provider == nil {
		return &vm.FieldError{Field: "provider", Value: nil, Reason: "is required"}
	}
	if c.StateDir == "" {
		return &vm.FieldError{Field: "state_dir", Value: "", Reason: "is required"}
	}
	if c.Events == nil {
		c.Events = events.Discard
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Clock == nil {
		c.Clock = RealClock()
	}
	if c.Rand == nil {
		c.Rand = rand.Float64
	}
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&c.StartTimeout, 60*time.Second)
	def(&c.HealthInterval, 5*time.Second)
	def(&c.PingTimeout, 2*time.Second)
	def(&c.LivenessWindow, c.HealthInterval)
	def(&c.StopTimeout, 30*time.Second)
	def(&c.Backoff.Initial, time.Second)
	def(&c.Backoff.Max, 2*time.Minute)
	if c.HealthFailures <= 0 {
		c.HealthFailures = 3
	}
	if c.Backoff.MaxAttempts <= 0 {
		c.Backoff.MaxAttempts = 8
	}
	if c.Backoff.Jitter < 0 || c.Backoff.Jitter > 1 {
		return &vm.FieldError{Field: "backoff.jitter", Value: c.Backoff.Jitter, Reason: "must be between 0 and 1"}
	}
	if err := c.Idle.validate(); err != nil {
		return err
	}
	if c.SnapshotDir == "" {
		c.SnapshotDir = filepath.Join(c.StateDir, "snapshots")
	}
	return nil
}

// Errors callers can test for besides the vm ones.
var (
	// ErrClosed: the manager was closed.
	ErrClosed = errors.New("machine manager closed")
	// ErrStopped: a stop was requested while the caller waited for the machine.
	ErrStopped = errors.New("machine stopped")
	// ErrGaveUp: recovery failed MaxAttempts times in a row.
	ErrGaveUp = errors.New("gave up starting machine")
)

func dataDiskPath(stateDir, name string) string {
	return filepath.Join(stateDir, "machines", name, "data.img")
}

func wrapName(op, name string, err error) error {
	return fmt.Errorf("%s machine %s: %w", op, name, err)
}
