package e2b

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"time"

	"github.com/warmpool/warmpool/api"
	"github.com/warmpool/warmpool/vm"
)

// leaseOwner marks the leases made through the E2B API.
const leaseOwner = "e2b"

// create is POST /sandboxes: acquire a lease from the pool named by
// templateID (or from a pool made for the template of that name).
func (s *Server) create(w http.ResponseWriter, r *http.Request) {
	var req newSandbox
	if err := decodeBody(r, &req, false); err != nil {
		writeAPIError(w, http.StatusBadRequest, err.Error())
		return
	}
	if req.AutoPause != nil && *req.AutoPause {
		writeAPIError(w, http.StatusBadRequest, "autoPause: warmpool cannot pause a sandbox; its VM runs until killed or until its timeout")
		return
	}
	if req.TemplateID == "" {
		req.TemplateID = "base"
	}
	ttl := DefaultTimeout
	if req.Timeout != nil {
		if *req.Timeout <= 0 || time.Duration(*req.Timeout)*time.Second > api.MaxTTL {
			writeAPIError(w, http.StatusBadRequest, fmt.Sprintf("timeout %d: must be between 1 and %d seconds", *req.Timeout, int(api.MaxTTL/time.Second)))
			return
		}
		ttl = time.Duration(*req.Timeout) * time.Second
	}
	env := make([]string, 0, len(req.EnvVars))
	for k, v := range req.EnvVars {
		env = append(env, k+"="+v)
	}
	slices.Sort(env)
	areq := api.AcquireRequest{Owner: leaseOwner, TTL: api.Duration(ttl), Labels: req.Metadata, Env: env, Wait: s.opts.AcquireWait}
	if err := areq.Validate(); err != nil {
		writeAPIError(w, http.StatusBadRequest, strings.NewReplacer("labels", "metadata", "env", "envVars").Replace(err.Error()))
		return
	}
	pool, err := s.poolFor(r.Context(), req.TemplateID)
	if err != nil {
		s.failAPI(w, r, err)
		return
	}
	l, err := s.opts.Backend.Acquire(r.Context(), pool, areq)
	if err != nil {
		s.failAPI(w, r, err)
		return
	}
	writeJSON(w, http.StatusCreated, s.sandboxOf(l))
}

// poolFor names the pool that serves templateID: the pool of that name,
// else one made (min 0) for the template of that name.
func (s *Server) poolFor(ctx context.Context, templateID string) (string, error) {
	if err := vm.ValidateName("templateID", templateID); err != nil {
		return "", fmt.Errorf("template %q not found: %w", templateID, vm.ErrNotFound)
	}
	pools, err := s.opts.Backend.Pools(ctx)
	if err != nil {
		return "", err
	}
	if slices.ContainsFunc(pools, func(p api.Pool) bool { return p.Name == templateID }) {
		return templateID, nil
	}
	tpls, err := s.opts.Backend.Templates(ctx)
	if err != nil {
		return "", err
	}
	if !slices.ContainsFunc(tpls, func(t api.Template) bool { return t.Name == templateID }) {
		return "", fmt.Errorf("template %q not found: no warmpool pool or template of that name: %w", templateID, vm.ErrNotFound)
	}
	s.fallbackMu.Lock()
	defer s.fallbackMu.Unlock()
	pools, err = s.opts.Backend.Pools(ctx)
	if err != nil {
		return "", err
	}
	if !slices.ContainsFunc(pools, func(p api.Pool) bool { return p.Name == templateID }) {
		preq := api.PoolRequest{Template: templateID, Min: 0, Max: s.opts.FallbackPoolMax}
		if _, err := s.opts.Backend.SetPool(ctx, templateID, preq); err != nil {
			return "", fmt.Errorf("make pool %s for template %s: %w", templateID, templateID, err)
		}
		s.log.Info("e2b: made a pool for a template no pool served", "pool", templateID, "max", preq.Max)
	}
	return templateID, nil
}

