package qmp

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// fakeQEMU serves one QMP client: it greets, accepts qmp_capabilities and
// answers commands through handle, which may also send events first.
func fakeQEMU(t *testing.T, handle func(w *json.Encoder, cmd map[string]any, fds []int)) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "qmp")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	path := filepath.Join(dir, "qmp.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		c, err := l.AcceptUnix()
		if err != nil {
			return
		}
		defer c.Close()
		w := json.NewEncoder(c)
		w.Encode(map[string]any{"QMP": map[string]any{"version": map[string]any{"qemu": map[string]int{"major": 7, "minor": 2, "micro": 22}}, "capabilities": []string{}}})
		for {
			buf := make([]byte, 4096)
			oob := make([]byte, 128)
			n, oobn, _, _, err := c.ReadMsgUnix(buf, oob)
			if err != nil || n == 0 {
				return
			}
			var fds []int
			if msgs, err := unix.ParseSocketControlMessage(oob[:oobn]); err == nil {
				for _, m := range msgs {
					f, _ := unix.ParseUnixRights(&m)
					fds = append(fds, f...)
				}
			}
			var cmd map[string]any
			if json.Unmarshal(buf[:n], &cmd) != nil {
				return
			}
			if cmd["execute"] == "qmp_capabilities" {
				w.Encode(map[string]any{"return": map[string]any{}, "id": cmd["id"]})
				continue
			}
			handle(w, cmd, fds)
		}
	}()
	return path
}

func TestExecuteEventsAndErrors(t *testing.T) {
	path := fakeQEMU(t, func(w *json.Encoder, cmd map[string]any, _ []int) {
		switch cmd["execute"] {
		case "query-status":
			w.Encode(map[string]any{"event": "STOP", "data": map[string]any{}, "timestamp": map[string]int{"seconds": 1, "microseconds": 2}})
			w.Encode(map[string]any{"return": map[string]any{"status": "paused", "running": false}, "id": cmd["id"]})
		case "hang":
		default:
			w.Encode(map[string]any{"error": map[string]any{"class": "CommandNotFound", "desc": "The command " + cmd["execute"].(string) + " has not been found"}, "id": cmd["id"]})
		}
	})
	ctx := context.Background()
	c, err := Dial(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	if v := c.Version().String(); v != "7.2.22" {
		t.Errorf("version %s, want 7.2.22", v)
	}
	events, stop := c.Subscribe()
	defer stop()
	var st struct{ Status string }
	if err := c.Execute(ctx, "query-status", nil, &st); err != nil || st.Status != "paused" {
		t.Fatalf("query-status = %+v, %v", st, err)
	}
	select {
	case ev := <-events:
		if ev.Name != "STOP" || ev.Time.Unix() != 1 {
			t.Errorf("event %+v, want STOP at 1s", ev)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no STOP event delivered")
	}
	var qe *Error
	if err := c.Execute(ctx, "nonsense", nil, nil); !errors.As(err, &qe) || qe.Class != "CommandNotFound" {
		t.Errorf("unknown command error = %v, want a CommandNotFound *Error", err)
	}
	short, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	if err := c.Execute(short, "hang", nil, nil); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("unanswered command = %v, want deadline exceeded", err)
	}
	c.Close()
	if err := c.Execute(ctx, "query-status", nil, nil); !errors.Is(err, ErrClosed) {
		t.Errorf("after Close = %v, want ErrClosed", err)
	}
	if _, ok := <-events; ok {
		t.Error("subscription still open after Close")
	}
}

func TestExecuteWithFilePassesDescriptor(t *testing.T) {
	got := make(chan string, 1)
	path := fakeQEMU(t, func(w *json.Encoder, cmd map[string]any, fds []int) {
		if len(fds) == 1 {
			f := os.NewFile(uintptr(fds[0]), "passed")
			f.Seek(0, 0)
			b := make([]byte, 64)
			n, _ := f.Read(b)
			f.Close()
			got <- string(b[:n])
		} else {
			got <- "no descriptor"
		}
		w.Encode(map[string]any{"return": map[string]any{}, "id": cmd["id"]})
	})
	c, err := Dial(context.Background(), path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	f, err := os.CreateTemp(t.TempDir(), "fd")
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString("through the socket")
	defer f.Close()
	if err := c.ExecuteWithFile(context.Background(), "getfd", map[string]any{"fdname": "x"}, nil, f); err != nil {
		t.Fatal(err)
	}
	if s := <-got; s != "through the socket" {
		t.Errorf("QEMU side read %q", s)
	}
}

func TestDialRejectsNonQMP(t *testing.T) {
	dir, _ := os.MkdirTemp("", "qmp")
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "s")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		c, err := l.Accept()
		if err == nil {
			c.Write([]byte("SSH-2.0-hello\n"))
			time.Sleep(time.Second)
			c.Close()
		}
	}()
	if _, err := Dial(context.Background(), path); err == nil {
		t.Fatal("Dial accepted a server that is not QMP")
	}
	// A server that never greets: Dial gives up with ctx.
	go func() {
		c, err := l.Accept()
		if err == nil {
			time.Sleep(2 * time.Second)
			c.Close()
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if _, err := Dial(ctx, path); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Dial to a silent server = %v, want deadline exceeded", err)
	}
}
