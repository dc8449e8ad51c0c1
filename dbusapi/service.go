package dbusapi

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"

	godbus "github.com/godbus/dbus/v5"

	"github.com/slotwatch/slotwatch/broker"
	"github.com/slotwatch/slotwatch/monitor"
)

// Options tunes a Service.
type Options struct {
	Logger  *slog.Logger
	Version string
	// LoginTokenName is the label of the token the session logged in with
	// (PKCS11_LOGIN_TOKEN_NAME, as GNOME uses it); "" if none.
	LoginTokenName string
	// Reload, if set, is what Manager.Reload runs: re-read the config and
	// the module list, apply it to the monitor and the broker's module set,
	// and return the snapshot that resulted. A *ConfigError answers
	// InvalidConfig. Nil: Reload only answers once the current snapshot is
	// on the bus.
	Reload func() (*monitor.Snapshot, error)
	// Gnome also serves the view as gnome-settings-daemon's smartcard
	// service (org.gnome.SettingsDaemon.Smartcard); see gnome.go.
	Gnome GnomeMode
}

// ConfigError is what Options.Reload returns when the configuration is
// wrong: Reload answers InvalidConfig with its message.
type ConfigError struct{ Err error }

func (e *ConfigError) Error() string { return e.Err.Error() }
func (e *ConfigError) Unwrap() error { return e.Err }

// Service is slotwatch on the bus: it mirrors the monitor's snapshots as
// objects, and serves the broker's sessions. Create with New, then Start.
type Service struct {
	conn *godbus.Conn
	mon  *monitor.Monitor
	br   *broker.Broker
	opts Options

	log     *slog.Logger
	out     *emitter // every signal, in order
	objs    *objects
	gnome   *gnome // nil unless Options.Gnome
	callers *callers

	instanceID string

	sub     *monitor.Subscription
	applied sync.Mutex // held while an event is applied; guards the fields below
	// lastSnap is the snapshot whose events are all on the bus, and
	// policyProblem what the removal policy last reported (SetPolicyProblem);
	// both make up the Manager's StateReason.
	lastSnap      *monitor.Snapshot
	policyProblem string
	// appliedCh is closed (and replaced) each time a snapshot's events are
	// all on the bus: Reload waits on it.
	appliedCh     chan struct{}
	appliedEvents uint64 // events applied so far

	reloadMu   sync.Mutex  // one Reload at a time
	gnomeOwned atomic.Bool // this connection owns GnomeBusName
	done       chan struct{}
	closeMu    sync.Once
}

// New prepares a service on conn for the monitor's view and the broker's
// sessions. The service becomes the broker's observer: session objects
// follow the broker's table.
func New(conn *godbus.Conn, mon *monitor.Monitor, br *broker.Broker, opts Options) *Service {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Version == "" {
		opts.Version = "0.1.0"
	}
	id := make([]byte, 16)
	rand.Read(id)
	out := newEmitter(conn, opts.Logger)
	s := &Service{
		conn: conn, mon: mon, br: br, opts: opts, log: opts.Logger,
		out:        out,
		objs:       newObjects(out, RootPath),
		instanceID: hex.EncodeToString(id),
		appliedCh:  make(chan struct{}),
		done:       make(chan struct{}),
	}
	if opts.Gnome != GnomeOff {
		s.gnome = newGnome(s)
	}
	s.callers = newCallers(conn, br, opts.Logger)
	br.SetObserver(sessionObjects{s})
	return s
}

// Start exports every object of the current snapshot, then requests the bus
// name (so the name never appears before its objects), then follows the
// monitor. When it returns, the first snapshot is on the bus.
func (s *Service) Start() error {
	snap, sub := s.mon.Subscribe()
	s.sub = sub
	s.lastSnap = snap
	fail := func(err error) error {
		sub.Close()
		s.out.close()
		return err
	}
	if err := s.exportRoot(snap); err != nil {
		return fail(err)
	}
	if err := s.exportDispatch(); err != nil {
		return fail(err)
	}
	s.exportSnapshot(snap)
	if s.gnome != nil {
		if err := s.gnome.export(snap); err != nil {
			return fail(fmt.Errorf("exporting the GNOME objects: %w", err))
		}
	}
	if err := s.callers.start(s.nameChanged); err != nil {
		return fail(err)
	}
	s.out.flush() // the initial objects' signals go out before the name appears
	reply, err := s.conn.RequestName(BusName, godbus.NameFlagDoNotQueue)
	if err != nil {
		return fail(fmt.Errorf("requesting %s: %w", BusName, err))
	}
	if reply != godbus.RequestNameReplyPrimaryOwner {
		owner := s.nameOwner(BusName)
		if owner == "" {
			owner = "another connection"
		}
		return fail(fmt.Errorf("%s is already owned by %s: is another slotwatch running?", BusName, owner))
	}
	if s.gnome != nil {
		s.requestGnomeName()
	}
	go s.follow()
	return nil
}

// Close stops following the monitor, closes every session slotwatch
// brokered, and releases the bus names. It does not close the connection,
// the broker or the monitor.
func (s *Service) Close() {
	s.closeMu.Do(func() {
		if s.sub == nil {
			s.out.close()
			return
		}
		s.sub.Close()
		<-s.done
		s.callers.stop()
		s.br.Close()
		s.out.close() // the sessions' InterfacesRemoved go out before the name does
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
		s.appliedEvents++
		close(s.appliedCh)
		s.appliedCh = make(chan struct{})
		s.applied.Unlock()
	}
}

// callerOf checks a call against the contract and returns who makes it.
func (s *Service) callerOf(msg godbus.Message, path godbus.ObjectPath, iface, method string) (broker.Caller, error) {
	sender, err := checkCall(msg, path, iface, method)
	if err != nil {
		return broker.Caller{}, err
	}
	return s.callers.caller(sender)
}

// reply maps an error for the bus (nil stays nil).
func (s *Service) reply(err error) *godbus.Error { return toDBus(s.log, err) }

// logAdd logs a failed export; it reports whether there was one.
func (s *Service) logAdd(p godbus.ObjectPath, err error) bool {
	if err != nil {
		s.log.Error("exporting object failed", "path", p, "err", err)
		return true
	}
	return false
}
