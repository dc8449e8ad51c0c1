package module

import (
	"errors"
	"fmt"

	"github.com/miekg/pkcs11"
)

// Error is a PKCS#11 return value other than CKR_OK, with the function that
// returned it. Code is the raw CK_RV, so callers can branch on codes that have
// no sentinel here (errors.As), and the common ones match their sentinel with
// errors.Is:
//
//	if errors.Is(err, module.ErrPinIncorrect) { ... }
type Error struct {
	Func string // "C_Login"; empty in the sentinel values below
	Code uint   // CKR_*
}

func (e *Error) Error() string {
	if e.Func == "" {
		return fmt.Sprintf("%s (%#x)", CodeName(e.Code), e.Code)
	}
	return fmt.Sprintf("%s: %s (%#x)", e.Func, CodeName(e.Code), e.Code)
}

// Is makes errors.Is(err, ErrX) true when err carries the same code as the
// sentinel ErrX, whatever function returned it. A target with Func set
// matches only that function.
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	if !ok {
		return false
	}
	return t.Code == e.Code && (t.Func == "" || t.Func == e.Func)
}

// Sentinels for the codes callers branch on. Compare with errors.Is, never ==:
// the errors this package returns carry the function name as well.
var (
	ErrTokenNotPresent      = code(pkcs11.CKR_TOKEN_NOT_PRESENT)
	ErrTokenNotRecognized   = code(pkcs11.CKR_TOKEN_NOT_RECOGNIZED)
	ErrTokenWriteProtected  = code(pkcs11.CKR_TOKEN_WRITE_PROTECTED)
	ErrDeviceRemoved        = code(pkcs11.CKR_DEVICE_REMOVED)
	ErrDeviceError          = code(pkcs11.CKR_DEVICE_ERROR)
	ErrDeviceMemory         = code(pkcs11.CKR_DEVICE_MEMORY)
	ErrHostMemory           = code(pkcs11.CKR_HOST_MEMORY)
	ErrGeneralError         = code(pkcs11.CKR_GENERAL_ERROR)
	ErrFunctionFailed       = code(pkcs11.CKR_FUNCTION_FAILED)
	ErrFunctionNotSupported = code(pkcs11.CKR_FUNCTION_NOT_SUPPORTED)
	ErrFunctionCanceled     = code(pkcs11.CKR_FUNCTION_CANCELED)
	ErrNotInitialized       = code(pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED)
	ErrAlreadyInitialized   = code(pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED)
	ErrNoEvent              = code(pkcs11.CKR_NO_EVENT)
	ErrSlotIDInvalid        = code(pkcs11.CKR_SLOT_ID_INVALID)
	ErrArgumentsBad         = code(pkcs11.CKR_ARGUMENTS_BAD)

	ErrSessionHandleInvalid  = code(pkcs11.CKR_SESSION_HANDLE_INVALID)
	ErrSessionClosed         = code(pkcs11.CKR_SESSION_CLOSED)
	ErrSessionExists         = code(pkcs11.CKR_SESSION_EXISTS)
	ErrSessionCount          = code(pkcs11.CKR_SESSION_COUNT)
	ErrBufferTooSmall        = code(pkcs11.CKR_BUFFER_TOO_SMALL)
	ErrSessionReadOnly       = code(pkcs11.CKR_SESSION_READ_ONLY)
	ErrSessionReadOnlyExists = code(pkcs11.CKR_SESSION_READ_ONLY_EXISTS)
	ErrOperationActive       = code(pkcs11.CKR_OPERATION_ACTIVE)

	ErrPinIncorrect          = code(pkcs11.CKR_PIN_INCORRECT)
	ErrPinLocked             = code(pkcs11.CKR_PIN_LOCKED)
	ErrPinInvalid            = code(pkcs11.CKR_PIN_INVALID)
	ErrPinLenRange           = code(pkcs11.CKR_PIN_LEN_RANGE)
	ErrPinExpired            = code(pkcs11.CKR_PIN_EXPIRED)
	ErrUserNotLoggedIn       = code(pkcs11.CKR_USER_NOT_LOGGED_IN)
	ErrUserAlreadyLoggedIn   = code(pkcs11.CKR_USER_ALREADY_LOGGED_IN)
	ErrUserTypeInvalid       = code(pkcs11.CKR_USER_TYPE_INVALID)
	ErrUserPinNotInitialized = code(pkcs11.CKR_USER_PIN_NOT_INITIALIZED)
	ErrAnotherUserLoggedIn   = code(pkcs11.CKR_USER_ANOTHER_ALREADY_LOGGED_IN)

	ErrMechanismInvalid      = code(pkcs11.CKR_MECHANISM_INVALID)
	ErrMechanismParamInvalid = code(pkcs11.CKR_MECHANISM_PARAM_INVALID)
	ErrTemplateIncomplete    = code(pkcs11.CKR_TEMPLATE_INCOMPLETE)
	ErrTemplateInconsistent  = code(pkcs11.CKR_TEMPLATE_INCONSISTENT)
	ErrAttributeTypeInvalid  = code(pkcs11.CKR_ATTRIBUTE_TYPE_INVALID)
	ErrAttributeValueInvalid = code(pkcs11.CKR_ATTRIBUTE_VALUE_INVALID)
	ErrAttributeSensitive    = code(pkcs11.CKR_ATTRIBUTE_SENSITIVE)
	ErrObjectHandleInvalid   = code(pkcs11.CKR_OBJECT_HANDLE_INVALID)
	ErrKeyHandleInvalid      = code(pkcs11.CKR_KEY_HANDLE_INVALID)
	ErrKeyTypeInconsistent   = code(pkcs11.CKR_KEY_TYPE_INCONSISTENT)
	ErrKeyFunctionNotAllowed = code(pkcs11.CKR_KEY_FUNCTION_NOT_PERMITTED)
	ErrDataInvalid           = code(pkcs11.CKR_DATA_INVALID)
	ErrDataLenRange          = code(pkcs11.CKR_DATA_LEN_RANGE)
)

