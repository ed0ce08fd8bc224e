package vm

import (
	"errors"
	"strings"
	"testing"
)

func TestValidateName(t *testing.T) {
	for _, ok := range []string{"a", "web-1", "py3.12_base", "A9"} {
		if err := ValidateName("name", ok); err != nil {
			t.Errorf("ValidateName(%q) = %v, want nil", ok, err)
		}
	}
	for _, bad := range []string{"", "a/b", "..", "a..b", ".hidden", "-flag", "sp ace", "é", strings.Repeat("x", 64)} {
		err := ValidateName("pool", bad)
		if !errors.Is(err, ErrInvalid) {
			t.Errorf("ValidateName(%q) = %v, want ErrInvalid", bad, err)
			continue
		}
		if !strings.Contains(err.Error(), "pool") {
			t.Errorf("error %q does not name the field", err)
		}
	}
}

func TestSpecValidateNamesField(t *testing.T) {
	cases := map[string]Spec{
		"vcpus":      {VCPUs: 0, MemoryMiB: 256},
		"memory_mib": {VCPUs: 1, MemoryMiB: -5},
		"name":       {Name: "../etc", VCPUs: 1, MemoryMiB: 256},
	}
	for field, s := range cases {
		err := s.Validate()
		var fe *FieldError
		if !errors.As(err, &fe) || fe.Field != field {
			t.Errorf("Validate(%+v) = %v, want FieldError on %s", s, err, field)
		}
	}
	if err := (Spec{VCPUs: 1, MemoryMiB: 256}).Validate(); err != nil {
		t.Errorf("valid spec rejected: %v", err)
	}
}
