package daemon

import (
	"log/slog"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/warmpool/warmpool/agent"
)

// Outcomes of a hand-off's entropy, the label values of
// warmpool_handoffs_total.
const (
	entropyReseeded   = "reseeded"   // added, and the guest's CRNG reseeded from it
	entropyAdded      = "added"      // added, but the CRNG was not reseeded
	entropyNone       = "none"       // the guest added none of it
	entropyUnreported = "unreported" // the guest's agent predates reporting it
)

// handoffEntropy counts what guest agents report doing with the entropy
// each hand-off gives them: the only evidence on the host that clones of
// one snapshot stopped sharing their random state.
type handoffEntropy struct {
	bytes    prometheus.Counter
	outcomes *prometheus.CounterVec
}

func newHandoffEntropy(reg prometheus.Registerer) *handoffEntropy {
	h := &handoffEntropy{
		bytes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "warmpool_handoff_entropy_bytes_total",
			Help: "Random bytes the guest agents of leased VMs report mixing into their kernel's pool at hand-off.",
		}),
		outcomes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "warmpool_handoffs_total",
			Help: "Hand-offs by what the guest did with their entropy: reseeded (its CRNG reseeded from it), added (no reseed; the daemon log says why), none, unreported (an agent too old to say).",
		}, []string{"entropy"}),
	}
	for _, o := range []string{entropyReseeded, entropyAdded, entropyNone, entropyUnreported} {
		h.outcomes.WithLabelValues(o)
	}
	reg.MustRegister(h.bytes, h.outcomes)
	return h
}

// record counts the guest's report r on a hand-off that sent sent bytes
// of entropy, and warns when the guest's random state may still be the
// snapshot's.
func (h *handoffEntropy) record(log *slog.Logger, vmID, lease string, sent int, r agent.HandoffResult) {
	outcome := entropyReseeded
	switch {
	case !r.Reported:
		outcome = entropyUnreported
	case r.EntropyBytes == 0:
		outcome = entropyNone
	case !r.Reseeded:
		outcome = entropyAdded
	}
	h.bytes.Add(float64(r.EntropyBytes))
	h.outcomes.WithLabelValues(outcome).Inc()
	if outcome != entropyReseeded || r.EntropyBytes < sent {
		log.Warn("guest did not take the hand-off's entropy in full: it may share random state with other clones of its snapshot",
			"vm", vmID, "lease", lease, "entropy", outcome, "sent_bytes", sent, "added_bytes", r.EntropyBytes, "reason", r.NotReseeded)
	}
}
