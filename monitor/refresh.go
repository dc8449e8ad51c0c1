package monitor

import (
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/slotwatch/slotwatch/module"
)

// refresh is the heart of the monitor (rules 1–3): take what the sources
// reported, re-read what may have changed, diff it against the current view,
// assign generations, and publish one new snapshot with its events.
func (l *loop) refresh(all bool) {
	in := l.takeInbox()
	now := time.Now()
	all = all || in.rescan

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
		if in.modulesDirty[mt.name] || all || in.pcscDirty {
			readModule[mt] = true
		}
	}

	readersChanged := false
	if l.cfg.PCSC && (all || in.pcscDirty || len(readModule) > 0 || (!l.pcscRetryAt.IsZero() && !now.Before(l.pcscRetryAt))) {
		readersChanged = l.readPCSC(now)
	}
	if readersChanged {
		for _, mt := range l.modules {
			readModule[mt] = true
		}
	}

	newSlots := map[SlotKey]*Slot{}
	for _, mt := range l.modules {
		if !mt.initialized || mt.failed {
			continue // a failed module has no slots, so its tokens are removed
		}
		if !readModule[mt] {
			for k, s := range l.slots {
				if k.Module == mt.name {
					newSlots[k] = s
				}
			}
			continue
		}
		reads, err := readSlots(mt.mod)
		if err != nil {
			l.moduleReadFailed(mt, err, now)
			if !mt.failed {
				for k, s := range l.slots { // keep the last view through a transient error
					if k.Module == mt.name {
						newSlots[k] = s
					}
				}
			}
			continue
		}
		if mt.failures > 0 {
			l.log.Info("module reads work again", "module", mt.name)
		}
		mt.failures, mt.lastErr = 0, nil
		mt.retry.Reset()
		unsettled := false
		for _, r := range reads {
			s := l.buildSlot(mt, r, now)
			newSlots[s.Key] = s
			if s.Token == nil && r.token == nil && s.Reader != "" {
				if rd := l.readers[s.Reader]; rd != nil && rd.State == ReaderPresent {
					unsettled = true
				}
			}
		}
		l.settle(mt, unsettled, now)
		if safetyRead[mt] && !all && !in.pcscDirty && !readersChanged && !in.modulesDirty[mt.name] {
			l.checkMissedEvents(mt, newSlots)
		}
	}

	l.commit(newSlots, now)
}

// readPCSC re-reads every reader's state. It reports whether anything about
// the readers changed.
func (l *loop) readPCSC(now time.Time) bool {
	states, err := l.reader.read()
	if err != nil {
		changed := l.pcscUp || l.pcscErr == nil || l.pcscErr.Error() != err.Error()
		if l.pcscUp {
			l.log.Warn("PC/SC unavailable", "err", err)
		}
		l.pcscUp, l.pcscErr = false, err
		l.pcscRetryAt = now.Add(l.pcscRetry.Next())
		// Every reader is gone with pcscd: when it is back, each reader is
		// a new attachment whose event counter starts again.
		for _, r := range l.readers {
			if r.State != ReaderUnavailable {
				changed = true
			}
		}
		stale := map[string]*Reader{}
		for n, r := range l.readers {
			c := *r
			c.State, c.Atr, c.EventCount, c.Attachment = ReaderUnavailable, nil, 0, 0
			stale[n] = &c
		}
		l.readers = stale
		return changed
	}
	if !l.pcscUp {
		l.log.Info("PC/SC available", "readers", len(states))
		if l.pcscErr != nil {
			// Back after an outage: say so before the re-read's results.
			l.publishState(StateRecovering, "pcscd is back; re-reading readers")
		}
	}
	l.pcscUp, l.pcscErr = true, nil
	l.pcscRetry.Reset()
	l.pcscRetryAt = time.Time{}
	readers := map[string]*Reader{}
	changed := false
	for _, st := range states {
		r := &Reader{Name: st.Reader, State: readerState(st.EventState), EventCount: st.EventCount()}
		if r.State == ReaderPresent || r.State == ReaderMute {
			r.Atr = st.Atr
		}
		if old, ok := l.readers[st.Reader]; ok && old.Attachment != 0 {
			r.Attachment = old.Attachment
		} else {
			l.attachments++
			r.Attachment = l.attachments
		}
		if old, ok := l.readers[st.Reader]; !ok || !sameReader(old, r) {
			changed = true
		}
		readers[st.Reader] = r
	}
	if len(readers) != len(l.readers) {
		changed = true
	}
	l.readers = readers
	return changed
}

