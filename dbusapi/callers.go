package dbusapi

import (
	"bytes"
	"fmt"
	"log/slog"
	"os"
	"strings"

	godbus "github.com/godbus/dbus/v5"
)

// callers learns who is calling (pid, command line) and when a caller's
// connection leaves the bus (NameOwnerChanged with no new owner), so that
// its sessions are closed at once.
type callers struct {
	conn *godbus.Conn
	log  *slog.Logger
	ch   chan *godbus.Signal
	done chan struct{}
}

func newCallers(conn *godbus.Conn, log *slog.Logger) *callers {
	return &callers{conn: conn, log: log}
}

// start subscribes to NameOwnerChanged; gone is called, in order, with each
// unique name that left the bus, and owned when this connection gains
// (NameAcquired) or loses (NameLost) a well-known name.
func (c *callers) start(gone func(name string), owned func(name string, acquired bool)) error {
	if err := c.conn.AddMatchSignal(
		godbus.WithMatchSender("org.freedesktop.DBus"),
		godbus.WithMatchInterface("org.freedesktop.DBus"),
		godbus.WithMatchMember("NameOwnerChanged"),
	); err != nil {
		return fmt.Errorf("watching callers: %w", err)
	}
	c.ch = make(chan *godbus.Signal, 64)
	c.done = make(chan struct{})
	c.conn.Signal(c.ch)
	go func() {
		defer close(c.done)
		for sig := range c.ch {
			if sig.Name == "org.freedesktop.DBus.NameAcquired" || sig.Name == "org.freedesktop.DBus.NameLost" {
				if len(sig.Body) != 1 || owned == nil {
					continue
				}
				if name, ok := sig.Body[0].(string); ok {
					owned(name, sig.Name == "org.freedesktop.DBus.NameAcquired")
				}
				continue
			}
			if sig.Name != "org.freedesktop.DBus.NameOwnerChanged" || len(sig.Body) != 3 {
				continue
			}
			name, _ := sig.Body[0].(string)
			newOwner, _ := sig.Body[2].(string)
			if strings.HasPrefix(name, ":") && newOwner == "" {
				gone(name)
			}
		}
	}()
	return nil
}

func (c *callers) stop() {
	if c.ch == nil {
		return
	}
	c.conn.RemoveSignal(c.ch)
	close(c.ch)
	<-c.done
}

// pid asks the bus for the process id behind a unique name (0 if unknown).
func (c *callers) pid(name string) uint32 {
	var pid uint32
	if err := c.conn.BusObject().Call("org.freedesktop.DBus.GetConnectionUnixProcessID", 0, name).Store(&pid); err != nil {
		return 0
	}
	return pid
}

// describe names a caller for people: unique name, pid and command line.
func describeCaller(name string, pid uint32) string {
	if pid == 0 {
		return name
	}
	cmd := "?"
	if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid)); err == nil {
		cmd = strings.TrimSpace(string(bytes.ReplaceAll(bytes.TrimRight(b, "\x00"), []byte{0}, []byte{' '})))
	}
	return fmt.Sprintf("%s (pid %d, %s)", name, pid, cmd)
}
