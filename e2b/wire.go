package e2b

import (
	"encoding/json"
	"fmt"
	"strconv"
	"time"
)

// The types below are E2B's wire format, written from its public API
// descriptions (the REST API's openapi.yml and envd's process.proto and
// filesystem.proto, both Apache-2.0): only the JSON field names and shapes
// must match. envd messages travel as protobuf JSON (the SDK's Connect
// transport uses it): lowerCamelCase names, oneofs as one set field,
// int64 as strings, bytes as base64, enums by name or number.

// apiError is the body of every REST error: the SDK reads code and message.
type apiError struct {
	Code    int    `json:"code"`
	Message string `json:"message"`
}

// newSandbox is the body of POST /sandboxes (and /v2/sandboxes).
type newSandbox struct {
	TemplateID string            `json:"templateID"`
	Timeout    *int              `json:"timeout,omitempty"` // seconds
	Metadata   map[string]string `json:"metadata,omitempty"`
	EnvVars    map[string]string `json:"envVars,omitempty"`
	AutoPause  *bool             `json:"autoPause,omitempty"`
	// Secure asks for an envd access token; warmpool always issues one.
	Secure *bool `json:"secure,omitempty"`
}

// sandbox answers a create or a connect.
type sandbox struct {
	TemplateID      string `json:"templateID"`
	SandboxID       string `json:"sandboxID"`
	ClientID        string `json:"clientID"`
	EnvdVersion     string `json:"envdVersion"`
	EnvdAccessToken string `json:"envdAccessToken,omitempty"`
	Alias           string `json:"alias,omitempty"`
}

// sandboxDetail answers GET /sandboxes/{id}; listedSandbox is one entry of
// GET /sandboxes and /v2/sandboxes. They share their fields.
type sandboxDetail struct {
	TemplateID      string            `json:"templateID"`
	Alias           string            `json:"alias,omitempty"`
	SandboxID       string            `json:"sandboxID"`
	ClientID        string            `json:"clientID"`
	StartedAt       time.Time         `json:"startedAt"`
	EndAt           time.Time         `json:"endAt"`
	EnvdVersion     string            `json:"envdVersion"`
	EnvdAccessToken string            `json:"envdAccessToken,omitempty"`
	CPUCount        int               `json:"cpuCount"`
	MemoryMB        int               `json:"memoryMB"`
	DiskSizeMB      int               `json:"diskSizeMB"`
	Metadata        map[string]string `json:"metadata"`
	State           string            `json:"state"`
	VolumeMounts    []any             `json:"volumeMounts"`
}

// timeoutRequest is the body of POST /sandboxes/{id}/timeout.
type timeoutRequest struct {
	Timeout int `json:"timeout"` // seconds
}

// connectRequest is the optional body of POST /sandboxes/{id}/connect.
type connectRequest struct {
	Timeout *int `json:"timeout,omitempty"`
}

// envd: process.Process.

type processConfig struct {
	Cmd  string            `json:"cmd"`
	Args []string          `json:"args,omitempty"`
	Envs map[string]string `json:"envs,omitempty"`
	Cwd  *string           `json:"cwd,omitempty"`
}

type ptySize struct {
	Cols uint32 `json:"cols"`
	Rows uint32 `json:"rows"`
}

type pty struct {
	Size *ptySize `json:"size,omitempty"`
}

type startRequest struct {
	Process *processConfig `json:"process"`
	PTY     *pty           `json:"pty,omitempty"`
	Tag     *string        `json:"tag,omitempty"`
	Stdin   *bool          `json:"stdin,omitempty"`
}

type processSelector struct {
	PID *uint32 `json:"pid,omitempty"`
	Tag *string `json:"tag,omitempty"`
}

type processEvent struct {
	Start     *startEvent `json:"start,omitempty"`
	Data      *dataEvent  `json:"data,omitempty"`
	End       *endEvent   `json:"end,omitempty"`
	Keepalive *struct{}   `json:"keepalive,omitempty"`
}

