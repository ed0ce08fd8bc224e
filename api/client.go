package api

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/warmpool/warmpool/events"
)

// Client talks to a warmpool daemon. Its methods return the server's errors
// as *Error, which match vm.ErrNotFound, ErrNothingReady and friends with
// errors.Is.
type Client struct {
	base   string // "http://warmpool" for a Unix socket
	target string // what the user gave, for error messages
	token  string
	http   *http.Client
}

// NewClient returns a client for socketOrURL: a Unix socket path (or
// "unix:PATH"), "tcp:HOST:PORT", or an http:// or https:// URL. token is
// sent as a bearer token when not empty.
func NewClient(socketOrURL, token string) *Client {
	c := &Client{target: socketOrURL, token: token}
	transport := &http.Transport{
		MaxIdleConns:          16,
		IdleConnTimeout:       90 * time.Second,
		ResponseHeaderTimeout: 0, // acquire, exec and ensure may take long
	}
	switch {
	case strings.HasPrefix(socketOrURL, "http://"), strings.HasPrefix(socketOrURL, "https://"):
		c.base = strings.TrimSuffix(socketOrURL, "/")
		transport.Proxy = http.ProxyFromEnvironment
	case strings.HasPrefix(socketOrURL, "tcp:"):
		c.base = "http://" + strings.TrimPrefix(socketOrURL, "tcp:")
	default:
		path := strings.TrimPrefix(socketOrURL, "unix:")
		c.base = "http://warmpool"
		dialer := &net.Dialer{Timeout: 5 * time.Second}
		transport.DialContext = func(ctx context.Context, _, _ string) (net.Conn, error) {
			return dialer.DialContext(ctx, "unix", path)
		}
	}
	c.http = &http.Client{Transport: transport}
	return c
}

// Close releases idle connections.
func (c *Client) Close() { c.http.CloseIdleConnections() }

// do sends a request with an optional JSON body and returns the response
// when its status is 2xx, else the decoded *Error.
func (c *Client) do(ctx context.Context, method, path string, body any, accept string) (*http.Response, error) {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return nil, fmt.Errorf("encode %s %s request: %w", method, path, err)
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, rd)
	if err != nil {
		return nil, fmt.Errorf("build %s %s request: %w", method, path, err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if accept == "" {
		accept = "application/json"
	}
	req.Header.Set("Accept", accept)
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return nil, fmt.Errorf("%s %s: %w", method, path, ctx.Err())
		}
		return nil, fmt.Errorf("reach warmpool daemon at %s: %w", c.target, unwrapURLError(err))
	}
	if resp.StatusCode/100 != 2 {
		defer resp.Body.Close()
		return nil, readError(resp)
	}
	return resp, nil
}

func unwrapURLError(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
}

func readError(resp *http.Response) error {
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	e := &Error{}
	if json.Unmarshal(b, e) != nil || e.Message == "" {
		e = &Error{Message: strings.TrimSpace(string(b)), Code: "http_" + strconv.Itoa(resp.StatusCode)}
		if e.Message == "" {
			e.Message = resp.Status
		}
	}
	e.Status = resp.StatusCode
	if ra := resp.Header.Get("Retry-After"); ra != "" {
		if secs, err := strconv.Atoi(ra); err == nil && secs >= 0 {
			e.RetryAfter = time.Duration(secs) * time.Second
		}
	}
	return e
}

// call sends a request and decodes a JSON response into out (when not nil).
func (c *Client) call(ctx context.Context, method, path string, body, out any) error {
	resp, err := c.do(ctx, method, path, body, "")
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if out == nil {
		_, _ = io.Copy(io.Discard, resp.Body) // drain so the connection is reused
		return nil
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("decode %s %s response: %w", method, path, err)
	}
	return nil
}

// Health returns nil when the daemon answers GET /healthz.
func (c *Client) Health(ctx context.Context) error {
	return c.call(ctx, http.MethodGet, "/healthz", nil, nil)
}

// Status returns the daemon's summary.
func (c *Client) Status(ctx context.Context) (Status, error) {
	var st Status
	return st, c.call(ctx, http.MethodGet, "/v1/status", nil, &st)
}

// Metrics returns the Prometheus text exposition.
func (c *Client) Metrics(ctx context.Context) (string, error) {
	resp, err := c.do(ctx, http.MethodGet, "/metrics", nil, "text/plain")
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", fmt.Errorf("read metrics: %w", err)
	}
	return string(b), nil
}

// Templates lists templates.
func (c *Client) Templates(ctx context.Context) ([]Template, error) {
	var ts []Template
	return ts, c.call(ctx, http.MethodGet, "/v1/templates", nil, &ts)
}

