package main

import (
	"embed"
	"io/fs"
)

// The flags match those guest.Build compiles the agent with from source, so
// both give the same bytes and the same image digest.
//go:generate env CGO_ENABLED=0 GOOS=linux GOARCH=amd64 go build -trimpath -buildvcs=false "-ldflags=-s -w" -o embedded/warmpool-agent ../warmpool-agent

//go:embed embedded
var embedded embed.FS

// embeddedAgent is the static guest agent built with this binary, or nil
// when it was built without one (a plain `go build` or `go install`), in
// which case image builds compile the agent themselves.
func embeddedAgent() []byte {
	b, err := fs.ReadFile(embedded, "embedded/warmpool-agent")
	if err != nil {
		return nil
	}
	return b
}
