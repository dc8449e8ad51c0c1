package dbusapi

import (
	"github.com/slotwatch/slotwatch/module"

	"encoding/xml"
	"reflect"
	"slices"
	"strings"
	"testing"

	godbus "github.com/godbus/dbus/v5"
	"github.com/godbus/dbus/v5/introspect"

	ifxml "github.com/slotwatch/slotwatch/xml"
)

// TestExportedMethodsMatchXML: the methods godbus exports for each
// interface (the exported Go methods of its handler, minus the injected
// Sender and Message arguments) are exactly the ones xml/ documents, with
// the same argument signatures.
func TestExportedMethodsMatchXML(t *testing.T) {
	for _, tc := range []struct {
		iface    string
		handlers []any // the live object's handler and the dispatcher godbus calls
	}{
		{ManagerInterface, []any{&manager{}, managerDispatch{}}},
		{TokenInterface, []any{&tokenObject{}, tokenDispatch{}}},
		{SessionInterface, []any{&sessionObject{}, sessionDispatch{}}},
		{ModuleInterface, []any{noMethods{}}},
		{ReaderInterface, []any{noMethods{}}},
		{SlotInterface, []any{noMethods{}}},
	} {
		t.Run(tc.iface, func(t *testing.T) {
			x, ok := ifxml.Interface(tc.iface)
			if !ok {
				t.Fatalf("xml/ has no %s", tc.iface)
			}
			var in introspect.Interface
			if err := xml.Unmarshal([]byte(x), &in); err != nil {
				t.Fatal(err)
			}
			want := map[string]string{}
			for _, m := range in.Methods {
				want[m.Name] = signature(m.Args)
			}
			for _, h := range tc.handlers {
				got := exportedMethods(h)
				if !reflect.DeepEqual(got, want) {
					t.Errorf("%T exports %v, xml/ documents %v", h, got, want)
				}
			}
		})
	}
}

func signature(args []introspect.Arg) string {
	var in, out []string
	for _, a := range args {
		if a.Direction == "out" {
			out = append(out, a.Type)
		} else {
			in = append(in, a.Type)
		}
	}
	return strings.Join(in, "") + "->" + strings.Join(out, "")
}

var (
	senderType  = reflect.TypeOf(godbus.Sender(""))
	messageType = reflect.TypeOf(godbus.Message{})
	errorType   = reflect.TypeOf(&godbus.Error{})
)

// exportedMethods lists what godbus would export of v: methods whose last
// result is *dbus.Error, with their D-Bus signatures.
func exportedMethods(v any) map[string]string {
	out := map[string]string{}
	typ := reflect.TypeOf(v)
	for i := range typ.NumMethod() {
		m := typ.Method(i)
		ft := m.Type
		if ft.NumOut() == 0 || ft.Out(ft.NumOut()-1) != errorType {
			continue
		}
		var in, res []string
		for j := 1; j < ft.NumIn(); j++ { // 0 is the receiver
			if p := ft.In(j); p != senderType && p != messageType {
				in = append(in, godbus.SignatureOfType(p).String())
			}
		}
		for j := 0; j < ft.NumOut()-1; j++ {
			res = append(res, godbus.SignatureOfType(ft.Out(j)).String())
		}
		out[m.Name] = strings.Join(in, "") + "->" + strings.Join(res, "")
	}
	return out
}

// TestErrorNames: every error name the service can answer is in the
// contract's list (xml/ documents each), and the table maps each internal
// error once.
func TestErrorNames(t *testing.T) {
	contract := []string{ErrTokenRemoved, ErrSessionsExist, ErrPinIncorrect, ErrPinLocked, ErrPinInvalid,
		ErrNotLoggedIn, ErrAlreadyLoggedIn, ErrNotSupported, ErrModuleFailure, ErrBusy, ErrCancelled,
		ErrInvalidConfig, ErrInvalidArgs, ErrAccessDenied, ErrUnknownObject}
	seen := map[error]bool{}
	for _, e := range errorMap {
		if !slices.Contains(contract, e.name) {
			t.Errorf("%v maps to %s, which is not in the contract", e.err, e.name)
		}
		if seen[e.err] {
			t.Errorf("%v is mapped twice", e.err)
		}
		seen[e.err] = true
	}
	for ckr, name := range ckrMap {
		if !slices.Contains(contract, name) {
			t.Errorf("%s maps to %s, which is not in the contract", ckr, name)
		}
	}
}

// TestEveryCKRHasOneName: every CK_RV of PKCS#11 v2.40 maps to a named
// error without the "unmapped" fallback, and the table names no code that
// does not exist.
func TestEveryCKRHasOneName(t *testing.T) {
	known := map[string]bool{}
	for _, code := range module.Codes() {
		name := module.CodeName(code)
		known[name] = true
		if _, mapped := errorName(&module.Error{Func: "C_Test", Code: code}); !mapped {
			t.Errorf("%s (%#x) has no D-Bus error name", name, code)
		}
	}
	for ckr := range ckrMap {
		if !known[ckr] {
			t.Errorf("ckrMap names %s, which PKCS#11 does not have", ckr)
		}
	}
	// The codes the adversarial review found answered as a loud
	// ModuleFailure.
	for code, want := range map[uint]string{
		0x50:  ErrCancelled,       // CKR_FUNCTION_CANCELED (PIN pad cancelled)
		0xb8:  ErrSessionsExist,   // CKR_SESSION_READ_WRITE_SO_EXISTS
		0x104: ErrAlreadyLoggedIn, // CKR_USER_TOO_MANY_TYPES
		0x90:  ErrBusy,            // CKR_OPERATION_ACTIVE
		0x82:  ErrBusy,            // CKR_OBJECT_HANDLE_INVALID
	} {
		if got, _ := errorName(&module.Error{Code: code}); got != want {
			t.Errorf("%s answers %s, want %s", module.CodeName(code), got, want)
		}
	}
}
