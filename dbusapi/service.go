package dbusapi

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log/slog"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	godbus "github.com/godbus/dbus/v5"

	"github.com/slotwatch/slotwatch/module"
	"github.com/slotwatch/slotwatch/monitor"
)

// Options tunes a Service.
type Options struct {
	Logger  *slog.Logger
	Version string
	// LoginTokenName is the label of the token the session logged in with
	// (PKCS11_LOGIN_TOKEN_NAME, as GNOME uses it); "" if none.
	LoginTokenName string
	// GenerationWait bounds how long a call waits for a removed token's
	// operations to drain before the slot's next token can be used; after
	// it the call fails with Busy. Default 5 s.
	GenerationWait time.Duration
	// Reload, if set, is what Manager.Reload runs: re-read the config and
	// the module list, apply it to the monitor, and return the modules now
	// watched and the snapshot that resulted. Nil: Reload only answers once
	// the current snapshot is on the bus.
	Reload func() (map[string]*module.Module, *monitor.Snapshot, error)
	// Gnome also serves the view as gnome-settings-daemon's smartcard
	// service (org.gnome.SettingsDaemon.Smartcard); see gnome.go.
	Gnome GnomeMode
}

// Service is slotwatch on the bus: it mirrors the monitor's snapshots as
// objects and serves the methods. Create with New, then Start.
type Service struct {
	conn *godbus.Conn
	mon  *monitor.Monitor
	opts Options

	modsMu  sync.RWMutex // guards modules; Reload replaces it
	modules map[string]*module.Module

	log   *slog.Logger
	objs  *objects
	gnome *gnome // nil unless Options.Gnome

	instanceID string
	sessions   *sessionTable
	logins     *loginTable
	callers    *callers

	sub     *monitor.Subscription
	applied sync.Mutex // held while an event is applied
	// appliedSeq is the snapshot sequence number whose events are all on
	// the bus; Reload waits for it to reach the reloaded snapshot.
	appliedSeq atomic.Uint64
	// lastSnap is the snapshot whose events are all on the bus, and
	// policyProblem what the removal policy last reported (SetPolicyProblem);
	// both make up the Manager's StateReason. Guarded by applied.
	lastSnap      *monitor.Snapshot
	policyProblem string
	gnomeOwned    atomic.Bool // this connection owns GnomeBusName
	done          chan struct{}
	closeMu       sync.Once
}

// New prepares a service on conn for the monitor's view. modules are the
// monitor's modules by name, for the session methods.
func New(conn *godbus.Conn, mon *monitor.Monitor, modules map[string]*module.Module, opts Options) *Service {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Version == "" {
		opts.Version = "0.1.0"
	}
	if opts.GenerationWait <= 0 {
		opts.GenerationWait = 5 * time.Second
	}
	id := make([]byte, 16)
	rand.Read(id)
	s := &Service{
		conn: conn, mon: mon, modules: modules, opts: opts, log: opts.Logger,
		objs:       newObjects(conn, RootPath),
		instanceID: hex.EncodeToString(id),
		done:       make(chan struct{}),
	}
	if opts.Gnome != GnomeOff {
		s.gnome = newGnome(s)
	}
	s.sessions = newSessionTable()
	s.logins = newLoginTable()
	s.callers = newCallers(conn, opts.Logger)
	return s
}

// Start exports every object of the current snapshot, then requests the bus
// name (so the name never appears before its objects), then follows the
// monitor. When it returns, the first snapshot is on the bus.
func (s *Service) Start() error {
	snap, sub := s.mon.Subscribe()
	s.sub = sub
	s.appliedSeq.Store(snap.Seq)
	s.lastSnap = snap
	if err := s.exportRoot(snap); err != nil {
		sub.Close()
		return err
	}
	if err := s.exportDispatch(); err != nil {
		sub.Close()
		return err
	}
	for i := range snap.Modules {
		s.addModule(&snap.Modules[i])
	}
	for i := range snap.Readers {
		s.addReader(&snap.Readers[i])
	}
	for i := range snap.Slots {
		s.addSlot(&snap.Slots[i])
	}
	for _, t := range snap.Tokens() {
		s.addToken(t)
	}
	if s.gnome != nil {
		if err := s.gnome.export(snap); err != nil {
			sub.Close()
			return fmt.Errorf("exporting the GNOME objects: %w", err)
		}
	}
	if err := s.callers.start(func(name string) { s.callerGone(name) }, s.nameChanged); err != nil {
		sub.Close()
		return err
	}
	reply, err := s.conn.RequestName(BusName, godbus.NameFlagDoNotQueue)
	if err != nil {
		sub.Close()
		return fmt.Errorf("requesting %s: %w", BusName, err)
	}
	if reply != godbus.RequestNameReplyPrimaryOwner {
		sub.Close()
		owner := s.nameOwner(BusName)
		if owner == "" {
			owner = "another connection"
		}
		return fmt.Errorf("%s is already owned by %s: is another slotwatch running?", BusName, owner)
	}
	if s.gnome != nil {
		s.requestGnomeName()
	}
	go s.follow()
	return nil
}

