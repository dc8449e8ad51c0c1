package pkcs11face

import (
	"context"
	"errors"

	"github.com/miekg/pkcs11"

	"github.com/slotwatch/slotwatch/broker"
	"github.com/slotwatch/slotwatch/module"
	"github.com/slotwatch/slotwatch/monitor"
)

// The one place where the face turns what the broker, the monitor and the
// modules answer into a CK_RV for the client. A module's own CK_RV passes
// through unchanged; the broker's answers map as below.
var ckrMap = []struct {
	err error
	rv  uint
}{
	{broker.ErrInvalidArgument, pkcs11.CKR_ARGUMENTS_BAD},
	// Another client's session, or one that is closed or was never
	// issued: to this client it does not exist.
	{broker.ErrAccessDenied, pkcs11.CKR_SESSION_HANDLE_INVALID},
	{broker.ErrNoSuchSession, pkcs11.CKR_SESSION_HANDLE_INVALID},
	{broker.ErrCallerGone, pkcs11.CKR_SESSION_HANDLE_INVALID},
	{broker.ErrNoSuchObject, pkcs11.CKR_OBJECT_HANDLE_INVALID},
	{broker.ErrSessionsExist, pkcs11.CKR_SESSION_EXISTS},
	{broker.ErrNotLoggedIn, pkcs11.CKR_USER_NOT_LOGGED_IN},
	{broker.ErrAlreadyLoggedIn, pkcs11.CKR_USER_ANOTHER_ALREADY_LOGGED_IN},
	{broker.ErrNotSupported, pkcs11.CKR_FUNCTION_NOT_SUPPORTED},
	// The session's token was pulled: its sessions are gone with it.
	{broker.ErrTokenRemoved, pkcs11.CKR_DEVICE_REMOVED},
	{module.ErrStaleGeneration, pkcs11.CKR_DEVICE_REMOVED},
	{module.ErrNoSuchSession, pkcs11.CKR_SESSION_HANDLE_INVALID},
	// Retry later: another client's login or InitToken holds the token,
	// another program holds the card exclusively, or a limit.
	{broker.ErrBusy, pkcs11.CKR_FUNCTION_FAILED},
	{monitor.ErrCardInUse, pkcs11.CKR_FUNCTION_FAILED},
	{context.DeadlineExceeded, pkcs11.CKR_FUNCTION_FAILED},
	{context.Canceled, pkcs11.CKR_FUNCTION_FAILED},
}

// ckr is err as a CK_RV (CKR_OK for nil).
func ckr(err error) uint {
	if err == nil {
		return pkcs11.CKR_OK
	}
	var me *module.Error
	if errors.As(err, &me) && !errors.Is(err, module.ErrStaleGeneration) && !errors.Is(err, module.ErrNoSuchSession) {
		return me.Code
	}
	var pe pkcs11.Error
	if errors.As(err, &pe) {
		return uint(pe)
	}
	for _, m := range ckrMap {
		if errors.Is(err, m.err) {
			return m.rv
		}
	}
	return pkcs11.CKR_GENERAL_ERROR
}

// asPKCS11 is err as the pkcs11.Error the RPC layer sends.
func asPKCS11(err error) error {
	if err == nil {
		return nil
	}
	return pkcs11.Error(ckr(err))
}
