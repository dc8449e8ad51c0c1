package broker

import (
	"errors"

	"github.com/miekg/pkcs11"

	"github.com/slotwatch/slotwatch/module"
)

// maxPIN bounds a PIN from a client; PKCS#11 PINs are short.
const maxPIN = 256

// checkPIN validates a PIN. An empty PIN means "ask the reader's PIN pad",
// which only a token with a protected authentication path has.
func checkPIN(pin []byte, tokenFlags uint) error {
	if len(pin) > maxPIN {
		return errorf(ErrInvalidArgument, "a PIN must be at most %d bytes, got %d", maxPIN, len(pin))
	}
	if len(pin) == 0 && tokenFlags&pkcs11.CKF_PROTECTED_AUTHENTICATION_PATH == 0 {
		return errorf(ErrInvalidArgument, "empty PIN, and this token has no PIN pad (CKF_PROTECTED_AUTHENTICATION_PATH)")
	}
	return nil
}

// Login logs c in to the token of its session id (CKU_SO or CKU_USER). The
// login is c's: other callers' sessions on the token stay public, and a
// second caller's Login fails with ErrAlreadyLoggedIn until c logs out or
// closes its last session there. The broker reads pin and does not keep
// or wipe it: the face owns the buffer.
func (b *Broker) Login(c Caller, id uint64, userType uint, pin []byte) error {
	h, s, end, err := b.begin(c, id, true, func() error {
		switch userType {
		case pkcs11.CKU_SO, pkcs11.CKU_USER:
			return nil
		case pkcs11.CKU_CONTEXT_SPECIFIC:
			// It has to come between C_SignInit and C_Sign, which Sign
			// makes in one call.
			return errorf(ErrNotSupported, "context-specific login is not offered in this version")
		}
		return errorf(ErrInvalidArgument, "unknown user type %d (0 SO, 1 user, 2 context specific)", userType)
	})
	if err != nil {
		return err
	}
	defer end()
	if err := checkPIN(pin, h.tok.Flags); err != nil {
		return err
	}
	if other := b.loginOf(h.state); other != "" && other != c.ID {
		return errorf(ErrAlreadyLoggedIn, "the token is logged in by another client; it must log out (or close its sessions) first")
	}
	err = h.mod.Login(s.modID, userType, pin)
	switch {
	case err == nil:
		b.setLogin(h, c.ID)
		b.keepPIN(h, userType, pin)
	case errors.Is(err, module.ErrSessionReadOnlyExists):
		// An SO login needs every session read-write: say whose are not.
		b.mu.Lock()
		n, holders := b.holdersLocked(h.tok.Slot)
		b.mu.Unlock()
		return &SessionsExistError{What: "SO login", Sessions: n, Holders: holders, Cause: err}
	}
	return err
}

// Logout logs c out of the token of its session id. Only the caller who
// logged in can (some modules, SoftHSM2 among them, answer CKR_OK to a
// logout nobody asked for; the broker answers ErrNotLoggedIn).
func (b *Broker) Logout(c Caller, id uint64) error {
	h, s, end, err := b.begin(c, id, true, nil)
	if err != nil {
		return err
	}
	defer end()
	if b.loginOf(h.state) != c.ID {
		return errorf(ErrNotLoggedIn, "this client is not logged in to the token")
	}
	err = h.mod.Logout(s.modID)
	if err == nil || errors.Is(err, module.ErrUserNotLoggedIn) {
		b.setLogin(h, "")
	}
	return err
}

// setLogin records the token's login owner and tells the observer the new
// State of every session on the token. h must be held exclusively.
func (b *Broker) setLogin(h *held, owner string) {
	b.mu.Lock()
	h.state.login = owner
	if owner == "" {
		h.state.pin.Wipe()
		h.state.pin = nil
	}
	var ss []*session
	for _, s := range b.sessions {
		if s.info.Generation == h.tok.Generation {
			ss = append(ss, s)
		}
	}
	b.mu.Unlock()
	// The module's state for the owner's sessions, public for the others'.
	states := make([]uint, len(ss))
	for i, s := range ss {
		states[i] = publicState(s.info.ReadWrite)
		if owner != "" && s.info.Caller.ID == owner {
			if st, err := h.mod.SessionState(s.modID); err == nil {
				states[i] = st
			}
		}
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	for i, s := range ss {
		if b.sessions[s.info.ID] != s || s.info.State == states[i] {
			continue
		}
		s.info.State = states[i]
		if b.obs != nil {
			b.obs.SessionChanged(s.info)
		}
	}
}