// Close stops following the monitor, closes every session slotwatch
// brokered, and releases the bus name. It does not close the connection or
// the monitor.
func (s *Service) Close() {
	s.closeMu.Do(func() {
		if s.sub == nil {
			return
		}
		s.sub.Close()
		<-s.done
		s.callers.stop()
		for _, sess := range s.sessions.all() {
			s.closeSession(sess, "slotwatch is stopping")
		}
		s.conn.ReleaseName(BusName)
		if s.gnome != nil {
			s.conn.ReleaseName(GnomeBusName)
		}
	})
}

// follow applies the monitor's events, in order, to the bus.
func (s *Service) follow() {
	defer close(s.done)
	for {
		ev, err := s.sub.Next(context.Background())
		if err != nil {
			return
		}
		s.applied.Lock()
		s.apply(ev)
		if s.gnome != nil {
			s.gnome.apply(ev)
		}
		s.lastSnap = ev.Snapshot
		s.applied.Unlock()
		s.appliedSeq.Store(ev.Snapshot.Seq)
	}
}

func (s *Service) apply(ev monitor.Event) {
	snap := ev.Snapshot
	switch ev.Kind {
	case monitor.TokenRemoved:
		s.removeToken(ev.Token)
	case monitor.TokenInserted:
		s.addToken(ev.Token)
	case monitor.TokenChanged:
		s.objs.set(tokenPath(ev.Token.Generation), TokenInterface, map[string]any{"Flags": uint32(ev.Token.Flags)})
	case monitor.SlotAdded:
		s.addSlot(ev.Slot)
	case monitor.SlotRemoved:
		s.objs.remove(slotPath(ev.Slot.Key))
	case monitor.SlotChanged:
		p := slotPath(ev.Slot.Key)
		s.objs.set(p, SlotInterface, map[string]any{
			"Description": ev.Slot.Description,
			"Reader":      readerPath(ev.Slot.Reader),
			"Removable":   ev.Slot.Removable,
		})
	case monitor.ReaderAdded:
		s.addReader(ev.Reader)
	case monitor.ReaderRemoved:
		s.objs.remove(readerPath(ev.Reader.Name))
	case monitor.ReaderChanged:
		s.objs.set(readerPath(ev.Reader.Name), ReaderInterface, readerProps(ev.Reader))
	case monitor.ModuleRemoved:
		s.objs.remove(modulePath(ev.Module.Name))
	case monitor.ModuleChanged:
		p := modulePath(ev.Module.Name)
		if !s.objs.has(p) {
			s.addModule(ev.Module)
		}
		s.objs.set(p, ModuleInterface, moduleProps(ev.Module))
	}
	s.objs.set(RootPath, ManagerInterface, s.managerProps(snap))
}

func (s *Service) exportRoot(snap *monitor.Snapshot) error {
	return s.objs.add(RootPath,
		iface{name: objectManagerInterface, methods: objectManager{s.objs}},
		iface{name: ManagerInterface, methods: &manager{s}, props: s.managerProps(snap)},
	)
}

func (s *Service) managerProps(snap *monitor.Snapshot) map[string]any {
	present := false
	for _, t := range snap.Tokens() {
		if s.usedForLogin(t) {
			present = true
		}
	}
	reason := snap.StateReason
	if s.policyProblem != "" {
		if reason != "" {
			reason += "; "
		}
		reason += s.policyProblem
	}
	return map[string]any{
		"Version":           s.opts.Version,
		"InstanceId":        s.instanceID,
		"State":             uint32(snap.State),
		"StateReason":       reason,
		"LastGeneration":    snap.LastGeneration,
		"LoginTokenPresent": present,
	}
}