type startEvent struct {
	PID uint32 `json:"pid"`
}

type dataEvent struct {
	Stdout []byte `json:"stdout,omitempty"`
	Stderr []byte `json:"stderr,omitempty"`
	PTY    []byte `json:"pty,omitempty"`
}

type endEvent struct {
	ExitCode int32   `json:"exitCode"`
	Exited   bool    `json:"exited"`
	Status   string  `json:"status"`
	Error    *string `json:"error,omitempty"`
}

// processStream is StartResponse and ConnectResponse alike.
type processStream struct {
	Event processEvent `json:"event"`
}

type connectProcessRequest struct {
	Process processSelector `json:"process"`
}

type listRequest struct{}

type processInfo struct {
	Config processConfig `json:"config"`
	PID    uint32        `json:"pid"`
	Tag    *string       `json:"tag,omitempty"`
}

type listResponse struct {
	Processes []processInfo `json:"processes"`
}

type processInput struct {
	Stdin []byte `json:"stdin,omitempty"`
	PTY   []byte `json:"pty,omitempty"`
}

type sendInputRequest struct {
	Process processSelector `json:"process"`
	Input   *processInput   `json:"input,omitempty"`
}

type streamInputRequest struct {
	Start *struct {
		Process processSelector `json:"process"`
	} `json:"start,omitempty"`
	Data *struct {
		Input *processInput `json:"input,omitempty"`
	} `json:"data,omitempty"`
	Keepalive *struct{} `json:"keepalive,omitempty"`
}

type sendSignalRequest struct {
	Process processSelector `json:"process"`
	Signal  signal          `json:"signal"`
}

type closeStdinRequest struct {
	Process processSelector `json:"process"`
}

type updateRequest struct {
	Process processSelector `json:"process"`
	PTY     *pty            `json:"pty,omitempty"`
}

type empty struct{}

// signal is process.Signal: SIGNAL_SIGTERM (15) or SIGNAL_SIGKILL (9).
type signal int32

func (s *signal) UnmarshalJSON(b []byte) error {
	return unmarshalEnum(b, (*int32)(s), map[string]int32{"SIGNAL_UNSPECIFIED": 0, "SIGNAL_SIGTERM": 15, "SIGNAL_SIGKILL": 9})
}

// envd: filesystem.Filesystem.

// fileType is filesystem.FileType.
type fileType int32

const (
	fileTypeUnspecified fileType = 0
	fileTypeFile        fileType = 1
	fileTypeDirectory   fileType = 2
	fileTypeSymlink     fileType = 3
)

var fileTypeNames = map[string]int32{"FILE_TYPE_UNSPECIFIED": 0, "FILE_TYPE_FILE": 1, "FILE_TYPE_DIRECTORY": 2, "FILE_TYPE_SYMLINK": 3}

func (t fileType) MarshalJSON() ([]byte, error) {
	for name, v := range fileTypeNames {
		if v == int32(t) {
			return json.Marshal(name)
		}
	}
	return json.Marshal(int32(t))
}

func (t *fileType) UnmarshalJSON(b []byte) error {
	return unmarshalEnum(b, (*int32)(t), fileTypeNames)
}

func unmarshalEnum(b []byte, dst *int32, names map[string]int32) error {
	var name string
	if err := json.Unmarshal(b, &name); err == nil {
		v, ok := names[name]
		if !ok {
			return fmt.Errorf("unknown enum value %q", name)
		}
		*dst = v
		return nil
	}
	var n int32
	if err := json.Unmarshal(b, &n); err != nil {
		return fmt.Errorf("enum: want a name or a number, got %s", b)
	}
	*dst = n
	return nil
}

// int64String is a protobuf JSON int64: a string on the wire, a number
// accepted too.
type int64String int64

