package monitor

import (
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"time"
)

// The loop: the one goroutine that owns the state. It takes what the
// sources reported, decides what to read (refresh), has it read (read_*.go),
// and commits the result (publish.go).

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
	// lastRead is the reader attachment and event count each reader-backed
	// slot had when its module last read it: a released module is
	// initialized again only for a slot whose reader moved on since.
	lastRead map[SlotKey]tracked
	// changedReaders are the readers whose state this refresh's PC/SC read
	// found changed; lastReads and slotInfoAt let a module whose slots
	// stand for readers read only those slots (readChanged).
	changedReaders map[string]bool
	lastReads      map[SlotKey]slotRead
	slotInfoAt     map[SlotKey]time.Time
	lastGen        uint64
	seq            uint64
	reclaimGen     map[uint64]SlotKey // dead generations waiting for reclamation
	pcscRetry      backoff
	pcscRetryAt    time.Time    // non-zero: re-read PC/SC then (a read failed while the watcher was fine)
	pcscPollAt     time.Time    // non-zero: re-read PC/SC then (exclusive use is not an event: sharePoll)
	lost           []*lostToken // tokens removed by an outage that may resume (resume.go)
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

	// Idle release (release.go).
	pcscBacked  bool              // the last read showed slots that all stand for readers
	seenReaders map[string]uint64 // reader attachments at the last read
	released    bool              // finalized because idle; the view keeps its slots
	releaseAt   time.Time         // idle since before this minus the grace: release then
}

func newLoop(m *Monitor) *loop {
	l := &loop{
		m: m, cfg: m.cfg, log: m.log,
		readers:    map[string]*Reader{},
		slots:      map[SlotKey]*Slot{},
		slotTrack:  map[SlotKey]*tracked{},
		lastRead:   map[SlotKey]tracked{},
		lastReads:  map[SlotKey]slotRead{},
		slotInfoAt: map[SlotKey]time.Time{},
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
			consider(mt.releaseAt)
		}
	}
	consider(l.pcscRetryAt)
	consider(l.pcscPollAt)
	consider(l.nextLostExpiry())
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
		l.m.leases.unmanage(mt.name, ErrClosed)
		l.finalizeModule(mt)
	}
	l.m.pubMu.Lock()
	for s := range l.m.subs {
		s.end()
	}
	l.m.subs = map[*Subscription]struct{}{}
	l.m.pubMu.Unlock()
}

// takeInbox returns what the sources reported since the last refresh.
func (l *loop) takeInbox() reports {
	in := &l.m.inbox
	in.mu.Lock()
	defer in.mu.Unlock()
	got := in.reports
	in.pcscDirty, in.pcscRecovered = false, false
	in.modulesDirty, in.waitUnsupported, in.waitFailed = map[string]bool{}, map[string]bool{}, map[string]error{}
	in.demanded = map[string]bool{}
	in.drained = nil
	in.rescan = false
	return got
}

