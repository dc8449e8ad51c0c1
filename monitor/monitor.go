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
}

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
	rescan          bool // Rescan: re-read every module and PC/SC
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
	m.leases = newLeases(func(gen uint64) {
		m.inbox.mu.Lock()
		m.inbox.drained = append(m.inbox.drained, gen)
		m.inbox.mu.Unlock()
		m.wake()
	})
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
func (m *Monitor) Acquire(ctx context.Context, gen uint64) (release func(), err error) {
	return m.leases.acquire(ctx, gen)
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
