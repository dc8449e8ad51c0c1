package broker

import (
	"cmp"
	"context"
	"errors"
	"slices"

	"github.com/miekg/pkcs11"

	"github.com/slotwatch/slotwatch/module"
	"github.com/slotwatch/slotwatch/monitor"
)

// SessionInfo is what the broker tells about one session.
type SessionInfo struct {
	ID         uint64 // never reused for the daemon's life
	Caller     Caller // who opened it and owns it
	Generation uint64 // the token generation it was opened on
	Slot       monitor.SlotKey
	ReadWrite  bool
	// State is the CKS_* state as its owner may use it: a caller that is
	// not the token's login owner has a public session, whatever the
	// module says.
	State uint
}

// session is one open session: the module's session (by its registry id)
// and who owns it. Only info.State changes after opening, under Broker.mu.
// It holds no module: a call reaches the module only through a held
// generation (held.mod), which is the token's.
type session struct {
	info  SessionInfo
	modID uint64
	// suspended is non-nil while the session's token is away after an
	// outage (resume.go): it has no module session then, and is closed
	// when the session is resumed (a new record replaces this one) or
	// closed.
	suspended chan struct{}
}

func publicState(readWrite bool) uint {
	if readWrite {
		return pkcs11.CKS_RW_PUBLIC_SESSION
	}
	return pkcs11.CKS_RO_PUBLIC_SESSION
}

// OpenSession opens a session for c on token generation gen.
func (b *Broker) OpenSession(c Caller, gen uint64, readWrite bool) (SessionInfo, error) {
	exit, err := b.enter(c)
	if err != nil {
		return SessionInfo{}, err
	}
	defer exit()
	if err := b.checkSessionLimit(c, gen); err != nil {
		return SessionInfo{}, err
	}
	ctx, cancel := b.waitCtx()
	defer cancel()
	h, err := b.hold(ctx, gen, false)
	if err != nil {
		return SessionInfo{}, err
	}
	defer h.done()
	ms, err := h.mod.OpenSession(c.ID, h.tok.Slot.ID, gen, readWrite)
	if err != nil {
		return SessionInfo{}, err
	}
	// The module binds a session to whatever card is in the slot: a card
	// swapped before the monitor noticed must not be used as this one.
	if !h.stillInSlot() {
		h.mod.CloseSession(ms.ID)
		return SessionInfo{}, h.swapped()
	}
	info := SessionInfo{Caller: c, Generation: gen, Slot: h.tok.Slot, ReadWrite: readWrite, State: publicState(readWrite)}
	if b.loginOf(h.state) == c.ID {
		if st, err := h.mod.SessionState(ms.ID); err == nil {
			info.State = st
		}
	}

	b.mu.Lock()
	// Checked again now that the session exists: the caller may have left,
	// the token gone, or concurrent opens used up the limit meanwhile.
	var refuse error
	switch {
	case b.callers[c.ID] == nil:
		refuse = errorf(ErrCallerGone, "caller %s left while its session was being opened", c.ID)
	case h.state.dead || !b.live(gen):
		refuse = errorf(ErrTokenRemoved, "token generation %d was removed while the session was being opened", gen)
	case b.countLocked(c.ID, gen) >= b.limits.SessionsPerToken:
		refuse = b.sessionLimitError(c)
	}
	if refuse != nil {
		b.mu.Unlock()
		h.mod.CloseSession(ms.ID)
		return SessionInfo{}, refuse
	}
	b.nextID++
	info.ID = b.nextID
	b.sessions[info.ID] = &session{info: info, modID: ms.ID}
	b.recent[info.ID%uint64(len(b.recent))] = struct{ id, gen uint64 }{info.ID, gen}
	if b.obs != nil {
		b.obs.SessionOpened(info)
	}
	b.mu.Unlock()
	return info, nil
}

func (b *Broker) checkSessionLimit(c Caller, gen uint64) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.countLocked(c.ID, gen) >= b.limits.SessionsPerToken {
		return b.sessionLimitError(c)
	}
	return nil
}

func (b *Broker) sessionLimitError(c Caller) error {
	return errorf(ErrBusy, "%s holds %d sessions on this token, the most one caller may (max-sessions-per-token)", c.ID, b.limits.SessionsPerToken)
}

// countLocked counts caller id's sessions on gen; b.mu must be held.
func (b *Broker) countLocked(id string, gen uint64) int {
	n := 0
	for _, s := range b.sessions {
		if s.info.Caller.ID == id && s.info.Generation == gen {
			n++
		}
	}
	return n
}

