package qemu

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"net"
	"time"

	"github.com/warmpool/warmpool/agent/proto"
)

// agentShutdown asks the guest agent on conn to power off and returns once
// the agent acknowledged. It speaks the agent protocol itself: the agent
// client's package depends on vm's interfaces, which this package
// implements.
func agentShutdown(ctx context.Context, conn net.Conn) error {
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Now()) })
	defer stop()
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl)
	}
	var seed [8]byte
	_, _ = rand.Read(seed[:])
	// A random ID keeps a late answer meant for an earlier connection from
	// passing for ours.
	id := binary.LittleEndian.Uint64(seed[:]) >> 12
	req, err := proto.Encode(proto.Request{Version: proto.Version, ID: id, Op: proto.OpShutdown})
	if err != nil {
		return err
	}
	// The leading newline ends whatever fragment an earlier connection left
	// in the guest's buffer.
	if _, err := conn.Write(append([]byte{'\n'}, req...)); err != nil {
		return fmt.Errorf("send shutdown to the agent: %w", err)
	}
	r := proto.NewReader(conn)
	for {
		line, err := r.Next()
		if err != nil {
			return fmt.Errorf("wait for the agent to acknowledge shutdown: %w", err)
		}
		var resp proto.Response
		if json.Unmarshal(line, &resp) != nil || resp.ID != id || !resp.Final() {
			continue
		}
		if resp.Kind == proto.KindError {
			return fmt.Errorf("agent refused to shut down: %s (%s)", resp.Error, resp.Code)
		}
		return nil
	}
}
