package module

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/sha256"
	"encoding/asn1"
	"errors"
	"math/big"
	"testing"

	"github.com/miekg/pkcs11"
)

// CloseSession closes exactly the session it is given, in the module too
// (never with C_CloseAllSessions, which would log everybody out), and the
// other sessions on the token keep working.
func TestCloseSessionLeavesOthers(t *testing.T) {
	m := openSoftHSM(t, Options{})
	raw := rawCtx(t)
	slot := slotOf(t, m, alphaLabel)

	open := func(owner string, rw bool) *Session {
		t.Helper()
		s, err := m.OpenSession(owner, slot, 1, rw)
		if err != nil {
			t.Fatalf("OpenSession(%s): %v", owner, err)
		}
		return s
	}
	a1, a2 := open(":1.10", false), open(":1.10", true)
	b1, b2 := open(":1.11", false), open(":1.11", true)

	if got := m.SessionsOnSlot(slot); len(got) != 4 {
		t.Fatalf("SessionsOnSlot = %d records", len(got))
	}
	// B logs in; PKCS#11 login state is per application, so it shows in
	// every session of ours on the token.
	if err := m.Login(b2.ID, pkcs11.CKU_USER, []byte(alphaUserPIN)); err != nil {
		t.Fatalf("Login: %v", err)
	}

	for _, s := range []*Session{a1, a2} {
		if err := m.CloseSession(s.ID); err != nil {
			t.Fatalf("CloseSession(A's %d): %v", s.ID, err)
		}
	}

	// The registry forgot A's sessions...
	for _, s := range []*Session{a1, a2} {
		if _, ok := m.Session(s.ID); ok {
			t.Errorf("A's session %d still registered", s.ID)
		}
		if _, err := m.SessionState(s.ID); !errors.Is(err, ErrNoSuchSession) {
			t.Errorf("SessionState(A's %d) = %v, want ErrNoSuchSession", s.ID, err)
		}
		// ...and the module closed them.
		if _, err := raw.GetSessionInfo(s.Handle); err != pkcs11.Error(pkcs11.CKR_SESSION_HANDLE_INVALID) {
			t.Errorf("module still knows A's handle %d: %v", s.Handle, err)
		}
	}
	// B's sessions are untouched, in the module and in the registry, and
	// B is still logged in (C_CloseAllSessions would have logged B out).
	for _, s := range []*Session{b1, b2} {
		info, err := raw.GetSessionInfo(s.Handle)
		if err != nil {
			t.Errorf("module lost B's handle %d: %v", s.Handle, err)
		}
		want := uint(pkcs11.CKS_RO_USER_FUNCTIONS)
		if s.ReadWrite {
			want = pkcs11.CKS_RW_USER_FUNCTIONS
		}
		if st, err := m.SessionState(s.ID); err != nil || st != want || info.State != want {
			t.Errorf("B's session %d state = %s (module %s), %v; want %s", s.ID, StateName(st), StateName(info.State), err, StateName(want))
		}
		objs, err := m.FindObjects(s.ID, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY)}, 0)
		if err != nil {
			t.Errorf("FindObjects on B's session %d: %v", s.ID, err)
		}
		if keyGenErr == nil && len(objs) != 1 {
			t.Errorf("FindObjects on B's session %d: %d private keys, want 1", s.ID, len(objs))
		}
	}
	if got := m.Sessions(); len(got) != 2 || got[0].ID != b1.ID || got[1].ID != b2.ID || got[0].Owner != ":1.11" {
		t.Errorf("Sessions = %+v", got)
	}
	// Closing A's sessions again only says they are gone.
	if err := m.CloseSession(a1.ID); !errors.Is(err, ErrNoSuchSession) {
		t.Errorf("CloseSession(closed) = %v", err)
	}
	for _, s := range []*Session{b1, b2} {
		if err := m.CloseSession(s.ID); err != nil {
			t.Errorf("CloseSession(B's %d): %v", s.ID, err)
		}
	}
	for _, s := range []*Session{b1, b2} {
		if _, err := raw.GetSessionInfo(s.Handle); err != pkcs11.Error(pkcs11.CKR_SESSION_HANDLE_INVALID) {
			t.Errorf("module still knows B's handle %d: %v", s.Handle, err)
		}
	}
}