// live tells whether gen is in the monitor's current view. The view
// changes before a face applies the removal (TokenGone), so a session
// inserted after this check is seen by TokenGone.
func (b *Broker) live(gen uint64) bool {
	_, ok := b.gens.Snapshot().Token(gen)
	return ok
}

// own returns c's open session id.
func (b *Broker) own(c Caller, id uint64) (*session, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	s, ok := b.sessions[id]
	if !ok {
		return nil, errorf(ErrNoSuchSession, "session %d is not open", id)
	}
	if s.info.Caller.ID != c.ID {
		return nil, errorf(ErrAccessDenied, "session %d belongs to %s", id, s.info.Caller.ID)
	}
	return s, nil
}

// CloseSession closes c's session id. If c is logged in to the token and
// this is its last session there, the token is logged out first.
func (b *Broker) CloseSession(c Caller, id uint64) error {
	exit, err := b.enter(c)
	if err != nil {
		return err
	}
	defer exit()
	ctx, cancel := b.waitCtx()
	defer cancel()
	for {
		s, err := b.own(c, id)
		if err != nil {
			return err
		}
		err = b.closeOnToken(ctx, c, s.info.Generation, []*session{s}, "closed by its owner")
		if !b.replaced(s) {
			return err
		}
		// Suspended or resumed under the close: close what it is now.
	}
}

// CloseAllSessions closes c's sessions on generation gen, nobody else's.
func (b *Broker) CloseAllSessions(c Caller, gen uint64) error {
	exit, err := b.enter(c)
	if err != nil {
		return err
	}
	defer exit()
	if _, live := b.gens.Snapshot().Token(gen); !live {
		return errorf(ErrTokenRemoved, "token generation %d is gone", gen)
	}
	ctx, cancel := b.waitCtx()
	defer cancel()
	return b.closeWhere(ctx, c, func(s *session) bool { return s.info.Generation == gen }, "CloseAllSessions")
}

// closeWhere closes c's sessions that match, token by token.
func (b *Broker) closeWhere(ctx context.Context, c Caller, match func(*session) bool, why string) error {
	var first error
	for {
		byGen := map[uint64][]*session{}
		var all []*session
		b.mu.Lock()
		for _, s := range b.sessions {
			if s.info.Caller.ID == c.ID && match(s) {
				byGen[s.info.Generation] = append(byGen[s.info.Generation], s)
				all = append(all, s)
			}
		}
		b.mu.Unlock()
		for gen, victims := range byGen {
			slices.SortFunc(victims, func(x, y *session) int { return cmp.Compare(x.info.ID, y.info.ID) })
			if err := b.closeOnToken(ctx, c, gen, victims, why); err != nil && first == nil {
				first = err
			}
		}
		// Again for those suspended or resumed under the close.
		if first != nil || !slices.ContainsFunc(all, b.replaced) {
			return first
		}
	}
}

// closeOnToken closes some of c's sessions on one token. When c owns the
// token's login and keeps no session there, it logs the token out on one of
// them before closing: a login never outlives its owner's sessions, and
// never waits for "the last session closed" (which slotwatch's own lookups
// or another caller's session would keep from happening). Changing the
// login takes the token exclusively; a caller that is not the owner closes
// under the shared lock, which keeps the login as it is meanwhile.
func (b *Broker) closeOnToken(ctx context.Context, c Caller, gen uint64, victims []*session, why string) error {
	// A suspended session has no module session to close (resume.go).
	var away []*session
	victims = slices.DeleteFunc(slices.Clone(victims), func(s *session) bool {
		if s.suspended != nil {
			away = append(away, s)
		}
		return s.suspended != nil
	})
	b.drop(away, why)
	if len(victims) == 0 {
		return nil
	}
	exclusive := false
	for {
		h, err := b.hold(ctx, gen, exclusive)
		if errors.Is(err, ErrTokenRemoved) {
			// A dead generation's handles never reach the module again
			// (DESIGN.md rule 4); the monitor reclaims them.
			b.drop(victims, "token removed")
			return nil
		}
		if err != nil {
			return err
		}
		owner := b.loginOf(h.state) == c.ID
		if owner && !exclusive {
			h.done()
			exclusive = true
			continue
		}
		err = b.closeHeld(h, c, victims, why)
		h.done()
		return err
	}
}

