package rpc

import (
	"context"
	"errors"
	"fmt"
	"math"

	"github.com/miekg/pkcs11"
)

// errBadResult is a Handler result the protocol cannot carry or that
// breaks the Handler contract; answered CKR_GENERAL_ERROR and logged.
var errBadResult = errors.New("handler result violates the Handler contract")

// Calls of the same shape, by the Handler method that serves them.
var (
	// "uayfy" → "ay": input consumed, output kept until taken.
	dataCalls = map[callID]func(Handler, context.Context, pkcs11.SessionHandle, []byte) ([]byte, error){
		callEncrypt:             Handler.Encrypt,
		callEncryptUpdate:       Handler.EncryptUpdate,
		callDecrypt:             Handler.Decrypt,
		callDecryptUpdate:       Handler.DecryptUpdate,
		callDigest:              Handler.Digest,
		callSign:                Handler.Sign,
		callSignRecover:         Handler.SignRecover,
		callVerifyRecover:       Handler.VerifyRecover,
		callDigestEncryptUpdate: Handler.DigestEncryptUpdate,
		callDecryptDigestUpdate: Handler.DecryptDigestUpdate,
		callSignEncryptUpdate:   Handler.SignEncryptUpdate,
		callDecryptVerifyUpdate: Handler.DecryptVerifyUpdate,
	}
	// "ufy" → "ay": operation ended, output kept until taken.
	finalCalls = map[callID]func(Handler, context.Context, pkcs11.SessionHandle) ([]byte, error){
		callEncryptFinal: Handler.EncryptFinal,
		callDecryptFinal: Handler.DecryptFinal,
		callDigestFinal:  Handler.DigestFinal,
		callSignFinal:    Handler.SignFinal,
	}
	// "uMu" → "".
	initCalls = map[callID]func(Handler, context.Context, pkcs11.SessionHandle, *pkcs11.Mechanism, pkcs11.ObjectHandle) error{
		callEncryptInit:       Handler.EncryptInit,
		callDecryptInit:       Handler.DecryptInit,
		callSignInit:          Handler.SignInit,
		callSignRecoverInit:   Handler.SignRecoverInit,
		callVerifyInit:        Handler.VerifyInit,
		callVerifyRecoverInit: Handler.VerifyRecoverInit,
	}
	// "uay" → "".
	inputCalls = map[callID]func(Handler, context.Context, pkcs11.SessionHandle, []byte) error{
		callDigestUpdate: Handler.DigestUpdate,
		callSignUpdate:   Handler.SignUpdate,
		callVerifyUpdate: Handler.VerifyUpdate,
		callVerifyFinal:  Handler.VerifyFinal,
		callSeedRandom:   Handler.SeedRandom,
		callInitPIN:      Handler.InitPIN,
	}
	// "u" → "".
	sessionCalls = map[callID]func(Handler, context.Context, pkcs11.SessionHandle) error{
		callLogout:           Handler.Logout,
		callFindObjectsFinal: Handler.FindObjectsFinal,
	}
)

// startedBy lists, for each call that starts an operation, the calls
// whose kept results belong to an earlier operation of that kind and
// must never be handed out again.
var startedBy = map[callID][]callID{
	callEncryptInit:       {callEncrypt, callEncryptUpdate, callEncryptFinal, callDigestEncryptUpdate, callSignEncryptUpdate},
	callDecryptInit:       {callDecrypt, callDecryptUpdate, callDecryptFinal, callDecryptDigestUpdate, callDecryptVerifyUpdate},
	callDigestInit:        {callDigest, callDigestFinal, callDigestEncryptUpdate, callDecryptDigestUpdate},
	callSignInit:          {callSign, callSignFinal, callSignEncryptUpdate},
	callSignRecoverInit:   {callSignRecover},
	callVerifyInit:        {callDecryptVerifyUpdate},
	callVerifyRecoverInit: {callVerifyRecover},
}

