package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"os"
	"os/signal"
	"reflect"
	"strings"
	"syscall"
	"time"

	godbus "github.com/godbus/dbus/v5"
	"github.com/spf13/cobra"

	"github.com/slotwatch/slotwatch/dbusapi"
)

const (
	sigNameOwnerChanged  = "org.freedesktop.DBus.NameOwnerChanged"
	sigInterfacesAdded   = "org.freedesktop.DBus.ObjectManager.InterfacesAdded"
	sigInterfacesRemoved = "org.freedesktop.DBus.ObjectManager.InterfacesRemoved"
	sigPropertiesChanged = "org.freedesktop.DBus.Properties.PropertiesChanged"
	sigTokenInserted     = dbusapi.ManagerInterface + ".TokenInserted"
	sigTokenRemoved      = dbusapi.ManagerInterface + ".TokenRemoved"
)

// Event names of `slotwatch monitor --json` (the "event" key).
const (
	evState          = "state" // the first line: the whole view
	evTokenInserted  = "token_inserted"
	evTokenRemoved   = "token_removed"
	evTokenChanged   = "token_changed"
	evReaderAdded    = "reader_added"
	evReaderRemoved  = "reader_removed"
	evReaderChanged  = "reader_changed"
	evSlotAdded      = "slot_added"
	evSlotRemoved    = "slot_removed"
	evModuleAdded    = "module_added"
	evModuleRemoved  = "module_removed"
	evModuleChanged  = "module_changed"
	evManagerState   = "manager_state"
	evSessionOpened  = "session_opened"
	evSessionClosed  = "session_closed"
	evSessionChanged = "session_changed"
	evDaemonLeft     = "daemon_left"
)

// monitorEvent is one line of `slotwatch monitor`.
type monitorEvent struct {
	Time  time.Time
	Event string

	Snapshot *listing // evState
	Address  string   // evState

	Token   *tokenInfo   // token_*
	Reader  *readerInfo  // reader_*
	Slot    *slotInfo    // slot_*
	Module  *moduleInfo  // module_*
	Session *sessionInfo // session_*
	Manager *managerInfo // manager_state

	Owner string // daemon_left: the unique name that left
}

// fields are the JSON object of the event: "time" and "event", then the
// keys of its kind, always all of them.
func (e monitorEvent) fields() map[string]any {
	f := map[string]any{"time": e.Time.Format(time.RFC3339Nano), "event": e.Event}
	switch {
	case e.Snapshot != nil:
		f["address"] = e.Address
		f["snapshot"] = e.Snapshot
	case e.Token != nil:
		t := e.Token
		f["token"], f["generation"], f["slot"] = t.Path, t.Generation, t.Slot
		f["label"], f["serial"], f["module"], f["slot_id"], f["reader"] = t.Label, t.Serial, t.Module, t.SlotID, t.Reader
		if e.Event == evTokenChanged {
			f["flags"] = t.Flags
		}
	case e.Reader != nil:
		r := e.Reader
		f["reader"], f["path"], f["state"], f["state_code"], f["event_count"], f["atr"] = r.Name, r.Path, r.State, r.StateCode, r.EventCount, r.ATR
	case e.Slot != nil:
		s := e.Slot
		f["slot"], f["module"], f["slot_id"], f["description"], f["reader"] = s.Path, s.Module, s.SlotID, s.Description, s.Reader
	case e.Module != nil:
		m := e.Module
		f["module"], f["path"], f["library"], f["state"], f["state_code"], f["wait_mode"] = m.Name, m.Path, m.Library, m.State, m.StateCode, m.WaitMode
		f["released"] = m.Released
	case e.Session != nil:
		s := e.Session
		f["session"], f["token"], f["generation"], f["label"] = s.Path, s.Token, s.Generation, s.TokenLabel
		f["owner"], f["owner_pid"], f["command"], f["read_write"], f["state"], f["state_code"] = s.Owner, s.OwnerPid, s.Command, s.ReadWrite, s.State, s.StateCode
	case e.Manager != nil:
		f["state"], f["state_code"], f["state_reason"] = e.Manager.State, e.Manager.StateCode, e.Manager.StateReason
	case e.Event == evDaemonLeft:
		f["owner"] = e.Owner
	}
	return f
}

