package broker

import (
	"errors"
	"testing"

	"github.com/miekg/pkcs11"

	"github.com/slotwatch/slotwatch/module"
	"github.com/slotwatch/slotwatch/tests/stack"
)

// TestPassThroughNamesOnlyGivenObjects: through the PKCS#11 face's
// pass-through calls, a caller can name only objects it was given on the
// token; another caller's login neither shows nor lends its private
// objects, and nothing can be made under it.
func TestPassThroughNamesOnlyGivenObjects(t *testing.T) {
	if hsmErr != nil {
		t.Fatalf("no SoftHSM2 store: %v", hsmErr)
	}
	r := newRigWith(t, Limits{}, []*module.Module{module.Open(stack.SoftHSMModule, module.Options{Name: "softhsm2"})})
	gen := r.genOf(hsmLabel)
	alice, bob := r.caller("alice"), r.caller("bob")
	a := r.open(alice, gen, true)
	b := r.open(bob, gen, true)
	if err := r.b.Login(alice, a.ID, pkcs11.CKU_USER, []byte(hsmPIN)); err != nil {
		t.Fatal(err)
	}
	keyTemplate := []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY)}
	keys, err := r.b.FindObjectHandles(alice, a.ID, keyTemplate)
	if err != nil || len(keys) != 1 {
		t.Fatalf("alice's search for private keys: %v, %v; want one", keys, err)
	}
	sign := func(c Caller, id uint64, key pkcs11.ObjectHandle) ([]byte, error) {
		var sig []byte
		err := r.b.SessionCall(c, id, "C_SignInit+C_Sign", UsesObjects, []pkcs11.ObjectHandle{key},
			func(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle) ([]pkcs11.ObjectHandle, error) {
				if err := ctx.SignInit(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_ECDSA, nil)}, key); err != nil {
					return nil, err
				}
				var err error
				sig, err = ctx.Sign(sh, digest)
				return nil, err
			})
		return sig, err
	}
	if sig, err := sign(alice, a.ID, keys[0]); err != nil || len(sig) != 64 {
		t.Fatalf("alice signs with her key: %d bytes, %v", len(sig), err)
	}

	// Bob guesses alice's key handle: not his to name.
	if sig, err := sign(bob, b.ID, keys[0]); !errors.Is(err, ErrNoSuchObject) || sig != nil {
		t.Fatalf("bob names alice's key handle: %x, %v; want ErrNoSuchObject", sig, err)
	}
	// His own search does not show it while alice is logged in.
	if got, err := r.b.FindObjectHandles(bob, b.ID, keyTemplate); err != nil || len(got) != 0 {
		t.Fatalf("bob's search under alice's login: %v, %v; want none", got, err)
	}
	// Nothing is made under alice's login.
	made := false
	err = r.b.SessionCall(bob, b.ID, "C_CreateObject", MakesObjects, nil,
		func(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle) ([]pkcs11.ObjectHandle, error) {
			made = true
			return nil, nil
		})
	if !errors.Is(err, ErrNotLoggedIn) || made {
		t.Fatalf("bob makes an object under alice's login: made %v, %v; want ErrNotLoggedIn before any call", made, err)
	}

	// A public object bob found himself is his to use, also now.
	pubs, err := r.b.FindObjectHandles(bob, b.ID, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PUBLIC_KEY)})
	if err != nil || len(pubs) != 1 {
		t.Fatalf("bob's search for public keys: %v, %v", pubs, err)
	}
	var label []*pkcs11.Attribute
	err = r.b.SessionCall(bob, b.ID, "C_GetAttributeValue", UsesObjects, pubs,
		func(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle) ([]pkcs11.ObjectHandle, error) {
			var err error
			label, err = ctx.GetAttributeValue(sh, pubs[0], []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_LABEL, nil)})
			return nil, err
		})
	if err != nil || len(label) != 1 {
		t.Fatalf("bob reads his public key's label: %v, %v", label, err)
	}

	// Once alice logged out, a key bob finds himself is still useless to
	// him without his own login.
	if err := r.b.Logout(alice, a.ID); err != nil {
		t.Fatal(err)
	}
	if got, err := r.b.FindObjectHandles(bob, b.ID, keyTemplate); err != nil || len(got) != 0 {
		t.Fatalf("bob's search for private keys, nobody logged in: %v, %v; want none", got, err)
	}
	// Leaving forgets what a caller was given.
	r.b.Leave(alice.ID)
	r.b.Join(alice)
	a2 := r.open(alice, gen, false)
	if _, err := sign(alice, a2.ID, keys[0]); !errors.Is(err, ErrNoSuchObject) {
		t.Fatalf("alice, back, names the key she found before leaving: %v, want ErrNoSuchObject", err)
	}
}
