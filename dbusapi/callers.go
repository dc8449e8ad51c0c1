package dbusapi

import (
	"fmt"
	"log/slog"
	"strings"
	"sync"

	godbus "github.com/godbus/dbus/v5"

	"github.com/slotwatch/slotwatch/broker"
)

// The bus driver, the only sender whose word on who left counts.
const (
	busDriverName = "org.freedesktop.DBus"
	busDriverPath = godbus.ObjectPath("/org/freedesktop/DBus")
)

// callers decides who a bus caller is, at the boundary: the first call of
// a connection looks its credentials up once (uid and pid from the bus,
// command line and start time from /proc) and joins it to the broker; when
// the bus driver says the connection left, the broker closes its sessions.
//
// Every client can send a signal to slotwatch's unique name, and a unicast
// signal reaches slotwatch whatever its match rules say: so a departure
// counts only if the bus driver sent it (sender org.freedesktop.DBus, path
// /org/freedesktop/DBus — the bus sets the sender, a client cannot forge
// it), and only once NameHasOwner confirms the name is gone.
type callers struct {
	conn *godbus.Conn
	br   *broker.Broker
	log  *slog.Logger

	mu    sync.Mutex // guards known
	known map[string]broker.Caller

	ch      chan *godbus.Signal
	done    chan struct{}
	leaving sync.WaitGroup // departures being applied
}

func newCallers(conn *godbus.Conn, br *broker.Broker, log *slog.Logger) *callers {
	return &callers{conn: conn, br: br, log: log, known: map[string]broker.Caller{}}
}

// caller returns the broker's Caller for a bus unique name, joining it on
// its first call.
func (c *callers) caller(sender string) (broker.Caller, error) {
	c.mu.Lock()
	known, ok := c.known[sender]
	c.mu.Unlock()
	if ok {
		return known, nil
	}
	if !strings.HasPrefix(sender, ":") {
		return broker.Caller{}, accessDenied("no caller identity (sender %q)", sender)
	}
	uid, pid, err := c.credentials(sender)
	if err != nil {
		return broker.Caller{}, accessDenied("caller %s: %v", sender, err)
	}
	who := broker.ProcessCaller(sender, uid, pid)
	c.br.Join(who)
	c.mu.Lock()
	c.known[sender] = who
	c.mu.Unlock()
	// A caller that left before it joined was seen by nobody: ask.
	if !c.nameHasOwner(sender) {
		c.leave(sender)
		return broker.Caller{}, accessDenied("caller %s left the bus", sender)
	}
	return who, nil
}

// credentials asks the bus for a connection's uid and pid.
func (c *callers) credentials(name string) (uid, pid uint32, err error) {
	var creds map[string]godbus.Variant
	if err := c.conn.BusObject().Call(busDriverName+".GetConnectionCredentials", 0, name).Store(&creds); err != nil {
		return 0, 0, err
	}
	u, ok := creds["UnixUserID"].Value().(uint32)
	if !ok {
		return 0, 0, fmt.Errorf("the bus knows no uid for %s", name)
	}
	p, _ := creds["ProcessID"].Value().(uint32)
	return u, p, nil
}

func (c *callers) nameHasOwner(name string) bool {
	var has bool
	if err := c.conn.BusObject().Call(busDriverName+".NameHasOwner", 0, name).Store(&has); err != nil {
		return true // the bus did not answer: leave it to NameOwnerChanged
	}
	return has
}

// pid is the process id behind a unique name (0 if unknown), for names
// that are not callers (the owner of the GNOME name).
func (c *callers) pid(name string) uint32 {
	_, pid, err := c.credentials(name)
	if err != nil {
		return 0
	}
	return pid
}

// leave forgets a caller and has the broker close its sessions.
func (c *callers) leave(name string) {
	c.mu.Lock()
	delete(c.known, name)
	c.mu.Unlock()
	c.br.Leave(name)
}

// start follows the bus driver's signals: departures of unique names, and
// owned called when this connection gains (NameAcquired) or loses
// (NameLost) a well-known name.
func (c *callers) start(owned func(name string, acquired bool)) error {
	if err := c.conn.AddMatchSignal(
		godbus.WithMatchSender(busDriverName),
		godbus.WithMatchInterface(busDriverName),
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
			c.handle(sig, owned)
		}
	}()
	return nil
}

func (c *callers) handle(sig *godbus.Signal, owned func(string, bool)) {
	if sig.Sender != busDriverName || sig.Path != busDriverPath {
		return // anyone can send a signal to us; only the bus's count
	}
	switch sig.Name {
	case busDriverName + ".NameAcquired", busDriverName + ".NameLost":
		if name, ok := oneString(sig.Body); ok && owned != nil {
			owned(name, sig.Name == busDriverName+".NameAcquired")
		}
	case busDriverName + ".NameOwnerChanged":
		if len(sig.Body) != 3 {
			return
		}
		name, _ := sig.Body[0].(string)
		newOwner, _ := sig.Body[2].(string)
		if !strings.HasPrefix(name, ":") || newOwner != "" {
			return
		}
		c.leaving.Add(1)
		// The broker may wait for a token lock (a caller's slow login)
		// before it can close a session: no departure waits for another.
		go func() {
			defer c.leaving.Done()
			if c.nameHasOwner(name) {
				c.log.Warn("the bus said a caller left, but its name still has an owner; keeping its sessions", "caller", name)
				return
			}
			c.leave(name)
		}()
	}
}

func oneString(body []any) (string, bool) {
	if len(body) != 1 {
		return "", false
	}
	s, ok := body[0].(string)
	return s, ok
}

func (c *callers) stop() {
	if c.ch == nil {
		return
	}
	c.conn.RemoveSignal(c.ch)
	close(c.ch)
	<-c.done
	c.leaving.Wait()
}

// describeName names any bus connection for people (the owner of a name).
func (c *callers) describeName(name string) string {
	return broker.ProcessCaller(name, 0, c.pid(name)).String()
}
