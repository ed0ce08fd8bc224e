package firecracker

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
)

// APIError is a request Firecracker refused. It names the VM and the
// request so that a log line alone says what went wrong where.
type APIError struct {
	VMID         string
	Method, Path string
	StatusCode   int
	// FaultMessage is Firecracker's own explanation.
	FaultMessage string
}

func (e *APIError) Error() string {
	return fmt.Sprintf("firecracker %s: %s %s: %d: %s", e.VMID, e.Method, e.Path, e.StatusCode, e.FaultMessage)
}

// apiClient speaks Firecracker's HTTP API over its Unix socket.
type apiClient struct {
	vmID string
	http *http.Client
}

func newAPIClient(vmID, socket string) *apiClient {
	var d net.Dialer
	return &apiClient{
		vmID: vmID,
		http: &http.Client{Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				return d.DialContext(ctx, "unix", socket)
			},
			// One request at a time per VM, and no idle connection that
			// would outlive the VM.
			DisableKeepAlives: true,
		}},
	}
}

// do sends body (nil for none) and decodes a 200 answer into out (nil to
// ignore it). Any answer other than 2xx becomes an *APIError.
func (c *apiClient) do(ctx context.Context, method, path string, body, out any) error {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return fmt.Errorf("firecracker %s: %s %s: encode body: %w", c.vmID, method, path, err)
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://localhost"+path, rd)
	if err != nil {
		return fmt.Errorf("firecracker %s: %s %s: %w", c.vmID, method, path, err)
	}
	req.Header.Set("Accept", "application/json")
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("firecracker %s: %s %s: %w", c.vmID, method, path, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return fmt.Errorf("firecracker %s: %s %s: read answer: %w", c.vmID, method, path, err)
	}
	if resp.StatusCode/100 != 2 {
		var fault struct {
			FaultMessage string `json:"fault_message"`
		}
		msg := strings.TrimSpace(string(data))
		if json.Unmarshal(data, &fault) == nil && fault.FaultMessage != "" {
			msg = fault.FaultMessage
		}
		if msg == "" {
			msg = http.StatusText(resp.StatusCode)
		}
		return &APIError{VMID: c.vmID, Method: method, Path: path, StatusCode: resp.StatusCode, FaultMessage: msg}
	}
	if out != nil && resp.StatusCode == http.StatusOK {
		if err := json.Unmarshal(data, out); err != nil {
			return fmt.Errorf("firecracker %s: %s %s: decode answer: %w", c.vmID, method, path, err)
		}
	}
	return nil
}

func (c *apiClient) close() { c.http.CloseIdleConnections() }

// Request and answer bodies, with only the fields warmpool uses. Optional
// fields are omitempty so that an older Firecracker never sees a field it
// does not know.
type (
	machineConfig struct {
		VCPUCount int  `json:"vcpu_count"`
		MemMiB    int  `json:"mem_size_mib"`
		SMT       bool `json:"smt,omitempty"`
	}
	bootSource struct {
		KernelImagePath string `json:"kernel_image_path"`
		InitrdPath      string `json:"initrd_path,omitempty"`
		BootArgs        string `json:"boot_args,omitempty"`
	}
	drive struct {
		DriveID      string `json:"drive_id"`
		PathOnHost   string `json:"path_on_host"`
		IsRootDevice bool   `json:"is_root_device"`
		IsReadOnly   bool   `json:"is_read_only"`
	}
	partialDrive struct {
		DriveID    string `json:"drive_id"`
		PathOnHost string `json:"path_on_host"`
	}
	networkInterface struct {
		IfaceID     string `json:"iface_id"`
		HostDevName string `json:"host_dev_name"`
		GuestMAC    string `json:"guest_mac,omitempty"`
	}
	vsockDevice struct {
		GuestCID int    `json:"guest_cid"`
		UDSPath  string `json:"uds_path"`
	}
	balloonDevice struct {
		AmountMiB             int  `json:"amount_mib"`
		DeflateOnOOM          bool `json:"deflate_on_oom"`
		StatsPollingIntervalS int  `json:"stats_polling_interval_s,omitempty"`
	}
	balloonUpdate struct {
		AmountMiB int `json:"amount_mib"`
	}
	balloonStatistics struct {
		TargetMiB       int   `json:"target_mib"`
		ActualMiB       int   `json:"actual_mib"`
		TotalMemory     int64 `json:"total_memory"`
		FreeMemory      int64 `json:"free_memory"`
		AvailableMemory int64 `json:"available_memory"`
	}
	mmdsConfig struct {
		Version           string   `json:"version,omitempty"`
		NetworkInterfaces []string `json:"network_interfaces"`
		IPv4Address       string   `json:"ipv4_address,omitempty"`
	}
	instanceAction struct {
		ActionType string `json:"action_type"`
	}
	vmState struct {
		State string `json:"state"`
	}
	instanceInfo struct {
		ID    string `json:"id"`
		State string `json:"state"`
	}
	firecrackerVersion struct {
		Version string `json:"firecracker_version"`
	}
	snapshotCreate struct {
		SnapshotType string `json:"snapshot_type"`
		SnapshotPath string `json:"snapshot_path"`
		MemFilePath  string `json:"mem_file_path"`
	}
	memoryBackend struct {
		BackendType string `json:"backend_type"`
		BackendPath string `json:"backend_path"`
	}
	networkOverride struct {
		IfaceID     string `json:"iface_id"`
		HostDevName string `json:"host_dev_name"`
	}
	vsockOverride struct {
		UDSPath string `json:"uds_path"`
	}
	snapshotLoad struct {
		SnapshotPath     string            `json:"snapshot_path"`
		MemBackend       memoryBackend     `json:"mem_backend"`
		ResumeVM         bool              `json:"resume_vm"`
		NetworkOverrides []networkOverride `json:"network_overrides,omitempty"`
		VsockOverride    *vsockOverride    `json:"vsock_override,omitempty"`
	}
)

// version is a Firecracker release number, compared numerically.
type version [3]int

func parseVersion(s string) (version, error) {
	var v version
	s = strings.TrimPrefix(strings.TrimSpace(s), "v")
	if i := strings.IndexAny(s, "-+ "); i >= 0 {
		s = s[:i]
	}
	parts := strings.Split(s, ".")
	if len(parts) < 2 || len(parts) > 3 {
		return v, fmt.Errorf("unrecognised Firecracker version %q", s)
	}
	for i, p := range parts {
		n, err := strconv.Atoi(p)
		if err != nil {
			return v, fmt.Errorf("unrecognised Firecracker version %q", s)
		}
		v[i] = n
	}
	return v, nil
}

func (v version) atLeast(major, minor int) bool {
	return v[0] > major || v[0] == major && v[1] >= minor
}
