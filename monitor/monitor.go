package monitor

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"runtime"
	"slices"
	"strings"
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

// loop is the state the monitor goroutine owns. Nothing else touches it.
type loop struct {
	m   *Monitor
	cfg Config
	log *slog.Logger

	modules []*moduleTrack // in name order
	pcsc    *pcscWatcher
	reader  pcscReader

	pcscUp      bool               // the last PC/SC read worked
	pcscErr     error              // why PC/SC is down
	readers     map[string]*Reader // last successful read
	attachments uint64             // counter for Reader.Attachment
	slots       map[SlotKey]*Slot  // current slots (with tokens)
	slotTrack   map[SlotKey]*tracked
	lastGen     uint64
	seq         uint64
	reclaimGen  map[uint64]SlotKey // dead generations waiting for reclamation
	pcscRetry   backoff
	pcscRetryAt time.Time // non-zero: re-read PC/SC then (a read failed while the watcher was fine)
}

// tracked is what the loop remembers of a slot's token beyond the snapshot:
// the reader attachment and event count it was last seen with.
type tracked struct {
	attachment uint64
	eventCount uint16
}

type moduleTrack struct {
	mod         Module
	name        string
	initialized bool
	view        ModuleView // info read at initialization; zero until then
	waitMode    WaitMode
	waiterStop  chan struct{}
	waiterDone  chan struct{}
	failed      bool      // failing: its tokens are removed; finalize and initialize again
	failures    int       // failed reads in a row
	rereadAt    time.Time // after a transient read error, or while a card settles: read again then
	settleReads int       // re-reads so far while PC/SC shows a card the module does not
	nextSafety  time.Time // blocking mode: re-read then even without an event
	missed      int       // safety re-reads that found a change no event announced
	retry       backoff
	retryAt     time.Time // when not initialized: next Initialize attempt
	nextPoll    time.Time // polling mode: next re-read
	lastErr     error
}

func newLoop(m *Monitor) *loop {
	l := &loop{
		m: m, cfg: m.cfg, log: m.log,
		readers:    map[string]*Reader{},
		slots:      map[SlotKey]*Slot{},
		slotTrack:  map[SlotKey]*tracked{},
		reclaimGen: map[uint64]SlotKey{},
		pcscRetry:  backoff{Min: m.cfg.RetryMin, Max: m.cfg.RetryMax},
	}
	for _, mod := range m.cfg.Modules {
		l.modules = append(l.modules, &moduleTrack{
			mod: mod, name: mod.Name(),
			retry: backoff{Min: m.cfg.RetryMin, Max: m.cfg.ModuleRetryMax},
		})
	}
	slices.SortFunc(l.modules, func(a, b *moduleTrack) int { return strings.Compare(a.name, b.name) })
	for _, mt := range l.modules {
		l.initModule(mt)
	}
	if m.cfg.PCSC {
		l.pcsc = startPCSCWatcher(backoff{Min: m.cfg.RetryMin, Max: m.cfg.RetryMax}, func(connected bool) {
			m.inbox.mu.Lock()
			switch {
			case !connected:
				m.inbox.pcscLost = true
			case m.inbox.pcscLost:
				m.inbox.pcscLost, m.inbox.pcscRecovered = false, true
			}
			m.inbox.pcscDirty = true
			m.inbox.mu.Unlock()
			m.wake()
		})
	}
	return l
}

func (l *loop) run() {
	defer close(l.m.done)
	defer l.shutdown()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		l.armTimer(timer)
		var req *setModulesRequest
		select {
		case <-l.m.stop:
			return
		case <-l.m.wakeCh:
		case <-timer.C:
		case r := <-l.m.setModules:
			req = &r
		}
		select {
		case l.m.holdSem <- struct{}{}:
		case <-l.m.stop:
			return
		}
		if req != nil {
			l.replaceModules(req.modules)
		}
		l.refresh(req != nil)
		<-l.m.holdSem
		if req != nil {
			req.done <- l.m.Snapshot()
		}
	}
}

// armTimer sets the timer to the earliest deadline: a poll, a module
// re-initialization or a PC/SC re-read.
func (l *loop) armTimer(t *time.Timer) {
	var next time.Time
	consider := func(at time.Time) {
		if !at.IsZero() && (next.IsZero() || at.Before(next)) {
			next = at
		}
	}
	for _, mt := range l.modules {
		switch {
		case !mt.initialized, mt.failed:
			consider(mt.retryAt)
		case mt.waitMode == WaitPolling:
			consider(mt.nextPoll)
		case mt.waitMode == WaitBlocking:
			consider(mt.nextSafety)
		}
		if mt.initialized {
			consider(mt.rereadAt)
		}
	}
	consider(l.pcscRetryAt)
	d := time.Hour
	if !next.IsZero() {
		d = max(time.Until(next), 0)
	}
	t.Reset(d)
}

func (l *loop) shutdown() {
	if l.pcsc != nil {
		l.pcsc.close()
	}
	l.reader.close()
	for _, mt := range l.modules {
		l.finalizeModule(mt)
	}
	l.m.pubMu.Lock()
	for s := range l.m.subs {
		s.end()
	}
	l.m.subs = map[*Subscription]struct{}{}
	l.m.pubMu.Unlock()
}

