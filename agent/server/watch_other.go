//go:build !linux

package server

import (
	"fmt"
	"runtime"

	"github.com/warmpool/warmpool/agent/proto"
)

// serveWatch needs inotify: the guest agent only runs in Linux guests.
func (s *session) serveWatch(st *stream, path string, recursive bool) error {
	return st.fail(&codedError{code: proto.CodeUnknownOp, err: fmt.Errorf("watch %s: not available on %s", path, runtime.GOOS)})
}
