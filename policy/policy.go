// Package policy owns what the session does when tokens come and go: the
// removal action (lock the screen or log out when a token in scope is
// removed) and optional desktop notifications. It follows the monitor's
// events and calls the desktop's services on the session bus; a failure is
// reported, never fatal.
//
// Everything runs on one goroutine per Policy, in event order, so a slow
// screensaver or notification server never delays the monitor or the
// D-Bus API; every call it makes has a timeout.
//
// The removal grace (Config.RemovalGrace): the action for a removed token
// waits that long, and is dropped if a token with the same serial and
// label is inserted meanwhile — a USB reset, or readers re-enumerating
// after a resume, must not lock the session. Between Sleep and Resume
// (logind's PrepareForSleep) the grace does not run: removals seen then,
// and those whose grace was still running, get their grace counted from
// the resume. Before locking, the policy asks the screensaver whether it
// is already active (locked on suspend, say) and then does not lock again.
package policy

import (
	"context"
	"log/slog"
	"os"
	"sync"
	"time"

	godbus "github.com/godbus/dbus/v5"

	"github.com/slotwatch/slotwatch/monitor"
)

// callTimeout bounds every D-Bus call and every gsettings run.
const callTimeout = 5 * time.Second

// Config is what Start needs.
type Config struct {
	// Action is the removal action; "" means not configured (see
	// GSettings).
	Action Action
	// GSettings: when Action is "", read GNOME's setting (the
	// removal-action key of org.gnome.settings-daemon.peripherals.smartcard)
	// at each removal, with gsettings, so that a change applies at once.
	// Without gsettings or without the schema the action is none.
	GSettings bool
	// Scope says which tokens' removal triggers the action; the zero value
	// means the login token.
	Scope Scope
	// RemovalGrace is how long the removal action waits for a removed
	// token in scope to come back: a token with the same serial and label
	// inserted within it cancels the action. 0 acts at once (and ignores
	// Sleep and Resume). Notifications are never delayed.
	RemovalGrace time.Duration
	// Notify sends a desktop notification on every insertion and removal.
	Notify bool
	// LoginTokenName is PKCS11_LOGIN_TOKEN_NAME: the token whose Label
	// equals it is the one the session was logged in with. "" = none.
	LoginTokenName string
	// Logger gets what the policy does (default: discard). Nothing secret
	// is ever logged.
	Logger *slog.Logger
	// Report is called from the policy's goroutine after every attempt to
	// carry out a removal action: with "" when it succeeded, otherwise with
	// a one-line description of what failed. Notification failures are
	// only logged. May be nil.
	Report func(problem string)
}

// eventSource is what the policy reads events from; *monitor.Subscription
// is one.
type eventSource interface {
	Next(ctx context.Context) (monitor.Event, error)
	Close()
}

// Policy follows a monitor and carries out the removal policy. Create it
// with Start, stop it with Close.
type Policy struct {
	conn *godbus.Conn
	cfg  Config
	log  *slog.Logger

	// gsettings is the gsettings program and env its environment (nil:
	// this process's); tests point them elsewhere.
	gsettings string
	env       []string
	// timeout bounds every call (callTimeout; tests shorten it).
	timeout time.Duration

	ctx       context.Context // canceled by Close: ends the goroutine and any call in flight
	cancel    context.CancelFunc
	src       eventSource // nil until start
	done      chan struct{}
	closeOnce sync.Once

	mu     sync.Mutex    // guards next and sleeps
	next   *Config       // set by SetConfig, taken by the goroutine before the next event
	sleeps []sleepChange // set by Sleep and Resume, taken by the goroutine
	wake   chan struct{} // (capacity 1) the goroutine has sleeps to take

	// Owned by the policy's goroutine.
	notifyID      uint32 // the last notification's id, replaced by the next one
	notifyFailing bool   // the last Notify call failed (warned once per outage)
	gsettingsGone bool   // gsettings or its schema is missing (logged once)
	// startupPending: the first snapshot was not a complete view (pcscd
	// down, a module failing), so the startup rule waits for the first
	// running one rather than lock a session whose card is there.
	startupPending bool
	// pending are the removals whose action waits for their grace, in
	// the order they were seen.
	pending []pendingRemoval
	// asleep: between Sleep and Resume; sleepLimit is when the policy
	// stops waiting for the Resume (see sleepHoldLimit).
	asleep     bool
	sleepLimit time.Time
}

// Start subscribes to mon and runs the policy on its own goroutine until
// Close (or until mon is closed). conn is the daemon's bus connection.
func Start(conn *godbus.Conn, mon *monitor.Monitor, cfg Config) *Policy {
	p := newPolicy(conn, cfg)
	snap, sub := mon.Subscribe()
	p.start(snap, sub)
	return p
}

func newPolicy(conn *godbus.Conn, cfg Config) *Policy {
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if cfg.Action != "" && !cfg.Action.valid() {
		log.Error("unknown removal action; using none", "action", string(cfg.Action))
		cfg.Action = ActionNone
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Policy{
		conn:      conn,
		cfg:       cfg,
		log:       log,
		gsettings: "gsettings",
		timeout:   callTimeout,
		ctx:       ctx,
		cancel:    cancel,
		done:      make(chan struct{}),
		wake:      make(chan struct{}, 1),
	}
}

// start runs the policy on src, which starts after snap.
func (p *Policy) start(snap *monitor.Snapshot, src eventSource) {
	p.src = src
	p.logConfig("removal policy")
	go p.run(snap)
}

func (p *Policy) run(snap *monitor.Snapshot) {
	defer close(p.done)
	events := make(chan monitor.Event)
	pumped := make(chan struct{})
	go p.pump(events, pumped)
	defer func() { <-pumped }()

	p.startup(snap)
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		p.armTimer(timer)
		select {
		case ev, ok := <-events:
			if !ok {
				return
			}
			p.takeConfig()
			p.handle(ev)
		case <-p.wake:
			p.takeSleeps()
		case <-timer.C:
			p.expire(time.Now())
		case <-p.ctx.Done():
			return
		}
	}
}