func (s *Server) sandboxOf(l api.Lease) sandbox {
	return sandbox{
		TemplateID:      l.Pool,
		SandboxID:       l.ID,
		ClientID:        clientID,
		EnvdVersion:     EnvdVersion,
		EnvdAccessToken: accessToken(s.opts.TokenSecret, l.ID),
	}
}

// lease finds a live lease; an unknown one wraps vm.ErrNotFound.
func (s *Server) lease(ctx context.Context, id string) (api.Lease, error) {
	ls, err := s.opts.Backend.Leases(ctx)
	if err != nil {
		return api.Lease{}, err
	}
	for _, l := range ls {
		if l.ID == id {
			return l, nil
		}
	}
	return api.Lease{}, fmt.Errorf("sandbox %q not found: %w", id, vm.ErrNotFound)
}

// shapes says how big each pool's VMs are.
func (s *Server) shapes(ctx context.Context) (map[string]api.Template, error) {
	pools, err := s.opts.Backend.Pools(ctx)
	if err != nil {
		return nil, err
	}
	tpls, err := s.opts.Backend.Templates(ctx)
	if err != nil {
		return nil, err
	}
	byName := map[string]api.Template{}
	for _, t := range tpls {
		byName[t.Name] = t
	}
	out := map[string]api.Template{}
	for _, p := range pools {
		out[p.Name] = byName[p.Template]
	}
	return out, nil
}

func (s *Server) detailOf(l api.Lease, shape api.Template, withToken bool) sandboxDetail {
	d := sandboxDetail{
		TemplateID:   l.Pool,
		SandboxID:    l.ID,
		ClientID:     clientID,
		StartedAt:    l.CreatedAt.UTC(),
		EnvdVersion:  EnvdVersion,
		CPUCount:     shape.VCPUs,
		MemoryMB:     shape.MemoryMiB,
		Metadata:     l.Labels,
		State:        "running",
		VolumeMounts: []any{},
	}
	if d.Metadata == nil {
		d.Metadata = map[string]string{}
	}
	if l.ExpiresAt != nil {
		d.EndAt = l.ExpiresAt.UTC()
	}
	if withToken {
		d.EnvdAccessToken = accessToken(s.opts.TokenSecret, l.ID)
	}
	return d
}