// Errors of this package's own, not PKCS#11 codes.
var (
	// ErrNoSuchSession: the session id is not (or no longer) in the
	// registry — closed, reclaimed, or dropped by the last Finalize.
	ErrNoSuchSession = errors.New("no such session")
	// ErrStaleGeneration: the token generation (of the session, or asked
	// for by OpenSession) was retired by RetireGeneration or ReclaimSlot;
	// the card now in the slot, if any, is a different token.
	ErrStaleGeneration = errors.New("token generation retired")
	// ErrLoad: the library could not be loaded or has no C_GetFunctionList.
	ErrLoad = errors.New("cannot load PKCS#11 library")
)

func code(c uint) *Error { return &Error{Code: c} }

// wrap turns what miekg/pkcs11 returned into this package's error:
// pkcs11.Error (a bare CK_RV) becomes *Error with the function name.
func wrap(fn string, err error) error {
	if err == nil {
		return nil
	}
	if _, ok := err.(*Error); ok {
		return err
	}
	var rv pkcs11.Error
	if errors.As(err, &rv) {
		return &Error{Func: fn, Code: uint(rv)}
	}
	return fmt.Errorf("%s: %w", fn, err)
}

// rvError is wrap for a CK_RV we got from our own cgo calls.
func rvError(fn string, rv uint) error {
	if rv == pkcs11.CKR_OK {
		return nil
	}
	return &Error{Func: fn, Code: rv}
}

// errCode is the CK_RV inside err, if it has one.
func errCode(err error) (uint, bool) {
	var e *Error
	if errors.As(err, &e) {
		return e.Code, true
	}
	return 0, false
}

// IsModuleFailure reports whether err says the module as a whole is broken,
// so that finalizing and initializing it again is the remedy (DESIGN rule 6):
// CKR_GENERAL_ERROR, CKR_DEVICE_ERROR, CKR_CRYPTOKI_NOT_INITIALIZED.
//
// CKR_FUNCTION_FAILED is deliberately not one of them: PKCS#11 defines it as
// "this one call could not be performed", and OpenSC returns it for ordinary
// card-level failures of a single operation (a card answering a sign command
// with an error status). Reinitializing on it would drop every caller's
// sessions on every token because one operation on one card failed.
// CKR_CRYPTOKI_NOT_INITIALIZED counts because a module that says so while we
// hold it initialized has lost its state; note that a blocked
// WaitForSlotEvent also gets it when we finalize on purpose, so the caller
// must tell that case apart by knowing it asked for the Finalize.
func IsModuleFailure(err error) bool {
	c, ok := errCode(err)
	if !ok {
		return false
	}
	switch c {
	case pkcs11.CKR_GENERAL_ERROR, pkcs11.CKR_DEVICE_ERROR, pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED:
		return true
	}
	return false
}

