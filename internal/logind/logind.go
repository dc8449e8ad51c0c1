// Package logind follows systemd-logind's PrepareForSleep signal on the
// system bus: PrepareForSleep(true) just before the system suspends or
// hibernates, PrepareForSleep(false) once it has resumed.
//
// Any client of the system bus can emit a signal with logind's path,
// interface and member, and can send it straight to our connection
// (unicast signals pass no match rule). So a PrepareForSleep counts only
// when its sender is the unique name that owns org.freedesktop.login1 at
// that moment: GetNameOwner at start, then NameOwnerChanged from the bus
// driver itself (whose sender nobody can take). Everything else is logged
// and dropped.
//
// No system bus, or no logind on it, is normal (containers, other init
// systems, tests): the Watcher then logs one Info line and does nothing,
// or waits for logind to appear.
package logind

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	godbus "github.com/godbus/dbus/v5"
)

// logind's names.
const (
	BusName          = "org.freedesktop.login1"
	ObjectPath       = godbus.ObjectPath("/org/freedesktop/login1")
	ManagerInterface = "org.freedesktop.login1.Manager"
	SignalMember     = "PrepareForSleep"
)

// The bus driver's names.
const (
	busDriver     = "org.freedesktop.DBus"
	busDriverPath = godbus.ObjectPath("/org/freedesktop/DBus")
)

// DefaultTimeout bounds connecting to the system bus and subscribing.
const DefaultTimeout = 5 * time.Second

// Config is what Start needs.
type Config struct {
	// Address is the system bus's address; "" means
	// DBUS_SYSTEM_BUS_ADDRESS, else the default system bus socket.
	Address string
	// OnSleep is called on PrepareForSleep(true), OnResume on
	// PrepareForSleep(false), from the Watcher's goroutine, one at a time
	// and in the order logind sent them. They must not block for long.
	// Either may be nil.
	OnSleep  func()
	OnResume func()
	// Logger gets what the Watcher does (default: discard).
	Logger *slog.Logger
	// Timeout bounds connecting and subscribing (DefaultTimeout if 0): a
	// system bus that does not answer does not hold up the caller longer.
	Timeout time.Duration
}

// Watcher follows logind's PrepareForSleep. Make one with Start, stop it
// with Close.
type Watcher struct {
	cfg  Config
	log  *slog.Logger
	conn *godbus.Conn // nil when the Watcher follows nothing
	sigs chan *godbus.Signal
	done chan struct{} // closed when the goroutine has returned

	closeOnce sync.Once
	closing   chan struct{}

	// Owned by the goroutine (set by Start before it starts).
	owner        string // unique name owning BusName, "" for none
	warnedForged bool   // a forged signal was logged at Warn already
}

// Start connects to the system bus, subscribes to PrepareForSleep and
// NameOwnerChanged for logind's name, and follows them on a goroutine of
// its own until Close. It never fails: without a system bus (or when
// connecting or subscribing fails or takes longer than Config.Timeout) the
// Watcher logs why and follows nothing; without logind on the bus it
// waits for logind to appear.
func Start(cfg Config) *Watcher {
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = DefaultTimeout
	}
	w := &Watcher{
		cfg:     cfg,
		log:     log,
		sigs:    make(chan *godbus.Signal),
		done:    make(chan struct{}),
		closing: make(chan struct{}),
	}
	conn, err := w.connect()
	if err != nil {
		// Absence is normal; anything else is worth a warning.
		if errors.Is(err, errNoBus) {
			log.Info("no system bus; not following suspend and resume", "err", err.Error())
		} else {
			log.Warn("cannot follow suspend and resume on the system bus", "err", err.Error())
		}
		close(w.done)
		return w
	}
	w.conn = conn
	if w.owner == "" {
		log.Info("logind is not on the system bus; following suspend and resume once it is there", "name", BusName)
	} else {
		log.Info("following suspend and resume (logind's PrepareForSleep)", "logind", w.owner)
	}
	go w.run()
	return w
}

// errNoBus marks "there is no system bus here".
var errNoBus = errors.New("no system bus")

// connect connects, subscribes and reads logind's owner, all within
// cfg.Timeout.
func (w *Watcher) connect() (*godbus.Conn, error) {
	opts := []godbus.ConnOption{godbus.WithSignalHandler(godbus.NewSequentialSignalHandler())}
	var conn *godbus.Conn
	var err error
	if w.cfg.Address != "" {
		conn, err = godbus.Dial(w.cfg.Address, opts...)
	} else {
		conn, err = godbus.SystemBusPrivate(opts...)
	}
	if err != nil {
		// Dial only fails before any byte is exchanged: no address, no
		// socket, nobody listening.
		return nil, fmt.Errorf("%w: %v", errNoBus, err)
	}
	// Auth and Hello block on the bus's answers and take no context:
	// closing the connection is what ends them.
	timer := time.AfterFunc(w.cfg.Timeout, func() { conn.Close() })
	err = conn.Auth(nil)
	if err == nil {
		err = conn.Hello()
	}
	if !timer.Stop() {
		conn.Close()
		return nil, fmt.Errorf("the system bus did not let us in within %v", w.cfg.Timeout)
	}
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("connecting to the system bus: %v", err)
	}
	if err := w.subscribe(conn); err != nil {
		conn.Close()
		return nil, err
	}
	return conn, nil
}