func (n int64String) MarshalJSON() ([]byte, error) {
	return json.Marshal(strconv.FormatInt(int64(n), 10))
}

func (n *int64String) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err == nil {
		v, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			return err
		}
		*n = int64String(v)
		return nil
	}
	var v int64
	if err := json.Unmarshal(b, &v); err != nil {
		return err
	}
	*n = int64String(v)
	return nil
}

type entryInfo struct {
	Name          string      `json:"name"`
	Type          fileType    `json:"type"`
	Path          string      `json:"path"`
	Size          int64String `json:"size"`
	Mode          uint32      `json:"mode"`
	Permissions   string      `json:"permissions"`
	Owner         string      `json:"owner"`
	Group         string      `json:"group"`
	ModifiedTime  *time.Time  `json:"modifiedTime,omitempty"`
	SymlinkTarget *string     `json:"symlinkTarget,omitempty"`
}

type pathRequest struct {
	Path string `json:"path"`
}

type listDirRequest struct {
	Path  string `json:"path"`
	Depth uint32 `json:"depth"`
}

type moveRequest struct {
	Source      string `json:"source"`
	Destination string `json:"destination"`
}

type entryResponse struct {
	Entry *entryInfo `json:"entry"`
}

type listDirResponse struct {
	Entries []entryInfo `json:"entries"`
}

// writeInfo is one entry of the answer to POST /files.
type writeInfo struct {
	Name string `json:"name"`
	Type string `json:"type"`
	Path string `json:"path"`
}

// envd: watching directories (WatchDir, and the polling CreateWatcher,
// GetWatcherEvents, RemoveWatcher).

// watchRequest is WatchDirRequest and CreateWatcherRequest alike.
type watchRequest struct {
	Path      string `json:"path"`
	Recursive bool   `json:"recursive,omitempty"`
	// IncludeEntry (envd 0.6.3) asks for each event's EntryInfo.
	IncludeEntry bool `json:"includeEntry,omitempty"`
	// AllowNetworkMounts (envd 0.6.4): warmpool watches any directory.
	AllowNetworkMounts bool `json:"allowNetworkMounts,omitempty"`
}

// eventType is filesystem.EventType.
type eventType int32

const (
	eventTypeUnspecified eventType = 0
	eventTypeCreate      eventType = 1
	eventTypeWrite       eventType = 2
	eventTypeRemove      eventType = 3
	eventTypeRename      eventType = 4
	eventTypeChmod       eventType = 5
)

var eventTypeNames = map[string]int32{"EVENT_TYPE_UNSPECIFIED": 0, "EVENT_TYPE_CREATE": 1, "EVENT_TYPE_WRITE": 2,
	"EVENT_TYPE_REMOVE": 3, "EVENT_TYPE_RENAME": 4, "EVENT_TYPE_CHMOD": 5}

func (t eventType) MarshalJSON() ([]byte, error) {
	for name, v := range eventTypeNames {
		if v == int32(t) {
			return json.Marshal(name)
		}
	}
	return json.Marshal(int32(t))
}

func (t *eventType) UnmarshalJSON(b []byte) error {
	return unmarshalEnum(b, (*int32)(t), eventTypeNames)
}

// filesystemEvent is one change; Name is relative to the watched
// directory.
type filesystemEvent struct {
	Name string    `json:"name"`
	Type eventType `json:"type"`
}

type watchDirResponse struct {
	Start      *struct{}        `json:"start,omitempty"`
	Filesystem *filesystemEvent `json:"filesystem,omitempty"`
	Keepalive  *struct{}        `json:"keepalive,omitempty"`
}

type createWatcherResponse struct {
	WatcherID string `json:"watcherId"`
}

// watcherRequest is GetWatcherEventsRequest and RemoveWatcherRequest.
type watcherRequest struct {
	WatcherID string `json:"watcherId"`
}

type getWatcherEventsResponse struct {
	Events []filesystemEvent `json:"events"`
}