// closeHeld is closeOnToken with the token held (exclusively if c owns
// the login).
func (b *Broker) closeHeld(h *held, c Caller, victims []*session, why string) error {
	b.mu.Lock()
	var taken []*session
	for _, s := range victims {
		if b.sessions[s.info.ID] == s {
			delete(b.sessions, s.info.ID)
			taken = append(taken, s)
		}
	}
	lastOfOwner := h.state.login == c.ID && b.countLocked(c.ID, h.tok.Generation) == 0
	b.mu.Unlock()
	var first error
	if lastOfOwner && len(taken) > 0 {
		if err := h.mod.Logout(taken[0].modID); err != nil && !errors.Is(err, module.ErrUserNotLoggedIn) {
			b.log.Warn("logging the token out as its login's owner closed its last session", "caller", c.ID, "generation", h.tok.Generation, "err", err)
		}
		b.setLogin(h, "")
	}
	for _, s := range taken {
		if err := h.mod.CloseSession(s.modID); err != nil && first == nil {
			first = err
		}
		b.notifyClosed(s, why)
	}
	return first
}

// drop forgets sessions without a module call and tells the observer. A
// suspended session's owner that keeps none there any more loses the
// login kept for its resumption.
func (b *Broker) drop(victims []*session, why string) {
	for _, s := range victims {
		b.mu.Lock()
		if b.sessions[s.info.ID] == s {
			delete(b.sessions, s.info.ID)
			if s.suspended != nil {
				close(s.suspended)
				if sus := b.away[s.info.Generation]; sus != nil && sus.login == s.info.Caller.ID && b.countLocked(sus.login, s.info.Generation) == 0 {
					sus.pin.Wipe()
					sus.login, sus.pin = "", nil
				}
			}
			if b.obs != nil {
				b.obs.SessionClosed(s.info, why)
			}
		}
		b.mu.Unlock()
	}
}

func (b *Broker) notifyClosed(s *session, why string) {
	if b.obs == nil {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.obs.SessionClosed(s.info, why)
}

// TokenGone is what a face calls when the monitor reports generation gen
// removed, before it announces the removal: the generation's sessions are
// forgotten without a module call (their handles must never reach the
// module again; the monitor reclaims them once calls in flight drained),
// and its login with them.
func (b *Broker) TokenGone(gen uint64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if ts, ok := b.tokens[gen]; ok {
		ts.dead = true
		ts.login = ""
		ts.pin.Wipe()
		ts.pin = nil
		delete(b.tokens, gen)
	}
	var victims []*session
	for id, s := range b.sessions {
		if s.info.Generation == gen {
			victims = append(victims, s)
			delete(b.sessions, id)
		}
	}
	slices.SortFunc(victims, func(x, y *session) int { return cmp.Compare(x.info.ID, y.info.ID) })
	for _, s := range victims {
		if b.obs != nil {
			b.obs.SessionClosed(s.info, "token removed")
		}
	}
}

// Session returns open session id.
func (b *Broker) Session(id uint64) (SessionInfo, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	s, ok := b.sessions[id]
	if !ok {
		return SessionInfo{}, false
	}
	return s.info, true
}

// Sessions returns every open session, by id.
func (b *Broker) Sessions() []SessionInfo {
	b.mu.Lock()
	defer b.mu.Unlock()
	out := make([]SessionInfo, 0, len(b.sessions))
	for _, s := range b.sessions {
		out = append(out, s.info)
	}
	slices.SortFunc(out, func(x, y SessionInfo) int { return cmp.Compare(x.ID, y.ID) })
	return out
}

// SessionGeneration returns the token generation session id was opened on.
// known is false for an id never issued; forgotten is true for one issued
// so long ago that the broker no longer remembers (its token is then
// almost surely gone, and faces treat it so).
func (b *Broker) SessionGeneration(id uint64) (gen uint64, known, forgotten bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if id == 0 || id > b.nextID {
		return 0, false, false
	}
	e := b.recent[id%uint64(len(b.recent))]
	if e.id != id {
		return 0, true, true
	}
	return e.gen, true, false
}

// holdersLocked lists the sessions on slot and each holder once; b.mu must
// be held.
func (b *Broker) holdersLocked(slot monitor.SlotKey) (n int, holders []Caller) {
	var ss []*session
	for _, s := range b.sessions {
		if s.info.Slot == slot {
			ss = append(ss, s)
		}
	}
	slices.SortFunc(ss, func(x, y *session) int { return cmp.Compare(x.info.ID, y.info.ID) })
	seen := map[string]bool{}
	for _, s := range ss {
		if !seen[s.info.Caller.ID] {
			seen[s.info.Caller.ID] = true
			holders = append(holders, s.info.Caller)
		}
	}
	return len(ss), holders
}
