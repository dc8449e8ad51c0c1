package dbusapi

import (
	"context"
	"errors"
	"fmt"
	"log/slog"

	godbus "github.com/godbus/dbus/v5"

	"github.com/slotwatch/slotwatch/broker"
	"github.com/slotwatch/slotwatch/module"
	"github.com/slotwatch/slotwatch/monitor"
)

// Error names of the contract. Every failure a client sees is one of these.
const (
	errorPrefix        = BusName + ".Error."
	ErrTokenRemoved    = errorPrefix + "TokenRemoved"
	ErrSessionsExist   = errorPrefix + "SessionsExist"
	ErrPinIncorrect    = errorPrefix + "PinIncorrect"
	ErrPinLocked       = errorPrefix + "PinLocked"
	ErrPinInvalid      = errorPrefix + "PinInvalid"
	ErrNotLoggedIn     = errorPrefix + "NotLoggedIn"
	ErrAlreadyLoggedIn = errorPrefix + "AlreadyLoggedIn"
	ErrNotSupported    = errorPrefix + "NotSupported"
	ErrModuleFailure   = errorPrefix + "ModuleFailure"
	ErrBusy            = errorPrefix + "Busy"
	// ErrCancelled: the user cancelled at the reader (a PIN pad's Cancel
	// key: CKR_FUNCTION_CANCELED).
	ErrCancelled = errorPrefix + "Cancelled"
	// ErrInvalidConfig: Reload found the configuration file wrong; the
	// running configuration stays.
	ErrInvalidConfig = errorPrefix + "InvalidConfig"
	ErrInvalidArgs   = "org.freedesktop.DBus.Error.InvalidArgs"
	ErrAccessDenied  = "org.freedesktop.DBus.Error.AccessDenied"
	ErrUnknownObject = "org.freedesktop.DBus.Error.UnknownObject"
)

// errorMap is the one place that maps internal errors to D-Bus error
// names (fwupd's model): the broker's answers, the monitor's, and the
// module's own errors. The first entry whose error matches (errors.Is)
// wins. A module's CK_RV is looked up in ckrMap instead.
var errorMap = []struct {
	err  error
	name string
}{
	{broker.ErrInvalidArgument, ErrInvalidArgs},
	{broker.ErrAccessDenied, ErrAccessDenied},
	{broker.ErrCallerGone, ErrAccessDenied},
	{broker.ErrBusy, ErrBusy},
	{broker.ErrSessionsExist, ErrSessionsExist},
	{broker.ErrNotLoggedIn, ErrNotLoggedIn},
	{broker.ErrAlreadyLoggedIn, ErrAlreadyLoggedIn},
	{broker.ErrNotSupported, ErrNotSupported},
	{broker.ErrNoSuchSession, ErrUnknownObject},
	{broker.ErrNoSuchObject, ErrUnknownObject},
	{monitor.ErrTokenRemoved, ErrTokenRemoved},
	{monitor.ErrCardInUse, ErrBusy},
	{module.ErrStaleGeneration, ErrTokenRemoved},
	{module.ErrNoSuchSession, ErrTokenRemoved},
	{module.ErrLoad, ErrModuleFailure},
	{context.DeadlineExceeded, ErrBusy},
	{context.Canceled, ErrBusy},
}

