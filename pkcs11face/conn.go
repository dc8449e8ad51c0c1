package pkcs11face

import (
	"context"
	"errors"
	"net"
	"sync"

	"github.com/miekg/pkcs11"

	"github.com/slotwatch/slotwatch/broker"
	"github.com/slotwatch/slotwatch/monitor"
	"github.com/slotwatch/slotwatch/pkcs11face/rpc"
)

var _ rpc.Handler = (*conn)(nil)

// serve runs the RPC protocol on the connection until the client goes or
// ctx ends.
func (c *conn) serve(ctx context.Context, nc net.Conn) error {
	return rpc.Serve(ctx, nc, c, rpc.Options{Logger: c.srv.log.With("caller", c.caller.ID)})
}

// conn is one client connection: a broker caller. Its methods are the
// PKCS#11 functions as the RPC layer hands them over; session handles are
// the broker's session ids (never reused, so a stale handle can never name
// a newer session), object handles the module's, usable only as the
// broker gave them to this caller (broker.SessionCall).
type conn struct {
	srv    *Server
	caller broker.Caller
	events *slotEvents

	mu    sync.Mutex // guards finds
	finds map[pkcs11.SessionHandle]*findState
}

// findState is a search between C_FindObjectsInit and C_FindObjectsFinal:
// the broker runs the whole search at Init (it owns the module session's
// find operation only for one call); C_FindObjects hands out the results.
type findState struct {
	left []pkcs11.ObjectHandle
}

// token returns the current token generation in slot id.
func (c *conn) token(id uint) (*monitor.Slot, uint64, error) {
	key, ok := c.srv.slots.key(id)
	if !ok {
		return nil, 0, pkcs11.Error(pkcs11.CKR_SLOT_ID_INVALID)
	}
	slot, ok := c.srv.mon.Snapshot().Slot(key)
	if !ok {
		return nil, 0, pkcs11.Error(pkcs11.CKR_SLOT_ID_INVALID)
	}
	if slot.Token == nil {
		return slot, 0, pkcs11.Error(pkcs11.CKR_TOKEN_NOT_PRESENT)
	}
	return slot, slot.Token.Generation, nil
}

// GetInfo is C_GetInfo: slotwatch itself is the library the client sees.
func (c *conn) GetInfo(_ context.Context) (pkcs11.Info, error) {
	return pkcs11.Info{
		CryptokiVersion:    pkcs11.Version{Major: 2, Minor: 40},
		ManufacturerID:     "slotwatch",
		LibraryDescription: "slotwatch PKCS#11 face",
		LibraryVersion:     libraryVersion(c.srv.ver),
	}, nil
}

// GetSlotList is C_GetSlotList on the current view.
func (c *conn) GetSlotList(_ context.Context, tokenPresent bool) ([]uint, error) {
	return c.srv.slots.slotIDs(c.srv.mon.Snapshot(), tokenPresent), nil
}

// GetSlotInfo is C_GetSlotInfo from the view.
func (c *conn) GetSlotInfo(_ context.Context, id uint) (pkcs11.SlotInfo, error) {
	slot, _, err := c.token(id)
	if slot == nil {
		return pkcs11.SlotInfo{}, err
	}
	info := pkcs11.SlotInfo{SlotDescription: slot.Description, ManufacturerID: slot.Manufacturer}
	if slot.Removable {
		info.Flags |= pkcs11.CKF_REMOVABLE_DEVICE
	}
	if slot.Reader != "" {
		info.Flags |= pkcs11.CKF_HW_SLOT
	}
	if slot.Token != nil {
		info.Flags |= pkcs11.CKF_TOKEN_PRESENT
	}
	return info, nil
}

// GetTokenInfo is C_GetTokenInfo, asked of the module (the view keeps only
// part of it) — except while the module is released (idle release): then
// the answer of the last call on this generation, with the view's flags,
// so that a program polling C_GetTokenInfo does not keep the module
// initialized, and so the card held, for good.
func (c *conn) GetTokenInfo(_ context.Context, id uint) (pkcs11.TokenInfo, error) {
	slot, gen, err := c.token(id)
	if err != nil {
		return pkcs11.TokenInfo{}, err
	}
	if info, ok := c.srv.tokens.get(gen); ok && c.srv.released(slot.Key.Module) {
		info.Flags = slot.Token.Flags
		return info, nil
	}
	var info pkcs11.TokenInfo
	err = c.srv.b.TokenCall(c.caller, gen, "C_GetTokenInfo", func(ctx *pkcs11.Ctx, slot uint) (err error) {
		info, err = ctx.GetTokenInfo(slot)
		return err
	})
	if err != nil {
		return pkcs11.TokenInfo{}, asPKCS11(err)
	}
	c.srv.tokens.put(gen, info, c.srv.mon.Snapshot())
	return info, nil
}