func sameReader(a, b *Reader) bool {
	return a.State == b.State && a.EventCount == b.EventCount && a.Attachment == b.Attachment && string(a.Atr) == string(b.Atr)
}

// slotRead is one slot as the module reported it in one refresh.
type slotRead struct {
	id    uint
	info  module.SlotInfo
	token *module.TokenInfo // nil: no (recognized) token
}

// readSlots reads every slot of a module and the token in it.
func readSlots(mod Module) ([]slotRead, error) {
	ids, err := mod.SlotList(false)
	if err != nil {
		return nil, err
	}
	var reads []slotRead
	for _, id := range ids {
		si, err := mod.SlotInfo(id)
		if errors.Is(err, module.ErrSlotIDInvalid) || module.IsTokenGone(err) {
			continue // the slot went away between list and info
		}
		if err != nil {
			return nil, err
		}
		r := slotRead{id: id, info: si}
		if si.TokenPresent() {
			ti, err := mod.TokenInfo(id)
			switch {
			case err == nil:
				r.token = &ti
			case module.IsTokenGone(err):
				// removed meanwhile, or a card that is not a token
			default:
				return nil, err
			}
		}
		reads = append(reads, r)
	}
	return reads, nil
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

// checkMissedEvents compares what a safety re-read found with the current
// view: a change no event announced means the module's wait missed it (or
// hangs). Too many of those make the module failing: initializing it
// again starts a fresh wait.
func (l *loop) checkMissedEvents(mt *moduleTrack, newSlots map[SlotKey]*Slot) {
	changed := false
	for k, s := range newSlots {
		if k.Module != mt.name {
			continue
		}
		old := l.slots[k]
		switch {
		case old == nil:
			changed = true
		case (old.Token == nil) != (s.Token == nil):
			changed = true
		case old.Token != nil && old.Token.Generation != s.Token.Generation:
			changed = true
		}
	}
	for k := range l.slots {
		if _, ok := newSlots[k]; !ok && k.Module == mt.name {
			changed = true
		}
	}
	if !changed {
		return
	}
	mt.missed++
	l.log.Warn("a re-read found a change the module's C_WaitForSlotEvent did not announce", "module", mt.name, "missed", mt.missed)
	if mt.missed >= l.cfg.MissedEventsBeforeReinit {
		mt.missed = 0
		l.failModule(mt, errors.New("C_WaitForSlotEvent misses events"))
	}
}

// moduleReadFailed counts a failed read; a module that keeps failing is
// finalized and initialized again (rule 6).
func (l *loop) moduleReadFailed(mt *moduleTrack, err error, now time.Time) {
	mt.failures++
	mt.lastErr = err
	l.log.Warn("module read failed", "module", mt.name, "err", err, "failures", mt.failures)
	if errors.Is(err, module.ErrNotInitialized) || mt.failures >= l.cfg.FailuresBeforeReinit {
		l.failModule(mt, err)
		return
	}
	mt.rereadAt = now.Add(mt.retry.Next())
}

// failModule removes every token of a failing module at once and schedules
// its re-initialization. The finalize itself waits until no operation holds
// one of its generations (rule 4).
func (l *loop) failModule(mt *moduleTrack, err error) {
	l.log.Error("module failing; it will be initialized again", "module", mt.name, "err", err)
	mt.failed = true
	mt.lastErr = err
	mt.retryAt = time.Now().Add(mt.retry.Next())
}

// matchReader finds the PC/SC reader a slot stands for. OpenSC names its
// slots after the reader, cut to PKCS#11's 64 characters.
func matchReader(desc string, readers map[string]*Reader) string {
	if desc == "" {
		return ""
	}
	if _, ok := readers[desc]; ok {
		return desc
	}
	if len(desc) >= 63 {
		for name := range readers {
			if strings.HasPrefix(name, desc) {
				return name
			}
		}
	}
	return ""
}

// buildSlot turns one slot read into the new view of that slot, deciding
// whether its token is the same insertion as before (rule 2).
func (l *loop) buildSlot(mt *moduleTrack, r slotRead, now time.Time) *Slot {
	key := SlotKey{Module: mt.name, ID: r.id}
	old := l.slots[key]
	s := &Slot{Key: key, Description: r.info.Description, Manufacturer: r.info.Manufacturer, Removable: r.info.Removable()}
	s.Reader = matchReader(r.info.Description, l.readers)
	if s.Reader == "" && old != nil && !l.pcscUp {
		s.Reader = old.Reader // pcscd is down: the slot still stands for its reader
	}
	if r.token == nil {
		return s
	}
	cand := &Token{
		Slot: key, Label: r.token.Label, Manufacturer: r.token.Manufacturer, Model: r.token.Model,
		Serial: r.token.Serial, Flags: r.token.Flags, Reader: s.Reader, Inserted: now,
	}
	var rd *Reader
	if s.Reader != "" {
		// A slot backed by a reader has a token only while PC/SC agrees a
		// card is present: the module may lag behind (or hold a stale
		// view while pcscd is gone).
		rd = l.readers[s.Reader]
		if rd == nil || rd.State != ReaderPresent {
			return s
		}
	}
	var prev *Token
	if old != nil {
		prev = old.Token
	}
	tr := l.slotTrack[key]
	replug := prev == nil || !prev.sameCard(cand)
	if !replug && rd != nil && tr != nil {
		// Same card info, but PC/SC counted insertions or removals since we
		// last saw it, or the reader itself went away meanwhile: the card was
		// pulled and put back inside one event gap.
		replug = tr.attachment != rd.Attachment || tr.eventCount != rd.EventCount
	}
	if rd != nil {
		l.slotTrack[key] = &tracked{attachment: rd.Attachment, eventCount: rd.EventCount}
	} else {
		delete(l.slotTrack, key)
	}
	if replug {
		l.lastGen++
		cand.Generation = l.lastGen
		s.Token = cand
		return s
	}
	if prev.Flags == cand.Flags && prev.Reader == cand.Reader {
		s.Token = prev
		return s
	}
	t := *prev
	t.Flags, t.Reader = cand.Flags, cand.Reader
	s.Token = &t
	return s
}

// commit diffs the new slots (and the readers and modules read meanwhile)
// against the current snapshot, kills and registers generations, and
// publishes the result. Removals come before insertions.
func (l *loop) commit(newSlots map[SlotKey]*Slot, now time.Time) {
	old := l.m.Snapshot()
	next := l.buildSnapshot(newSlots)
	var evs []Event

	if next.State != old.State || next.StateReason != old.StateReason {
		evs = append(evs, Event{Kind: StateChanged})
	}
	// Token removals first: a subscriber must see the old generation go
	// before anything else happens in its slot.
	for _, s := range old.Slots {
		if s.Token == nil {
			continue
		}
		ns := newSlots[s.Key]
		if ns == nil || ns.Token == nil || ns.Token.Generation != s.Token.Generation {
			evs = append(evs, Event{Kind: TokenRemoved, Token: s.Token})
			l.killGeneration(s.Token)
		}
	}
	for i := range old.Slots {
		if _, ok := newSlots[old.Slots[i].Key]; !ok {
			evs = append(evs, Event{Kind: SlotRemoved, Slot: &old.Slots[i]})
			delete(l.slotTrack, old.Slots[i].Key)
		}
	}
	for i := range old.Readers {
		if _, ok := next.Reader(old.Readers[i].Name); !ok {
			evs = append(evs, Event{Kind: ReaderRemoved, Reader: &old.Readers[i]})
		}
	}
	for i := range old.Modules {
		if _, ok := findModule(next, old.Modules[i].Name); !ok {
			evs = append(evs, Event{Kind: ModuleRemoved, Module: &old.Modules[i]})
		}
	}
	for i := range next.Modules {
		nm := &next.Modules[i]
		om, ok := findModule(old, nm.Name)
		if !ok || *om != *nm {
			evs = append(evs, Event{Kind: ModuleChanged, Module: nm})
		}
	}
	for i := range next.Readers {
		nr := &next.Readers[i]
		or, ok := old.Reader(nr.Name)
		switch {
		case !ok:
			evs = append(evs, Event{Kind: ReaderAdded, Reader: nr})
		case !sameReader(or, nr):
			evs = append(evs, Event{Kind: ReaderChanged, Reader: nr})
		}
	}
	for i := range next.Slots {
		ns := &next.Slots[i]
		os, ok := old.Slot(ns.Key)
		switch {
		case !ok:
			evs = append(evs, Event{Kind: SlotAdded, Slot: ns})
		case os.Description != ns.Description || os.Reader != ns.Reader || os.Removable != ns.Removable || os.Manufacturer != ns.Manufacturer:
			evs = append(evs, Event{Kind: SlotChanged, Slot: ns})
		}
	}
	for i := range next.Slots {
		nt := next.Slots[i].Token
		if nt == nil {
			continue
		}
		ot, ok := old.Token(nt.Generation)
		switch {
		case !ok:
			l.m.leases.add(nt.Generation, nt.Slot)
			evs = append(evs, Event{Kind: TokenInserted, Token: nt})
		case ot.Flags != nt.Flags || ot.Reader != nt.Reader:
			evs = append(evs, Event{Kind: TokenChanged, Token: nt})
		}
	}

	l.slots = newSlots
	if len(evs) == 0 && old.Seq != 0 {
		return
	}
	l.seq++
	next.Seq = l.seq
	for i := range evs {
		evs[i].Snapshot = next
	}
	for _, ev := range evs {
		l.log.Debug("event", "event", ev.String())
	}
	l.m.publish(next, evs)
}

func findModule(s *Snapshot, name string) (*ModuleView, bool) {
	for i := range s.Modules {
		if s.Modules[i].Name == name {
			return &s.Modules[i], true
		}
	}
	return nil, false
}

// killGeneration marks a removed token's generation dead: new operations on
// it fail at once, and its sessions are reclaimed when the last holder
// returns (rule 4).
func (l *loop) killGeneration(t *Token) {
	l.reclaimGen[t.Generation] = t.Slot
	if mt := l.moduleTrack(t.Slot.Module); mt != nil {
		mt.mod.RetireGeneration(t.Slot.ID, t.Generation)
	}
	if l.m.leases.kill(t.Generation) {
		l.reclaim(t.Generation)
	}
}

// reclaim forgets a drained generation's sessions without ever passing their
// handles to the module, then lets the slot's next generation open sessions.
func (l *loop) reclaim(gen uint64) {
	key, ok := l.reclaimGen[gen]
	if !ok {
		return
	}
	delete(l.reclaimGen, gen)
	if mt := l.moduleTrack(key.Module); mt != nil {
		if n := mt.mod.ReclaimSlot(key.ID, gen); n > 0 {
			l.log.Debug("reclaimed sessions of a removed token", "slot", key, "generation", gen, "sessions", n)
		}
	}
	l.m.leases.reclaimed(gen)
}

func (l *loop) moduleTrack(name string) *moduleTrack {
	for _, mt := range l.modules {
		if mt.name == name {
			return mt
		}
	}
	return nil
}

// buildSnapshot assembles an immutable snapshot from the loop's state.
func (l *loop) buildSnapshot(slots map[SlotKey]*Slot) *Snapshot {
	s := &Snapshot{PCSC: l.cfg.PCSC && l.pcscUp, LastGeneration: l.lastGen}
	var problems []string
	if l.cfg.PCSC && !l.pcscUp && l.pcscErr != nil {
		problems = append(problems, l.pcscErr.Error())
	}
	for _, mt := range l.modules {
		mv := mt.view
		if mv.Name == "" {
			mv = l.moduleInfo(mt)
			if mt.initialized {
				mt.view = mv
			}
		}
		mv.WaitMode = mt.waitMode
		mv.State, mv.StateReason = ModuleRunning, ""
		if !mt.initialized || mt.failed {
			mv.State = ModuleFailed
			reason := "not initialized"
			if mt.lastErr != nil {
				reason = mt.lastErr.Error()
			}
			mv.StateReason = reason
			problems = append(problems, fmt.Sprintf("module %s failed: %s", mt.name, reason))
		}
		s.Modules = append(s.Modules, mv)
	}
	for _, name := range slices.Sorted(maps.Keys(l.readers)) {
		s.Readers = append(s.Readers, *l.readers[name])
	}
	for _, k := range slices.SortedFunc(maps.Keys(slots), func(a, b SlotKey) int {
		if c := strings.Compare(a.Module, b.Module); c != 0 {
			return c
		}
		return int(a.ID) - int(b.ID)
	}) {
		s.Slots = append(s.Slots, *slots[k])
	}
	switch {
	case len(problems) > 0:
		s.State, s.StateReason = StateDegraded, strings.Join(problems, "; ")
	default:
		s.State = StateRunning
	}
	return s
}

// moduleInfo reads the module's C_GetInfo for the snapshot.
func (l *loop) moduleInfo(mt *moduleTrack) ModuleView {
	v := ModuleView{Name: mt.name, Path: mt.mod.Path()}
	if !mt.initialized {
		return v
	}
	info, err := mt.mod.Info()
	if err != nil {
		return v
	}
	v.Description, v.Manufacturer, v.LibraryVersion = info.Description, info.Manufacturer, info.LibraryVersion.String()
	return v
}

// publishState publishes the current view with another State, e.g.
// Recovering while a source is being brought back.
func (l *loop) publishState(state State, reason string) {
	old := l.m.Snapshot()
	if old.State == state && old.StateReason == reason {
		return
	}
	next := *old
	next.State, next.StateReason = state, reason
	l.seq++
	next.Seq = l.seq
	l.m.publish(&next, []Event{{Kind: StateChanged, Snapshot: &next}})
}