// ckrMap names every CK_RV of PKCS#11 v2.40 (module.Codes; a test keeps
// them in step). Codes a module returns only when slotwatch itself erred,
// or when the module is broken, are ModuleFailure.
var ckrMap = map[string]string{
	// The token went: a new generation follows.
	"CKR_TOKEN_NOT_PRESENT":      ErrTokenRemoved,
	"CKR_TOKEN_NOT_RECOGNIZED":   ErrTokenRemoved,
	"CKR_DEVICE_REMOVED":         ErrTokenRemoved,
	"CKR_SESSION_HANDLE_INVALID": ErrTokenRemoved,
	"CKR_SESSION_CLOSED":         ErrTokenRemoved,

	"CKR_SESSION_EXISTS":               ErrSessionsExist,
	"CKR_SESSION_READ_ONLY_EXISTS":     ErrSessionsExist,
	"CKR_SESSION_READ_WRITE_SO_EXISTS": ErrSessionsExist,

	// Try again later.
	"CKR_SESSION_COUNT":         ErrBusy,
	"CKR_OPERATION_ACTIVE":      ErrBusy,
	"CKR_OBJECT_HANDLE_INVALID": ErrBusy, // an object went while it was read

	"CKR_PIN_INCORRECT":     ErrPinIncorrect,
	"CKR_PIN_LOCKED":        ErrPinLocked,
	"CKR_PIN_INVALID":       ErrPinInvalid,
	"CKR_PIN_LEN_RANGE":     ErrPinInvalid,
	"CKR_PIN_TOO_WEAK":      ErrPinInvalid,
	"CKR_FUNCTION_CANCELED": ErrCancelled,
	"CKR_CANCEL":            ErrCancelled,

	"CKR_USER_NOT_LOGGED_IN":             ErrNotLoggedIn,
	"CKR_USER_ALREADY_LOGGED_IN":         ErrAlreadyLoggedIn,
	"CKR_USER_ANOTHER_ALREADY_LOGGED_IN": ErrAlreadyLoggedIn,
	"CKR_USER_TOO_MANY_TYPES":            ErrAlreadyLoggedIn,

	// The token or module cannot do this.
	"CKR_FUNCTION_NOT_SUPPORTED":         ErrNotSupported,
	"CKR_FUNCTION_NOT_PARALLEL":          ErrNotSupported,
	"CKR_FUNCTION_REJECTED":              ErrNotSupported,
	"CKR_SESSION_PARALLEL_NOT_SUPPORTED": ErrNotSupported,
	"CKR_MECHANISM_INVALID":              ErrNotSupported,
	"CKR_MECHANISM_PARAM_INVALID":        ErrNotSupported,
	"CKR_KEY_TYPE_INCONSISTENT":          ErrNotSupported,
	"CKR_KEY_FUNCTION_NOT_PERMITTED":     ErrNotSupported,
	"CKR_KEY_SIZE_RANGE":                 ErrNotSupported,
	"CKR_KEY_NOT_NEEDED":                 ErrNotSupported,
	"CKR_KEY_CHANGED":                    ErrNotSupported,
	"CKR_KEY_NEEDED":                     ErrNotSupported,
	"CKR_KEY_INDIGESTIBLE":               ErrNotSupported,
	"CKR_KEY_NOT_WRAPPABLE":              ErrNotSupported,
	"CKR_KEY_UNEXTRACTABLE":              ErrNotSupported,
	"CKR_CURVE_NOT_SUPPORTED":            ErrNotSupported,
	"CKR_DOMAIN_PARAMS_INVALID":          ErrNotSupported,
	"CKR_RANDOM_SEED_NOT_SUPPORTED":      ErrNotSupported,
	"CKR_RANDOM_NO_RNG":                  ErrNotSupported,
	"CKR_ACTION_PROHIBITED":              ErrNotSupported,
	"CKR_ATTRIBUTE_READ_ONLY":            ErrNotSupported,
	"CKR_ATTRIBUTE_SENSITIVE":            ErrNotSupported,
	"CKR_INFORMATION_SENSITIVE":          ErrNotSupported,
	"CKR_STATE_UNSAVEABLE":               ErrNotSupported,
	"CKR_TOKEN_WRITE_PROTECTED":          ErrNotSupported,
	"CKR_USER_PIN_NOT_INITIALIZED":       ErrNotSupported,
	"CKR_PIN_EXPIRED":                    ErrNotSupported, // a PIN change is not offered
	"CKR_NEW_PIN_MODE":                   ErrNotSupported,
	"CKR_NEXT_OTP":                       ErrNotSupported,

	// What the client handed in is wrong.
	"CKR_ARGUMENTS_BAD":                    ErrInvalidArgs,
	"CKR_SLOT_ID_INVALID":                  ErrInvalidArgs,
	"CKR_DATA_INVALID":                     ErrInvalidArgs,
	"CKR_DATA_LEN_RANGE":                   ErrInvalidArgs,
	"CKR_ATTRIBUTE_TYPE_INVALID":           ErrInvalidArgs,
	"CKR_ATTRIBUTE_VALUE_INVALID":          ErrInvalidArgs,
	"CKR_TEMPLATE_INCOMPLETE":              ErrInvalidArgs,
	"CKR_TEMPLATE_INCONSISTENT":            ErrInvalidArgs,
	"CKR_KEY_HANDLE_INVALID":               ErrInvalidArgs,
	"CKR_SESSION_READ_ONLY":                ErrInvalidArgs,
	"CKR_USER_TYPE_INVALID":                ErrInvalidArgs,
	"CKR_ENCRYPTED_DATA_INVALID":           ErrInvalidArgs,
	"CKR_ENCRYPTED_DATA_LEN_RANGE":         ErrInvalidArgs,
	"CKR_SIGNATURE_INVALID":                ErrInvalidArgs,
	"CKR_SIGNATURE_LEN_RANGE":              ErrInvalidArgs,
	"CKR_WRAPPED_KEY_INVALID":              ErrInvalidArgs,
	"CKR_WRAPPED_KEY_LEN_RANGE":            ErrInvalidArgs,
	"CKR_WRAPPING_KEY_HANDLE_INVALID":      ErrInvalidArgs,
	"CKR_WRAPPING_KEY_SIZE_RANGE":          ErrInvalidArgs,
	"CKR_WRAPPING_KEY_TYPE_INCONSISTENT":   ErrInvalidArgs,
	"CKR_UNWRAPPING_KEY_HANDLE_INVALID":    ErrInvalidArgs,
	"CKR_UNWRAPPING_KEY_SIZE_RANGE":        ErrInvalidArgs,
	"CKR_UNWRAPPING_KEY_TYPE_INCONSISTENT": ErrInvalidArgs,
	"CKR_PUBLIC_KEY_INVALID":               ErrInvalidArgs,
	"CKR_SAVED_STATE_INVALID":              ErrInvalidArgs,

	// The module is broken, or slotwatch misused it.
	"CKR_OK":                           ErrModuleFailure, // never an error; listed for completeness
	"CKR_GENERAL_ERROR":                ErrModuleFailure,
	"CKR_FUNCTION_FAILED":              ErrModuleFailure,
	"CKR_DEVICE_ERROR":                 ErrModuleFailure,
	"CKR_DEVICE_MEMORY":                ErrModuleFailure,
	"CKR_HOST_MEMORY":                  ErrModuleFailure,
	"CKR_CRYPTOKI_NOT_INITIALIZED":     ErrModuleFailure,
	"CKR_CRYPTOKI_ALREADY_INITIALIZED": ErrModuleFailure,
	"CKR_NEED_TO_CREATE_THREADS":       ErrModuleFailure,
	"CKR_CANT_LOCK":                    ErrModuleFailure,
	"CKR_MUTEX_BAD":                    ErrModuleFailure,
	"CKR_MUTEX_NOT_LOCKED":             ErrModuleFailure,
	"CKR_FIPS_SELF_TEST_FAILED":        ErrModuleFailure,
	"CKR_LIBRARY_LOAD_FAILED":          ErrModuleFailure,
	"CKR_EXCEEDED_MAX_ITERATIONS":      ErrModuleFailure,
	"CKR_NO_EVENT":                     ErrModuleFailure,
	"CKR_BUFFER_TOO_SMALL":             ErrModuleFailure,
	"CKR_OPERATION_NOT_INITIALIZED":    ErrModuleFailure,
}

