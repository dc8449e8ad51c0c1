package broker

import (
	"errors"
	"strings"

	"github.com/miekg/pkcs11"

	"github.com/slotwatch/slotwatch/module"
)

// maxLabel is CK_TOKEN_INFO.label's size.
const maxLabel = 32

// InitToken initializes the token of generation gen (C_InitToken) with
// soPIN and label. It runs at most once at a time per token: a second call
// while one runs fails with ErrBusy at once and never re-initializes.
//
// Without force it refuses while anyone holds a session on the slot, with
// a *SessionsExistError that names them. With force it closes them — but
// first, where PKCS#11 lets it, it checks the SO PIN, so that a caller
// with a wrong SO PIN closes nobody's session: it opens a read-write
// session of its own and logs the SO in (then out). PKCS#11 refuses an SO
// login while a read-only session is open (CKR_SESSION_READ_ONLY_EXISTS)
// or a user is logged in (CKR_USER_ANOTHER_ALREADY_LOGGED_IN); then no
// check is possible without closing sessions, and the holders' sessions are
// closed before C_InitToken checks the PIN, as before. The check costs no
// extra SO-PIN retry: it is the same single try C_InitToken would make.
//
// The token is held exclusively throughout, so nobody opens a session
// between the check and C_InitToken.
func (b *Broker) InitToken(c Caller, gen uint64, soPIN []byte, label string, force bool) error {
	exit, err := b.enter(c)
	if err != nil {
		return err
	}
	defer exit()
	if len(label) == 0 || len(label) > maxLabel || strings.ContainsRune(label, 0) {
		return errorf(ErrInvalidArgument, "label must be 1 to %d bytes without NUL, got %d bytes", maxLabel, len(label))
	}
	if len(soPIN) > maxPIN {
		return errorf(ErrInvalidArgument, "a PIN must be at most %d bytes, got %d", maxPIN, len(soPIN))
	}
	if !b.live(gen) {
		return errorf(ErrTokenRemoved, "token generation %d is gone", gen)
	}
	b.mu.Lock()
	ts := b.tokenLocked(gen)
	if ts.initializing {
		b.mu.Unlock()
		return errorf(ErrBusy, "another InitToken is running on token generation %d", gen)
	}
	ts.initializing = true
	b.mu.Unlock()
	defer func() {
		b.mu.Lock()
		ts.initializing = false
		b.mu.Unlock()
	}()

	ctx, cancel := b.waitCtx()
	defer cancel()
	h, err := b.hold(ctx, gen, true)
	if err != nil {
		return err
	}
	defer h.done()
	if err := checkPIN(soPIN, h.tok.Flags); err != nil {
		return err
	}
	b.mu.Lock()
	n, holders := b.holdersLocked(h.tok.Slot)
	b.mu.Unlock()
	if n > 0 && !force {
		return &SessionsExistError{What: "InitToken", Sessions: n, Holders: holders}
	}
	// Never initialize a card that was swapped in before the monitor
	// noticed: that would wipe somebody else's token.
	if !h.sameTokenInSlot() {
		return h.swapped()
	}
	if n > 0 {
		if err := b.checkSOPIN(h, c, soPIN); err != nil {
			return err
		}
		b.log.Info("InitToken with force: closing every session on the token", "caller", c.String(), "sessions", n, "generation", gen)
		b.closeAllOnSlot(h)
	}
	return h.mod.InitToken(h.tok.Slot.ID, soPIN, label)
}

// checkSOPIN logs the SO in and out on a read-write session of the
// broker's own. It returns the module's answer to a wrong, locked or
// invalid PIN, and nil when the PIN is right or cannot be checked without
// closing sessions (see InitToken).
func (b *Broker) checkSOPIN(h *held, c Caller, soPIN []byte) error {
	ms, err := h.mod.OpenSession(c.ID+" (InitToken's SO-PIN check)", h.tok.Slot.ID, h.tok.Generation, true)
	if err != nil {
		b.log.Info("InitToken: cannot check the SO PIN before closing sessions", "err", err)
		return nil
	}
	defer h.mod.CloseSession(ms.ID)
	err = h.mod.Login(ms.ID, pkcs11.CKU_SO, soPIN)
	switch {
	case err == nil:
		h.mod.Logout(ms.ID)
		return nil
	case errors.Is(err, module.ErrPinIncorrect), errors.Is(err, module.ErrPinLocked),
		errors.Is(err, module.ErrPinInvalid), errors.Is(err, module.ErrPinLenRange):
		return err
	}
	b.log.Info("InitToken: the module cannot check the SO PIN while sessions are open; closing them first", "err", err)
	return nil
}

// closeAllOnSlot closes every brokered session on h's slot, whoever holds
// it; h is held exclusively. Their owners see them close.
func (b *Broker) closeAllOnSlot(h *held) {
	b.mu.Lock()
	var victims []*session
	for id, s := range b.sessions {
		if s.info.Slot == h.tok.Slot {
			victims = append(victims, s)
			delete(b.sessions, id)
		}
	}
	b.mu.Unlock()
	for _, s := range victims {
		h.mod.CloseSession(s.modID)
		b.notifyClosed(s, "InitToken with force")
	}
	// Every session is closed: PKCS#11 ends the login with the last one.
	b.mu.Lock()
	h.state.login = ""
	b.mu.Unlock()
}