// IsTokenGone reports whether err says the token (or the session's hold on
// it) is gone: the card was pulled, replaced, or the module dropped the
// session with it. The remedy is a new generation, not a retry.
func IsTokenGone(err error) bool {
	c, ok := errCode(err)
	if !ok {
		return false
	}
	switch c {
	case pkcs11.CKR_TOKEN_NOT_PRESENT, pkcs11.CKR_DEVICE_REMOVED, pkcs11.CKR_SESSION_HANDLE_INVALID,
		pkcs11.CKR_SESSION_CLOSED, pkcs11.CKR_TOKEN_NOT_RECOGNIZED:
		return true
	}
	return false
}

// CodeName is the CKR_* name of a return value, "CKR_VENDOR_DEFINED+0x..."
// for vendor codes, or "CKR_0x..." for codes this table does not know.
func CodeName(rv uint) string {
	if n, ok := ckrNames[rv]; ok {
		return n
	}
	if rv >= pkcs11.CKR_VENDOR_DEFINED {
		return fmt.Sprintf("CKR_VENDOR_DEFINED+%#x", rv-pkcs11.CKR_VENDOR_DEFINED)
	}
	return fmt.Sprintf("CKR_%#x", rv)
}

// ckrNames covers PKCS#11 v2.40 (generated from miekg/pkcs11's constants).
var ckrNames = map[uint]string{
	pkcs11.CKR_OK:                               "CKR_OK",
	pkcs11.CKR_CANCEL:                           "CKR_CANCEL",
	pkcs11.CKR_HOST_MEMORY:                      "CKR_HOST_MEMORY",
	pkcs11.CKR_SLOT_ID_INVALID:                  "CKR_SLOT_ID_INVALID",
	pkcs11.CKR_GENERAL_ERROR:                    "CKR_GENERAL_ERROR",
	pkcs11.CKR_FUNCTION_FAILED:                  "CKR_FUNCTION_FAILED",
	pkcs11.CKR_ARGUMENTS_BAD:                    "CKR_ARGUMENTS_BAD",
	pkcs11.CKR_NO_EVENT:                         "CKR_NO_EVENT",
	pkcs11.CKR_NEED_TO_CREATE_THREADS:           "CKR_NEED_TO_CREATE_THREADS",
	pkcs11.CKR_CANT_LOCK:                        "CKR_CANT_LOCK",
	pkcs11.CKR_ATTRIBUTE_READ_ONLY:              "CKR_ATTRIBUTE_READ_ONLY",
	pkcs11.CKR_ATTRIBUTE_SENSITIVE:              "CKR_ATTRIBUTE_SENSITIVE",
	pkcs11.CKR_ATTRIBUTE_TYPE_INVALID:           "CKR_ATTRIBUTE_TYPE_INVALID",
	pkcs11.CKR_ATTRIBUTE_VALUE_INVALID:          "CKR_ATTRIBUTE_VALUE_INVALID",
	pkcs11.CKR_ACTION_PROHIBITED:                "CKR_ACTION_PROHIBITED",
	pkcs11.CKR_DATA_INVALID:                     "CKR_DATA_INVALID",
	pkcs11.CKR_DATA_LEN_RANGE:                   "CKR_DATA_LEN_RANGE",
	pkcs11.CKR_DEVICE_ERROR:                     "CKR_DEVICE_ERROR",
	pkcs11.CKR_DEVICE_MEMORY:                    "CKR_DEVICE_MEMORY",
	pkcs11.CKR_DEVICE_REMOVED:                   "CKR_DEVICE_REMOVED",
	pkcs11.CKR_ENCRYPTED_DATA_INVALID:           "CKR_ENCRYPTED_DATA_INVALID",
	pkcs11.CKR_ENCRYPTED_DATA_LEN_RANGE:         "CKR_ENCRYPTED_DATA_LEN_RANGE",
	pkcs11.CKR_FUNCTION_CANCELED:                "CKR_FUNCTION_CANCELED",
	pkcs11.CKR_FUNCTION_NOT_PARALLEL:            "CKR_FUNCTION_NOT_PARALLEL",
	pkcs11.CKR_FUNCTION_NOT_SUPPORTED:           "CKR_FUNCTION_NOT_SUPPORTED",
	pkcs11.CKR_KEY_HANDLE_INVALID:               "CKR_KEY_HANDLE_INVALID",
	pkcs11.CKR_KEY_SIZE_RANGE:                   "CKR_KEY_SIZE_RANGE",
	pkcs11.CKR_KEY_TYPE_INCONSISTENT:            "CKR_KEY_TYPE_INCONSISTENT",
	pkcs11.CKR_KEY_NOT_NEEDED:                   "CKR_KEY_NOT_NEEDED",
	pkcs11.CKR_KEY_CHANGED:                      "CKR_KEY_CHANGED",
	pkcs11.CKR_KEY_NEEDED:                       "CKR_KEY_NEEDED",
	pkcs11.CKR_KEY_INDIGESTIBLE:                 "CKR_KEY_INDIGESTIBLE",
	pkcs11.CKR_KEY_FUNCTION_NOT_PERMITTED:       "CKR_KEY_FUNCTION_NOT_PERMITTED",
	pkcs11.CKR_KEY_NOT_WRAPPABLE:                "CKR_KEY_NOT_WRAPPABLE",
	pkcs11.CKR_KEY_UNEXTRACTABLE:                "CKR_KEY_UNEXTRACTABLE",
	pkcs11.CKR_MECHANISM_INVALID:                "CKR_MECHANISM_INVALID",
	pkcs11.CKR_MECHANISM_PARAM_INVALID:          "CKR_MECHANISM_PARAM_INVALID",
	pkcs11.CKR_OBJECT_HANDLE_INVALID:            "CKR_OBJECT_HANDLE_INVALID",
	pkcs11.CKR_OPERATION_ACTIVE:                 "CKR_OPERATION_ACTIVE",
	pkcs11.CKR_OPERATION_NOT_INITIALIZED:        "CKR_OPERATION_NOT_INITIALIZED",
	pkcs11.CKR_PIN_INCORRECT:                    "CKR_PIN_INCORRECT",
	pkcs11.CKR_PIN_INVALID:                      "CKR_PIN_INVALID",
	pkcs11.CKR_PIN_LEN_RANGE:                    "CKR_PIN_LEN_RANGE",
	pkcs11.CKR_PIN_EXPIRED:                      "CKR_PIN_EXPIRED",
	pkcs11.CKR_PIN_LOCKED:                       "CKR_PIN_LOCKED",
	pkcs11.CKR_SESSION_CLOSED:                   "CKR_SESSION_CLOSED",
	pkcs11.CKR_SESSION_COUNT:                    "CKR_SESSION_COUNT",
	pkcs11.CKR_SESSION_HANDLE_INVALID:           "CKR_SESSION_HANDLE_INVALID",
	pkcs11.CKR_SESSION_PARALLEL_NOT_SUPPORTED:   "CKR_SESSION_PARALLEL_NOT_SUPPORTED",
	pkcs11.CKR_SESSION_READ_ONLY:                "CKR_SESSION_READ_ONLY",
	pkcs11.CKR_SESSION_EXISTS:                   "CKR_SESSION_EXISTS",
	pkcs11.CKR_SESSION_READ_ONLY_EXISTS:         "CKR_SESSION_READ_ONLY_EXISTS",
	pkcs11.CKR_SESSION_READ_WRITE_SO_EXISTS:     "CKR_SESSION_READ_WRITE_SO_EXISTS",
	pkcs11.CKR_SIGNATURE_INVALID:                "CKR_SIGNATURE_INVALID",
	pkcs11.CKR_SIGNATURE_LEN_RANGE:              "CKR_SIGNATURE_LEN_RANGE",
	pkcs11.CKR_TEMPLATE_INCOMPLETE:              "CKR_TEMPLATE_INCOMPLETE",
	pkcs11.CKR_TEMPLATE_INCONSISTENT:            "CKR_TEMPLATE_INCONSISTENT",
	pkcs11.CKR_TOKEN_NOT_PRESENT:                "CKR_TOKEN_NOT_PRESENT",
	pkcs11.CKR_TOKEN_NOT_RECOGNIZED:             "CKR_TOKEN_NOT_RECOGNIZED",
	pkcs11.CKR_TOKEN_WRITE_PROTECTED:            "CKR_TOKEN_WRITE_PROTECTED",
	pkcs11.CKR_UNWRAPPING_KEY_HANDLE_INVALID:    "CKR_UNWRAPPING_KEY_HANDLE_INVALID",
	pkcs11.CKR_UNWRAPPING_KEY_SIZE_RANGE:        "CKR_UNWRAPPING_KEY_SIZE_RANGE",
	pkcs11.CKR_UNWRAPPING_KEY_TYPE_INCONSISTENT: "CKR_UNWRAPPING_KEY_TYPE_INCONSISTENT",
	pkcs11.CKR_USER_ALREADY_LOGGED_IN:           "CKR_USER_ALREADY_LOGGED_IN",
	pkcs11.CKR_USER_NOT_LOGGED_IN:               "CKR_USER_NOT_LOGGED_IN",
	pkcs11.CKR_USER_PIN_NOT_INITIALIZED:         "CKR_USER_PIN_NOT_INITIALIZED",
	pkcs11.CKR_USER_TYPE_INVALID:                "CKR_USER_TYPE_INVALID",
	pkcs11.CKR_USER_ANOTHER_ALREADY_LOGGED_IN:   "CKR_USER_ANOTHER_ALREADY_LOGGED_IN",
	pkcs11.CKR_USER_TOO_MANY_TYPES:              "CKR_USER_TOO_MANY_TYPES",
	pkcs11.CKR_WRAPPED_KEY_INVALID:              "CKR_WRAPPED_KEY_INVALID",
	pkcs11.CKR_WRAPPED_KEY_LEN_RANGE:            "CKR_WRAPPED_KEY_LEN_RANGE",
	pkcs11.CKR_WRAPPING_KEY_HANDLE_INVALID:      "CKR_WRAPPING_KEY_HANDLE_INVALID",
	pkcs11.CKR_WRAPPING_KEY_SIZE_RANGE:          "CKR_WRAPPING_KEY_SIZE_RANGE",
	pkcs11.CKR_WRAPPING_KEY_TYPE_INCONSISTENT:   "CKR_WRAPPING_KEY_TYPE_INCONSISTENT",
	pkcs11.CKR_RANDOM_SEED_NOT_SUPPORTED:        "CKR_RANDOM_SEED_NOT_SUPPORTED",
	pkcs11.CKR_RANDOM_NO_RNG:                    "CKR_RANDOM_NO_RNG",
	pkcs11.CKR_DOMAIN_PARAMS_INVALID:            "CKR_DOMAIN_PARAMS_INVALID",
	pkcs11.CKR_CURVE_NOT_SUPPORTED:              "CKR_CURVE_NOT_SUPPORTED",
	pkcs11.CKR_BUFFER_TOO_SMALL:                 "CKR_BUFFER_TOO_SMALL",
	pkcs11.CKR_SAVED_STATE_INVALID:              "CKR_SAVED_STATE_INVALID",
	pkcs11.CKR_INFORMATION_SENSITIVE:            "CKR_INFORMATION_SENSITIVE",
	pkcs11.CKR_STATE_UNSAVEABLE:                 "CKR_STATE_UNSAVEABLE",
	pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED:         "CKR_CRYPTOKI_NOT_INITIALIZED",
	pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED:     "CKR_CRYPTOKI_ALREADY_INITIALIZED",
	pkcs11.CKR_MUTEX_BAD:                        "CKR_MUTEX_BAD",
	pkcs11.CKR_MUTEX_NOT_LOCKED:                 "CKR_MUTEX_NOT_LOCKED",
	pkcs11.CKR_NEW_PIN_MODE:                     "CKR_NEW_PIN_MODE",
	pkcs11.CKR_NEXT_OTP:                         "CKR_NEXT_OTP",
	pkcs11.CKR_EXCEEDED_MAX_ITERATIONS:          "CKR_EXCEEDED_MAX_ITERATIONS",
	pkcs11.CKR_FIPS_SELF_TEST_FAILED:            "CKR_FIPS_SELF_TEST_FAILED",
	pkcs11.CKR_LIBRARY_LOAD_FAILED:              "CKR_LIBRARY_LOAD_FAILED",
	pkcs11.CKR_PIN_TOO_WEAK:                     "CKR_PIN_TOO_WEAK",
	pkcs11.CKR_PUBLIC_KEY_INVALID:               "CKR_PUBLIC_KEY_INVALID",
	pkcs11.CKR_FUNCTION_REJECTED:                "CKR_FUNCTION_REJECTED",
}
