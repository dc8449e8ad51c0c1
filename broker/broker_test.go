package broker

import (
	"crypto/sha256"
	"errors"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/miekg/pkcs11"

	"github.com/slotwatch/slotwatch/module"
	"github.com/slotwatch/slotwatch/tests/stack"
)

var (
	privateKeys = Template{Class: ptr(uint(pkcs11.CKO_PRIVATE_KEY))}
	digest      = func() []byte { d := sha256.Sum256([]byte("slotwatch")); return d[:] }()
)

func ptr[T any](v T) *T { return &v }

// TestSessionsBelongToTheirOwner: another caller's session answers
// ErrAccessDenied to every call, and CloseAllSessions closes only the
// caller's own.
func TestSessionsBelongToTheirOwner(t *testing.T) {
	r := newRig(t, Limits{}, 0)
	gen := r.gen(0)
	alice, bob := r.caller("alice"), r.caller("bob")
	a := r.open(alice, gen, false)
	b1 := r.open(bob, gen, false)
	for name, call := range map[string]func() error{
		"Login":        func() error { return r.b.Login(bob, a.ID, pkcs11.CKU_USER, []byte(fmPIN)) },
		"Logout":       func() error { return r.b.Logout(bob, a.ID) },
		"FindObjects":  func() error { _, err := r.b.FindObjects(bob, a.ID, Template{}); return err },
		"Sign":         func() error { _, err := r.b.Sign(bob, a.ID, []byte{1}, pkcs11.CKM_ECDSA, digest); return err },
		"CloseSession": func() error { return r.b.CloseSession(bob, a.ID) },
	} {
		if err := call(); !errors.Is(err, ErrAccessDenied) {
			t.Errorf("bob's %s on alice's session: %v, want ErrAccessDenied", name, err)
		}
	}
	if err := r.b.CloseAllSessions(bob, gen); err != nil {
		t.Fatal(err)
	}
	ss := r.b.Sessions()
	if len(ss) != 1 || ss[0].ID != a.ID {
		t.Fatalf("after bob's CloseAllSessions: %v, want only alice's session %d (bob's was %d)", ss, a.ID, b1.ID)
	}
}

