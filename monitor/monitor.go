package monitor

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/slotwatch/slotwatch/module"
)

// Module is what the monitor needs of a loaded PKCS#11 module;
// *module.Module implements it. The monitor holds one reference
// (Initialize) while it watches the module and is expected to be the last
// holder, so that its Finalize really finalizes and unblocks the waiter.
type Module interface {
	Name() string
	Path() string
	Initialize() error
	Finalize() error
	Info() (module.Info, error)
	SlotList(tokenPresent bool) ([]uint, error)
	SlotInfo(slot uint) (module.SlotInfo, error)
	TokenInfo(slot uint) (module.TokenInfo, error)
	// WaitForSlotEvent blocks (dontBlock false) until a slot event, or
	// returns module.ErrFunctionNotSupported when the module cannot wait,
	// module.ErrNotInitialized once finalized.
	WaitForSlotEvent(dontBlock bool) (uint, error)
	// RetireGeneration marks the sessions of generations up to gen dead at
	// once: calls on them fail before reaching the module.
	RetireGeneration(slot uint, gen uint64)
	// ReclaimSlot forgets the sessions of dead generations up to gen without
	// passing their handles to the module.
	ReclaimSlot(slot uint, gen uint64) int
	// SessionCount is how many sessions the module holds (open or not yet
	// reclaimed): an idle release waits until it is 0.
	SessionCount() int
}

// IdleRelease is what the monitor does with a module whose slots all stand
// for PC/SC readers (OpenSC and its kind) once nothing needs it.
//
// Such a module holds every card it sees (OpenSC connects in shared mode
// from C_Initialize to C_Finalize), which keeps programs that want a card
// exclusively (GnuPG's scdaemon) out. When enabled, the monitor finalizes
// the module after Grace without a session, an operation or a read, and
// learns of changes from PC/SC alone meanwhile; the view stays as it was.
// It initializes the module again when an operation needs it (Acquire) or
// when PC/SC reports a change the module must read (a card inserted or
// swapped, a new reader).
type IdleRelease struct {
	Enabled bool
	Grace   time.Duration
}

// DefaultIdleRelease is the policy of modules Config.IdleRelease says
// nothing of: enabled, with a grace of one second.
var DefaultIdleRelease = IdleRelease{Enabled: true, Grace: time.Second}

// Config is what New needs.
type Config struct {
	Modules []Module
	// PCSC watches PC/SC readers (pcscd). Without it, slots are not matched
	// to readers and a replug inside one event gap cannot be told apart.
	PCSC bool
	// PollInterval is how often modules that cannot wait are re-read.
	// Default 2 s.
	PollInterval time.Duration
	// RetryMin is the first delay of every backoff (default 50 ms);
	// RetryMax caps the backoff for reconnecting to pcscd and for a
	// module's failing waits (default 400 ms).
	RetryMin, RetryMax time.Duration
	// ModuleRetryMax caps the backoff between re-initializations of a
	// failing module. Default 30 s.
	ModuleRetryMax time.Duration
	// FailuresBeforeReinit is how many failed reads in a row make a module
	// "failing" (rule 6). Default 3.
	FailuresBeforeReinit int
	// SafetyInterval is how often a module with a blocking waiter is
	// re-read although no event came: a safety net for waits that miss
	// events or hang. A re-read that finds a change no event announced is
	// a missed event; MissedEventsBeforeReinit of them make the module
	// failing, so it is initialized again. Default 30 s, 2.
	SafetyInterval           time.Duration
	MissedEventsBeforeReinit int
	// MinWakeGap is the shortest time between two wake-ups from one
	// module's waiter (default 20 ms): a module whose wait returns at once
	// forever cannot spin the daemon, and events are wake-ups anyway.
	MinWakeGap time.Duration
	// SharePoll is how often PC/SC is read while another process holds a
	// card exclusively, to see the reader freed (pcscd wakes no one for
	// that). Default 1 s.
	SharePoll time.Duration
	// IdleRelease returns a module's idle release policy. It is asked at
	// each decision, so a reload may change it. Default:
	// DefaultIdleRelease for every module.
	IdleRelease func(module string) IdleRelease
	// ResumeWindow is how long a token removed by an outage may come back
	// as the same card and resume its sessions (Token.Resumes). Default
	// 60 s; negative: never (every outage ends sessions, as a removal).
	ResumeWindow time.Duration
	// Logger gets the monitor's decisions (Debug: every event). Default:
	// discard.
	Logger *slog.Logger
}