// text is the event for people: one line each, with a timestamp, like
// pcsc_scan (the first event, the current state, is several lines).
func (e monitorEvent) text() string {
	ts := e.Time.Format("15:04:05.000")
	line := func(format string, args ...any) string {
		return ts + " " + fmt.Sprintf(format, args...) + "\n"
	}
	what := strings.ReplaceAll(e.Event, "_", " ")
	switch {
	case e.Snapshot != nil:
		return snapshotText(ts, e.Snapshot, e.Address)
	case e.Token != nil:
		if e.Event == evTokenChanged {
			return line("%-15s %s  flags 0x%x  (%s)", what, tokenText(e.Token), e.Token.Flags, e.Token.Path)
		}
		return line("%-15s %s  (%s)", what, tokenText(e.Token), e.Token.Path)
	case e.Reader != nil:
		return line("%-15s %s", what, readerText(e.Reader))
	case e.Slot != nil:
		return line("%-15s %s", what, slotText(e.Slot))
	case e.Module != nil:
		return line("%-15s %s", what, moduleText(e.Module))
	case e.Session != nil:
		return line("%-15s %s", what, sessionText(e.Session))
	case e.Manager != nil:
		return line("%-15s %s", "daemon state", managerStateText(e.Manager))
	case e.Event == evDaemonLeft:
		return line("daemon left the bus (was %s)", e.Owner)
	}
	return line("%s", what)
}

func snapshotText(ts string, l *listing, address string) string {
	var b strings.Builder
	line := func(format string, args ...any) {
		b.WriteString(ts + " " + fmt.Sprintf(format, args...) + "\n")
	}
	line("slotwatch %s on %s: %s, last generation %d", orDash(l.Manager.Version), address, managerStateText(&l.Manager), l.Manager.LastGeneration)
	for i := range l.Modules {
		line("%-15s %s", "module", moduleText(&l.Modules[i]))
	}
	for i := range l.Readers {
		line("%-15s %s", "reader", readerText(&l.Readers[i]))
	}
	for i := range l.Tokens {
		line("%-15s %s  (%s)", "token present", tokenText(&l.Tokens[i]), l.Tokens[i].Path)
	}
	for i := range l.Sessions {
		line("%-15s %s", "session open", sessionText(&l.Sessions[i]))
	}
	line("waiting for events (Ctrl-C to stop)")
	return b.String()
}

func managerStateText(m *managerInfo) string {
	if m.StateReason != "" {
		return m.State + ": " + m.StateReason
	}
	return m.State
}

func tokenText(t *tokenInfo) string {
	s := fmt.Sprintf("generation %d", t.Generation)
	if t.Label != "" || t.Serial != "" {
		s += fmt.Sprintf("  %s  serial %s", quoted(t.Label), orDash(t.Serial))
	}
	if t.Reader != "" {
		s += "  reader " + quoted(t.Reader)
	}
	if t.Module != "" {
		s += "  slot " + slotName(t.Module, t.SlotID)
	}
	return s
}

func readerText(r *readerInfo) string {
	return fmt.Sprintf("%s  %s  events %d", quoted(r.Name), r.State, r.EventCount)
}

func slotText(s *slotInfo) string {
	t := fmt.Sprintf("%s  %s", slotName(s.Module, s.SlotID), quoted(s.Description))
	if s.Reader != "" {
		t += "  reader " + quoted(s.Reader)
	}
	return t
}

func moduleText(m *moduleInfo) string {
	state := m.State
	if m.Released {
		state += " (released)"
	}
	return fmt.Sprintf("%s  %s  %s  %s", m.Name, state, m.WaitMode, orDash(m.Library))
}

