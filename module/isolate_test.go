package module

import (
	"errors"
	"testing"
	"unsafe"

	"github.com/miekg/pkcs11"

	"github.com/slotwatch/slotwatch/tests/stack"
)

// TestFunctionListOfCtx: the function list read out of miekg's context is
// the module's own (the layout ctxFunctionList relies on).
func TestFunctionListOfCtx(t *testing.T) {
	ctx := pkcs11.New(stack.SoftHSMModule)
	if ctx == nil {
		t.Fatal("cannot load SoftHSM")
	}
	defer ctx.Destroy()
	lib, ok := refLoaded(stack.SoftHSMModule)
	if !ok {
		t.Fatal("no reference")
	}
	defer lib.release()
	if got := ctxFunctionList(ctx); got != unsafe.Pointer(lib.fl) {
		t.Fatalf("function list from miekg's context %p, the library's %p", got, lib.fl)
	}
}

// TestIsolatedSoftHSM: SoftHSM2 behind p11-kit remote works like in
// process — slots, tokens, a session, a login with our own C_Login — and
// its wait answers "not supported" (the monitor polls it).
func TestIsolatedSoftHSM(t *testing.T) {
	if hsmErr != nil {
		t.Fatal(hsmErr)
	}
	m := Open(stack.SoftHSMModule, Options{Name: "softhsm-isolated", Isolate: true})
	if err := m.Initialize(); err != nil {
		t.Fatal(err)
	}
	defer m.Finalize()
	info, err := m.Info()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("isolated module: %q", info.Description)
	slots, err := m.SlotList(true)
	if err != nil || len(slots) == 0 {
		t.Fatalf("SlotList: %v %v", slots, err)
	}
	var slot uint
	found := false
	for _, s := range slots {
		if ti, err := m.TokenInfo(s); err == nil && ti.Label == alphaLabel {
			slot, found = s, true
		}
	}
	if !found {
		t.Fatalf("no token %q behind p11-kit remote", alphaLabel)
	}
	s, err := m.OpenSession("owner", slot, 1, false)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Login(s.ID, pkcs11.CKU_USER, []byte(alphaUserPIN)); err != nil {
		t.Fatalf("Login through the isolated instance: %v", err)
	}
	if _, err := m.WaitForSlotEvent(false); !errors.Is(err, ErrFunctionNotSupported) {
		t.Fatalf("WaitForSlotEvent of an isolated module: %v, want ErrFunctionNotSupported", err)
	}
}