// dispatch decodes the arguments of call c.id, runs it on the Handler and
// encodes the results into e. A returned error becomes an error answer.
func (s *server) dispatch(ctx context.Context, c *call, d *decoder, e *encoder) error {
	h, id := s.h, c.id
	if f, ok := dataCalls[id]; ok {
		sh := pkcs11.SessionHandle(d.ulong())
		data := d.byteArray()
		buf := d.byteBuffer()
		if err := d.done(); err != nil {
			return err
		}
		return s.output(e, sh, id, d.b, buf, func() ([]byte, error) { return f(h, ctx, sh, data) })
	}
	if f, ok := finalCalls[id]; ok {
		sh := pkcs11.SessionHandle(d.ulong())
		buf := d.byteBuffer()
		if err := d.done(); err != nil {
			return err
		}
		return s.output(e, sh, id, d.b, buf, func() ([]byte, error) { return f(h, ctx, sh) })
	}
	if f, ok := initCalls[id]; ok {
		sh := pkcs11.SessionHandle(d.ulong())
		m := d.mechanism()
		key := pkcs11.ObjectHandle(d.ulong())
		if err := d.done(); err != nil {
			return err
		}
		s.dropPending(sh, startedBy[id])
		return f(h, ctx, sh, m, key)
	}
	if f, ok := inputCalls[id]; ok {
		sh := pkcs11.SessionHandle(d.ulong())
		data := d.byteArray()
		if err := d.done(); err != nil {
			return err
		}
		return f(h, ctx, sh, data)
	}
	if f, ok := sessionCalls[id]; ok {
		sh := pkcs11.SessionHandle(d.ulong())
		if err := d.done(); err != nil {
			return err
		}
		return f(h, ctx, sh)
	}

	switch id {
	case callInitialize:
		return s.initialize(d)
	case callFinalize:
		return s.finalize(d)

	case callGetInfo:
		if err := d.done(); err != nil {
			return err
		}
		info, err := h.GetInfo(ctx)
		if err != nil {
			return err
		}
		e.version(info.CryptokiVersion)
		e.spaceString(info.ManufacturerID, 32)
		e.ulong(info.Flags)
		e.spaceString(info.LibraryDescription, 32)
		e.version(info.LibraryVersion)

	case callGetSlotList:
		present := d.byteArg() != 0
		buf := d.ulongBuffer()
		if err := d.done(); err != nil {
			return err
		}
		slots, err := h.GetSlotList(ctx, present)
		if err != nil {
			return err
		}
		e.outUlongs(slots, buf)

	case callGetSlotInfo:
		slot := d.ulong()
		if err := d.done(); err != nil {
			return err
		}
		info, err := h.GetSlotInfo(ctx, slot)
		if err != nil {
			return err
		}
		e.spaceString(info.SlotDescription, 64)
		e.spaceString(info.ManufacturerID, 32)
		e.ulong(info.Flags)
		e.version(info.HardwareVersion)
		e.version(info.FirmwareVersion)

	case callGetTokenInfo:
		slot := d.ulong()
		if err := d.done(); err != nil {
			return err
		}
		info, err := h.GetTokenInfo(ctx, slot)
		if err != nil {
			return err
		}
		e.spaceString(info.Label, 32)
		e.spaceString(info.ManufacturerID, 32)
		e.spaceString(info.Model, 16)
		e.spaceString(info.SerialNumber, 16)
		e.ulong(info.Flags)
		e.ulong(info.MaxSessionCount)
		e.ulong(info.SessionCount)
		e.ulong(info.MaxRwSessionCount)
		e.ulong(info.RwSessionCount)
		e.ulong(info.MaxPinLen)
		e.ulong(info.MinPinLen)
		e.ulong(info.TotalPublicMemory)
		e.ulong(info.FreePublicMemory)
		e.ulong(info.TotalPrivateMemory)
		e.ulong(info.FreePrivateMemory)
		e.version(info.HardwareVersion)
		e.version(info.FirmwareVersion)
		e.spaceString(info.UTCTime, 16)

	case callGetMechanismList:
		slot := d.ulong()
		buf := d.ulongBuffer()
		if err := d.done(); err != nil {
			return err
		}
		mechs, err := h.GetMechanismList(ctx, slot)
		if err != nil {
			return err
		}
		e.outUlongs(mechs, buf)

	case callGetMechanismInfo:
		slot := d.ulong()
		mech := d.ulong()
		if err := d.done(); err != nil {
			return err
		}
		info, err := h.GetMechanismInfo(ctx, slot, mech)
		if err != nil {
			return err
		}
		e.ulong(info.MinKeySize)
		e.ulong(info.MaxKeySize)
		e.ulong(info.Flags)

	case callInitToken:
		slot := d.ulong()
		pin := d.byteArray()
		label := d.label()
		if err := d.done(); err != nil {
			return err
		}
		return h.InitToken(ctx, slot, pin, label)

	case callOpenSession:
		slot := d.ulong()
		flags := d.ulong()
		if err := d.done(); err != nil {
			return err
		}
		sh, err := h.OpenSession(ctx, slot, flags)
		if err != nil {
			return err
		}
		e.ulong(uint(sh))

	case callCloseSession:
		sh := pkcs11.SessionHandle(d.ulong())
		if err := d.done(); err != nil {
			return err
		}
		// Before the Handler: its handle number may be reused at once.
		s.dropSession(sh)
		return h.CloseSession(ctx, sh)

	case callCloseAllSessions:
		slot := d.ulong()
		if err := d.done(); err != nil {
			return err
		}
		// We do not know which sessions are on the slot; forgetting the
		// results kept for all of them is merely conservative.
		s.dropAllPending()
		return h.CloseAllSessions(ctx, slot)

	case callGetSessionInfo:
		sh := pkcs11.SessionHandle(d.ulong())
		if err := d.done(); err != nil {
			return err
		}
		info, err := h.GetSessionInfo(ctx, sh)
		if err != nil {
			return err
		}
		e.ulong(info.SlotID)
		e.ulong(info.State)
		e.ulong(info.Flags)
		e.ulong(info.DeviceError)

	case callSetPIN:
		sh := pkcs11.SessionHandle(d.ulong())
		oldPIN := d.byteArray()
		newPIN := d.byteArray()
		if err := d.done(); err != nil {
			return err
		}
		return h.SetPIN(ctx, sh, oldPIN, newPIN)

	case callGetOperationState:
		sh := pkcs11.SessionHandle(d.ulong())
		buf := d.byteBuffer()
		if err := d.done(); err != nil {
			return err
		}
		state, err := h.GetOperationState(ctx, sh)
		if err != nil {
			return err
		}
		if len(state) >= maxArrayLen {
			return errBadResult
		}
		e.outBytes(state, buf)

	case callSetOperationState:
		sh := pkcs11.SessionHandle(d.ulong())
		state := d.byteArray()
		encKey := pkcs11.ObjectHandle(d.ulong())
		authKey := pkcs11.ObjectHandle(d.ulong())
		if err := d.done(); err != nil {
			return err
		}
		return h.SetOperationState(ctx, sh, state, encKey, authKey)

	case callLogin:
		sh := pkcs11.SessionHandle(d.ulong())
		userType := d.ulong()
		pin := d.byteArray()
		if err := d.done(); err != nil {
			return err
		}
		return h.Login(ctx, sh, userType, pin)

	case callCreateObject:
		sh := pkcs11.SessionHandle(d.ulong())
		tmpl := d.attrArray()
		if err := d.done(); err != nil {
			return err
		}
		o, err := h.CreateObject(ctx, sh, tmpl)
		if err != nil {
			return err
		}
		e.ulong(uint(o))

	case callCopyObject:
		sh := pkcs11.SessionHandle(d.ulong())
		o := pkcs11.ObjectHandle(d.ulong())
		tmpl := d.attrArray()
		if err := d.done(); err != nil {
			return err
		}
		n, err := h.CopyObject(ctx, sh, o, tmpl)
		if err != nil {
			return err
		}
		e.ulong(uint(n))

	case callDestroyObject:
		sh := pkcs11.SessionHandle(d.ulong())
		o := pkcs11.ObjectHandle(d.ulong())
		if err := d.done(); err != nil {
			return err
		}
		return h.DestroyObject(ctx, sh, o)

	case callGetObjectSize:
		sh := pkcs11.SessionHandle(d.ulong())
		o := pkcs11.ObjectHandle(d.ulong())
		if err := d.done(); err != nil {
			return err
		}
		size, err := h.GetObjectSize(ctx, sh, o)
		if err != nil {
			return err
		}
		e.ulong(size)

	case callGetAttributeValue:
		return s.getAttributeValue(ctx, d, e)

	case callSetAttributeValue:
		sh := pkcs11.SessionHandle(d.ulong())
		o := pkcs11.ObjectHandle(d.ulong())
		tmpl := d.attrArray()
		if err := d.done(); err != nil {
			return err
		}
		return h.SetAttributeValue(ctx, sh, o, tmpl)

	case callFindObjectsInit:
		sh := pkcs11.SessionHandle(d.ulong())
		tmpl := d.attrArray()
		if err := d.done(); err != nil {
			return err
		}
		return h.FindObjectsInit(ctx, sh, tmpl)

	case callFindObjects:
		sh := pkcs11.SessionHandle(d.ulong())
		buf := d.ulongBuffer()
		if err := d.done(); err != nil {
			return err
		}
		objs, err := h.FindObjects(ctx, sh, int(min(buf.size, math.MaxInt32)))
		if err != nil {
			return err
		}
		if uint64(len(objs)) > uint64(buf.size) {
			return fmt.Errorf("%w: FindObjects returned %d handles for room for %d", errBadResult, len(objs), buf.size)
		}
		handles := make([]uint, len(objs))
		for i, o := range objs {
			handles[i] = uint(o)
		}
		e.outUlongs(handles, buf)

	case callDigestInit:
		sh := pkcs11.SessionHandle(d.ulong())
		m := d.mechanism()
		if err := d.done(); err != nil {
			return err
		}
		s.dropPending(sh, startedBy[id])
		return h.DigestInit(ctx, sh, m)

	case callDigestKey:
		sh := pkcs11.SessionHandle(d.ulong())
		key := pkcs11.ObjectHandle(d.ulong())
		if err := d.done(); err != nil {
			return err
		}
		return h.DigestKey(ctx, sh, key)

	case callVerify:
		sh := pkcs11.SessionHandle(d.ulong())
		data := d.byteArray()
		sig := d.byteArray()
		if err := d.done(); err != nil {
			return err
		}
		return h.Verify(ctx, sh, data, sig)

	case callGenerateKey:
		sh := pkcs11.SessionHandle(d.ulong())
		m := d.mechanism()
		tmpl := d.attrArray()
		if err := d.done(); err != nil {
			return err
		}
		key, err := h.GenerateKey(ctx, sh, m, tmpl)
		if err != nil {
			return err
		}
		e.ulong(uint(key))

	case callGenerateKeyPair:
		sh := pkcs11.SessionHandle(d.ulong())
		m := d.mechanism()
		pub := d.attrArray()
		priv := d.attrArray()
		if err := d.done(); err != nil {
			return err
		}
		pubKey, privKey, err := h.GenerateKeyPair(ctx, sh, m, pub, priv)
		if err != nil {
			return err
		}
		e.ulong(uint(pubKey))
		e.ulong(uint(privKey))

	case callWrapKey:
		sh := pkcs11.SessionHandle(d.ulong())
		m := d.mechanism()
		wrapping := pkcs11.ObjectHandle(d.ulong())
		key := pkcs11.ObjectHandle(d.ulong())
		buf := d.byteBuffer()
		if err := d.done(); err != nil {
			return err
		}
		// Not kept across calls: wrapping ends no operation, and a kept
		// result could outlive the key handles it was made with.
		wrapped, err := h.WrapKey(ctx, sh, m, wrapping, key)
		if err != nil {
			return err
		}
		if len(wrapped) >= maxArrayLen {
			return errBadResult
		}
		e.outBytes(wrapped, buf)

	case callUnwrapKey:
		sh := pkcs11.SessionHandle(d.ulong())
		m := d.mechanism()
		unwrapping := pkcs11.ObjectHandle(d.ulong())
		wrapped := d.byteArray()
		tmpl := d.attrArray()
		if err := d.done(); err != nil {
			return err
		}
		key, err := h.UnwrapKey(ctx, sh, m, unwrapping, wrapped, tmpl)
		if err != nil {
			return err
		}
		e.ulong(uint(key))

	case callDeriveKey:
		sh := pkcs11.SessionHandle(d.ulong())
		m := d.mechanism()
		base := pkcs11.ObjectHandle(d.ulong())
		tmpl := d.attrArray()
		if err := d.done(); err != nil {
			return err
		}
		key, err := h.DeriveKey(ctx, sh, m, base, tmpl)
		if err != nil {
			return err
		}
		e.ulong(uint(key))

	case callGenerateRandom:
		sh := pkcs11.SessionHandle(d.ulong())
		buf := d.byteBuffer()
		if err := d.done(); err != nil {
			return err
		}
		// The buffer size is the amount asked for, not a room to fill;
		// there is no length query. Bound it: it comes from the client.
		n := int64(buf.size)
		if n > int64(s.maxSize) {
			return pkcs11.Error(pkcs11.CKR_DEVICE_MEMORY)
		}
		random, err := h.GenerateRandom(ctx, sh, int(n))
		if err != nil {
			return err
		}
		if int64(len(random)) != n {
			return fmt.Errorf("%w: GenerateRandom returned %d bytes for %d", errBadResult, len(random), n)
		}
		e.outBytes(random, outBuffer{size: buf.size})

	case callWaitForSlotEvent:
		flags := d.ulong()
		if err := d.done(); err != nil {
			return err
		}
		if !s.enterWait() {
			s.log.Warn("p11-kit rpc: too many blocked C_WaitForSlotEvent calls on one connection")
			return pkcs11.Error(pkcs11.CKR_FUNCTION_FAILED)
		}
		c.answered = s.leaveWait // see finalize
		slot, err := h.WaitForSlotEvent(ctx, flags)
		if err != nil {
			return err
		}
		e.ulong(slot)

	default:
		// Every call of the table is handled above.
		return errSignature
	}
	return nil
}
