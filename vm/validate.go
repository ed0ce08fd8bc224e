package vm

import (
	"strconv"
	"strings"
)

// MaxNameLen bounds names so they fit in socket paths (108 bytes on Linux)
// together with the state directory.
const MaxNameLen = 63

// ValidateName accepts names made of ASCII letters, digits, '-', '_' and '.',
// starting with a letter or digit, so that a name can never escape a
// directory or inject an argument when it becomes part of a path.
func ValidateName(field, name string) error {
	if name == "" {
		return &FieldError{Field: field, Value: name, Reason: "must not be empty"}
	}
	if len(name) > MaxNameLen {
		return &FieldError{Field: field, Value: name, Reason: "longer than 63 characters"}
	}
	if name == "." || name == ".." || strings.Contains(name, "..") {
		return &FieldError{Field: field, Value: name, Reason: "must not contain '..'"}
	}
	for i, r := range name {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9':
		case (r == '-' || r == '_' || r == '.') && i > 0:
		default:
			return &FieldError{Field: field, Value: name, Reason: "only letters, digits, '-', '_' and '.' are allowed, starting with a letter or digit"}
		}
	}
	return nil
}

// ValidateRange checks lo <= v <= hi.
func ValidateRange(field string, v, lo, hi int) error {
	if v < lo || v > hi {
		return &FieldError{Field: field, Value: v, Reason: rangeReason(lo, hi)}
	}
	return nil
}

func rangeReason(lo, hi int) string {
	return "must be between " + strconv.Itoa(lo) + " and " + strconv.Itoa(hi)
}