// ReclaimSlot forgets a dead generation's records and closes its sessions in
// the module with C_CloseAllSessions, never with one of their handles.
func TestReclaimSlot(t *testing.T) {
	log := newLogBuffer()
	m := openSoftHSM(t, Options{CallLog: log.logger})
	raw := rawCtx(t)
	slot := slotOf(t, m, alphaLabel)
	other := slotOf(t, m, initLabel)

	var dead []*Session
	for _, owner := range []string{"a", "b", "a"} {
		s, err := m.OpenSession(owner, slot, 5, false)
		if err != nil {
			t.Fatal(err)
		}
		dead = append(dead, s)
	}
	bystander, err := m.OpenSession("c", other, 9, false) // another slot: not touched
	if err != nil {
		t.Fatal(err)
	}

	log.reset()
	if n := m.ReclaimSlot(slot, 5); n != 3 {
		t.Fatalf("ReclaimSlot = %d, want 3", n)
	}
	// The only call ReclaimSlot made is C_CloseAllSessions on the slot.
	lines := log.lines()
	if len(lines) != 1 || !contains(lines[0], "msg=C_CloseAllSessions", "rv=CKR_OK") {
		t.Fatalf("calls made by ReclaimSlot:\n%s", log.String())
	}
	for _, s := range dead {
		if _, err := m.SessionState(s.ID); !errors.Is(err, ErrNoSuchSession) {
			t.Errorf("dead session %d: %v", s.ID, err)
		}
		if _, err := raw.GetSessionInfo(s.Handle); err != pkcs11.Error(pkcs11.CKR_SESSION_HANDLE_INVALID) {
			t.Errorf("module still has dead handle %d: %v", s.Handle, err)
		}
	}
	if _, err := m.SessionState(bystander.ID); err != nil {
		t.Errorf("session on another slot: %v", err)
	}

	// The retired generation cannot come back; the next one can open.
	if _, err := m.OpenSession("a", slot, 5, false); !errors.Is(err, ErrStaleGeneration) {
		t.Errorf("OpenSession(retired generation) = %v, want ErrStaleGeneration", err)
	}
	next, err := m.OpenSession("a", slot, 6, false)
	if err != nil {
		t.Fatal(err)
	}

	// A later generation's sessions on the slot block C_CloseAllSessions:
	// reclaiming generation 6 while 7 is open forgets 6 only, and 7 works.
	live, err := m.OpenSession("b", slot, 7, false)
	if err != nil {
		t.Fatal(err)
	}
	log.reset()
	if n := m.ReclaimSlot(slot, 6); n != 1 {
		t.Fatalf("ReclaimSlot(6) = %d, want 1", n)
	}
	if log.String() != "" {
		t.Errorf("ReclaimSlot with a live later generation called the module:\n%s", log.String())
	}
	if _, err := m.SessionState(next.ID); !errors.Is(err, ErrNoSuchSession) {
		t.Errorf("generation 6 session: %v", err)
	}
	if _, err := m.SessionState(live.ID); err != nil {
		t.Errorf("generation 7 session: %v", err)
	}
}

func TestSessionOperations(t *testing.T) {
	if keyGenErr != nil {
		t.Skipf("no key pair on the token: %v", keyGenErr)
	}
	m := openSoftHSM(t, Options{})
	slot := slotOf(t, m, alphaLabel)
	s, err := m.OpenSession("signer", slot, 1, false)
	if err != nil {
		t.Fatal(err)
	}
	id := []byte{keyID}
	privTemplate := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_ID, id),
	}
	// Private keys are invisible before login.
	if keys, err := m.FindObjects(s.ID, privTemplate, 0); err != nil || len(keys) != 0 {
		t.Fatalf("FindObjects before login = %v, %v", keys, err)
	}
	if err := m.Login(s.ID, pkcs11.CKU_USER, []byte("000000")); !errors.Is(err, ErrPinIncorrect) {
		t.Fatalf("Login(wrong) = %v, want ErrPinIncorrect", err)
	}
	if err := m.Login(s.ID, pkcs11.CKU_USER, []byte(alphaUserPIN)); err != nil {
		t.Fatal(err)
	}
	if err := m.Login(s.ID, pkcs11.CKU_USER, []byte(alphaUserPIN)); !errors.Is(err, ErrUserAlreadyLoggedIn) {
		t.Errorf("second Login = %v, want ErrUserAlreadyLoggedIn", err)
	}
	if st, err := m.SessionState(s.ID); err != nil || st != pkcs11.CKS_RO_USER_FUNCTIONS {
		t.Errorf("state after login = %s, %v", StateName(st), err)
	}
	keys, err := m.FindObjects(s.ID, privTemplate, 0)
	if err != nil || len(keys) != 1 {
		t.Fatalf("FindObjects(private key) = %v, %v", keys, err)
	}
	pubs, err := m.FindObjects(s.ID, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PUBLIC_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_ID, id),
	}, 1)
	if err != nil || len(pubs) != 1 {
		t.Fatalf("FindObjects(public key) = %v, %v", pubs, err)
	}
	attrs, err := m.GetAttributes(s.ID, pubs[0], []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, nil),
		pkcs11.NewAttribute(pkcs11.CKA_EC_POINT, nil),
	})
	if err != nil {
		t.Fatal(err)
	}
	if string(attrs[0].Value) != "signing key" {
		t.Errorf("CKA_LABEL = %q", attrs[0].Value)
	}
	var point []byte // CKA_EC_POINT is a DER OCTET STRING around the point
	if _, err := asn1.Unmarshal(attrs[1].Value, &point); err != nil {
		t.Fatal(err)
	}
	pub, err := ecdsa.ParseUncompressedPublicKey(elliptic.P256(), point)
	if err != nil {
		t.Fatal(err)
	}

	digest := sha256.Sum256([]byte("slotwatch"))
	sig, err := m.Sign(s.ID, pkcs11.NewMechanism(pkcs11.CKM_ECDSA, nil), keys[0], digest[:])
	if err != nil {
		t.Fatal(err)
	}
	if len(sig) != 64 {
		t.Fatalf("signature is %d bytes", len(sig))
	}
	r, ss := new(big.Int).SetBytes(sig[:32]), new(big.Int).SetBytes(sig[32:])
	if !ecdsa.Verify(pub, digest[:], r, ss) {
		t.Error("signature does not verify")
	}
	if _, err := m.Sign(s.ID, pkcs11.NewMechanism(0x7fff_fff0, nil), keys[0], digest[:]); !errors.Is(err, ErrMechanismInvalid) {
		t.Errorf("Sign(bad mechanism) = %v", err)
	}
	if _, err := m.Sign(s.ID, pkcs11.NewMechanism(pkcs11.CKM_ECDSA, nil), 0xdead, digest[:]); !errors.Is(err, ErrKeyHandleInvalid) && !errors.Is(err, ErrObjectHandleInvalid) {
		t.Errorf("Sign(bad key) = %v", err)
	}
	if _, err := m.GetAttributes(s.ID, 0xdead, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_LABEL, nil)}); !errors.Is(err, ErrObjectHandleInvalid) {
		t.Errorf("GetAttributes(bad object) = %v", err)
	}
	if err := m.Logout(s.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Sign(s.ID, pkcs11.NewMechanism(pkcs11.CKM_ECDSA, nil), keys[0], digest[:]); err == nil {
		t.Error("Sign after Logout worked")
	}
	if st, err := m.SessionState(s.ID); err != nil || st != pkcs11.CKS_RO_PUBLIC_SESSION {
		t.Errorf("state after logout = %s, %v", StateName(st), err)
	}
	if _, err := m.OpenSession("x", 12345, 1, false); !errors.Is(err, ErrSlotIDInvalid) {
		t.Errorf("OpenSession(bad slot) = %v", err)
	}
	if err := m.Login(999999, pkcs11.CKU_USER, nil); !errors.Is(err, ErrNoSuchSession) {
		t.Errorf("Login(unknown id) = %v", err)
	}
}