func sessionText(s *sessionInfo) string {
	mode := "read-only"
	if s.ReadWrite {
		mode = "read-write"
	}
	t := fmt.Sprintf("%s  on %s (generation %d)  %s  %s  owner %s", s.Path, quoted(s.TokenLabel), s.Generation, mode, s.State, orDash(s.Owner))
	if s.OwnerPid != 0 {
		t += fmt.Sprintf(" pid %d", s.OwnerPid)
	}
	if s.Command != "" {
		t += " (" + s.Command + ")"
	}
	return t
}

// watcher follows the daemon's signals and turns them into events. It
// keeps the objects it saw (also removed ones, until the last signal that
// names them), so that a removal can say what was removed. Not safe for
// concurrent use: one goroutine feeds it the signals in order.
type watcher struct {
	objs    managedObjects
	mgr     map[string]godbus.Variant
	gone    managedObjects               // removed objects, until TokenRemoved (tokens) or for good
	shown   map[uint64]bool              // generations already shown as present or inserted
	cmdline func(uint32) string          // nil: no command lines
	cmds    map[godbus.ObjectPath]string // sessionCommand's memory
}

func newWatcher(objs managedObjects, mgr map[string]godbus.Variant, cmdline func(uint32) string) *watcher {
	w := &watcher{objs: managedObjects{}, mgr: map[string]godbus.Variant{}, gone: managedObjects{}, shown: map[uint64]bool{}, cmdline: cmdline, cmds: map[godbus.ObjectPath]string{}}
	for p, ifaces := range objs {
		w.objs[p] = cloneIfaces(ifaces)
		if t, ok := ifaces[dbusapi.TokenInterface]; ok {
			w.shown[propUint64(t, "Generation")] = true
		}
	}
	maps.Copy(w.mgr, mgr)
	return w
}

func cloneIfaces(in map[string]map[string]godbus.Variant) map[string]map[string]godbus.Variant {
	out := make(map[string]map[string]godbus.Variant, len(in))
	for name, props := range in {
		out[name] = maps.Clone(props)
	}
	return out
}

// snapshot is the current view as a listing.
func (w *watcher) snapshot() *listing {
	l := buildListing(w.objs, w.mgr, nil)
	for i := range l.Sessions {
		l.Sessions[i].Command = w.sessionCommand(godbus.ObjectPath(l.Sessions[i].Path), l.Sessions[i].OwnerPid)
	}
	return l
}

// sessionCommand is the command line of a session's owner, read once per
// session: when the session is closed, its process may be gone.
func (w *watcher) sessionCommand(path godbus.ObjectPath, pid uint32) string {
	if cmd, ok := w.cmds[path]; ok {
		return cmd
	}
	cmd := ""
	if w.cmdline != nil {
		cmd = w.cmdline(pid)
	}
	w.cmds[path] = cmd
	return cmd
}

// view is every object seen, live or removed, to look up what a signal
// names (the slot and reader of a removed token, the token of a closed
// session).
func (w *watcher) view() managedObjects {
	v := make(managedObjects, len(w.objs)+len(w.gone))
	maps.Copy(v, w.gone)
	maps.Copy(v, w.objs)
	return v
}