func (c Config) withDefaults() Config {
	if c.PollInterval <= 0 {
		c.PollInterval = 2 * time.Second
	}
	if c.RetryMin <= 0 {
		c.RetryMin = 50 * time.Millisecond
	}
	if c.RetryMax <= 0 {
		// When pcscd is back, a card it reports should show within a
		// second: this retry, plus pcscd's own detection (vpcd polls
		// every 400 ms), plus reading the card.
		c.RetryMax = 400 * time.Millisecond
	}
	if c.ModuleRetryMax <= 0 {
		c.ModuleRetryMax = 30 * time.Second
	}
	if c.FailuresBeforeReinit <= 0 {
		c.FailuresBeforeReinit = 3
	}
	if c.SafetyInterval <= 0 {
		c.SafetyInterval = 30 * time.Second
	}
	if c.MissedEventsBeforeReinit <= 0 {
		c.MissedEventsBeforeReinit = 2
	}
	if c.MinWakeGap <= 0 {
		c.MinWakeGap = 20 * time.Millisecond
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.SharePoll <= 0 {
		c.SharePoll = time.Second
	}
	if c.ResumeWindow == 0 {
		c.ResumeWindow = time.Minute
	}
	if c.IdleRelease == nil {
		c.IdleRelease = func(string) IdleRelease { return DefaultIdleRelease }
	}
	return c
}

// Monitor owns the view. Create it with New, read it with Snapshot and
// Subscribe, stop it with Close.
type Monitor struct {
	cfg    Config
	log    *slog.Logger
	leases *leases

	snap atomic.Pointer[Snapshot]

	wakeCh chan struct{} // buffered 1: bursts of wake-ups merge into one refresh
	inbox  inbox

	// holdSem is taken by the loop around every refresh; Hold takes it to
	// keep the loop from refreshing (tests, debugging).
	holdSem chan struct{}

	pubMu sync.Mutex // guards subs; held while publishing so Subscribe sees a consistent start
	subs  map[*Subscription]struct{}

	setModules chan setModulesRequest // Reload: the loop applies a new module set

	stop      chan struct{}
	done      chan struct{}
	closeOnce sync.Once
}

type setModulesRequest struct {
	modules []Module
	done    chan *Snapshot
}

// inbox is what sources tell the loop between two refreshes.
type inbox struct {
	mu sync.Mutex // guards reports
	reports
}

// reports are the facts of one inbox, taken by the loop at each refresh.
type reports struct {
	pcscDirty       bool
	pcscLost        bool // the watcher lost pcscd and has not reconnected yet
	pcscRecovered   bool
	modulesDirty    map[string]bool
	waitUnsupported map[string]bool
	waitFailed      map[string]error
	drained         []uint64
	demanded        map[string]bool // released modules an operation waits for
	rescan          bool            // Rescan: re-read every module and PC/SC
}

// New starts a monitor: it initializes the modules, starts the sources and
// the loop, and returns once the first snapshot is published.
func New(cfg Config) (*Monitor, error) {
	cfg = cfg.withDefaults()
	names := map[string]bool{}
	for _, mod := range cfg.Modules {
		if names[mod.Name()] {
			return nil, fmt.Errorf("monitor: two modules named %q", mod.Name())
		}
		names[mod.Name()] = true
	}
	m := &Monitor{
		cfg:        cfg,
		log:        cfg.Logger,
		wakeCh:     make(chan struct{}, 1),
		holdSem:    make(chan struct{}, 1),
		subs:       map[*Subscription]struct{}{},
		setModules: make(chan setModulesRequest),
		stop:       make(chan struct{}),
		done:       make(chan struct{}),
	}
	m.inbox.modulesDirty = map[string]bool{}
	m.inbox.waitUnsupported = map[string]bool{}
	m.inbox.waitFailed = map[string]error{}
	m.inbox.demanded = map[string]bool{}
	m.leases = newLeases(func(gen uint64) {
		m.inbox.mu.Lock()
		m.inbox.drained = append(m.inbox.drained, gen)
		m.inbox.mu.Unlock()
		m.wake()
	}, func(module string) {
		m.inbox.mu.Lock()
		m.inbox.demanded[module] = true
		m.inbox.mu.Unlock()
		m.wake()
	}, func(string) { m.wake() })
	m.snap.Store(&Snapshot{State: StateUnknown, StateReason: "starting"})
	l := newLoop(m)
	l.refresh(true) // the first snapshot, before New returns
	go l.run()
	return m, nil
}

// Snapshot returns the current view. It never waits on a module or pcscd.
func (m *Monitor) Snapshot() *Snapshot { return m.snap.Load() }

// Subscribe returns the current snapshot and a subscription to every change
// after it.
func (m *Monitor) Subscribe() (*Snapshot, *Subscription) {
	m.pubMu.Lock()
	defer m.pubMu.Unlock()
	s := newSubscription(m)
	select {
	case <-m.done:
		s.end()
	default:
		m.subs[s] = struct{}{}
	}
	return m.snap.Load(), s
}

func (m *Monitor) unsubscribe(s *Subscription) {
	m.pubMu.Lock()
	delete(m.subs, s)
	m.pubMu.Unlock()
}

func (m *Monitor) publish(s *Snapshot, evs []Event) {
	m.pubMu.Lock()
	defer m.pubMu.Unlock()
	m.snap.Store(s)
	if len(evs) == 0 {
		return
	}
	for sub := range m.subs {
		sub.push(evs)
	}
}

// Acquire holds token generation gen for the duration of one operation:
// until release is called, the token's sessions are not reclaimed even if
// the token is removed. It fails with ErrTokenRemoved once gen is dead. It
// waits (until ctx is done) while an older generation of the same slot is
// still draining, so sessions of the new token never coexist with handles of
// the old one.
//
// A released module (IdleRelease) is initialized again first. A token whose
// card another process holds exclusively fails at once with ErrCardInUse.
func (m *Monitor) Acquire(ctx context.Context, gen uint64) (release func(), err error) {
	if m.inExclusiveUse(gen) {
		return nil, ErrCardInUse
	}
	release, err = m.leases.acquire(ctx, gen)
	if err == nil && m.inExclusiveUse(gen) {
		// Seen by the read that initialized the module again: pcscd
		// tells no one when a card is taken exclusively.
		release()
		return nil, ErrCardInUse
	}
	return release, err
}

// inExclusiveUse tells whether the current view shows generation gen's
// card held exclusively by another process.
func (m *Monitor) inExclusiveUse(gen uint64) bool {
	s := m.Snapshot()
	if t, ok := s.Token(gen); ok && t.Reader != "" {
		if r, ok := s.Reader(t.Reader); ok && r.State == ReaderExclusive {
			return true
		}
	}
	return false
}

// SetModules replaces the set of watched modules (a reload): modules no
// longer listed are finalized and their tokens removed, new ones are
// initialized, modules kept (the same value) are left alone. It returns the
// snapshot that results, once it is published.
func (m *Monitor) SetModules(mods []Module) (*Snapshot, error) {
	names := map[string]bool{}
	for _, mod := range mods {
		if names[mod.Name()] {
			return nil, fmt.Errorf("monitor: two modules named %q", mod.Name())
		}
		names[mod.Name()] = true
	}
	req := setModulesRequest{modules: mods, done: make(chan *Snapshot, 1)}
	select {
	case m.setModules <- req:
	case <-m.done:
		return nil, ErrClosed
	}
	select {
	case s := <-req.done:
		return s, nil
	case <-m.done:
		return nil, ErrClosed
	}
}

// Hold keeps the loop from starting another refresh until release is
// called; a refresh in progress finishes first. Wake-ups that arrive
// meanwhile are merged into one refresh after release. For tests and
// debugging.
func (m *Monitor) Hold() (release func()) {
	select {
	case m.holdSem <- struct{}{}:
	case <-m.done:
		return func() {}
	}
	var once sync.Once
	return func() { once.Do(func() { <-m.holdSem }) }
}

// Close stops the sources and the loop, finalizes the modules, and ends
// every subscription (after the events already queued). It is idempotent
// and returns promptly even while waits are blocked.
func (m *Monitor) Close() error {
	m.closeOnce.Do(func() { close(m.stop) })
	<-m.done
	return nil
}

func (m *Monitor) wake() {
	select {
	case m.wakeCh <- struct{}{}:
	default:
	}
}

// Rescan has the loop re-read PC/SC and every module at once, as after a
// resume from suspend: a wake-up like any other (rule 1), with nothing
// assumed unchanged.
func (m *Monitor) Rescan() {
	m.inbox.mu.Lock()
	m.inbox.rescan = true
	m.inbox.mu.Unlock()
	m.wake()
}

func (m *Monitor) markModuleDirty(name string) {
	m.inbox.mu.Lock()
	m.inbox.modulesDirty[name] = true
	m.inbox.mu.Unlock()
	m.wake()
}