// replaceModules applies a new module set: removed modules are finalized
// (their slots, and so their tokens, leave the next snapshot), new ones are
// initialized.
func (l *loop) replaceModules(mods []Module) {
	keep := map[Module]bool{}
	for _, mod := range mods {
		keep[mod] = true
	}
	var kept []*moduleTrack
	have := map[Module]bool{}
	for _, mt := range l.modules {
		if keep[mt.mod] {
			kept = append(kept, mt)
			have[mt.mod] = true
			continue
		}
		l.log.Info("module removed", "module", mt.name)
		l.finalizeModule(mt)
	}
	for _, mod := range mods {
		if have[mod] {
			continue
		}
		mt := &moduleTrack{mod: mod, name: mod.Name(), retry: backoff{Min: l.cfg.RetryMin, Max: l.cfg.ModuleRetryMax}}
		l.log.Info("module added", "module", mt.name)
		l.initModule(mt)
		kept = append(kept, mt)
	}
	slices.SortFunc(kept, func(a, b *moduleTrack) int { return strings.Compare(a.name, b.name) })
	l.modules = kept
}

// initModule initializes a module and starts its waiter.
func (l *loop) initModule(mt *moduleTrack) {
	if err := mt.mod.Initialize(); err != nil {
		mt.lastErr = err
		mt.retryAt = time.Now().Add(mt.retry.Next())
		l.log.Warn("module initialization failed", "module", mt.name, "err", err, "retry_at", mt.retryAt)
		return
	}
	mt.initialized = true
	mt.failures, mt.missed = 0, 0
	mt.nextSafety = time.Time{}
	mt.lastErr = nil
	mt.retryAt = time.Time{}
	mt.view = ModuleView{}
	mt.failed = false
	if mt.waitMode != WaitPolling {
		mt.waitMode = WaitBlocking
		l.startWaiter(mt)
	}
}

// finalizeModule stops the waiter (C_Finalize unblocks it, rule 7) and
// finalizes the module.
func (l *loop) finalizeModule(mt *moduleTrack) {
	if !mt.initialized {
		return
	}
	mt.initialized = false
	if mt.waiterStop != nil {
		close(mt.waiterStop)
	}
	if err := mt.mod.Finalize(); err != nil {
		l.log.Warn("module finalize failed", "module", mt.name, "err", err)
	}
	if mt.waiterDone != nil {
		select {
		case <-mt.waiterDone:
		case <-time.After(2 * time.Second):
			// A module whose wait ignores C_Finalize: its thread stays
			// blocked in the module. Nothing in Go can end it; report it.
			l.log.Error("module's C_WaitForSlotEvent did not return after C_Finalize; its waiter thread is lost", "module", mt.name)
		}
	}
	mt.waiterStop, mt.waiterDone = nil, nil
}

// startWaiter runs one blocking C_WaitForSlotEvent loop on its own locked
// OS thread (PKCS#11 modules may keep per-thread state). It only wakes the
// monitor.
func (l *loop) startWaiter(mt *moduleTrack) {
	stop := make(chan struct{})
	done := make(chan struct{})
	mt.waiterStop, mt.waiterDone = stop, done
	m := l.m
	mod, name := mt.mod, mt.name
	b := backoff{Min: l.cfg.RetryMin, Max: l.cfg.RetryMax}
	minGap := l.cfg.MinWakeGap
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		defer close(done)
		var lastWake time.Time
		for {
			_, err := mod.WaitForSlotEvent(false)
			select {
			case <-stop:
				return
			default:
			}
			switch {
			case err == nil:
				b.Reset()
				if gap := time.Since(lastWake); gap < minGap && !sleep(minGap-gap, stop) {
					return
				}
				lastWake = time.Now()
				m.markModuleDirty(name)
				continue
			case errors.Is(err, module.ErrFunctionNotSupported):
				m.inbox.mu.Lock()
				m.inbox.waitUnsupported[name] = true
				m.inbox.mu.Unlock()
				m.wake()
				return
			case errors.Is(err, module.ErrNotInitialized):
				// Finalized by someone other than the monitor: the module
				// has to be initialized again.
				m.inbox.mu.Lock()
				m.inbox.waitFailed[name] = err
				m.inbox.mu.Unlock()
				m.wake()
				return
			}
			// Other errors (OpenSC answers CKR_GENERAL_ERROR while pcscd is
			// gone): let the loop re-read, and do not spin.
			m.markModuleDirty(name)
			if !sleep(b.Next(), stop) {
				return
			}
		}
	}()
}

// takeInbox returns what the sources reported since the last refresh.
func (l *loop) takeInbox() reports {
	in := &l.m.inbox
	in.mu.Lock()
	defer in.mu.Unlock()
	got := in.reports
	in.pcscDirty, in.pcscRecovered = false, false
	in.modulesDirty, in.waitUnsupported, in.waitFailed = map[string]bool{}, map[string]bool{}, map[string]error{}
	in.drained = nil
	in.rescan = false
	return got
}