func (s *Service) usedForLogin(t *monitor.Token) bool {
	return s.opts.LoginTokenName != "" && t.Label == s.opts.LoginTokenName
}

func moduleProps(m *monitor.ModuleView) map[string]any {
	return map[string]any{
		"Library":        m.Path,
		"Description":    m.Description,
		"Manufacturer":   m.Manufacturer,
		"LibraryVersion": m.LibraryVersion,
		"WaitMode":       uint32(m.WaitMode),
		"State":          uint32(m.State),
	}
}

func (s *Service) addModule(m *monitor.ModuleView) {
	s.logAdd(modulePath(m.Name), s.objs.add(modulePath(m.Name),
		iface{name: ModuleInterface, props: moduleProps(m)}))
}

func readerProps(r *monitor.Reader) map[string]any {
	atr := r.Atr
	if atr == nil {
		atr = []byte{}
	}
	return map[string]any{
		"Name":       r.Name,
		"State":      uint32(r.State),
		"Atr":        atr,
		"EventCount": uint32(r.EventCount),
	}
}

func (s *Service) addReader(r *monitor.Reader) {
	s.logAdd(readerPath(r.Name), s.objs.add(readerPath(r.Name),
		iface{name: ReaderInterface, props: readerProps(r)}))
}

func (s *Service) addSlot(sl *monitor.Slot) {
	tok := noObject
	if sl.Token != nil {
		tok = tokenPath(sl.Token.Generation)
	}
	s.logAdd(slotPath(sl.Key), s.objs.add(slotPath(sl.Key), iface{
		name: SlotInterface,
		props: map[string]any{
			"Module":      modulePath(sl.Key.Module),
			"SlotId":      uint64(sl.Key.ID),
			"Description": sl.Description,
			"Reader":      readerPath(sl.Reader),
			"Removable":   sl.Removable,
			"Token":       tok,
		},
	}))
}

// addToken exports a new generation's token, points its slot at it, and
// announces it with TokenInserted (after InterfacesAdded, so a client that
// reacts to the signal finds the object).
func (s *Service) addToken(t *monitor.Token) {
	p := tokenPath(t.Generation)
	err := s.objs.add(p, iface{
		name:    TokenInterface,
		methods: &tokenObject{s: s, tok: *t},
		props: map[string]any{
			"Slot":         slotPath(t.Slot),
			"Generation":   t.Generation,
			"Label":        t.Label,
			"Manufacturer": t.Manufacturer,
			"Model":        t.Model,
			"Serial":       t.Serial,
			"Flags":        uint32(t.Flags),
			"UsedForLogin": s.usedForLogin(t),
		},
	})
	if s.logAdd(p, err) {
		return
	}
	s.objs.set(slotPath(t.Slot), SlotInterface, map[string]any{"Token": p})
	s.conn.Emit(RootPath, ManagerInterface+".TokenInserted", p, slotPath(t.Slot), t.Generation)
}

// removeToken takes a removed generation off the bus: its sessions first
// (their owners see the objects go), then the token; its path keeps
// answering TokenRemoved through the tombstone.
func (s *Service) removeToken(t *monitor.Token) {
	for _, sess := range s.sessions.ofGeneration(t.Generation) {
		s.dropSession(sess)
	}
	s.logins.set(t.Generation, "")
	p := tokenPath(t.Generation)
	s.objs.remove(p)
	s.objs.set(slotPath(t.Slot), SlotInterface, map[string]any{"Token": noObject})
	s.conn.Emit(RootPath, ManagerInterface+".TokenRemoved", p, slotPath(t.Slot), t.Generation)
}

// logAdd logs a failed export; it reports whether there was one.
func (s *Service) logAdd(p godbus.ObjectPath, err error) bool {
	if err != nil {
		s.log.Error("exporting object failed", "path", p, "err", err)
		return true
	}
	return false
}

// manager is the Manager interface's methods.
type manager struct{ s *Service }

// Reload re-reads the configuration and the module list, adds and removes
// modules accordingly (a removed module's tokens are removed, with
// signals), and answers when the new snapshot is on the bus.
func (m *manager) Reload(msg godbus.Message) *godbus.Error {
	s := m.s
	if _, err := checkCall(msg, RootPath, ManagerInterface, "Reload"); err != nil {
		return toDBus(s.log, err)
	}
	target := s.mon.Snapshot().Seq
	if s.opts.Reload != nil {
		mods, snap, err := s.opts.Reload()
		if err != nil {
			return godbus.NewError("org.freedesktop.DBus.Error.InvalidFileContent", []any{err.Error()})
		}
		s.modsMu.Lock()
		s.modules = mods
		s.modsMu.Unlock()
		target = snap.Seq
	}
	deadline := time.Now().Add(5 * time.Second)
	for s.appliedSeq.Load() < target && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	return nil
}