// pump passes the monitor's events to run, so that run can also wait for
// graces and for Sleep and Resume. It closes out when the events end.
func (p *Policy) pump(out chan<- monitor.Event, pumped chan<- struct{}) {
	defer close(pumped)
	defer close(out)
	for {
		ev, err := p.src.Next(p.ctx)
		if err != nil {
			if p.ctx.Err() == nil {
				p.log.Debug("removal policy: no more events", "err", err)
			}
			return
		}
		select {
		case out <- ev:
		case <-p.ctx.Done():
			return
		}
	}
}

// armTimer sets timer to the next grace that ends, or to the end of the
// wait for a Resume; it stops it when there is none.
func (p *Policy) armTimer(timer *time.Timer) {
	var next time.Time
	for _, r := range p.pending {
		if !r.due.IsZero() && (next.IsZero() || r.due.Before(next)) {
			next = r.due
		}
	}
	if p.asleep && (next.IsZero() || p.sleepLimit.Before(next)) {
		next = p.sleepLimit
	}
	if next.IsZero() {
		timer.Stop()
		return
	}
	timer.Reset(time.Until(next))
}

// SetConfig replaces the policy's configuration (Manager.Reload); it
// applies from the next event on. Logger and Report stay as they are.
func (p *Policy) SetConfig(cfg Config) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.next = &cfg
}

// takeConfig applies a configuration SetConfig left; on the policy's
// goroutine only.
func (p *Policy) takeConfig() {
	p.mu.Lock()
	next := p.next
	p.next = nil
	p.mu.Unlock()
	if next == nil {
		return
	}
	next.Logger, next.Report = p.cfg.Logger, p.cfg.Report
	if next.Action != "" && !next.Action.valid() {
		p.log.Error("unknown removal action; using none", "action", string(next.Action))
		next.Action = ActionNone
	}
	p.cfg = *next
	p.logConfig("removal policy reloaded")
}

// logConfig says what the policy does.
func (p *Policy) logConfig(msg string) {
	action := string(p.cfg.Action)
	if action == "" {
		action = string(ActionNone)
		if p.cfg.GSettings {
			action = "from GNOME's settings"
		}
	}
	p.log.Info(msg, "action", action, "scope", p.cfg.Scope.String(),
		"login_token", p.cfg.LoginTokenName, "grace", p.cfg.RemovalGrace, "notify", p.cfg.Notify)
}

// Close stops the policy and waits for its goroutine; a call in flight is
// abandoned. It is idempotent.
func (p *Policy) Close() {
	p.closeOnce.Do(func() {
		p.cancel()
		if p.src != nil {
			p.src.Close()
		}
	})
	if p.src != nil {
		<-p.done
	}
}

// startup applies GNOME's rule to the first snapshot: a session logged in
// with a token that is not there any more gets the removal action at once.
// A snapshot taken while the monitor is not running may miss a card that
// is there; then the rule applies to the first running one.
func (p *Policy) startup(snap *monitor.Snapshot) {
	if snap != nil && snap.State != monitor.StateRunning {
		p.startupPending = true
		return
	}
	p.startupPending = false
	name := p.cfg.LoginTokenName
	if name == "" {
		return
	}
	if k := p.cfg.Scope.kind(); k != ScopeLoginToken && k != ScopeAny {
		return
	}
	if snap != nil {
		for _, t := range snap.Tokens() {
			if t.Label == name {
				return
			}
		}
	}
	p.removalAction(nil, "login token absent at startup")
}

// handle carries out the policy for one event.
func (p *Policy) handle(ev monitor.Event) {
	if p.startupPending && ev.Kind == monitor.StateChanged && ev.Snapshot.State == monitor.StateRunning {
		p.startup(ev.Snapshot)
	}
	if ev.Token == nil {
		return
	}
	switch ev.Kind {
	case monitor.TokenRemoved:
		// The action first: locking must not wait for a notification.
		if p.cfg.Scope.Covers(ev.Token.Serial, p.usedForLogin(ev.Token)) {
			p.removed(ev.Token)
		}
		if p.cfg.Notify {
			p.notify(ev.Token, false)
		}
	case monitor.TokenInserted:
		p.back(ev.Token)
		if p.cfg.Notify {
			p.notify(ev.Token, true)
		}
	}
}

func (p *Policy) usedForLogin(t *monitor.Token) bool {
	return p.cfg.LoginTokenName != "" && t.Label == p.cfg.LoginTokenName
}

// report passes problem to Config.Report.
func (p *Policy) report(problem string) {
	if p.cfg.Report != nil {
		p.cfg.Report(problem)
	}
}

// environ is the environment of the gsettings child.
func (p *Policy) environ() []string {
	if p.env != nil {
		return p.env
	}
	return os.Environ()
}