func (s *Server) get(w http.ResponseWriter, r *http.Request) {
	l, err := s.lease(r.Context(), r.PathValue("id"))
	if err != nil {
		s.failAPI(w, r, err)
		return
	}
	shapes, err := s.shapes(r.Context())
	if err != nil {
		s.failAPI(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, s.detailOf(l, shapes[l.Pool], true))
}

// list is GET /sandboxes and /v2/sandboxes: every live lease (they all run;
// none is paused), filtered by ?metadata= (URL-encoded key=value pairs),
// ?state= and ?template=. Everything fits on one page.
func (s *Server) list(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	want, err := url.ParseQuery(q.Get("metadata"))
	if err != nil {
		writeAPIError(w, http.StatusBadRequest, fmt.Sprintf("metadata %q: want URL-encoded key=value pairs", q.Get("metadata")))
		return
	}
	var states []string
	for _, v := range q["state"] {
		states = append(states, strings.Split(v, ",")...)
	}
	ls, err := s.opts.Backend.Leases(r.Context())
	if err != nil {
		s.failAPI(w, r, err)
		return
	}
	shapes, err := s.shapes(r.Context())
	if err != nil {
		s.failAPI(w, r, err)
		return
	}
	out := []sandboxDetail{}
	if len(states) > 0 && !slices.Contains(states, "running") {
		writeJSON(w, http.StatusOK, out)
		return
	}
	for _, l := range ls {
		if t := q.Get("template"); t != "" && t != l.Pool {
			continue
		}
		if !labelsMatch(l.Labels, want) {
			continue
		}
		out = append(out, s.detailOf(l, shapes[l.Pool], false))
	}
	writeJSON(w, http.StatusOK, out)
}

func labelsMatch(labels map[string]string, want url.Values) bool {
	for k, vs := range want {
		for _, v := range vs {
			if labels[k] != v {
				return false
			}
		}
	}
	return true
}

func (s *Server) kill(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	if _, err := s.lease(r.Context(), id); err != nil {
		s.failAPI(w, r, err)
		return
	}
	// The kill goes through when the client gives up waiting for it.
	ctx, cancel := withoutCancel(r.Context(), time.Minute)
	defer cancel()
	if err := s.opts.Backend.Release(ctx, id); err != nil {
		s.failAPI(w, r, err)
		return
	}
	// A lease that ends otherwise takes its watchers' agent session with
	// it, which ends them too (runWatcher).
	s.watchers.removeSandbox(id)
	w.WriteHeader(http.StatusNoContent)
}

// setTimeout is POST /sandboxes/{id}/timeout: the sandbox now ends timeout
// seconds from now, earlier or later than before.
func (s *Server) setTimeout(w http.ResponseWriter, r *http.Request) {
	var req timeoutRequest
	if err := decodeBody(r, &req, false); err != nil {
		writeAPIError(w, http.StatusBadRequest, err.Error())
		return
	}
	ttl := time.Duration(req.Timeout) * time.Second
	if req.Timeout <= 0 || ttl > api.MaxTTL {
		writeAPIError(w, http.StatusBadRequest, fmt.Sprintf("timeout %d: must be between 1 and %d seconds", req.Timeout, int(api.MaxTTL/time.Second)))
		return
	}
	if _, err := s.opts.Backend.SetLeaseTTL(r.Context(), r.PathValue("id"), api.LeaseTTLRequest{TTL: api.Duration(ttl)}); err != nil {
		s.failAPI(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// refresh is POST /sandboxes/{id}/refreshes: keep it alive for duration
// seconds more (E2B's default 60s) unless it already lives longer.
func (s *Server) refresh(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Duration *int `json:"duration"`
	}
	if err := decodeBody(r, &req, true); err != nil {
		writeAPIError(w, http.StatusBadRequest, err.Error())
		return
	}
	secs := 60
	if req.Duration != nil {
		secs = *req.Duration
	}
	if err := s.extend(r.Context(), r.PathValue("id"), secs); err != nil {
		s.failAPI(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// connect is POST /sandboxes/{id}/connect: a running sandbox answers with
// its access details, its timeout extended to the one asked for when that
// is later.
func (s *Server) connect(w http.ResponseWriter, r *http.Request) {
	var req connectRequest
	if err := decodeBody(r, &req, true); err != nil {
		writeAPIError(w, http.StatusBadRequest, err.Error())
		return
	}
	id := r.PathValue("id")
	l, err := s.lease(r.Context(), id)
	if err != nil {
		s.failAPI(w, r, err)
		return
	}
	if req.Timeout != nil {
		if err := s.extend(r.Context(), id, *req.Timeout); err != nil {
			s.failAPI(w, r, err)
			return
		}
	}
	writeJSON(w, http.StatusOK, s.sandboxOf(l))
}

// extend moves the lease's expiry to secs from now when that is later.
func (s *Server) extend(ctx context.Context, id string, secs int) error {
	ttl := time.Duration(secs) * time.Second
	if secs <= 0 || ttl > api.MaxTTL {
		return fmt.Errorf("timeout %d: must be between 1 and %d seconds: %w", secs, int(api.MaxTTL/time.Second), vm.ErrInvalid)
	}
	l, err := s.lease(ctx, id)
	if err != nil {
		return err
	}
	if l.ExpiresAt == nil || !l.ExpiresAt.Before(time.Now().Add(ttl)) {
		return nil
	}
	_, err = s.opts.Backend.SetLeaseTTL(ctx, id, api.LeaseTTLRequest{TTL: api.Duration(ttl)})
	return err
}

func (s *Server) unsupported(what string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if _, err := s.lease(r.Context(), r.PathValue("id")); err != nil {
			s.failAPI(w, r, err)
			return
		}
		writeAPIError(w, http.StatusBadRequest, fmt.Sprintf("%s: not supported by warmpool: a sandbox is a warm-pool lease, which runs until killed or until its timeout (warmpool machines suspend and resume)", what))
	}
}

var errNotRunning = errors.New("sandbox is not running")