// subscribe registers the signal channel and the match rules, then reads
// logind's current owner. The rules come first so that no change of owner
// falls between the answer and the first NameOwnerChanged.
func (w *Watcher) subscribe(conn *godbus.Conn) error {
	ctx, cancel := context.WithTimeout(context.Background(), w.cfg.Timeout)
	defer cancel()
	conn.Signal(w.sigs)
	if err := conn.AddMatchSignalContext(ctx,
		godbus.WithMatchSender(busDriver),
		godbus.WithMatchObjectPath(busDriverPath),
		godbus.WithMatchInterface(busDriver),
		godbus.WithMatchMember("NameOwnerChanged"),
		godbus.WithMatchArg(0, BusName),
	); err != nil {
		return fmt.Errorf("subscribing to NameOwnerChanged for %s: %v", BusName, err)
	}
	if err := conn.AddMatchSignalContext(ctx,
		godbus.WithMatchSender(BusName),
		godbus.WithMatchObjectPath(ObjectPath),
		godbus.WithMatchInterface(ManagerInterface),
		godbus.WithMatchMember(SignalMember),
	); err != nil {
		return fmt.Errorf("subscribing to %s.%s: %v", ManagerInterface, SignalMember, err)
	}
	var owner string
	err := conn.BusObject().CallWithContext(ctx, busDriver+".GetNameOwner", 0, BusName).Store(&owner)
	var de godbus.Error
	switch {
	case err == nil:
		w.owner = owner
	case errors.As(err, &de) && de.Name == "org.freedesktop.DBus.Error.NameHasNoOwner":
		w.owner = ""
	default:
		return fmt.Errorf("asking the system bus who owns %s: %v", BusName, err)
	}
	return nil
}

// run handles the signals in the order they came, until the connection
// is closed (Close, or the bus went away).
func (w *Watcher) run() {
	defer close(w.done)
	for sig := range w.sigs {
		w.handle(sig)
	}
	select {
	case <-w.closing:
	default:
		w.log.Warn("lost the system bus; no longer following suspend and resume")
	}
}

func (w *Watcher) handle(sig *godbus.Signal) {
	switch sig.Name {
	case busDriver + ".NameOwnerChanged":
		w.nameOwnerChanged(sig)
	case ManagerInterface + "." + SignalMember:
		w.prepareForSleep(sig)
	}
}

// nameOwnerChanged follows logind's owner. Only the bus driver's own
// signal counts: anyone can send a NameOwnerChanged to our unique name.
func (w *Watcher) nameOwnerChanged(sig *godbus.Signal) {
	if sig.Sender != busDriver || sig.Path != busDriverPath {
		w.forged(sig, "NameOwnerChanged not from the bus driver")
		return
	}
	var name, old, owner string
	if err := godbus.Store(sig.Body, &name, &old, &owner); err != nil || name != BusName {
		return
	}
	w.owner = owner
	if owner == "" {
		w.log.Info("logind left the system bus; waiting for it to come back", "name", BusName)
	} else {
		w.log.Info("logind is on the system bus", "name", BusName, "owner", owner)
	}
}

func (w *Watcher) prepareForSleep(sig *godbus.Signal) {
	if sig.Path != ObjectPath {
		w.forged(sig, "PrepareForSleep on another object path")
		return
	}
	if w.owner == "" || sig.Sender != w.owner {
		w.forged(sig, "PrepareForSleep not from logind")
		return
	}
	var start bool
	if err := godbus.Store(sig.Body, &start); err != nil {
		w.log.Warn("logind's PrepareForSleep has unexpected arguments; ignored", "signature", godbus.SignatureOf(sig.Body...).String())
		return
	}
	w.log.Debug("logind: PrepareForSleep", "start", start)
	if start {
		if w.cfg.OnSleep != nil {
			w.cfg.OnSleep()
		}
		return
	}
	if w.cfg.OnResume != nil {
		w.cfg.OnResume()
	}
}

// forged logs a dropped signal: the first one at Warn (someone on the
// system bus is trying), the rest at Debug (a client must not be able to
// flood the log).
func (w *Watcher) forged(sig *godbus.Signal, why string) {
	attrs := []any{"sender", sig.Sender, "path", string(sig.Path), "logind", w.owner}
	if w.warnedForged {
		w.log.Debug("ignored a signal: "+why, attrs...)
		return
	}
	w.warnedForged = true
	w.log.Warn("ignored a signal: "+why+" (further ones are logged at debug level)", attrs...)
}

// Following reports whether the Watcher is connected to a system bus and
// follows it (whether or not logind is there).
func (w *Watcher) Following() bool {
	if w.conn == nil {
		return false
	}
	select {
	case <-w.done:
		return false
	default:
		return true
	}
}

// Close disconnects from the system bus and waits for the Watcher's
// goroutine; no callback runs after it returns. It is idempotent.
func (w *Watcher) Close() {
	w.closeOnce.Do(func() {
		close(w.closing)
		if w.conn != nil {
			w.conn.Close()
		}
	})
	<-w.done
}
