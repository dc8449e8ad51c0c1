package broker

import (
	"cmp"
	"context"
	"slices"

	"github.com/slotwatch/slotwatch/internal/secret"
	"github.com/slotwatch/slotwatch/monitor"
)

// Sessions across an outage. When pcscd goes away or a module is
// re-initialized, the monitor removes the tokens it took (a new generation
// on return, rule 6), but marks a token that went without PC/SC seeing its
// card leave (monitor.Event.Outage). Its sessions are not closed: they are
// suspended — same ids, same owners, no module session — and a call on one
// waits for the card (at most Limits.TokenWait, then ErrBusy). If the same
// card comes back (a token whose Resumes names the lost generation), each
// session gets a module session on the new generation, and the login its
// owner had is made again with the PIN kept for it (Options.ResumeLogin;
// internal/secret). If it cannot come back (monitor.TokenLost), the
// sessions close as on a removal. Object handles are the module's and do
// not survive: a client finds its objects again (ErrNoSuchObject for an
// old handle).

// suspension is what a token lost to an outage leaves for its sessions.
type suspension struct {
	login   string         // the caller that was logged in, "" if none
	pin     *secret.Secret // its PIN (nil: not kept)
	pinUser uint           // CKU_USER or CKU_SO
}

// TokenAway is what a face calls, instead of TokenGone, for a token
// generation removed by an outage: its sessions are suspended until
// TokenBack or TokenLost.
func (b *Broker) TokenAway(gen uint64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	sus := &suspension{}
	if ts, ok := b.tokens[gen]; ok {
		ts.dead = true
		sus.login, sus.pin, sus.pinUser = ts.login, ts.pin, ts.pinUser
		ts.login, ts.pin = "", nil
		delete(b.tokens, gen)
	}
	n := 0
	for id, s := range b.sessions {
		if s.info.Generation != gen {
			continue
		}
		away := &session{info: s.info, suspended: make(chan struct{})}
		b.sessions[id] = away
		n++
	}
	if n == 0 {
		sus.pin.Wipe()
		return
	}
	b.away[gen] = sus
	b.log.Info("token lost to an outage; its sessions are suspended", "generation", gen, "sessions", n, "login", sus.login)
}

// TokenBack is what a face calls for an inserted token, after announcing
// it: if it resumes a generation whose sessions are suspended, they are
// reopened on it (in the background; calls on them wait).
func (b *Broker) TokenBack(t *monitor.Token) {
	if t.Resumes == 0 {
		return
	}
	b.mu.Lock()
	sus, ok := b.away[t.Resumes]
	delete(b.away, t.Resumes)
	if ok {
		b.resuming.Add(1)
	}
	b.mu.Unlock()
	if !ok {
		return
	}
	go func() {
		defer b.resuming.Done()
		b.resume(t.Resumes, t.Generation, sus)
	}()
}

// TokenLost is what a face calls when a generation removed by an outage
// will not come back: its suspended sessions close.
func (b *Broker) TokenLost(gen uint64) {
	b.mu.Lock()
	sus, ok := b.away[gen]
	delete(b.away, gen)
	b.mu.Unlock()
	if ok {
		sus.pin.Wipe()
		b.closeSuspended(gen, "token removed")
	}
}

// closeSuspended forgets gen's suspended sessions and tells the observer.
func (b *Broker) closeSuspended(gen uint64, why string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	var victims []*session
	for id, s := range b.sessions {
		if s.info.Generation == gen && s.suspended != nil {
			victims = append(victims, s)
			delete(b.sessions, id)
		}
	}
	slices.SortFunc(victims, func(x, y *session) int { return cmp.Compare(x.info.ID, y.info.ID) })
	for _, s := range victims {
		close(s.suspended)
		if b.obs != nil {
			b.obs.SessionClosed(s.info, why)
		}
	}
}