// TestOperationNeverRunsUnderAnotherCallersLogin (adversarial case 2): a
// Sign and a FindObjects that passed the "is another caller logged in?"
// check and sit in a slow module call never run under a login another
// caller makes meanwhile: the Login waits for them.
func TestOperationNeverRunsUnderAnotherCallersLogin(t *testing.T) {
	r := newRig(t, Limits{}, 1)
	gen := r.gen(1)
	alice, bob := r.caller("alice"), r.caller("bob")
	a := r.open(alice, gen, false)
	b := r.open(bob, gen, false)
	if err := r.ctl.Sleep("C_FindObjectsInit", 300*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	for _, op := range []string{"Sign", "FindObjects"} {
		t.Run(op, func(t *testing.T) {
			type result struct {
				sig  []byte
				objs []Object
				err  error
			}
			done := make(chan result, 1)
			go func() {
				var res result
				if op == "Sign" {
					res.sig, res.err = r.b.Sign(bob, b.ID, []byte{1}, pkcs11.CKM_ECDSA, digest)
				} else {
					res.objs, res.err = r.b.FindObjects(bob, b.ID, privateKeys)
				}
				done <- res
			}()
			r.waitFor("bob's call to hold the token", func() bool { n, _, _ := r.lockState(gen); return n == 1 })
			if err := r.b.Login(alice, a.ID, pkcs11.CKU_USER, []byte(fmPIN)); err != nil {
				t.Fatalf("alice's Login: %v", err)
			}
			res := <-done
			if res.sig != nil || len(res.objs) != 0 {
				t.Fatalf("bob's %s used alice's login: signature %x, objects %v", op, res.sig, res.objs)
			}
			// Without a login of its own, no private key is visible to
			// bob on a token that needs one: that is "not logged in".
			if op == "Sign" && !errors.Is(res.err, ErrNotLoggedIn) {
				t.Fatalf("bob's Sign without a login: %v, want ErrNotLoggedIn (no key visible)", res.err)
			}
			// And after alice's login, bob still cannot use it.
			if _, err := r.b.Sign(bob, b.ID, []byte{1}, pkcs11.CKM_ECDSA, digest); !errors.Is(err, ErrNotLoggedIn) {
				t.Fatalf("bob's Sign under alice's login: %v, want ErrNotLoggedIn", err)
			}
			if objs, err := r.b.FindObjects(bob, b.ID, privateKeys); err != nil || len(objs) != 0 {
				t.Fatalf("bob's FindObjects(private keys) under alice's login: %v, %v; want none", objs, err)
			}
			if err := r.b.Logout(alice, a.ID); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestLoginEndsWithItsOwnersLastSession (case 3): when the login's owner
// closes its last session, the token is logged out explicitly, even while
// slotwatch's own ListCertificates session or another caller's session
// being opened would keep "the last session" from closing.
func TestLoginEndsWithItsOwnersLastSession(t *testing.T) {
	r := newRig(t, Limits{}, 2)
	gen := r.gen(2)
	alice, carol := r.caller("alice"), r.caller("carol")
	a := r.open(alice, gen, false)
	if err := r.b.Login(alice, a.ID, pkcs11.CKU_USER, []byte(fmPIN)); err != nil {
		t.Fatal(err)
	}
	if err := r.ctl.Sleep("C_FindObjectsInit", 300*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	listed := make(chan error, 1)
	go func() { _, err := r.b.ListCertificates(carol, gen); listed <- err }()
	r.waitFor("carol's ListCertificates to hold the token", func() bool { n, _, _ := r.lockState(gen); return n == 1 })
	if err := r.b.CloseSession(alice, a.ID); err != nil {
		t.Fatalf("alice's Close: %v", err)
	}
	if err := <-listed; err != nil {
		t.Fatalf("carol's ListCertificates: %v", err)
	}
	r.ctl.Reset()
	if n := len(r.calls("C_Logout")); n != 1 {
		t.Fatalf("%d C_Logout calls, want 1 (explicit, before alice's session closed)", n)
	}
	c := r.open(carol, gen, false)
	if c.State != pkcs11.CKS_RO_PUBLIC_SESSION {
		t.Fatalf("carol's new session has state %d, want public", c.State)
	}
	if objs, err := r.b.FindObjects(carol, c.ID, privateKeys); err != nil || len(objs) != 0 {
		t.Fatalf("carol's FindObjects(private keys) after alice left: %v, %v; want none", objs, err)
	}
	// And carol can log in now: nobody owns the token's login.
	if err := r.b.Login(carol, c.ID, pkcs11.CKU_USER, []byte(fmPIN)); err != nil {
		t.Fatalf("carol's Login after alice's login ended: %v", err)
	}
}

// TestSlowLoginHoldsUpOnlyItsToken (case 4): a 3 s login (a PIN pad) on
// one token leaves another token's callers served at once, and a call on
// the same token answers ErrBusy after the bounded wait.
func TestSlowLoginHoldsUpOnlyItsToken(t *testing.T) {
	r := newRig(t, Limits{TokenWait: 300 * time.Millisecond}, 3, 4)
	g3, g4 := r.gen(3), r.gen(4)
	alice, bob, carol := r.caller("alice"), r.caller("bob"), r.caller("carol")
	a := r.open(alice, g3, false)
	c := r.open(carol, g3, false)
	if err := r.ctl.Sleep("C_Login", 3*time.Second); err != nil {
		t.Fatal(err)
	}
	loggedIn := make(chan error, 1)
	go func() { loggedIn <- r.b.Login(alice, a.ID, pkcs11.CKU_USER, []byte(fmPIN)) }()
	r.waitFor("alice's Login to hold its token", func() bool { _, w, _ := r.lockState(g3); return w })

	start := time.Now()
	b := r.open(bob, g4, false)
	if _, err := r.b.FindObjects(bob, b.ID, Template{}); err != nil {
		t.Fatal(err)
	}
	if err := r.b.CloseSession(bob, b.ID); err != nil {
		t.Fatal(err)
	}
	other := time.Since(start)
	t.Logf("OpenSession+FindObjects+Close on another token while a 3 s Login runs: %v", other)
	if other > time.Second {
		t.Errorf("a call on another token took %v behind a slow login elsewhere", other)
	}

	start = time.Now()
	_, err := r.b.FindObjects(carol, c.ID, Template{})
	same := time.Since(start)
	if !errors.Is(err, ErrBusy) {
		t.Errorf("FindObjects on the token whose login runs: %v, want ErrBusy", err)
	}
	if same > 2*time.Second {
		t.Errorf("ErrBusy came after %v, want about the 300 ms token wait", same)
	}
	if err := <-loggedIn; err != nil {
		t.Fatalf("alice's slow Login: %v", err)
	}
}

// TestInitTokenWithWrongSOPINClosesNobody (case 5): with force and a wrong
// SO PIN, no holder's session is closed: the PIN is checked first.
func TestInitTokenWithWrongSOPINClosesNobody(t *testing.T) {
	r := newRig(t, Limits{}, 5)
	gen := r.gen(5)
	mallory, bob := r.caller("mallory"), r.caller("bob")
	b := r.open(bob, gen, true)
	err := r.b.InitToken(mallory, gen, []byte("0000"), "wiped", true)
	if !errors.Is(err, module.ErrPinIncorrect) {
		t.Fatalf("InitToken with a wrong SO PIN: %v, want the module's CKR_PIN_INCORRECT", err)
	}
	if ss := r.b.Sessions(); len(ss) != 1 || ss[0].ID != b.ID {
		t.Fatalf("sessions after a refused InitToken: %v, want bob's %d still open", ss, b.ID)
	}
	if _, err := r.b.FindObjects(bob, b.ID, Template{}); err != nil {
		t.Fatalf("bob's session after a refused InitToken: %v", err)
	}
	if n := len(r.calls("C_InitToken")); n != 0 {
		t.Fatalf("%d C_InitToken calls, want none", n)
	}
	// Without force it names the holder.
	err = r.b.InitToken(mallory, gen, []byte(fmPIN), "wiped", false)
	var se *SessionsExistError
	if !errors.As(err, &se) || len(se.Holders) != 1 || se.Holders[0].ID != bob.ID {
		t.Fatalf("InitToken without force: %v, want SessionsExist naming bob", err)
	}
	// With the right SO PIN and force, bob's session goes and the token
	// is initialized.
	if err := r.b.InitToken(mallory, gen, []byte(fmPIN), "wiped", true); err != nil {
		t.Fatalf("InitToken with force: %v", err)
	}
	if ss := r.b.Sessions(); len(ss) != 0 {
		t.Fatalf("sessions after InitToken with force: %v", ss)
	}
	if ev := r.obs.of(b.ID); !slices.Equal(ev, []string{"opened 1 state 2", "closed 1 (InitToken with force)"}) && len(ev) != 2 {
		t.Fatalf("bob's session events: %v", ev)
	}
}

// TestInitTokenRunsOnceAtATime (case 5): a second InitToken on the same
// token while one runs answers ErrBusy and never re-initializes.
func TestInitTokenRunsOnceAtATime(t *testing.T) {
	r := newRig(t, Limits{}, 6)
	gen := r.gen(6)
	alice, bob := r.caller("alice"), r.caller("bob")
	if err := r.ctl.Sleep("C_InitToken", 400*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	first := make(chan error, 1)
	go func() { first <- r.b.InitToken(alice, gen, []byte(fmPIN), "first", false) }()
	r.waitFor("alice's InitToken to hold the token", func() bool { _, w, _ := r.lockState(gen); return w })
	if err := r.b.InitToken(bob, gen, []byte(fmPIN), "second", false); !errors.Is(err, ErrBusy) {
		t.Fatalf("a second InitToken while one runs: %v, want ErrBusy", err)
	}
	if err := <-first; err != nil {
		t.Fatalf("the first InitToken: %v", err)
	}
	r.ctl.Reset()
	if n := len(r.calls("C_InitToken")); n != 1 {
		t.Fatalf("%d C_InitToken calls, want 1", n)
	}
}

// TestLimits (case 7): past max-sessions-per-token and
// max-concurrent-calls a caller gets ErrBusy, and others stay served.
func TestLimits(t *testing.T) {
	r := newRig(t, Limits{SessionsPerToken: 2, ConcurrentCalls: 1}, 7)
	gen := r.gen(7)
	greedy, other := r.caller("greedy"), r.caller("other")
	r.open(greedy, gen, false)
	s := r.open(greedy, gen, false)
	if _, err := r.b.OpenSession(greedy, gen, false); !errors.Is(err, ErrBusy) {
		t.Fatalf("a third session: %v, want ErrBusy", err)
	}
	r.open(other, gen, false)

	if err := r.ctl.Sleep("C_FindObjectsInit", 300*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	slow := make(chan error, 1)
	go func() { _, err := r.b.FindObjects(greedy, s.ID, Template{}); slow <- err }()
	r.waitFor("greedy's first call to run", func() bool { n, _, _ := r.lockState(gen); return n == 1 })
	if _, err := r.b.FindObjects(greedy, s.ID, Template{}); !errors.Is(err, ErrBusy) {
		t.Fatalf("a second concurrent call: %v, want ErrBusy", err)
	}
	if err := <-slow; err != nil {
		t.Fatal(err)
	}
}

// TestCallerLeavingDuringOpenSessionLeaksNothing (case 8): a caller that
// leaves while its OpenSession runs gets ErrCallerGone, and the session is
// closed, not left listed as a holder.
func TestCallerLeavingDuringOpenSessionLeaksNothing(t *testing.T) {
	r := newRig(t, Limits{}, 0)
	gen := r.gen(0)
	ghost := r.caller("ghost")
	if err := r.ctl.Sleep("C_OpenSession", 300*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	opened := make(chan error, 1)
	go func() { _, err := r.b.OpenSession(ghost, gen, false); opened <- err }()
	r.waitFor("ghost's OpenSession to hold the token", func() bool { n, _, _ := r.lockState(gen); return n == 1 })
	r.b.Leave(ghost.ID)
	if err := <-opened; !errors.Is(err, ErrCallerGone) {
		t.Fatalf("OpenSession of a caller that left meanwhile: %v, want ErrCallerGone", err)
	}
	if ss := r.b.Sessions(); len(ss) != 0 {
		t.Fatalf("sessions left behind: %v", ss)
	}
	r.ctl.Reset()
	if opens, closes := len(r.calls("C_OpenSession")), len(r.calls("C_CloseSession")); opens != closes {
		t.Fatalf("%d C_OpenSession, %d C_CloseSession: a module session leaked", opens, closes)
	}
}

// TestStatesFollowTheLogin (case 8): a non-owner's session is public while
// another caller is logged in; the owner's sessions show the login; the
// observer hears every change in order.
func TestStatesFollowTheLogin(t *testing.T) {
	r := newRig(t, Limits{}, 1)
	gen := r.gen(1)
	alice, bob := r.caller("alice"), r.caller("bob")
	a := r.open(alice, gen, false)
	if err := r.b.Login(alice, a.ID, pkcs11.CKU_USER, []byte(fmPIN)); err != nil {
		t.Fatal(err)
	}
	b := r.open(bob, gen, false)
	if b.State != pkcs11.CKS_RO_PUBLIC_SESSION {
		t.Errorf("bob's new session while alice is logged in: state %d, want public (%d)", b.State, pkcs11.CKS_RO_PUBLIC_SESSION)
	}
	a2 := r.open(alice, gen, false)
	if a2.State != pkcs11.CKS_RO_USER_FUNCTIONS {
		t.Errorf("alice's second session: state %d, want user functions (%d)", a2.State, pkcs11.CKS_RO_USER_FUNCTIONS)
	}
	r.b.Leave(alice.ID)
	want := []string{
		"opened 1 state 0",
		"changed 1 state 1",
		"closed 1 (owner left)",
	}
	if got := r.obs.of(a.ID); !slices.Equal(got, want) {
		t.Errorf("alice's first session events %v, want %v", got, want)
	}
}

// TestSOLoginNamesTheHolders (case 8): an SO login refused because of
// read-only sessions names who holds them.
func TestSOLoginNamesTheHolders(t *testing.T) {
	r := newRig(t, Limits{}, 2)
	gen := r.gen(2)
	alice, bob := r.caller("alice"), r.caller("bob")
	r.open(bob, gen, false)
	a := r.open(alice, gen, true)
	err := r.b.Login(alice, a.ID, pkcs11.CKU_SO, []byte(fmPIN))
	var se *SessionsExistError
	if !errors.As(err, &se) || !errors.Is(err, ErrSessionsExist) {
		t.Fatalf("SO login with bob's read-only session open: %v, want SessionsExist", err)
	}
	if !slices.ContainsFunc(se.Holders, func(c Caller) bool { return c.ID == bob.ID }) {
		t.Fatalf("SessionsExist names %v, want bob among them", se.Holders)
	}
}

// TestRemovedTokensSessionsGoWithoutModuleCalls: a removal drops the
// generation's sessions and login at once; calls on them answer
// ErrNoSuchSession, and no handle of theirs reaches the module.
func TestRemovedTokensSessionsGoWithoutModuleCalls(t *testing.T) {
	r := newRig(t, Limits{}, 3)
	gen := r.gen(3)
	alice := r.caller("alice")
	a := r.open(alice, gen, false)
	if err := r.ctl.Remove(3); err != nil {
		t.Fatal(err)
	}
	r.waitFor("the session to go", func() bool { return len(r.b.Sessions()) == 0 })
	if _, err := r.b.FindObjects(alice, a.ID, Template{}); !errors.Is(err, ErrNoSuchSession) {
		t.Fatalf("FindObjects on a removed token's session: %v, want ErrNoSuchSession", err)
	}
	if g, known, _ := r.b.SessionGeneration(a.ID); !known || g != gen {
		t.Fatalf("SessionGeneration(%d) = %d, %v; want %d", a.ID, g, known, gen)
	}
	if _, err := r.b.OpenSession(alice, gen, false); !errors.Is(err, ErrTokenRemoved) {
		t.Fatalf("OpenSession on a removed generation: %v, want ErrTokenRemoved", err)
	}
	r.ctl.Insert(3, "t3", "t3") // for the cleanup's symmetry
}

// TestConcurrentCallersKeepTheirInvariants runs many callers' opens,
// logins, signs and closes at once on one token (with -race): nobody ever
// signs without its own login, and at the end nothing is left.
func TestConcurrentCallersKeepTheirInvariants(t *testing.T) {
	r := newRig(t, Limits{TokenWait: 10 * time.Second}, 4)
	gen := r.gen(4)
	var wg sync.WaitGroup
	errs := make(chan error, 100)
	for i := range 6 {
		c := r.caller(string(rune('a' + i)))
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 10 {
				s, err := r.b.OpenSession(c, gen, false)
				if err != nil {
					errs <- err
					return
				}
				loginErr := r.b.Login(c, s.ID, pkcs11.CKU_USER, []byte(fmPIN))
				sig, signErr := r.b.Sign(c, s.ID, []byte{1}, pkcs11.CKM_ECDSA, digest)
				if loginErr != nil && sig != nil {
					errs <- errors.New(c.ID + " signed without its own login")
				}
				if loginErr == nil && signErr != nil {
					errs <- errors.New(c.ID + " could not sign with its own login: " + signErr.Error())
				}
				if err := r.b.CloseSession(c, s.ID); err != nil {
					errs <- err
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if ss := r.b.Sessions(); len(ss) != 0 {
		t.Fatalf("sessions left: %v", ss)
	}
}

// TestSoftHSM2 runs the broker over a real software token in process:
// login, sign and logout are the owner's; another caller sees no private
// key and cannot sign; an SO login refused because of a read-only session
// names its holder; and InitToken with force and a wrong SO PIN closes
// nobody's read-write session.
func TestSoftHSM2(t *testing.T) {
	if hsmErr != nil {
		t.Fatalf("no SoftHSM2 store: %v", hsmErr)
	}
	r := newRigWith(t, Limits{}, []*module.Module{module.Open(stack.SoftHSMModule, module.Options{Name: "softhsm2"})})
	gen := r.genOf(hsmLabel)
	alice, bob := r.caller("alice"), r.caller("bob")
	a := r.open(alice, gen, false)
	b := r.open(bob, gen, true)
	if err := r.b.Login(alice, a.ID, pkcs11.CKU_USER, []byte("000000")); !errors.Is(err, module.ErrPinIncorrect) {
		t.Fatalf("Login with a wrong PIN: %v", err)
	}
	if err := r.b.Login(alice, a.ID, pkcs11.CKU_USER, []byte(hsmPIN)); err != nil {
		t.Fatalf("Login: %v", err)
	}
	sig, err := r.b.Sign(alice, a.ID, []byte{1}, pkcs11.CKM_ECDSA, digest)
	if err != nil || len(sig) != 64 {
		t.Fatalf("alice's Sign: %d bytes, %v; want a 64-byte P-256 signature", len(sig), err)
	}
	if objs, err := r.b.FindObjects(bob, b.ID, privateKeys); err != nil || len(objs) != 0 {
		t.Fatalf("bob's FindObjects(private keys) under alice's login: %v, %v", objs, err)
	}
	if _, err := r.b.Sign(bob, b.ID, []byte{1}, pkcs11.CKM_ECDSA, digest); !errors.Is(err, ErrNotLoggedIn) {
		t.Fatalf("bob's Sign under alice's login: %v, want ErrNotLoggedIn", err)
	}
	if err := r.b.Logout(alice, a.ID); err != nil {
		t.Fatal(err)
	}

	// InitToken with force and a wrong SO PIN: only bob's read-write
	// session is open, so the SO PIN is checked first and bob's session
	// stays.
	if err := r.b.CloseSession(alice, a.ID); err != nil {
		t.Fatal(err)
	}
	err = r.b.InitToken(alice, gen, []byte("00000000"), "wiped", true)
	if !errors.Is(err, module.ErrPinIncorrect) {
		t.Fatalf("InitToken with a wrong SO PIN: %v, want CKR_PIN_INCORRECT", err)
	}
	if ss := r.b.Sessions(); len(ss) != 1 || ss[0].ID != b.ID {
		t.Fatalf("sessions after a refused InitToken: %v, want bob's", ss)
	}

	// An SO login while bob holds a read-only session names bob.
	ro := r.open(bob, gen, false)
	so := r.open(alice, gen, true)
	err = r.b.Login(alice, so.ID, pkcs11.CKU_SO, []byte(hsmSO))
	var se *SessionsExistError
	if !errors.As(err, &se) || !slices.ContainsFunc(se.Holders, func(c Caller) bool { return c.ID == bob.ID }) {
		t.Fatalf("SO login with bob's read-only session %d open: %v, want SessionsExist naming bob", ro.ID, err)
	}
}
