package dbusapi

import (
	"context"
	"errors"
	"fmt"
	"log/slog"

	godbus "github.com/godbus/dbus/v5"

	"github.com/slotwatch/slotwatch/module"
	"github.com/slotwatch/slotwatch/monitor"
)

// Error names of the contract. Every failure a client sees is one of these,
// InvalidArgs or AccessDenied.
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
	ErrInvalidArgs     = "org.freedesktop.DBus.Error.InvalidArgs"
	ErrAccessDenied    = "org.freedesktop.DBus.Error.AccessDenied"
)

// errorMap is the one place that maps internal errors to D-Bus error names
// (fwupd's model). The first entry whose error matches (errors.Is) wins.
var errorMap = []struct {
	err  error
	name string
}{
	{monitor.ErrTokenRemoved, ErrTokenRemoved},
	{module.ErrStaleGeneration, ErrTokenRemoved},
	{module.ErrNoSuchSession, ErrTokenRemoved},
	{module.ErrTokenNotPresent, ErrTokenRemoved},
	{module.ErrTokenNotRecognized, ErrTokenRemoved},
	{module.ErrDeviceRemoved, ErrTokenRemoved},
	{module.ErrSessionHandleInvalid, ErrTokenRemoved},
	{module.ErrSessionClosed, ErrTokenRemoved},
	{module.ErrSessionExists, ErrSessionsExist},
	{module.ErrSessionReadOnlyExists, ErrSessionsExist},
	{module.ErrSessionCount, ErrBusy},
	{module.ErrTokenWriteProtected, ErrNotSupported},
	{module.ErrUserPinNotInitialized, ErrNotSupported},
	{module.ErrAnotherUserLoggedIn, ErrAlreadyLoggedIn},
	{module.ErrDataInvalid, ErrInvalidArgs},
	{module.ErrKeyTypeInconsistent, ErrNotSupported},
	{module.ErrKeyFunctionNotAllowed, ErrNotSupported},
	{module.ErrMechanismParamInvalid, ErrNotSupported},
	{module.ErrPinExpired, ErrNotSupported}, // a PIN change is not offered
	{module.ErrSessionReadOnly, ErrInvalidArgs},
	{module.ErrDataLenRange, ErrInvalidArgs},
	{module.ErrPinIncorrect, ErrPinIncorrect},
	{module.ErrPinLocked, ErrPinLocked},
	{module.ErrPinInvalid, ErrPinInvalid},
	{module.ErrPinLenRange, ErrPinInvalid},
	{module.ErrUserNotLoggedIn, ErrNotLoggedIn},
	{module.ErrUserAlreadyLoggedIn, ErrAlreadyLoggedIn},
	{module.ErrUserTypeInvalid, ErrInvalidArgs},
	{module.ErrMechanismInvalid, ErrNotSupported},
	{module.ErrFunctionNotSupported, ErrNotSupported},
	{module.ErrKeyHandleInvalid, ErrInvalidArgs},
	{module.ErrArgumentsBad, ErrInvalidArgs},
	{module.ErrAttributeTypeInvalid, ErrInvalidArgs},
	{module.ErrTemplateIncomplete, ErrInvalidArgs},
	{module.ErrTemplateInconsistent, ErrInvalidArgs},
	{context.DeadlineExceeded, ErrBusy},
	{context.Canceled, ErrBusy},
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

// toDBus turns any internal error into exactly one D-Bus error. An error
// the table does not know becomes ModuleFailure and is logged loudly, so a
// missing entry is noticed.
func toDBus(log *slog.Logger, err error) *godbus.Error {
	if err == nil {
		return nil
	}
	var api *apiError
	if errors.As(err, &api) {
		return godbus.NewError(api.name, []any{api.msg})
	}
	for _, e := range errorMap {
		if errors.Is(err, e.err) {
			return godbus.NewError(e.name, []any{err.Error()})
		}
	}
	log.Error("unmapped internal error answered as ModuleFailure", "err", err)
	return godbus.NewError(ErrModuleFailure, []any{err.Error()})
}