// GetMechanismList is C_GetMechanismList.
func (c *conn) GetMechanismList(_ context.Context, id uint) ([]uint, error) {
	_, gen, err := c.token(id)
	if err != nil {
		return nil, err
	}
	var out []uint
	err = c.srv.b.TokenCall(c.caller, gen, "C_GetMechanismList", func(ctx *pkcs11.Ctx, slot uint) error {
		ms, err := ctx.GetMechanismList(slot)
		for _, m := range ms {
			out = append(out, m.Mechanism)
		}
		return err
	})
	return out, asPKCS11(err)
}

// GetMechanismInfo is C_GetMechanismInfo.
func (c *conn) GetMechanismInfo(_ context.Context, id uint, mech uint) (pkcs11.MechanismInfo, error) {
	_, gen, err := c.token(id)
	if err != nil {
		return pkcs11.MechanismInfo{}, err
	}
	var info pkcs11.MechanismInfo
	err = c.srv.b.TokenCall(c.caller, gen, "C_GetMechanismInfo", func(ctx *pkcs11.Ctx, slot uint) (err error) {
		info, err = ctx.GetMechanismInfo(slot, []*pkcs11.Mechanism{pkcs11.NewMechanism(mech, nil)})
		return err
	})
	return info, asPKCS11(err)
}

// InitToken is C_InitToken. It never closes other clients' sessions: with
// any open, the answer is CKR_SESSION_EXISTS, and the broker names them
// (log; their Session objects on the bus show who they are).
func (c *conn) InitToken(_ context.Context, id uint, soPIN []byte, label string) error {
	_, gen, err := c.token(id)
	if err != nil {
		return err
	}
	err = c.srv.b.InitToken(c.caller, gen, soPIN, label, false)
	if se := (*broker.SessionsExistError)(nil); errors.As(err, &se) {
		c.srv.log.Warn("C_InitToken refused: sessions are open on the token", "caller", c.caller.ID, "holders", se.Error())
	}
	return asPKCS11(err)
}

// OpenSession is C_OpenSession (serial sessions only, as PKCS#11 2.40
// requires; no notification callback crosses the socket).
func (c *conn) OpenSession(_ context.Context, id uint, flags uint) (pkcs11.SessionHandle, error) {
	if flags&pkcs11.CKF_SERIAL_SESSION == 0 {
		return 0, pkcs11.Error(pkcs11.CKR_SESSION_PARALLEL_NOT_SUPPORTED)
	}
	_, gen, err := c.token(id)
	if err != nil {
		return 0, err
	}
	info, err := c.srv.b.OpenSession(c.caller, gen, flags&pkcs11.CKF_RW_SESSION != 0)
	if err != nil {
		return 0, asPKCS11(err)
	}
	return pkcs11.SessionHandle(info.ID), nil
}

// CloseSession is C_CloseSession.
func (c *conn) CloseSession(_ context.Context, h pkcs11.SessionHandle) error {
	c.endFind(h)
	return asPKCS11(c.srv.b.CloseSession(c.caller, uint64(h)))
}

// CloseAllSessions is C_CloseAllSessions: this client's sessions on the
// slot's token, nobody else's.
func (c *conn) CloseAllSessions(_ context.Context, id uint) error {
	_, gen, err := c.token(id)
	if err != nil {
		return err
	}
	return asPKCS11(c.srv.b.CloseAllSessions(c.caller, gen))
}