// module returns the module named name.
func (s *Service) module(name string) (*module.Module, bool) {
	s.modsMu.RLock()
	defer s.modsMu.RUnlock()
	m, ok := s.modules[name]
	return m, ok
}

// generationOf parses the generation from a token path.
func generationOf(p godbus.ObjectPath) (uint64, bool) {
	g, err := strconv.ParseUint(lastElement(p), 10, 64)
	return g, err == nil
}

// SetPolicyProblem shows what went wrong with the removal policy (a lock
// screen or session manager that did not answer) in the Manager's
// StateReason, after the monitor's own reason; "" clears it.
func (s *Service) SetPolicyProblem(problem string) {
	s.applied.Lock()
	defer s.applied.Unlock()
	if s.policyProblem == problem || s.lastSnap == nil {
		s.policyProblem = problem
		return
	}
	s.policyProblem = problem
	s.objs.set(RootPath, ManagerInterface, s.managerProps(s.lastSnap))
}

// requestGnomeName asks for org.gnome.SettingsDaemon.Smartcard. If
// gsd-smartcard (or anyone) owns it, slotwatch says so and keeps serving
// its own name; it stays in the name's queue, so it takes the name over
// when the owner leaves. With GnomeReplace it asks the owner to hand the
// name over, which works where the owner allowed replacement.
func (s *Service) requestGnomeName() {
	var flags godbus.RequestNameFlags
	if s.opts.Gnome == GnomeReplace {
		flags = godbus.NameFlagReplaceExisting
	}
	owner := s.nameOwner(GnomeBusName)
	reply, err := s.conn.RequestName(GnomeBusName, flags)
	if err == nil && reply == godbus.RequestNameReplyPrimaryOwner {
		s.gnomeOwned.Store(true)
	}
	switch {
	case err != nil:
		s.log.Error("could not request the GNOME smartcard name; serving "+BusName+" only",
			"name", GnomeBusName, "err", err)
	case reply == godbus.RequestNameReplyPrimaryOwner && owner != "":
		s.log.Info("took over the GNOME smartcard name", "name", GnomeBusName, "from", owner)
	case reply == godbus.RequestNameReplyPrimaryOwner:
		s.log.Info("serving the GNOME smartcard name", "name", GnomeBusName)
	case s.opts.Gnome == GnomeReplace:
		s.log.Warn(fmt.Sprintf("%s is owned by %s, which does not allow replacement; serving %s only, "+
			"and waiting in the name's queue: slotwatch takes the name when its owner exits "+
			"(for gsd-smartcard: systemctl --user stop org.gnome.SettingsDaemon.Smartcard.service)",
			GnomeBusName, owner, BusName))
	default:
		s.log.Warn(fmt.Sprintf("%s is owned by %s (is gsd-smartcard running?); serving %s only, "+
			"and waiting in the name's queue: slotwatch takes the name when its owner exits; "+
			"--gnome-compat=replace takes it over now where the owner allows it",
			GnomeBusName, owner, BusName))
	}
}

// nameOwner describes the owner of a bus name (unique name, pid and
// command line), "" if it has none.
func (s *Service) nameOwner(name string) string {
	var o string
	if s.conn.BusObject().Call("org.freedesktop.DBus.GetNameOwner", 0, name).Store(&o) != nil {
		return ""
	}
	return describeCaller(o, s.callers.pid(o))
}

// nameChanged logs when slotwatch gains or loses the GNOME name after
// start-up (its owner left, or replaced slotwatch).
func (s *Service) nameChanged(name string, acquired bool) {
	if s.gnome == nil || name != GnomeBusName {
		return
	}
	switch {
	case acquired && !s.gnomeOwned.Swap(true):
		s.log.Info("now serving the GNOME smartcard name", "name", name)
	case !acquired:
		s.gnomeOwned.Store(false)
		s.log.Warn("lost the GNOME smartcard name to another owner; serving "+BusName+" only", "name", name)
	}
}
