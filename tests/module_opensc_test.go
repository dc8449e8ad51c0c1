package tests

import (
	"errors"
	"testing"
	"time"

	"github.com/miekg/pkcs11"

	"github.com/slotwatch/slotwatch/module"
	"github.com/slotwatch/slotwatch/tests/stack"
	"github.com/slotwatch/slotwatch/tests/vcard"
)

// TestOpenSCSessionsPerOwner runs module/'s session registry against OpenSC
// and a virtual card: two callers hold sessions on the same token; one
// closes its own one by one (as the broker does); the other's sessions
// still work on the card.
func TestOpenSCSessionsPerOwner(t *testing.T) {
	pcscd := stack.StartPCSCDForTest(t, stack.PCSCDConfig{Socket: pcscSocket, Dir: t.TempDir()})
	card := vcard.New(pcscd.Addr(0), vcard.Profile{Label: "Shared Card", Serial: "5ead0001"})
	t.Cleanup(func() { card.Close() })
	if err := card.Insert(); err != nil {
		t.Fatal(err)
	}

	mod := module.Open(stack.OpenSCModule, module.Options{Name: "opensc"})
	if err := mod.Initialize(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { mod.Finalize() })
	slot := findTokenSlot(t, mod, "Shared Card")

	const gen = 1 // what the monitor would have assigned; the registry only records it
	var alice, bob []*module.Session
	for range 2 {
		a, err := mod.OpenSession(":1.alice", slot, gen, false)
		if err != nil {
			t.Fatal(err)
		}
		b, err := mod.OpenSession(":1.bob", slot, gen, false)
		if err != nil {
			t.Fatal(err)
		}
		alice, bob = append(alice, a), append(bob, b)
	}
	for _, a := range alice {
		if err := mod.CloseSession(a.ID); err != nil {
			t.Fatalf("CloseSession(alice's %d): %v", a.ID, err)
		}
	}
	for _, a := range alice {
		if _, err := mod.SessionInfo(a.ID); !errors.Is(err, module.ErrNoSuchSession) {
			t.Fatalf("alice's closed session answers %v, want ErrNoSuchSession", err)
		}
	}
	for _, b := range bob {
		if _, err := mod.SessionInfo(b.ID); err != nil {
			t.Fatalf("bob's session after alice closed all: %v", err)
		}
		certs, err := mod.FindObjects(b.ID, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_CERTIFICATE)}, 0)
		if err != nil || len(certs) != 1 {
			t.Fatalf("bob's FindObjects(certificates) = %d objects, %v; want the card's 1", len(certs), err)
		}
	}
	if n := len(mod.SessionsOnSlot(slot)); n != 2 {
		t.Fatalf("%d sessions left on the slot, want bob's 2", n)
	}
}

func findTokenSlot(t *testing.T, mod *module.Module, label string) uint {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		slots, err := mod.SlotList(true)
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range slots {
			if ti, err := mod.TokenInfo(s); err == nil && ti.Label == label {
				return s
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("OpenSC shows no token %q", label)
	return 0
}