// handle turns one signal into zero or more events. A signal about what
// the first snapshot already showed (sent while it was read) is dropped.
func (w *watcher) handle(sig *godbus.Signal, now time.Time) []monitorEvent {
	ev := func(name string) monitorEvent { return monitorEvent{Time: now, Event: name} }
	switch sig.Name {
	case sigNameOwnerChanged:
		var name, oldOwner, newOwner string
		if godbus.Store(sig.Body, &name, &oldOwner, &newOwner) != nil || name != dbusapi.BusName {
			return nil
		}
		if newOwner == "" {
			e := ev(evDaemonLeft)
			e.Owner = oldOwner
			return []monitorEvent{e}
		}
		return nil

	case sigInterfacesAdded:
		var path godbus.ObjectPath
		var ifaces map[string]map[string]godbus.Variant
		if godbus.Store(sig.Body, &path, &ifaces) != nil {
			return nil
		}
		if known, ok := w.objs[path]; ok {
			maps.Copy(known, cloneIfaces(ifaces))
			return nil
		}
		w.objs[path] = cloneIfaces(ifaces)
		delete(w.gone, path)
		return w.objectEvents(ev, path, "added")

	case sigInterfacesRemoved:
		var path godbus.ObjectPath
		var names []string
		if godbus.Store(sig.Body, &path, &names) != nil {
			return nil
		}
		if _, ok := w.objs[path]; !ok {
			return nil // never seen: removed before the first snapshot
		}
		events := w.objectEvents(ev, path, "removed")
		if _, isSession := w.objs[path][dbusapi.SessionInterface]; !isSession {
			// Sessions are never named again (their numbers are not
			// reused); the rest may be, by TokenRemoved.
			w.gone[path] = w.objs[path]
		}
		delete(w.objs, path)
		return events

	case sigTokenInserted, sigTokenRemoved:
		var tok, slot godbus.ObjectPath
		var gen uint64
		if godbus.Store(sig.Body, &tok, &slot, &gen) != nil {
			return nil
		}
		name := evTokenInserted
		if sig.Name == sigTokenRemoved {
			name = evTokenRemoved
			delete(w.shown, gen) // generations are never reused
		} else if w.shown[gen] {
			return nil
		} else {
			w.shown[gen] = true
		}
		v := w.view()
		var t tokenInfo
		if props, ok := v[tok][dbusapi.TokenInterface]; ok {
			t = tokenFrom(v, tok, props)
		} else {
			// Never saw the object: say what the signal says.
			props := map[string]godbus.Variant{"Generation": godbus.MakeVariant(gen), "Slot": godbus.MakeVariant(slot)}
			t = tokenFrom(v, tok, props)
		}
		t.Generation = gen
		if sig.Name == sigTokenRemoved {
			delete(w.gone, tok)
		}
		e := ev(name)
		e.Token = &t
		return []monitorEvent{e}

	case sigPropertiesChanged:
		var iface string
		var changed map[string]godbus.Variant
		var invalidated []string
		if godbus.Store(sig.Body, &iface, &changed, &invalidated) != nil {
			return nil
		}
		if sig.Path == dbusapi.RootPath && iface == dbusapi.ManagerInterface {
			before := managerStateText(&managerInfo{State: managerStateName(propUint32(w.mgr, "State")), StateReason: propString(w.mgr, "StateReason")})
			maps.Copy(w.mgr, changed)
			m := buildListing(nil, w.mgr, nil).Manager
			if managerStateText(&m) == before {
				return nil
			}
			e := ev(evManagerState)
			e.Manager = &m
			return []monitorEvent{e}
		}
		props, ok := w.objs[sig.Path][iface]
		if !ok {
			return nil
		}
		var interesting []string
		switch iface {
		case dbusapi.ReaderInterface:
			interesting = []string{"State", "EventCount"}
		case dbusapi.ModuleInterface:
			interesting = []string{"State", "WaitMode", "Released"}
		case dbusapi.TokenInterface:
			interesting = []string{"Flags"}
		case dbusapi.SessionInterface:
			interesting = []string{"State"}
		}
		news := false
		for _, name := range interesting {
			if v, ok := changed[name]; ok && !reflect.DeepEqual(v.Value(), props[name].Value()) {
				news = true
			}
		}
		maps.Copy(props, changed)
		if !news {
			return nil
		}
		return w.objectEvents(ev, sig.Path, "changed")
	}
	return nil
}