// GetSessionInfo is C_GetSessionInfo; the state is the one this client
// may use (public while another client owns the login).
func (c *conn) GetSessionInfo(_ context.Context, h pkcs11.SessionHandle) (pkcs11.SessionInfo, error) {
	s, ok := c.srv.b.Session(uint64(h))
	if !ok || s.Caller.ID != c.caller.ID {
		return pkcs11.SessionInfo{}, pkcs11.Error(pkcs11.CKR_SESSION_HANDLE_INVALID)
	}
	info := pkcs11.SessionInfo{SlotID: c.srv.slots.id(s.Slot), State: s.State, Flags: pkcs11.CKF_SERIAL_SESSION}
	if s.ReadWrite {
		info.Flags |= pkcs11.CKF_RW_SESSION
	}
	return info, nil
}

// Login is C_Login; the login is this client's (broker.Login).
func (c *conn) Login(_ context.Context, h pkcs11.SessionHandle, userType uint, pin []byte) error {
	return asPKCS11(c.srv.b.Login(c.caller, uint64(h), userType, pin))
}

// Logout is C_Logout.
func (c *conn) Logout(_ context.Context, h pkcs11.SessionHandle) error {
	return asPKCS11(c.srv.b.Logout(c.caller, uint64(h)))
}

// FindObjectsInit is C_FindObjectsInit: the search runs at once.
func (c *conn) FindObjectsInit(_ context.Context, h pkcs11.SessionHandle, template []*pkcs11.Attribute) error {
	c.mu.Lock()
	_, active := c.finds[h]
	c.mu.Unlock()
	if active {
		return pkcs11.Error(pkcs11.CKR_OPERATION_ACTIVE)
	}
	found, err := c.srv.b.FindObjectHandles(c.caller, uint64(h), template)
	if err != nil {
		return asPKCS11(err)
	}
	c.mu.Lock()
	c.finds[h] = &findState{left: found}
	// Searches of sessions that are gone (closed by C_CloseAllSessions,
	// or with their token) are never finished by the client: forget them.
	for other := range c.finds {
		if s, ok := c.srv.b.Session(uint64(other)); !ok || s.Caller.ID != c.caller.ID {
			delete(c.finds, other)
		}
	}
	c.mu.Unlock()
	return nil
}

// FindObjects is C_FindObjects.
func (c *conn) FindObjects(_ context.Context, h pkcs11.SessionHandle, max int) ([]pkcs11.ObjectHandle, error) {
	if s, ok := c.srv.b.Session(uint64(h)); !ok || s.Caller.ID != c.caller.ID {
		c.endFind(h)
		return nil, pkcs11.Error(pkcs11.CKR_SESSION_HANDLE_INVALID)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	f, ok := c.finds[h]
	if !ok {
		return nil, pkcs11.Error(pkcs11.CKR_OPERATION_NOT_INITIALIZED)
	}
	n := min(max, len(f.left))
	out := f.left[:n:n]
	f.left = f.left[n:]
	return out, nil
}

// FindObjectsFinal is C_FindObjectsFinal.
func (c *conn) FindObjectsFinal(_ context.Context, h pkcs11.SessionHandle) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.finds[h]; !ok {
		return pkcs11.Error(pkcs11.CKR_OPERATION_NOT_INITIALIZED)
	}
	delete(c.finds, h)
	return nil
}

func (c *conn) endFind(h pkcs11.SessionHandle) {
	c.mu.Lock()
	delete(c.finds, h)
	c.mu.Unlock()
}

// WaitForSlotEvent is C_WaitForSlotEvent: the next slot where slotwatch
// published an insertion or a removal since this connection last asked
// (CKR_NO_EVENT at once with CKF_DONT_BLOCK when there is none).
func (c *conn) WaitForSlotEvent(ctx context.Context, flags uint) (uint, error) {
	id, ok := c.events.next(ctx, flags&pkcs11.CKF_DONT_BLOCK == 0)
	if !ok {
		if flags&pkcs11.CKF_DONT_BLOCK != 0 {
			return 0, pkcs11.Error(pkcs11.CKR_NO_EVENT)
		}
		return 0, pkcs11.Error(pkcs11.CKR_FUNCTION_FAILED)
	}
	return id, nil
}

// call passes one function through on session h (broker.SessionCall).
func (c *conn) call(h pkcs11.SessionHandle, fn string, kind broker.CallKind, objs []pkcs11.ObjectHandle,
	f func(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle) ([]pkcs11.ObjectHandle, error)) error {
	return asPKCS11(c.srv.b.SessionCall(c.caller, uint64(h), fn, kind, objs, f))
}
