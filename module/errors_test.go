package module

import (
	"errors"
	"fmt"
	"testing"

	"github.com/miekg/pkcs11"
)

func TestErrorMapping(t *testing.T) {
	tests := []struct {
		rv        uint
		fn        string
		msg       string
		sentinel  error
		failure   bool // IsModuleFailure
		tokenGone bool // IsTokenGone
	}{
		{pkcs11.CKR_TOKEN_NOT_PRESENT, "C_OpenSession", "C_OpenSession: CKR_TOKEN_NOT_PRESENT (0xe0)", ErrTokenNotPresent, false, true},
		{pkcs11.CKR_TOKEN_NOT_RECOGNIZED, "C_GetTokenInfo", "C_GetTokenInfo: CKR_TOKEN_NOT_RECOGNIZED (0xe1)", ErrTokenNotRecognized, false, true},
		{pkcs11.CKR_DEVICE_REMOVED, "C_Sign", "C_Sign: CKR_DEVICE_REMOVED (0x32)", ErrDeviceRemoved, false, true},
		{pkcs11.CKR_SESSION_HANDLE_INVALID, "C_Login", "C_Login: CKR_SESSION_HANDLE_INVALID (0xb3)", ErrSessionHandleInvalid, false, true},
		{pkcs11.CKR_SESSION_CLOSED, "C_FindObjects", "C_FindObjects: CKR_SESSION_CLOSED (0xb0)", ErrSessionClosed, false, true},
		{pkcs11.CKR_DEVICE_ERROR, "C_GetSlotList", "C_GetSlotList: CKR_DEVICE_ERROR (0x30)", ErrDeviceError, true, false},
		{pkcs11.CKR_GENERAL_ERROR, "C_WaitForSlotEvent", "C_WaitForSlotEvent: CKR_GENERAL_ERROR (0x5)", ErrGeneralError, true, false},
		{pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED, "C_WaitForSlotEvent", "C_WaitForSlotEvent: CKR_CRYPTOKI_NOT_INITIALIZED (0x190)", ErrNotInitialized, true, false},
		{pkcs11.CKR_FUNCTION_FAILED, "C_Sign", "C_Sign: CKR_FUNCTION_FAILED (0x6)", ErrFunctionFailed, false, false},
		{pkcs11.CKR_FUNCTION_NOT_SUPPORTED, "C_WaitForSlotEvent", "C_WaitForSlotEvent: CKR_FUNCTION_NOT_SUPPORTED (0x54)", ErrFunctionNotSupported, false, false},
		{pkcs11.CKR_NO_EVENT, "C_WaitForSlotEvent", "C_WaitForSlotEvent: CKR_NO_EVENT (0x8)", ErrNoEvent, false, false},
		{pkcs11.CKR_SESSION_EXISTS, "C_InitToken", "C_InitToken: CKR_SESSION_EXISTS (0xb6)", ErrSessionExists, false, false},
		{pkcs11.CKR_SESSION_COUNT, "C_OpenSession", "C_OpenSession: CKR_SESSION_COUNT (0xb1)", ErrSessionCount, false, false},
		{pkcs11.CKR_PIN_INCORRECT, "C_Login", "C_Login: CKR_PIN_INCORRECT (0xa0)", ErrPinIncorrect, false, false},
		{pkcs11.CKR_PIN_LOCKED, "C_Login", "C_Login: CKR_PIN_LOCKED (0xa4)", ErrPinLocked, false, false},
		{pkcs11.CKR_PIN_INVALID, "C_InitToken", "C_InitToken: CKR_PIN_INVALID (0xa1)", ErrPinInvalid, false, false},
		{pkcs11.CKR_PIN_LEN_RANGE, "C_Login", "C_Login: CKR_PIN_LEN_RANGE (0xa2)", ErrPinLenRange, false, false},
		{pkcs11.CKR_USER_NOT_LOGGED_IN, "C_Sign", "C_Sign: CKR_USER_NOT_LOGGED_IN (0x101)", ErrUserNotLoggedIn, false, false},
		{pkcs11.CKR_USER_ALREADY_LOGGED_IN, "C_Login", "C_Login: CKR_USER_ALREADY_LOGGED_IN (0x100)", ErrUserAlreadyLoggedIn, false, false},
		{pkcs11.CKR_USER_TYPE_INVALID, "C_Login", "C_Login: CKR_USER_TYPE_INVALID (0x103)", ErrUserTypeInvalid, false, false},
		{pkcs11.CKR_MECHANISM_INVALID, "C_SignInit", "C_SignInit: CKR_MECHANISM_INVALID (0x70)", ErrMechanismInvalid, false, false},
		{pkcs11.CKR_SLOT_ID_INVALID, "C_GetSlotInfo", "C_GetSlotInfo: CKR_SLOT_ID_INVALID (0x3)", ErrSlotIDInvalid, false, false},
		{pkcs11.CKR_ARGUMENTS_BAD, "C_Sign", "C_Sign: CKR_ARGUMENTS_BAD (0x7)", ErrArgumentsBad, false, false},
		{pkcs11.CKR_TEMPLATE_INCOMPLETE, "C_CreateObject", "C_CreateObject: CKR_TEMPLATE_INCOMPLETE (0xd0)", ErrTemplateIncomplete, false, false},
		{pkcs11.CKR_TEMPLATE_INCONSISTENT, "C_CreateObject", "C_CreateObject: CKR_TEMPLATE_INCONSISTENT (0xd1)", ErrTemplateInconsistent, false, false},
		{pkcs11.CKR_ATTRIBUTE_TYPE_INVALID, "C_GetAttributeValue", "C_GetAttributeValue: CKR_ATTRIBUTE_TYPE_INVALID (0x12)", ErrAttributeTypeInvalid, false, false},
		{pkcs11.CKR_OBJECT_HANDLE_INVALID, "C_GetAttributeValue", "C_GetAttributeValue: CKR_OBJECT_HANDLE_INVALID (0x82)", ErrObjectHandleInvalid, false, false},
		{pkcs11.CKR_KEY_HANDLE_INVALID, "C_SignInit", "C_SignInit: CKR_KEY_HANDLE_INVALID (0x60)", ErrKeyHandleInvalid, false, false},
		{pkcs11.CKR_DEVICE_MEMORY, "C_CreateObject", "C_CreateObject: CKR_DEVICE_MEMORY (0x31)", ErrDeviceMemory, false, false},
		{pkcs11.CKR_HOST_MEMORY, "C_Initialize", "C_Initialize: CKR_HOST_MEMORY (0x2)", ErrHostMemory, false, false},
		{pkcs11.CKR_VENDOR_DEFINED + 0x17, "C_Sign", "C_Sign: CKR_VENDOR_DEFINED+0x17 (0x80000017)", nil, false, false},
		{0x777, "C_Sign", "C_Sign: CKR_0x777 (0x777)", nil, false, false},
	}
	for _, tc := range tests {
		t.Run(CodeName(tc.rv), func(t *testing.T) {
			// As the package gets it from miekg/pkcs11: a bare pkcs11.Error.
			err := wrap(tc.fn, pkcs11.Error(tc.rv))
			if err.Error() != tc.msg {
				t.Errorf("Error() = %q, want %q", err.Error(), tc.msg)
			}
			var e *Error
			if !errors.As(err, &e) || e.Code != tc.rv || e.Func != tc.fn {
				t.Errorf("errors.As: %#v", e)
			}
			if tc.sentinel != nil && !errors.Is(err, tc.sentinel) {
				t.Errorf("errors.Is(%v, %v) = false", err, tc.sentinel)
			}
			// Wrapped further by a caller, it still matches.
			outer := fmt.Errorf("token 7: %w", err)
			if tc.sentinel != nil && !errors.Is(outer, tc.sentinel) {
				t.Errorf("errors.Is through %%w = false")
			}
			// And it matches no other sentinel.
			for _, other := range []error{ErrTokenNotPresent, ErrPinIncorrect, ErrGeneralError, ErrNoEvent, ErrNoSuchSession} {
				if other != tc.sentinel && errors.Is(err, other) {
					t.Errorf("errors.Is(%v, %v) = true", err, other)
				}
			}
			if got := IsModuleFailure(outer); got != tc.failure {
				t.Errorf("IsModuleFailure = %v, want %v", got, tc.failure)
			}
			if got := IsTokenGone(outer); got != tc.tokenGone {
				t.Errorf("IsTokenGone = %v, want %v", got, tc.tokenGone)
			}
			// Our own cgo calls produce the same error.
			if err2 := rvError(tc.fn, tc.rv); err2.Error() != tc.msg {
				t.Errorf("rvError = %q", err2)
			}
		})
	}

	if wrap("C_Login", nil) != nil || rvError("C_Login", pkcs11.CKR_OK) != nil {
		t.Error("CKR_OK must map to nil")
	}
	// A function-specific target matches only that function.
	err := wrap("C_Login", pkcs11.Error(pkcs11.CKR_PIN_INCORRECT))
	if !errors.Is(err, &Error{Func: "C_Login", Code: pkcs11.CKR_PIN_INCORRECT}) ||
		errors.Is(err, &Error{Func: "C_InitToken", Code: pkcs11.CKR_PIN_INCORRECT}) {
		t.Error("Func-specific errors.Is")
	}
	// Our own errors are not PKCS#11 codes.
	own := fmt.Errorf("session 3: %w", ErrNoSuchSession)
	if IsModuleFailure(own) || IsTokenGone(own) || errors.Is(own, ErrSessionHandleInvalid) {
		t.Error("ErrNoSuchSession must not look like a PKCS#11 code")
	}
	// Sentinels print without a function.
	if ErrPinLocked.Error() != "CKR_PIN_LOCKED (0xa4)" {
		t.Errorf("sentinel Error() = %q", ErrPinLocked.Error())
	}
}

// Every CKR name in the table is the CKR_ constant it names: a sample that
// would catch an off-by-one line in the generated table.
func TestCodeNames(t *testing.T) {
	for rv, want := range map[uint]string{
		0:     "CKR_OK",
		0x1b:  "CKR_ACTION_PROHIBITED",
		0x140: "CKR_CURVE_NOT_SUPPORTED",
		0x191: "CKR_CRYPTOKI_ALREADY_INITIALIZED",
		0x1b8: "CKR_PIN_TOO_WEAK",
		0x200: "CKR_FUNCTION_REJECTED",
	} {
		if got := CodeName(rv); got != want {
			t.Errorf("CodeName(%#x) = %q, want %q", rv, got, want)
		}
	}
}
