package api

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"

	"github.com/warmpool/warmpool/vm"
)

// MaxBodyBytes is the default limit on request bodies.
const MaxBodyBytes = 1 << 20

// Validator is implemented by every request type.
type Validator interface{ Validate() error }

// DecodeRequest reads exactly one JSON value from r into v, rejecting
// unknown fields, trailing data and bodies over limit bytes, then validates
// v when it is a Validator. An empty body is accepted only when optional is
// true, and leaves v untouched. Errors are *Error with a 4xx status.
func DecodeRequest(r io.Reader, limit int64, v any, optional bool) error {
	lr := &limitedReader{r: r, n: limit}
	dec := json.NewDecoder(lr)
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		if lr.exceeded {
			return tooLarge(limit)
		}
		if errors.Is(err, io.EOF) {
			if optional {
				return nil
			}
			return invalid("request body is empty; want a JSON object")
		}
		return decodeError(err)
	}
	if err := dec.Decode(&json.RawMessage{}); !errors.Is(err, io.EOF) {
		if lr.exceeded {
			return tooLarge(limit)
		}
		return invalid("request body must hold a single JSON value")
	}
	if val, ok := v.(Validator); ok {
		if err := val.Validate(); err != nil {
			return invalid(err.Error())
		}
	}
	return nil
}

// limitedReader fails once more than n bytes were read, remembering that it
// did so the error can say "too large" rather than "malformed".
type limitedReader struct {
	r        io.Reader
	n        int64
	exceeded bool
}

func (l *limitedReader) Read(p []byte) (int, error) {
	if l.n < 0 {
		l.exceeded = true
		return 0, errBodyTooLarge
	}
	if int64(len(p)) > l.n+1 {
		p = p[:l.n+1]
	}
	n, err := l.r.Read(p)
	l.n -= int64(n)
	if l.n < 0 {
		l.exceeded = true
		return n, errBodyTooLarge
	}
	return n, err
}

var errBodyTooLarge = errors.New("request body too large")

func tooLarge(limit int64) *Error {
	return &Error{Status: http.StatusRequestEntityTooLarge, Code: CodeTooLarge,
		Message: fmt.Sprintf("request body larger than %d bytes", limit)}
}

func invalid(msg string) *Error {
	return &Error{Status: http.StatusBadRequest, Code: CodeInvalidArgument, Message: msg}
}

func decodeError(err error) *Error {
	var syntax *json.SyntaxError
	var typ *json.UnmarshalTypeError
	switch {
	case errors.As(err, &syntax):
		return invalid(fmt.Sprintf("malformed JSON at byte %d: %s", syntax.Offset, strings.TrimPrefix(syntax.Error(), "json: ")))
	case errors.As(err, &typ):
		field := typ.Field
		if field == "" {
			return invalid(fmt.Sprintf("request body must be a JSON object, got %s", typ.Value))
		}
		if typ.Type == durationType {
			return invalid(fmt.Sprintf("invalid %s: got %s, want a duration string such as \"30s\"", field, typ.Value))
		}
		return invalid(fmt.Sprintf("invalid %s: got %s, want %s", field, typ.Value, jsonKind(typ.Type.Kind().String())))
	case errors.As(err, new(base64.CorruptInputError)):
		// The decoder does not say which field; stdin is the only binary one.
		return invalid("invalid stdin: not valid base64 (" + err.Error() + ")")
	case errors.Is(err, io.ErrUnexpectedEOF):
		return invalid("malformed JSON: body ends in the middle of a value")
	}
	msg := strings.TrimPrefix(err.Error(), "json: ")
	if strings.HasPrefix(msg, "unknown field ") {
		return invalid("unknown field " + strings.TrimPrefix(msg, "unknown field "))
	}
	return invalid("malformed request: " + msg)
}

func jsonKind(goKind string) string {
	switch goKind {
	case "int", "int64", "int32", "uint64", "uint", "uint32", "float64":
		return "number"
	case "slice":
		return "array"
	case "struct", "map":
		return "object"
	case "bool":
		return "boolean"
	}
	return goKind
}

// validateName turns a bad path segment into a 400 naming it.
func validateName(field, name string) *Error {
	if err := vm.ValidateName(field, name); err != nil {
		return invalid(err.Error())
	}
	return nil
}