// refresh is the heart of the monitor (rules 1–3): take what the sources
// reported, re-read what may have changed, diff it against the current view,
// assign generations, and publish one new snapshot with its events.
func (l *loop) refresh(all bool) {
	in := l.takeInbox()
	now := time.Now()
	all = all || in.rescan
	l.changedReaders = map[string]bool{}

	for _, gen := range in.drained {
		l.reclaim(gen)
	}

	if in.pcscRecovered {
		// A module that failed while pcscd was gone (OpenSC answers
		// CKR_GENERAL_ERROR then) gets its next try now, not at the end
		// of a backoff that grew during the outage.
		for _, mt := range l.modules {
			if !mt.initialized || mt.failed {
				mt.retry.Reset()
				mt.retryAt = now
			}
		}
	}

	readModule := map[*moduleTrack]bool{}
	safetyRead := map[*moduleTrack]bool{} // read only because no event came for long
	for _, mt := range l.modules {
		if in.waitUnsupported[mt.name] && mt.waitMode != WaitPolling {
			l.log.Info("module cannot wait for slot events; polling it", "module", mt.name, "interval", l.cfg.PollInterval)
			mt.waitMode = WaitPolling
			mt.nextPoll = now
		}
		if err := in.waitFailed[mt.name]; err != nil && mt.initialized && !mt.failed {
			l.failModule(mt, fmt.Errorf("C_WaitForSlotEvent: %w", err))
		}
		if mt.failed && mt.initialized && l.m.leases.heldOnModule(mt.name) == 0 {
			l.finalizeModule(mt)
		}
		if !mt.initialized && !mt.retryAt.IsZero() && !now.Before(mt.retryAt) {
			l.publishState(StateRecovering, "initializing module "+mt.name+" again")
			l.initModule(mt)
			readModule[mt] = mt.initialized
		}
		if mt.initialized && mt.waitMode == WaitPolling && !now.Before(mt.nextPoll) {
			readModule[mt] = true
			mt.nextPoll = now.Add(l.cfg.PollInterval)
		}
		if mt.initialized && mt.waitMode == WaitBlocking {
			switch {
			case in.modulesDirty[mt.name]:
				mt.nextSafety = now.Add(l.cfg.SafetyInterval) // the wait works
			case mt.nextSafety.IsZero():
				mt.nextSafety = now.Add(l.cfg.SafetyInterval)
			case !now.Before(mt.nextSafety):
				readModule[mt] = true
				safetyRead[mt] = true
				mt.nextSafety = now.Add(l.cfg.SafetyInterval)
			}
		}
		if mt.initialized && !mt.rereadAt.IsZero() && !now.Before(mt.rereadAt) {
			readModule[mt] = true
			mt.rereadAt = time.Time{}
		}
		// A module read on PC/SC events is read when a reader changed
		// (below), not on every PC/SC wake-up: its own connect to a card
		// wakes the watcher too.
		if in.modulesDirty[mt.name] || all || (in.pcscDirty && mt.waitMode != WaitPCSC) {
			readModule[mt] = true
		}
	}

	readersChanged := false
	if l.cfg.PCSC && (all || in.pcscDirty || len(readModule) > 0 || len(in.demanded) > 0 ||
		(!l.pcscRetryAt.IsZero() && !now.Before(l.pcscRetryAt)) ||
		(!l.pcscPollAt.IsZero() && !now.Before(l.pcscPollAt))) {
		readersChanged = l.readPCSC(now)
		l.pcscPollAt = time.Time{} // read: scheduled again below
	}
	if readersChanged {
		for _, mt := range l.modules {
			readModule[mt] = true
		}
	}

	fresh := l.wakeReleased(in.demanded, readModule)

	newSlots := map[SlotKey]*Slot{}
	for _, mt := range l.modules {
		if mt.released {
			l.carrySlots(mt, newSlots)
			continue
		}
		if !mt.initialized || mt.failed {
			continue // a failed module has no slots, so its tokens are removed
		}
		if !readModule[mt] {
			l.keepSlots(mt, newSlots)
			continue
		}
		reads, err := l.readModule(mt, fresh[mt], all || safetyRead[mt] || in.modulesDirty[mt.name], now)
		if err != nil {
			l.moduleReadFailed(mt, err, now)
			if !mt.failed {
				l.keepSlots(mt, newSlots) // the last view, through a transient error
			}
			continue
		}
		if mt.failures > 0 {
			l.log.Info("module reads work again", "module", mt.name)
		}
		mt.failures, mt.lastErr = 0, nil
		mt.retry.Reset()
		mt.releaseAt = time.Time{} // a read is use: the idle grace starts again
		unsettled := false
		built := make([]*Slot, 0, len(reads))
		for _, r := range reads {
			s := l.buildSlot(mt, r, now)
			newSlots[s.Key] = s
			built = append(built, s)
			if s.Token == nil && r.token == nil && s.Reader != "" {
				if rd := l.readers[s.Reader]; rd != nil && rd.State == ReaderPresent {
					unsettled = true
				}
			}
		}
		l.noteRead(mt, built)
		l.decideWaitMode(mt, now)
		l.settle(mt, unsettled, now)
		if safetyRead[mt] && !all && !in.pcscDirty && !readersChanged && !in.modulesDirty[mt.name] {
			l.checkMissedEvents(mt, newSlots)
		}
	}

	l.considerRelease(now)
	if l.pcscPollAt.IsZero() {
		l.schedulePCSCPoll(now)
	}
	l.commit(newSlots)
	for _, mt := range l.modules {
		if mt.initialized {
			// Operations waiting for a released module go on once the
			// view shows what it read.
			l.m.leases.reopen(mt.name, nil)
		}
	}
}

// keepSlots puts a module's current slots into the next view unchanged.
func (l *loop) keepSlots(mt *moduleTrack, newSlots map[SlotKey]*Slot) {
	for k, s := range l.slots {
		if k.Module == mt.name {
			newSlots[k] = s
		}
	}
}

// settle schedules a few quick re-reads while PC/SC reports a card that the
// module does not show as a token yet: the module recognizes cards when it
// is asked, and its own slot event may already have been consumed by our
// read. A card that never becomes a token (blank, unsupported) costs a
// handful of reads, then nothing until the next event.
func (l *loop) settle(mt *moduleTrack, unsettled bool, now time.Time) {
	const maxSettleReads = 6
	if !unsettled {
		mt.settleReads = 0
		return
	}
	if mt.settleReads >= maxSettleReads {
		return
	}
	mt.settleReads++
	delay := l.cfg.RetryMin << (mt.settleReads - 1)
	if at := now.Add(delay); mt.rereadAt.IsZero() || at.Before(mt.rereadAt) {
		mt.rereadAt = at
	}
}
