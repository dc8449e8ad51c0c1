package monitor

import (
	"time"
)

// Idle release (IdleRelease): a module whose slots all stand for PC/SC
// readers is finalized while nothing needs it, so that it holds no card,
// and initialized again when an operation or a reader change needs it.
// Meanwhile PC/SC is the only source for it, and its slots are carried over
// from the last read (carrySlots) as long as PC/SC shows nothing the module
// would have to read.

// decideWaitMode picks how the monitor learns of a module's events, after
// its first successful read since it was initialized: PC/SC for a module
// whose slots stand for readers (when its idle release is on: no waiter
// thread then, so finalizing it never races a C_WaitForSlotEvent), a
// blocking waiter otherwise.
func (l *loop) decideWaitMode(mt *moduleTrack, now time.Time) {
	if mt.waitMode != WaitUnknown {
		return
	}
	if mt.pcscBacked && l.cfg.IdleRelease(mt.name).Enabled {
		mt.waitMode = WaitPCSC
		l.m.leases.manage(mt.name)
		return
	}
	mt.waitMode = WaitBlocking
	mt.nextSafety = now.Add(l.cfg.SafetyInterval)
	l.startWaiter(mt)
}

// noteRead records what a successful read of a module showed: whether its
// slots all stand for readers, and which readers (attachments) it saw.
func (l *loop) noteRead(mt *moduleTrack, slots []*Slot) {
	mt.pcscBacked = len(slots) > 0
	for _, s := range slots {
		if s.Reader == "" {
			mt.pcscBacked = false
		}
	}
	mt.seenReaders = map[string]uint64{}
	for name, r := range l.readers {
		mt.seenReaders[name] = r.Attachment
	}
}

// needsCardRead tells whether a released module must be initialized to keep
// the view true: a card was inserted or swapped in one of its readers since
// it last read it (the event counter moved), or readers came or went.
// Removals need no read: PC/SC alone says the card is gone.
func (l *loop) needsCardRead(mt *moduleTrack) bool {
	if !l.pcscUp {
		return false // nothing to read with; the readers are unavailable
	}
	if len(l.readers) != len(mt.seenReaders) {
		return true
	}
	for name, r := range l.readers {
		if att, ok := mt.seenReaders[name]; !ok || att != r.Attachment {
			return true
		}
	}
	for k, s := range l.slots {
		if k.Module != mt.name || s.Reader == "" {
			continue
		}
		rd := l.readers[s.Reader]
		if rd == nil || rd.State != ReaderPresent {
			continue
		}
		if last, ok := l.lastRead[k]; !ok || last.attachment != rd.Attachment || last.eventCount != rd.EventCount {
			return true
		}
	}
	return false
}

// carrySlots puts a released module's slots into the next view unread: a
// token stays while its reader shows the same insertion (also while another
// process holds the card exclusively); an emptied reader empties its slot.
func (l *loop) carrySlots(mt *moduleTrack, newSlots map[SlotKey]*Slot) {
	for k, s := range l.slots {
		if k.Module != mt.name {
			continue
		}
		c := *s
		if c.Reader != "" {
			if rd := l.readers[c.Reader]; rd != nil && (rd.State == ReaderPresent || rd.State == ReaderExclusive) {
				c.Token = l.sameInsertion(s, rd)
			} else {
				c.Token = nil
			}
		}
		newSlots[k] = &c
	}
}

// wakeReleased initializes the released modules an operation waits for
// (demanded) or whose readers show a card to read; it sets readModule for
// every released module (true: read it now) and returns the ones it
// initialized.
func (l *loop) wakeReleased(demanded map[string]bool, readModule map[*moduleTrack]bool) (fresh map[*moduleTrack]bool) {
	fresh = map[*moduleTrack]bool{}
	for _, mt := range l.modules {
		if !mt.released {
			continue
		}
		why := ""
		switch {
		case demanded[mt.name]:
			why = "an operation needs it"
		case l.needsCardRead(mt):
			why = "a reader changed"
		default:
			readModule[mt] = false
			continue
		}
		readModule[mt] = l.wakeModule(mt, why)
		fresh[mt] = true
	}
	return fresh
}

// wakeModule initializes a released module again; the refresh then reads
// it. It reports whether the module is initialized.
func (l *loop) wakeModule(mt *moduleTrack, why string) bool {
	l.log.Debug("initializing a released module", "module", mt.name, "why", why)
	mt.released = false
	l.initModule(mt)
	if !mt.initialized {
		// Its operations fail with the error; the module is failing now
		// and recovers as any other (rule 6).
		l.m.leases.reopen(mt.name, mt.lastErr)
		return false
	}
	return true
}

// considerRelease finalizes the modules that have been idle for their
// grace, and schedules the check of those that just became idle. Idle: the
// module's slots stand for readers, PC/SC is up (it is the source while the
// module is released), no read is pending, no operation holds one of its
// generations and it has no session.
func (l *loop) considerRelease(now time.Time) {
	for _, mt := range l.modules {
		policy := l.cfg.IdleRelease(mt.name)
		idle := policy.Enabled && mt.initialized && !mt.failed && mt.pcscBacked && mt.waitMode != WaitPolling &&
			l.pcscUp && mt.rereadAt.IsZero() &&
			l.m.leases.heldOnModule(mt.name) == 0 && mt.mod.SessionCount() == 0
		if !idle {
			mt.releaseAt = time.Time{}
			continue
		}
		if mt.releaseAt.IsZero() {
			mt.releaseAt = now.Add(policy.Grace)
		}
		if now.Before(mt.releaseAt) {
			continue
		}
		mt.releaseAt = time.Time{}
		l.releaseModule(mt)
	}
}

// releaseModule finalizes an idle module, unless an operation got hold of
// it meanwhile.
func (l *loop) releaseModule(mt *moduleTrack) {
	l.m.leases.manage(mt.name)
	if !l.m.leases.shut(mt.name) {
		return
	}
	if mt.mod.SessionCount() > 0 {
		l.m.leases.reopen(mt.name, nil)
		return
	}
	l.log.Debug("releasing an idle module", "module", mt.name)
	l.finalizeModule(mt)
	mt.released = true
	if mt.waitMode == WaitBlocking {
		// Its waiter ended with the finalize; PC/SC is its source from now.
		mt.waitMode = WaitPCSC
	}
}

// schedulePCSCPoll decides when PC/SC is read again without an event.
// pcscd wakes no waiter when another process connects to a card or lets it
// go, so exclusive use (ReaderExclusive) is seen only by reading: the
// monitor reads PC/SC on every reader event and before it initializes a
// released module for a call, and, while a card is held exclusively, every
// SharePoll to see it freed (a card swapped meanwhile is read then). Not
// while cards are merely present: that would wake the daemon every second
// on every idle desktop to report something no call has asked about yet.
func (l *loop) schedulePCSCPoll(now time.Time) {
	l.pcscPollAt = time.Time{}
	if !l.pcscUp {
		return
	}
	for _, r := range l.readers {
		if r.State == ReaderExclusive {
			l.pcscPollAt = now.Add(l.cfg.SharePoll)
			return
		}
	}
}