// apiError is an error that already carries its D-Bus name: argument
// validation, access checks.
type apiError struct {
	name string
	msg  string
}

func (e *apiError) Error() string { return e.msg }

func invalidArgs(format string, args ...any) error {
	return &apiError{ErrInvalidArgs, fmt.Sprintf(format, args...)}
}

func accessDenied(format string, args ...any) error {
	return &apiError{ErrAccessDenied, fmt.Sprintf(format, args...)}
}

func namedError(name, format string, args ...any) error {
	return &apiError{name, fmt.Sprintf(format, args...)}
}

// errorName is the D-Bus name of an internal error; mapped is false when
// no entry knows it (it is then ModuleFailure).
func errorName(err error) (name string, mapped bool) {
	var api *apiError
	if errors.As(err, &api) {
		return api.name, true
	}
	for _, e := range errorMap {
		if errors.Is(err, e.err) {
			return e.name, true
		}
	}
	var rv *module.Error
	if errors.As(err, &rv) {
		if n, ok := ckrMap[module.CodeName(rv.Code)]; ok {
			return n, true
		}
	}
	return ErrModuleFailure, false
}

// toDBus turns any internal error into exactly one D-Bus error. An error
// the tables do not know (a vendor-defined CK_RV, a bug) becomes
// ModuleFailure and is logged loudly, so a missing entry is noticed.
func toDBus(log *slog.Logger, err error) *godbus.Error {
	if err == nil {
		return nil
	}
	name, mapped := errorName(err)
	if !mapped {
		log.Error("unmapped internal error answered as ModuleFailure", "err", err)
	}
	return godbus.NewError(name, []any{err.Error()})
}