// BuildTemplate builds a template, calling progress (when not nil) with each
// step the daemon reports.
func (c *Client) BuildTemplate(ctx context.Context, req TemplateRequest, progress func(step string)) (Template, error) {
	resp, err := c.do(ctx, http.MethodPost, "/v1/templates", req, "application/x-ndjson")
	if err != nil {
		return Template{}, err
	}
	defer resp.Body.Close()
	if !strings.HasPrefix(resp.Header.Get("Content-Type"), "application/x-ndjson") {
		var t Template
		if err := json.NewDecoder(resp.Body).Decode(&t); err != nil {
			return Template{}, fmt.Errorf("decode template %s: %w", req.Name, err)
		}
		return t, nil
	}
	dec := json.NewDecoder(resp.Body)
	for {
		var f TemplateFrame
		if err := dec.Decode(&f); err != nil {
			return Template{}, fmt.Errorf("build template %s: stream ended early: %w", req.Name, err)
		}
		switch {
		case f.Error != nil:
			f.Error.Status = resp.StatusCode
			return Template{}, f.Error
		case f.Template != nil:
			return *f.Template, nil
		case f.Progress != "" && progress != nil:
			progress(f.Progress)
		}
	}
}

// Pools lists pools.
func (c *Client) Pools(ctx context.Context) ([]Pool, error) {
	var ps []Pool
	return ps, c.call(ctx, http.MethodGet, "/v1/pools", nil, &ps)
}

// Pool returns one pool.
func (c *Client) Pool(ctx context.Context, name string) (Pool, error) {
	var p Pool
	return p, c.call(ctx, http.MethodGet, "/v1/pools/"+url.PathEscape(name), nil, &p)
}

// SetPool creates or replaces a pool.
func (c *Client) SetPool(ctx context.Context, name string, req PoolRequest) (Pool, error) {
	var p Pool
	return p, c.call(ctx, http.MethodPut, "/v1/pools/"+url.PathEscape(name), req, &p)
}

// DeletePool removes a pool.
func (c *Client) DeletePool(ctx context.Context, name string) error {
	return c.call(ctx, http.MethodDelete, "/v1/pools/"+url.PathEscape(name), nil, nil)
}

// Acquire takes a VM from pool, letting the daemon wait up to wait for one
// (0: the daemon's default). When none is ready in time the error matches
// ErrNothingReady.
func (c *Client) Acquire(ctx context.Context, pool string, wait time.Duration, req AcquireRequest) (Lease, error) {
	path := "/v1/pools/" + url.PathEscape(pool) + "/acquire"
	if wait > 0 {
		path += "?wait=" + url.QueryEscape(wait.String())
	}
	var body any
	if req.Owner != "" || req.TTL != 0 || len(req.Labels) > 0 || len(req.Env) > 0 {
		body = req
	}
	var l Lease
	return l, c.call(ctx, http.MethodPost, path, body, &l)
}

// Leases lists live leases.
func (c *Client) Leases(ctx context.Context) ([]Lease, error) {
	var ls []Lease
	return ls, c.call(ctx, http.MethodGet, "/v1/leases", nil, &ls)
}

// Release destroys a lease's VM; releasing twice is not an error.
func (c *Client) Release(ctx context.Context, leaseID string) error {
	return c.call(ctx, http.MethodDelete, "/v1/leases/"+url.PathEscape(leaseID), nil, nil)
}

// SetLeaseTTL makes a lease expire ttl from now, or never for 0.
func (c *Client) SetLeaseTTL(ctx context.Context, leaseID string, ttl time.Duration) (Lease, error) {
	var l Lease
	return l, c.call(ctx, http.MethodPut, "/v1/leases/"+url.PathEscape(leaseID)+"/ttl", LeaseTTLRequest{TTL: Duration(ttl)}, &l)
}

// Exec runs a command in a leased VM, copying its output to stdout and
// stderr as it arrives, and returns its exit code.
func (c *Client) Exec(ctx context.Context, leaseID string, req ExecRequest, stdout, stderr io.Writer) (int, error) {
	resp, err := c.do(ctx, http.MethodPost, "/v1/leases/"+url.PathEscape(leaseID)+"/exec", req, "application/x-ndjson")
	if err != nil {
		return -1, err
	}
	defer resp.Body.Close()
	rd := bufio.NewReaderSize(resp.Body, 64<<10)
	dec := json.NewDecoder(rd)
	for {
		var f ExecFrame
		if err := dec.Decode(&f); err != nil {
			if ctx.Err() != nil {
				return -1, fmt.Errorf("exec in lease %s: %w", leaseID, ctx.Err())
			}
			return -1, fmt.Errorf("exec in lease %s: output stream ended before the exit code: %w", leaseID, err)
		}
		switch {
		case f.Error != nil:
			f.Error.Status = resp.StatusCode
			return -1, f.Error
		case f.ExitCode != nil:
			return *f.ExitCode, nil
		case f.Stream == "stdout":
			if _, err := stdout.Write(f.Data); err != nil {
				return -1, fmt.Errorf("exec in lease %s: write stdout: %w", leaseID, err)
			}
		case f.Stream == "stderr":
			if _, err := stderr.Write(f.Data); err != nil {
				return -1, fmt.Errorf("exec in lease %s: write stderr: %w", leaseID, err)
			}
		}
	}
}

