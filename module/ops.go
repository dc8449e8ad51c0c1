package module

import (
	"fmt"
	"log/slog"
	"time"

	"github.com/miekg/pkcs11"
)

// Operations on a registered session. Each holds the session's lock for its
// C calls (see withSession) and passes enter right before each of them; an
// id that is not in the registry, or a record whose handle value the module
// gave to a newer session, gives ErrNoSuchSession, a session of a retired
// generation ErrStaleGeneration, without a (further) C call: an operation
// of several calls stops before the next one. The minimum the D-Bus Session
// object needs; more later.

// Login is C_Login with userType CKU_SO, CKU_USER or CKU_CONTEXT_SPECIFIC.
// The module reads pin in place: it is not copied, not logged (only its
// length), and not wiped — it belongs to the caller, who wipes it. An empty
// pin passes NULL, for readers with a PIN pad.
func (m *Module) Login(id uint64, userType uint, pin []byte) error {
	const fn = "C_Login"
	return m.withSession(fn, id, func(s *session) error {
		if err := m.enter(fn, s); err != nil {
			return err
		}
		start := time.Now()
		rv := m.lib.login(s.Handle, userType, pin)
		return m.result(fn, start, rvError(fn, rv),
			sessionAttrs(s), slog.String("user_type", userTypeName(userType)), redactedAttr("pin", pin))
	})
}

// InitPIN is C_InitPIN: the SO sets the user's PIN. Like Login, the module
// reads pin in place; it is not copied, logged or wiped here.
func (m *Module) InitPIN(id uint64, pin []byte) error {
	const fn = "C_InitPIN"
	return m.withSession(fn, id, func(s *session) error {
		if err := m.enter(fn, s); err != nil {
			return err
		}
		start := time.Now()
		rv := m.lib.initPIN(s.Handle, pin)
		return m.result(fn, start, rvError(fn, rv), sessionAttrs(s), redactedAttr("pin", pin))
	})
}

// SetPIN is C_SetPIN: the PIN of the user logged in (or the user's PIN)
// changes from oldPIN to newPIN, read in place like Login's.
func (m *Module) SetPIN(id uint64, oldPIN, newPIN []byte) error {
	const fn = "C_SetPIN"
	return m.withSession(fn, id, func(s *session) error {
		if err := m.enter(fn, s); err != nil {
			return err
		}
		start := time.Now()
		rv := m.lib.setPIN(s.Handle, oldPIN, newPIN)
		return m.result(fn, start, rvError(fn, rv), sessionAttrs(s), redactedAttr("old_pin", oldPIN), redactedAttr("new_pin", newPIN))
	})
}

// Logout is C_Logout.
func (m *Module) Logout(id uint64) error {
	const fn = "C_Logout"
	return m.withSession(fn, id, func(s *session) error {
		if err := m.enter(fn, s); err != nil {
			return err
		}
		start := time.Now()
		return m.result(fn, start, m.ctx.Logout(s.Handle), sessionAttrs(s))
	})
}

// SessionInfo is C_GetSessionInfo.
func (m *Module) SessionInfo(id uint64) (pkcs11.SessionInfo, error) {
	const fn = "C_GetSessionInfo"
	var info pkcs11.SessionInfo
	err := m.withSession(fn, id, func(s *session) error {
		if err := m.enter(fn, s); err != nil {
			return err
		}
		start := time.Now()
		var err error
		info, err = m.ctx.GetSessionInfo(s.Handle)
		return m.result(fn, start, err, sessionAttrs(s), slog.String("state", StateName(info.State)))
	})
	return info, err
}

// SessionState is the session's CKS_* state (from C_GetSessionInfo).
func (m *Module) SessionState(id uint64) (uint, error) {
	info, err := m.SessionInfo(id)
	return info.State, err
}

// findBatch is how many handles one C_FindObjects call asks for.
const findBatch = 64

