package monitor

import (
	"cmp"
	"errors"
	"slices"
	"strings"
	"time"

	"github.com/miekg/pkcs11"

	"github.com/slotwatch/slotwatch/module"
)

// Reading a module's slots and tokens, and deciding for each token whether
// it is the same insertion as before or a new generation (rules 2, 3).

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

// readModule reads a module's slots: only those of the readers that changed
// when readChanged can, all of them otherwise. fresh: the module was
// initialized in this refresh; full: read everything (a rescan, a safety
// re-read, an event from the module itself).
func (l *loop) readModule(mt *moduleTrack, fresh, full bool, now time.Time) ([]slotRead, error) {
	if !full && mt.rereadAt.IsZero() {
		if reads, ok, err := l.readChanged(mt, fresh, now); ok || err != nil {
			return reads, err
		}
	}
	reads, err := readSlots(mt.mod)
	if err != nil {
		return nil, err
	}
	for k := range l.lastReads {
		if k.Module == mt.name {
			delete(l.lastReads, k)
		}
	}
	for _, r := range reads {
		k := SlotKey{Module: mt.name, ID: r.id}
		l.lastReads[k], l.slotInfoAt[k] = r, now
	}
	return reads, nil
}

// openSCSlotCache is how long OpenSC's C_GetSlotInfo answers from its cache
// without looking at the reader (one second), plus a margin.
const openSCSlotCache = 1100 * time.Millisecond

// readChanged reads, for a module whose slots stand for readers (WaitPCSC),
// only the slots of the readers that changed since it last read them, and
// carries the other slots' last reads over. C_GetSlotList and the unchanged
// slots' C_GetSlotInfo are what OpenSC spends most of a read on (each looks
// at every reader), and they tell nothing new when the reader set is the
// one the module last listed.
//
// It declines (ok false) unless the module is read on PC/SC events, the
// readers are the ones (and attachments) it last saw, and each changed
// reader has exactly one known slot. A changed slot is read with
// C_GetSlotInfo, which looks at the reader, unless that would answer from
// OpenSC's one-second cache (a swap could go unnoticed then, and
// C_GetTokenInfo would describe the old card). Right after
// a fresh C_Initialize (a released module woken for a card) only
// C_GetTokenInfo is called: the initialization read the card; within the
// cache's second, C_GetSlotList (which looks at every reader) and
// C_GetTokenInfo.
func (l *loop) readChanged(mt *moduleTrack, fresh bool, now time.Time) (reads []slotRead, ok bool, err error) {
	if mt.waitMode != WaitPCSC || len(l.readers) != len(mt.seenReaders) {
		return nil, false, nil
	}
	for name, r := range l.readers {
		if att, ok := mt.seenReaders[name]; !ok || att != r.Attachment {
			return nil, false, nil
		}
	}
	changed := map[string]bool{}
	for name := range l.changedReaders {
		changed[name] = true
	}
	for k, s := range l.slots {
		if rd := l.readers[s.Reader]; k.Module == mt.name && rd != nil && rd.State == ReaderPresent {
			if last, ok := l.lastRead[k]; !ok || last.attachment != rd.Attachment || last.eventCount != rd.EventCount {
				changed[s.Reader] = true
			}
		}
	}
	var keys []SlotKey
	perReader := map[string]int{}
	cached := false // a changed slot's C_GetSlotInfo would answer from OpenSC's cache
	for k, s := range l.slots {
		if k.Module != mt.name {
			continue
		}
		if _, ok := l.lastReads[k]; !ok || s.Reader == "" {
			return nil, false, nil
		}
		keys = append(keys, k)
		perReader[s.Reader]++
		if rd := l.readers[s.Reader]; changed[s.Reader] && rd != nil && rd.State == ReaderPresent && now.Sub(l.slotInfoAt[k]) < openSCSlotCache {
			cached = true
		}
	}
	for name := range changed {
		if l.readers[name] != nil && perReader[name] != 1 {
			return nil, false, nil
		}
	}
	slices.SortFunc(keys, func(a, b SlotKey) int { return cmp.Compare(a.ID, b.ID) })
	// detected: the module has just looked at every reader (and read
	// every new card), so C_GetTokenInfo alone tells the token.
	detected := fresh
	if cached && !fresh {
		// C_GetSlotInfo would answer from its cache: have the module
		// look at every reader (C_GetSlotList does), and check that the
		// slots are the known ones.
		ids, err := mt.mod.SlotList(false)
		if err != nil {
			return nil, false, err
		}
		slices.Sort(ids)
		if !slices.EqualFunc(ids, keys, func(id uint, k SlotKey) bool { return id == k.ID }) {
			return nil, false, nil
		}
		detected = true
		for _, k := range keys {
			l.slotInfoAt[k] = now
		}
	}
	for _, k := range keys {
		reader := l.slots[k].Reader
		if !changed[reader] || l.readers[reader] == nil || l.readers[reader].State != ReaderPresent {
			// Unchanged, or the card left (or is held by another
			// process): PC/SC alone says so, buildSlot acts on it.
			reads = append(reads, l.lastReads[k])
			continue
		}
		if detected {
			// After a fresh C_Initialize slot ids follow the reader
			// list, which is the one of the last full read.
			ti, err := mt.mod.TokenInfo(k.ID)
			if err != nil {
				return nil, false, nil // no token yet (or a blank card): the full read settles it
			}
			r := l.lastReads[k]
			r.info.Flags |= pkcs11.CKF_TOKEN_PRESENT
			r.token = &ti
			l.lastReads[k] = r
			reads = append(reads, r)
			continue
		}
		si, err := mt.mod.SlotInfo(k.ID)
		if err != nil || matchReader(si.Description, l.readers) != l.slots[k].Reader {
			return nil, false, nil // let the full read sort it out
		}
		l.slotInfoAt[k] = now
		r := slotRead{id: k.ID, info: si}
		if si.TokenPresent() {
			ti, err := mt.mod.TokenInfo(k.ID)
			switch {
			case err == nil:
				r.token = &ti
			case module.IsTokenGone(err):
			default:
				return nil, false, err
			}
		}
		l.lastReads[k] = r
		reads = append(reads, r)
	}
	return reads, true, nil
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
	if rd := l.readers[s.Reader]; s.Reader != "" && rd != nil && rd.State == ReaderExclusive {
		// Another process holds the card exclusively: whatever the module
		// answers, it could not read it. The token stays as long as it is
		// the same insertion; a card that changed meanwhile is read once
		// the reader is free.
		s.Token = l.sameInsertion(old, rd)
		return s
	}
	if s.Reader != "" {
		if rd := l.readers[s.Reader]; rd != nil {
			l.lastRead[key] = tracked{attachment: rd.Attachment, eventCount: rd.EventCount}
		}
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
		cand.Resumes = l.claimLost(key, s.Reader, cand, rd)
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

// sameInsertion returns the slot's current token if PC/SC has counted no
// insertion or removal in its reader since the module last read it, nil
// otherwise.
func (l *loop) sameInsertion(old *Slot, rd *Reader) *Token {
	if old == nil || old.Token == nil {
		return nil
	}
	tr := l.slotTrack[old.Key]
	if tr == nil || tr.attachment != rd.Attachment || tr.eventCount != rd.EventCount {
		return nil
	}
	return old.Token
}