// resume reopens generation old's suspended sessions on generation gen,
// the same card, and logs its login's owner in again.
func (b *Broker) resume(old, gen uint64, sus *suspension) {
	defer sus.pin.Wipe() // kept again below, in a copy, if the login is made
	ctx, cancel := b.waitCtx()
	defer cancel()
	h, err := b.hold(ctx, gen, true)
	if err != nil {
		b.log.Warn("the card is back, but its suspended sessions could not be resumed", "generation", gen, "resumes", old, "err", err)
		b.closeSuspended(old, "could not be resumed: "+err.Error())
		return
	}
	defer h.done()

	b.mu.Lock()
	var away []*session
	for _, s := range b.sessions {
		if s.info.Generation == old && s.suspended != nil {
			away = append(away, s)
		}
	}
	b.mu.Unlock()
	slices.SortFunc(away, func(x, y *session) int { return cmp.Compare(x.info.ID, y.info.ID) })

	modIDs := make([]uint64, len(away)) // 0: not reopened
	for i, s := range away {
		ms, err := h.mod.OpenSession(s.info.Caller.ID, h.tok.Slot.ID, gen, s.info.ReadWrite)
		if err != nil {
			b.log.Warn("a suspended session could not be reopened", "session", s.info.ID, "owner", s.info.Caller.ID, "err", err)
			continue
		}
		modIDs[i] = ms.ID
	}
	if !h.stillInSlot() {
		for i, id := range modIDs {
			if id != 0 {
				h.mod.CloseSession(id)
				modIDs[i] = 0
			}
		}
	}
	login := b.loginAgain(h, sus, away, modIDs)

	// Each session's state as its owner may use it, read before the
	// tables change (a module call).
	states := make([]uint, len(away))
	for i, s := range away {
		states[i] = publicState(s.info.ReadWrite)
		if login != "" && s.info.Caller.ID == login && modIDs[i] != 0 {
			if st, err := h.mod.SessionState(modIDs[i]); err == nil {
				states[i] = st
			}
		}
	}

	b.mu.Lock()
	var orphans []uint64 // module sessions of sessions closed meanwhile
	for i, s := range away {
		if b.sessions[s.info.ID] != s || b.callers[s.info.Caller.ID] == nil {
			if modIDs[i] != 0 {
				orphans = append(orphans, modIDs[i])
			}
			continue
		}
		if modIDs[i] == 0 {
			delete(b.sessions, s.info.ID)
			close(s.suspended)
			if b.obs != nil {
				b.obs.SessionClosed(s.info, "could not be reopened after the outage")
			}
			continue
		}
		back := &session{info: s.info, modID: modIDs[i]}
		back.info.Generation, back.info.Slot, back.info.State = gen, h.tok.Slot, states[i]
		b.sessions[s.info.ID] = back
		b.recent[s.info.ID%uint64(len(b.recent))] = struct{ id, gen uint64 }{s.info.ID, gen}
		close(s.suspended)
		if b.obs != nil {
			b.obs.SessionChanged(back.info)
		}
	}
	stillOwned := login != "" && b.countLocked(login, gen) > 0
	b.mu.Unlock()
	for _, id := range orphans {
		h.mod.CloseSession(id)
	}
	if login != "" && !stillOwned {
		// Its owner closed its sessions meanwhile: a login never outlives them.
		b.mu.Lock()
		var any uint64
		for _, s := range b.sessions {
			if s.info.Generation == gen {
				any = s.modID
			}
		}
		b.mu.Unlock()
		if any != 0 {
			h.mod.Logout(any)
		}
		b.setLogin(h, "")
	}
	b.log.Info("sessions resumed on the same card", "generation", gen, "resumes", old, "sessions", len(away), "login", login)
}

// loginAgain logs the suspension's login owner in again on its first
// reopened session, with the kept PIN. It returns the owner if the token
// is now logged in for it ("" otherwise), and records the login (h is held
// exclusively) with a fresh copy of the PIN.
func (b *Broker) loginAgain(h *held, sus *suspension, away []*session, modIDs []uint64) string {
	if sus.login == "" {
		return ""
	}
	var on uint64
	for i, s := range away {
		if s.info.Caller.ID == sus.login && modIDs[i] != 0 {
			on = modIDs[i]
			break
		}
	}
	switch {
	case on == 0:
		return ""
	case sus.pin == nil:
		b.log.Info("sessions resume logged out: no PIN was kept (resume-login is off)", "caller", sus.login, "generation", h.tok.Generation)
		return ""
	case b.loginOf(h.state) != "":
		b.log.Warn("sessions resume logged out: another client logged in to the card first", "caller", sus.login, "generation", h.tok.Generation)
		return ""
	}
	var kept *secret.Secret
	err := sus.pin.Use(func(pin []byte) error {
		if err := h.mod.Login(on, sus.pinUser, pin); err != nil {
			return err
		}
		kept, _ = secret.New(pin)
		return nil
	})
	if err != nil {
		b.log.Warn("logging in again after the outage failed; the sessions resume logged out", "caller", sus.login, "generation", h.tok.Generation, "err", err)
		return ""
	}
	b.mu.Lock()
	h.state.pin, h.state.pinUser = kept, sus.pinUser
	b.mu.Unlock()
	b.setLoginOwner(h, sus.login)
	return sus.login
}

// setLoginOwner records the login owner without telling the observer: the
// sessions' new state goes out with their resumption.
func (b *Broker) setLoginOwner(h *held, owner string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	h.state.login = owner
}

// SetResumeLogin turns Options.ResumeLogin on or off (Reload); off wipes
// every PIN kept so far.
func (b *Broker) SetResumeLogin(on bool) {
	b.resumeLogin.Store(on)
	if on {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, ts := range b.tokens {
		ts.pin.Wipe()
		ts.pin = nil
	}
	for _, sus := range b.away {
		sus.pin.Wipe()
		sus.pin = nil
	}
}

// keepPIN keeps the PIN of a login just made, for a resumption.
func (b *Broker) keepPIN(h *held, userType uint, pin []byte) {
	if !b.resumeLogin.Load() || len(pin) == 0 {
		return // nothing to keep for a PIN pad's login
	}
	sec, err := secret.New(pin)
	if err != nil {
		b.log.Warn("the PIN cannot be kept in locked memory; after an outage this login is not made again", "err", err)
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	h.state.pin.Wipe()
	h.state.pin, h.state.pinUser = sec, userType
}

// awaitResume waits until suspended session s is resumed or closed, or
// ctx ends (ErrBusy).
func (b *Broker) awaitResume(ctx context.Context, s *session) error {
	select {
	case <-s.suspended:
		return nil
	case <-ctx.Done():
		return errorf(ErrBusy, "session %d: its token is away while slotwatch recovers (pcscd or the module); the session resumes if the same card comes back", s.info.ID)
	}
}

// replaced tells whether session s was suspended or resumed since it was
// read (its id now names another record).
func (b *Broker) replaced(s *session) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	cur, ok := b.sessions[s.info.ID]
	return ok && cur != s
}