// FindObjects runs one search (C_FindObjectsInit, C_FindObjects until done
// or max handles, C_FindObjectsFinal) and returns the handles found. max <= 0
// means no limit. The search is finalized even when a step fails, so the
// session is left free for the next operation — unless the record went stale
// or its generation was retired meanwhile: then its handle must not reach the
// module again, and the refusal (ErrNoSuchSession, ErrStaleGeneration) is
// the result.
func (m *Module) FindObjects(id uint64, template []*pkcs11.Attribute, max int) ([]pkcs11.ObjectHandle, error) {
	var found []pkcs11.ObjectHandle
	err := m.withSession("C_FindObjectsInit", id, func(s *session) error {
		if err := m.enter("C_FindObjectsInit", s); err != nil {
			return err
		}
		start := time.Now()
		err := m.result("C_FindObjectsInit", start, m.ctx.FindObjectsInit(s.Handle, template),
			sessionAttrs(s), slog.Any("template", attrList(template)))
		if err != nil {
			return err
		}
		for max <= 0 || len(found) < max {
			n := findBatch
			if max > 0 && max-len(found) < n {
				n = max - len(found)
			}
			if err := m.enter("C_FindObjects", s); err != nil {
				return err
			}
			start = time.Now()
			batch, _, ferr := m.ctx.FindObjects(s.Handle, n)
			if err = m.result("C_FindObjects", start, ferr, sessionAttrs(s), slog.Int("max", n), slog.Int("found", len(batch))); err != nil {
				break
			}
			found = append(found, batch...)
			if len(batch) < n {
				break
			}
		}
		if gerr := m.enter("C_FindObjectsFinal", s); gerr != nil {
			if err != nil {
				return fmt.Errorf("%w (after %v)", gerr, err)
			}
			return gerr
		}
		start = time.Now()
		ferr := m.result("C_FindObjectsFinal", start, m.ctx.FindObjectsFinal(s.Handle), sessionAttrs(s))
		if err == nil {
			err = ferr
		}
		return err
	})
	if err != nil {
		return nil, err
	}
	return found, nil
}

// GetAttributes is C_GetAttributeValue for the types in attrs (their values
// are ignored). The log shows the types and only non-secret values.
func (m *Module) GetAttributes(id uint64, obj pkcs11.ObjectHandle, attrs []*pkcs11.Attribute) ([]*pkcs11.Attribute, error) {
	const fn = "C_GetAttributeValue"
	if len(attrs) == 0 {
		return nil, nil // miekg indexes attrs[0]; PKCS#11 has nothing to do either
	}
	var out []*pkcs11.Attribute
	err := m.withSession(fn, id, func(s *session) error {
		if err := m.enter(fn, s); err != nil {
			return err
		}
		start := time.Now()
		var err error
		out, err = m.ctx.GetAttributeValue(s.Handle, obj, attrs)
		logged := out
		if logged == nil {
			logged = attrs
		}
		return m.result(fn, start, err, sessionAttrs(s), slog.Uint64("object", uint64(obj)),
			slog.Any("attributes", attrList(logged)))
	})
	return out, err
}

// Sign is C_SignInit + C_Sign (single part). The data is logged by length
// only; so is the signature.
func (m *Module) Sign(id uint64, mech *pkcs11.Mechanism, key pkcs11.ObjectHandle, data []byte) ([]byte, error) {
	if mech == nil {
		return nil, &Error{Func: "C_SignInit", Code: pkcs11.CKR_ARGUMENTS_BAD}
	}
	var sig []byte
	err := m.withSession("C_SignInit", id, func(s *session) error {
		if err := m.enter("C_SignInit", s); err != nil {
			return err
		}
		start := time.Now()
		err := m.result("C_SignInit", start, m.ctx.SignInit(s.Handle, []*pkcs11.Mechanism{mech}, key),
			sessionAttrs(s), mechAttr(mech), slog.Uint64("key", uint64(key)))
		if err != nil {
			return err
		}
		if err := m.enter("C_Sign", s); err != nil {
			return err
		}
		start = time.Now()
		sig, err = m.ctx.Sign(s.Handle, data)
		return m.result("C_Sign", start, err, sessionAttrs(s), slog.Int("data_len", len(data)), slog.Int("signature_len", len(sig)))
	})
	if err != nil {
		return nil, err
	}
	return sig, nil
}

// Call runs one PKCS#11 function on session id's handle: call gets the
// module's context and the session's handle and makes exactly one C call.
// It is how the PKCS#11 face passes through the functions slotwatch has no
// rule of its own for (encryption, digests, key generation...), under the
// same rules as every operation here: the session's lock, enter right
// before the call, the result logged (fn and the session, nothing of the
// arguments: they may be secrets).
func (m *Module) Call(id uint64, fn string, call func(ctx *pkcs11.Ctx, h pkcs11.SessionHandle) error) error {
	return m.withSession(fn, id, func(s *session) error {
		if err := m.enter(fn, s); err != nil {
			return err
		}
		start := time.Now()
		return m.result(fn, start, call(m.ctx, s.Handle), sessionAttrs(s))
	})
}

// SlotCall runs one PKCS#11 function on slot that needs no session
// (C_GetMechanismList, C_GetMechanismInfo), with the module held
// initialized for the call.
func (m *Module) SlotCall(slot uint, fn string, call func(ctx *pkcs11.Ctx) error) error {
	m.life.RLock()
	defer m.life.RUnlock()
	if m.ctx == nil {
		return notInitialized(fn)
	}
	start := time.Now()
	return m.result(fn, start, call(m.ctx), slog.Uint64("slot", uint64(slot)))
}