// RetireGeneration cuts a removed token's sessions off the module at once:
// no call, not even C_CloseSession, reaches it with their handles; the
// records stay listed until ReclaimSlot, which alone cleans up in the module.
func TestRetireGeneration(t *testing.T) {
	log := newLogBuffer()
	m := openSoftHSM(t, Options{CallLog: log.logger})
	raw := rawCtx(t)
	slot := slotOf(t, m, alphaLabel)
	a, err := m.OpenSession("a", slot, 5, false)
	if err != nil {
		t.Fatal(err)
	}
	b, err := m.OpenSession("b", slot, 5, false)
	if err != nil {
		t.Fatal(err)
	}

	log.reset()
	m.RetireGeneration(slot, 5)
	if _, err := m.SessionState(a.ID); !errors.Is(err, ErrStaleGeneration) {
		t.Errorf("SessionState(retired) = %v, want ErrStaleGeneration", err)
	}
	if err := m.Login(b.ID, pkcs11.CKU_USER, []byte(alphaUserPIN)); !errors.Is(err, ErrStaleGeneration) {
		t.Errorf("Login(retired) = %v, want ErrStaleGeneration", err)
	}
	if _, err := m.OpenSession("a", slot, 5, false); !errors.Is(err, ErrStaleGeneration) {
		t.Errorf("OpenSession(retired generation) = %v", err)
	}
	if err := m.CloseSession(a.ID); err != nil {
		t.Errorf("CloseSession(retired) = %v", err)
	}
	if got := m.SessionsOnSlot(slot); len(got) != 1 || got[0].ID != b.ID {
		t.Errorf("records after closing a: %+v", got)
	}
	if out := log.String(); out != "" {
		t.Errorf("calls made with a retired generation's sessions:\n%s", out)
	}
	// a's handle is still open in the module: nobody passed it there.
	if _, err := raw.GetSessionInfo(a.Handle); err != nil {
		t.Errorf("module lost a's handle before ReclaimSlot: %v", err)
	}

	if n := m.ReclaimSlot(slot, 5); n != 1 {
		t.Errorf("ReclaimSlot = %d, want 1 (b)", n)
	}
	for _, s := range []*Session{a, b} {
		if _, err := raw.GetSessionInfo(s.Handle); err != pkcs11.Error(pkcs11.CKR_SESSION_HANDLE_INVALID) {
			t.Errorf("handle %d after ReclaimSlot: %v", s.Handle, err)
		}
	}
	if _, err := m.OpenSession("a", slot, 6, false); err != nil {
		t.Errorf("OpenSession(next generation): %v", err)
	}
}