// objectEvents is the event of an object added, removed or changed
// (verb), by its interface. A token added or removed has none: the
// Manager's TokenInserted and TokenRemoved, which follow, are its events.
func (w *watcher) objectEvents(ev func(string) monitorEvent, path godbus.ObjectPath, verb string) []monitorEvent {
	ifaces := w.objs[path]
	v := w.view()
	var events []monitorEvent
	if p, ok := ifaces[dbusapi.ReaderInterface]; ok {
		r := readerFrom(path, p)
		e := ev("reader_" + verb)
		e.Reader = &r
		events = append(events, e)
	}
	if p, ok := ifaces[dbusapi.SlotInterface]; ok && verb != "changed" {
		s := slotFrom(v, path, p)
		e := ev("slot_" + verb)
		e.Slot = &s
		events = append(events, e)
	}
	if p, ok := ifaces[dbusapi.ModuleInterface]; ok {
		m := moduleFrom(path, p)
		e := ev("module_" + verb)
		e.Module = &m
		events = append(events, e)
	}
	if p, ok := ifaces[dbusapi.TokenInterface]; ok && verb == "changed" {
		t := tokenFrom(v, path, p)
		e := ev(evTokenChanged)
		e.Token = &t
		events = append(events, e)
	}
	if p, ok := ifaces[dbusapi.SessionInterface]; ok {
		s := sessionFrom(v, path, p, nil)
		s.Command = w.sessionCommand(path, s.OwnerPid)
		if verb == "removed" {
			delete(w.cmds, path)
		}
		name := map[string]string{"added": evSessionOpened, "removed": evSessionClosed, "changed": evSessionChanged}[verb]
		e := ev(name)
		e.Session = &s
		events = append(events, e)
	}
	return events
}

// writeEvent writes one event as text or as one line of JSON.
func writeEvent(w io.Writer, e monitorEvent, asJSON bool) error {
	if asJSON {
		b, err := json.Marshal(e.fields())
		if err != nil {
			return err
		}
		_, err = w.Write(append(b, '\n'))
		return err
	}
	_, err := io.WriteString(w, e.text())
	return err
}

// newMonitorCmd is `slotwatch monitor`; run is runMonitor (a test's own
// in tests).
func newMonitorCmd(run func(clientFlags) error) *cobra.Command {
	var cf clientFlags
	cmd := newClientCmd("monitor [--address BUS] [--json]", "print the daemon's events as they happen (a D-Bus client)", &cf, true)
	cmd.RunE = func(*cobra.Command, []string) error { return run(cf) }
	return cmd
}

func runMonitor(cf clientFlags) error {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	c, err := dialDaemon("monitor", cf.address)
	if err != nil {
		return err
	}
	defer c.close()
	return monitorLoop(ctx, c, os.Stdout, cf.json)
}

// monitorLoop subscribes to the daemon's signals, then prints the current
// state, then every event until ctx ends (nil) or the daemon leaves the bus
// (exit code 2).
func monitorLoop(ctx context.Context, c *client, out io.Writer, asJSON bool) error {
	ch := make(chan *godbus.Signal, 256)
	c.conn.Signal(ch)
	// Subscribe before reading the state, so nothing falls in between;
	// what the state already shows is dropped by the watcher.
	if err := c.conn.AddMatchSignal(godbus.WithMatchSender(dbusapi.BusName)); err != nil {
		return c.dbusError(err)
	}
	if err := c.conn.AddMatchSignal(
		godbus.WithMatchSender("org.freedesktop.DBus"),
		godbus.WithMatchInterface("org.freedesktop.DBus"),
		godbus.WithMatchMember("NameOwnerChanged"),
		godbus.WithMatchArg(0, dbusapi.BusName),
	); err != nil {
		return c.dbusError(err)
	}
	objs, mgr, err := c.fetch()
	if err != nil {
		return err
	}
	w := newWatcher(objs, mgr, commandLine)
	write := func(e monitorEvent) error {
		if err := writeEvent(out, e, asJSON); err != nil {
			return failure("monitor", "writing the output: %v", err)
		}
		return nil
	}
	if err := write(monitorEvent{Time: time.Now(), Event: evState, Snapshot: w.snapshot(), Address: c.address}); err != nil {
		return err
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case sig, ok := <-ch:
			if !ok {
				return failure("monitor", "lost the connection to the bus at %s", c.address)
			}
			for _, e := range w.handle(sig, time.Now()) {
				if err := write(e); err != nil {
					return err
				}
				if e.Event == evDaemonLeft {
					return &exitError{code: exitNotRunning, msg: fmt.Sprintf(
						"slotwatch monitor: the daemon left the bus at %s (%s lost its owner %s): it stopped or crashed", c.address, dbusapi.BusName, e.Owner)}
				}
			}
		}
	}
}