// Machines lists machines.
func (c *Client) Machines(ctx context.Context) ([]Machine, error) {
	var ms []Machine
	return ms, c.call(ctx, http.MethodGet, "/v1/machines", nil, &ms)
}

// Machine returns one machine.
func (c *Client) Machine(ctx context.Context, name string) (Machine, error) {
	var m Machine
	return m, c.call(ctx, http.MethodGet, "/v1/machines/"+url.PathEscape(name), nil, &m)
}

// PutMachine records a machine's desired spec.
func (c *Client) PutMachine(ctx context.Context, name string, req MachineRequest) (Machine, error) {
	var m Machine
	return m, c.call(ctx, http.MethodPut, "/v1/machines/"+url.PathEscape(name), req, &m)
}

// EnsureMachine returns once the machine is ready, in one request: the
// daemon merges the fields req gives into the recorded spec.
func (c *Client) EnsureMachine(ctx context.Context, name string, req MachineEnsureRequest) (Machine, error) {
	var m Machine
	return m, c.call(ctx, http.MethodPost, "/v1/machines/"+url.PathEscape(name)+"/ensure", req, &m)
}

// StopMachine stops a machine, gracefully unless force.
func (c *Client) StopMachine(ctx context.Context, name string, force bool) error {
	var body any
	if force {
		body = StopRequest{Force: true}
	}
	return c.call(ctx, http.MethodPost, "/v1/machines/"+url.PathEscape(name)+"/stop", body, nil)
}

// HoldMachine keeps a machine awake until the hold is released or expires.
func (c *Client) HoldMachine(ctx context.Context, name string, req HoldRequest) (Hold, error) {
	var h Hold
	return h, c.call(ctx, http.MethodPost, "/v1/machines/"+url.PathEscape(name)+"/hold", req, &h)
}

// ReleaseHold ends a hold.
func (c *Client) ReleaseHold(ctx context.Context, name, holdID string) error {
	return c.call(ctx, http.MethodDelete, "/v1/machines/"+url.PathEscape(name)+"/holds/"+url.PathEscape(holdID), nil, nil)
}

// EventFilter selects events on GET /v1/events.
type EventFilter struct {
	Subject    string // exact subject; empty: any
	KindPrefix string // kind prefix such as "machine."; empty: any
}

// Events follows the event stream, calling fn for each event until ctx ends,
// the stream ends, or fn returns an error (which Events returns). ready, when
// not nil, is called once the subscription is in place.
func (c *Client) Events(ctx context.Context, filter EventFilter, ready func(), fn func(events.Event) error) error {
	q := url.Values{}
	if filter.Subject != "" {
		q.Set("subject", filter.Subject)
	}
	if filter.KindPrefix != "" {
		q.Set("kind", filter.KindPrefix)
	}
	path := "/v1/events"
	if len(q) > 0 {
		path += "?" + q.Encode()
	}
	resp, err := c.do(ctx, http.MethodGet, path, nil, "text/event-stream")
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 4<<20)
	var data bytes.Buffer
	for sc.Scan() {
		line := sc.Bytes()
		switch {
		case len(line) == 0: // end of one message
			if data.Len() == 0 {
				continue
			}
			var e events.Event
			if err := json.Unmarshal(data.Bytes(), &e); err != nil {
				return fmt.Errorf("decode event %q: %w", truncate(data.String(), 80), err)
			}
			data.Reset()
			if err := fn(e); err != nil {
				return err
			}
		case bytes.HasPrefix(line, []byte(":")):
			if ready != nil && bytes.Equal(line, []byte(": subscribed")) {
				ready()
				ready = nil
			}
		case bytes.HasPrefix(line, []byte("data:")):
			if data.Len() > 0 {
				data.WriteByte('\n')
			}
			data.Write(bytes.TrimPrefix(bytes.TrimPrefix(line, []byte("data:")), []byte(" ")))
		}
	}
	if ctx.Err() != nil {
		return nil
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("read events: %w", err)
	}
	return nil
}
