package fakefirecracker

import (
	"net/http/httptest"
	"strings"
	"testing"
)

func loadTestSpec(t *testing.T) *Spec {
	t.Helper()
	p, err := SpecPath()
	if err != nil {
		t.Fatal(err)
	}
	s, err := LoadSpec(p)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestSpecValidate(t *testing.T) {
	s := loadTestSpec(t)
	if s.Version != "1.16.1" {
		t.Errorf("description version %q, want 1.16.1", s.Version)
	}
	cases := []struct {
		method, path, body string
		wantErr            string // "" means valid
	}{
		{"PUT", "/machine-config", `{"vcpu_count": 2, "mem_size_mib": 256}`, ""},
		{"PUT", "/machine-config", `{"vcpu_count": 2, "mem_size_mib": 256, "bogus": 1}`, "bogus"},
		{"PUT", "/machine-config", `{"vcpu_count": "2", "mem_size_mib": 256}`, "vcpu_count"},
		{"PUT", "/machine-config", `{"vcpu_count": 64, "mem_size_mib": 256}`, "vcpu_count"},
		{"PUT", "/machine-config", `{"mem_size_mib": 256}`, "vcpu_count"},
		{"PUT", "/boot-source", `{"kernel_image_path": "/k", "boot_args": "console=ttyS0"}`, ""},
		{"PUT", "/drives/data", `{"drive_id": "data", "is_root_device": false, "path_on_host": "/d", "is_read_only": false}`, ""},
		{"PATCH", "/drives/data", `{"drive_id": "data", "path_on_host": "/d", "is_root_device": false}`, "is_root_device"},
		{"PUT", "/snapshot/load", `{"snapshot_path": "/s", "mem_backend": {"backend_type": "File", "backend_path": "/m"}, "resume_vm": false}`, ""},
		{"PUT", "/snapshot/load", `{"snapshot_path": "/s", "mem_backend": {"backend_type": "Disk", "backend_path": "/m"}}`, "backend_type"},
		{"PUT", "/vsock", `{"guest_cid": 3, "uds_path": "v.sock"}`, ""},
		{"PUT", "/vsock", `{"guest_cid": 2, "uds_path": "v.sock"}`, "guest_cid"},
		{"PATCH", "/vm", `{"state": "Paused"}`, ""},
		{"PATCH", "/vm", `{"state": "Frozen"}`, "state"},
		{"POST", "/vm", `{"state": "Paused"}`, "POST /vm"},
		{"PUT", "/nonsense", `{}`, "/nonsense"},
		{"PUT", "/actions", `{"action_type": "InstanceStart"}`, ""},
		{"PUT", "/actions", ``, "body"},
		{"PUT", "/mmds", `{"anything": {"goes": [1, 2]}}`, ""},
		{"PUT", "/balloon", `{"amount_mib": 0, "deflate_on_oom": true, "stats_polling_interval_s": 1}`, ""},
		{"PUT", "/network-interfaces/eth0", `{"iface_id": "eth0", "host_dev_name": "tap0", "rx_rate_limiter": {"size": 1, "refill_time": 1, "extra": 1}}`, "extra"},
		{"GET", "/version", ``, ""},
		{"GET", "/", ``, ""},
	}
	for _, c := range cases {
		r := httptest.NewRequest(c.method, "http://localhost"+c.path, strings.NewReader(c.body))
		if c.body != "" {
			r.Header.Set("Content-Type", "application/json")
		}
		err := s.Validate(r)
		switch {
		case c.wantErr == "" && err != nil:
			t.Errorf("%s %s %s: rejected: %v", c.method, c.path, c.body, err)
		case c.wantErr != "" && err == nil:
			t.Errorf("%s %s %s: accepted, want an error mentioning %q", c.method, c.path, c.body, c.wantErr)
		case c.wantErr != "" && !strings.Contains(err.Error(), c.wantErr):
			t.Errorf("%s %s %s: error %q does not mention %q", c.method, c.path, c.body, err, c.wantErr)
		}
	}
}
