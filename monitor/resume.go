package monitor

import "time"

// Tokens lost to an outage. Rule 6 stands: when pcscd goes away or a module
// fails, the tokens it took are removed, and what comes back is a new
// generation. But a token that went without PC/SC seeing its card leave
// may well be the same card when it is back, and a client's sessions on it
// should survive (the broker reopens them). So the loop remembers such a
// token for Config.ResumeWindow: the token that then appears in the same
// place (the same reader of the same module, or the same slot when no
// reader stands behind it) with the same identity (label, manufacturer,
// model, serial) carries Resumes = the lost generation. A lost token that
// can no longer come back — PC/SC saw its reader empty or counted an event
// within the attachment it was lost in, another card appeared in its
// place, its module was removed, or the window passed — is announced once
// with TokenLost.

// lostToken is a token removed by an outage that may still resume.
type lostToken struct {
	tok *Token
	at  time.Time
	// The reader's attachment and event count when the token was lost;
	// attachment 0 when pcscd itself was gone (a new attachment on its
	// return cannot tell whether the card stayed).
	attachment uint64
	eventCount uint16
	// Decided at a buildSlot; acted on at the next commit.
	resumed bool // a token in its place resumes it: forget it silently
	gone    bool // it will not come back: TokenLost
}

// removedByOutage tells whether token t, removed by this refresh, went with
// an outage rather than with its card: its module failed, pcscd is gone or
// the reader unavailable, or the module stopped showing it while PC/SC
// counted no event in its reader. A token replaced in its slot by another
// generation, or on a module that is no longer watched, did not.
func (l *loop) removedByOutage(t *Token, next map[SlotKey]*Slot) bool {
	if s := next[t.Slot]; s != nil && s.Token != nil {
		return false
	}
	mt := l.moduleTrack(t.Slot.Module)
	if mt == nil {
		return false
	}
	if mt.failed || (!mt.initialized && !mt.released) {
		return true
	}
	if t.Reader == "" {
		return false
	}
	if !l.pcscUp {
		return true
	}
	rd := l.readers[t.Reader]
	if rd == nil {
		return false // the reader itself was unplugged, with its card
	}
	switch rd.State {
	case ReaderUnavailable:
		return true
	case ReaderPresent, ReaderExclusive, ReaderMute:
		tr := l.slotTrack[t.Slot]
		return tr != nil && tr.attachment == rd.Attachment && tr.eventCount == rd.EventCount
	}
	return false
}

// loseToken remembers t, removed by an outage, for a resumption.
func (l *loop) loseToken(t *Token, now time.Time) {
	lt := &lostToken{tok: t, at: now}
	if rd := l.readers[t.Reader]; t.Reader != "" && l.pcscUp && rd != nil {
		lt.attachment, lt.eventCount = rd.Attachment, rd.EventCount
	}
	l.lost = append(l.lost, lt)
	l.log.Info("token lost to an outage; its sessions wait for the same card", "generation", t.Generation, "slot", t.Slot, "window", l.cfg.ResumeWindow)
}

// claimLost is asked by buildSlot for a token about to get a new
// generation in slot key (reader: the slot's reader, rd its state): it
// returns the generation the token resumes, or 0. A lost token in the same
// place that is another card, or whose reader PC/SC saw change within the
// attachment it was lost in, cannot come back any more.
func (l *loop) claimLost(key SlotKey, reader string, cand *Token, rd *Reader) uint64 {
	var resumes uint64
	for _, lt := range l.lost {
		if lt.gone || lt.resumed || lt.tok.Slot.Module != key.Module {
			continue
		}
		if lt.tok.Reader != reader || (reader == "" && lt.tok.Slot != key) {
			continue
		}
		sawChange := rd != nil && lt.attachment != 0 && rd.Attachment == lt.attachment && rd.EventCount != lt.eventCount
		if resumes == 0 && lt.tok.sameCard(cand) && !sawChange {
			lt.resumed = true
			resumes = lt.tok.Generation
			continue
		}
		lt.gone = true
	}
	return resumes
}

// settleLost decides, at a commit, which lost tokens can no longer come
// back, and returns them (for TokenLost); resumed ones are forgotten.
func (l *loop) settleLost(now time.Time) []*Token {
	var gone []*Token
	kept := l.lost[:0]
	for _, lt := range l.lost {
		switch {
		case lt.resumed:
			continue
		case lt.gone, l.moduleTrack(lt.tok.Slot.Module) == nil, !now.Before(lt.at.Add(l.cfg.ResumeWindow)):
		case lt.tok.Reader != "" && l.pcscUp && l.sawCardLeave(lt):
		default:
			kept = append(kept, lt)
			continue
		}
		gone = append(gone, lt.tok)
	}
	clear(l.lost[len(kept):])
	l.lost = kept
	return gone
}

// sawCardLeave: PC/SC, in the attachment the token was lost in, shows its
// reader empty or counted an insertion or removal since.
func (l *loop) sawCardLeave(lt *lostToken) bool {
	rd := l.readers[lt.tok.Reader]
	if rd == nil || lt.attachment == 0 || rd.Attachment != lt.attachment {
		return false
	}
	return rd.State == ReaderEmpty || rd.EventCount != lt.eventCount
}

// nextLostExpiry is when the oldest lost token's window ends (zero: none).
func (l *loop) nextLostExpiry() time.Time {
	var next time.Time
	for _, lt := range l.lost {
		if at := lt.at.Add(l.cfg.ResumeWindow); next.IsZero() || at.Before(next) {
			next = at
		}
	}
	return next
}
