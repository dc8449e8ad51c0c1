package broker

import (
	"github.com/miekg/pkcs11"
)

// Pass-through calls for the PKCS#11 face: the functions slotwatch has no
// rule of its own for reach the module on the caller's session, under the
// broker's invariants (ownership, holds, the token lock) and two more:
//
//   - Object handles: a caller may name only objects it was given on that
//     token — found by its own search, or made by its own call. Handles are
//     small numbers a stranger could guess; a module would happily read or
//     use another caller's private key through them.
//   - Logins: while another caller owns the token's login, a private object
//     is neither found nor usable, and nothing can be made (a new object
//     would be made under that caller's login).

// CallKind says what a passed-through call does with objects.
type CallKind int

const (
	// NoObjects: the call names no object (C_GenerateRandom, C_Digest,
	// C_GetOperationState...).
	NoObjects CallKind = iota
	// UsesObjects: the call reads or uses objects it names (attributes,
	// a key for a cryptographic operation).
	UsesObjects
	// MakesObjects: the call makes objects (C_CreateObject, C_CopyObject,
	// C_GenerateKey, C_GenerateKeyPair, C_UnwrapKey, C_DeriveKey), or
	// changes or destroys one it names.
	MakesObjects
)

// FindObjectHandles runs one search on c's session id and returns the
// handles found (at most Limits.FindResults), which c may then name. While
// another caller owns the token's login, objects that need a login
// (CKA_PRIVATE) are left out.
func (b *Broker) FindObjectHandles(c Caller, id uint64, template []*pkcs11.Attribute) ([]pkcs11.ObjectHandle, error) {
	h, s, end, err := b.begin(c, id, false, nil)
	if err != nil {
		return nil, err
	}
	defer end()
	found, err := h.mod.FindObjects(s.modID, template, b.limits.FindResults)
	if err != nil {
		return nil, err
	}
	hidePrivate := b.loggedInByOther(h, c)
	out := make([]pkcs11.ObjectHandle, 0, len(found))
	for _, o := range found {
		if hidePrivate && isPrivate(h.mod, s.modID, o) {
			continue
		}
		out = append(out, o)
	}
	b.giveObjects(h, c, out)
	return out, nil
}

// SessionCall passes one PKCS#11 function through on c's session id. objs
// are the object handles the call names; each must be one c was given on
// this token, else ErrNoSuchObject. While another caller owns the token's
// login, a private one is refused with ErrNotLoggedIn, and so is every
// MakesObjects call. call makes the one C call and returns the handles of
// objects it made, which c may name from then on.
func (b *Broker) SessionCall(c Caller, id uint64, fn string, kind CallKind, objs []pkcs11.ObjectHandle,
	call func(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle) ([]pkcs11.ObjectHandle, error)) error {
	h, s, end, err := b.begin(c, id, false, nil)
	if err != nil {
		return err
	}
	defer end()
	if o, ok := b.notGiven(h, c, objs); !ok {
		return errorf(ErrNoSuchObject, "%s: object handle %d was not given to this client on this token", fn, o)
	}
	if b.loggedInByOther(h, c) {
		if kind == MakesObjects {
			return errorf(ErrNotLoggedIn, "%s: the token is logged in by another client: nothing can be made or changed on it now", fn)
		}
		for _, o := range objs {
			if isPrivate(h.mod, s.modID, o) {
				return errorf(ErrNotLoggedIn, "%s: object %d needs a login, and the token is logged in by another client", fn, o)
			}
		}
	}
	var made []pkcs11.ObjectHandle
	err = h.mod.Call(s.modID, fn, func(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle) error {
		var err error
		made, err = call(ctx, sh)
		return err
	})
	if len(made) > 0 {
		b.giveObjects(h, c, made)
	}
	return err
}

// TokenCall runs one session-less PKCS#11 function (C_GetMechanismList,
// C_GetMechanismInfo) on the slot of token generation gen, for c.
func (b *Broker) TokenCall(c Caller, gen uint64, fn string, call func(ctx *pkcs11.Ctx, slot uint) error) error {
	exit, err := b.enter(c)
	if err != nil {
		return err
	}
	defer exit()
	ctx, cancel := b.waitCtx()
	defer cancel()
	h, err := b.hold(ctx, gen, false)
	if err != nil {
		return err
	}
	defer h.done()
	slot := h.tok.Slot.ID
	return h.mod.SlotCall(slot, fn, func(ctx *pkcs11.Ctx) error { return call(ctx, slot) })
}

// giveObjects lets c name handles on h's token.
func (b *Broker) giveObjects(h *held, c Caller, handles []pkcs11.ObjectHandle) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if h.state.objects == nil {
		h.state.objects = map[string]map[pkcs11.ObjectHandle]bool{}
	}
	set := h.state.objects[c.ID]
	if set == nil {
		set = map[pkcs11.ObjectHandle]bool{}
		h.state.objects[c.ID] = set
	}
	for _, o := range handles {
		set[o] = true
	}
}

// notGiven returns the first of handles c was not given on h's token, and
// false; true if it was given them all.
func (b *Broker) notGiven(h *held, c Caller, handles []pkcs11.ObjectHandle) (pkcs11.ObjectHandle, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	given := h.state.objects[c.ID]
	for _, o := range handles {
		if !given[o] {
			return o, false
		}
	}
	return 0, true
}

// InitPIN is C_InitPIN on c's session id; SetPIN is C_SetPIN. Both are
// refused while another caller owns the token's login (C_InitPIN needs the
// SO's login, C_SetPIN changes the logged-in user's PIN: neither is c's to
// use then). The broker reads the PINs and does not keep or wipe them: the
// face owns the buffers.
func (b *Broker) InitPIN(c Caller, id uint64, pin []byte) error {
	return b.pinCall(c, id, "C_InitPIN", func(h *held, s *session) error { return h.mod.InitPIN(s.modID, pin) }, pin)
}

// SetPIN: see InitPIN.
func (b *Broker) SetPIN(c Caller, id uint64, oldPIN, newPIN []byte) error {
	return b.pinCall(c, id, "C_SetPIN", func(h *held, s *session) error { return h.mod.SetPIN(s.modID, oldPIN, newPIN) }, oldPIN, newPIN)
}

func (b *Broker) pinCall(c Caller, id uint64, fn string, call func(h *held, s *session) error, pins ...[]byte) error {
	h, s, end, err := b.begin(c, id, false, func() error {
		for _, p := range pins {
			if len(p) > maxPIN {
				return errorf(ErrInvalidArgument, "%s: a PIN must be at most %d bytes, got %d", fn, maxPIN, len(p))
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	defer end()
	if b.loggedInByOther(h, c) {
		return errorf(ErrNotLoggedIn, "%s: the token is logged in by another client", fn)
	}
	return call(h, s)
}
