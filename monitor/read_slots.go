package monitor

import (
	"errors"
	"strings"
	"time"

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
