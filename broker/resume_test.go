package broker

import (
	"errors"
	"strconv"
	"testing"
	"time"

	"github.com/miekg/pkcs11"

	"github.com/slotwatch/slotwatch/internal/secret"
)

// outage makes faultmod fail its reads until the monitor gives it up and
// initializes it again (rule 6): slot's token is removed by an outage and
// comes back, the same card, as a new generation.
func (r *rig) outage(slot, spare uint) {
	r.t.Helper()
	if err := r.ctl.Fail("GetSlotList", pkcs11.CKR_DEVICE_ERROR, 1, 3); err != nil {
		r.t.Fatal(err)
	}
	if err := r.ctl.Insert(spare, "wake", "wake"); err != nil { // a wake-up
		r.t.Fatal(err)
	}
	r.t.Cleanup(func() { r.ctl.Remove(spare) })
}

// resumed waits until session id is on a generation other than gen and
// no longer suspended, and returns it.
func (r *rig) resumed(id, gen uint64) SessionInfo {
	r.t.Helper()
	var info SessionInfo
	r.waitFor("session resumed on a new generation", func() bool {
		r.b.mu.Lock()
		defer r.b.mu.Unlock()
		s, ok := r.b.sessions[id]
		if !ok {
			r.t.Fatalf("session %d was closed by the outage", id)
		}
		info = s.info
		return s.suspended == nil && s.info.Generation != gen
	})
	return info
}

// TestSessionsSurviveAnOutage: a module re-initialized after failing shows
// the same token again; every session on it goes on with the same id on
// the new generation, its owners' login made again with the kept PIN, and
// a calls on it works without the client doing anything.
func TestSessionsSurviveAnOutage(t *testing.T) {
	for _, keep := range []bool{true, false} {
		name := map[bool]string{true: "PIN kept", false: "resume-login off"}[keep]
		t.Run(name, func(t *testing.T) {
			r := newRig(t, Limits{}, 4)
			r.b.SetResumeLogin(keep)
			gen := r.gen(4)
			alice, bob := r.caller("alice"), r.caller("bob")
			a := r.open(alice, gen, true)
			b := r.open(bob, gen, false)
			if err := r.b.Login(alice, a.ID, pkcs11.CKU_USER, []byte(fmPIN)); err != nil {
				t.Fatal(err)
			}
			logins := len(r.calls("C_Login"))

			r.outage(4, 5)
			back := r.resumed(a.ID, gen)
			bobBack := r.resumed(b.ID, gen)
			if back.Generation == gen || back.Generation != bobBack.Generation {
				t.Fatalf("resumed on generations %d and %d, from %d", back.Generation, bobBack.Generation, gen)
			}
			if tok, _ := r.mon.Snapshot().Token(back.Generation); tok == nil || tok.Resumes != gen {
				t.Fatalf("new token %+v does not resume %d", tok, gen)
			}
			wantState := uint(pkcs11.CKS_RW_USER_FUNCTIONS)
			wantLogins := logins + 1
			if !keep {
				wantState, wantLogins = pkcs11.CKS_RW_PUBLIC_SESSION, logins
			}
			if back.State != wantState {
				t.Fatalf("alice's session resumed in state %d, want %d", back.State, wantState)
			}
			if bobBack.State != pkcs11.CKS_RO_PUBLIC_SESSION {
				t.Fatalf("bob's session resumed in state %d, want public", bobBack.State)
			}
			if got := len(r.calls("C_Login")); got != wantLogins {
				t.Fatalf("C_Login calls %d after the resumption, want %d", got, wantLogins)
			}
			// The resumed sessions work: a call reaches the module.
			if _, err := r.b.FindObjects(bob, b.ID, Template{}); err != nil {
				t.Fatalf("FindObjects on bob's resumed session: %v", err)
			}
			err := r.b.Logout(alice, a.ID)
			if keep && err != nil {
				t.Fatalf("alice's Logout after the resumption: %v", err)
			}
			if !keep && !errors.Is(err, ErrNotLoggedIn) {
				t.Fatalf("alice's Logout with no PIN kept: %v, want ErrNotLoggedIn", err)
			}
			r.b.mu.Lock()
			ts := r.b.tokens[back.Generation]
			pinLeft := ts != nil && ts.pin != nil
			r.b.mu.Unlock()
			if pinLeft {
				t.Fatal("a PIN is still kept after the logout")
			}
		})
	}
}

// TestSuspendedSessions: while a token is away, a call on its session
// waits and answers ErrBusy after Limits.TokenWait, another caller cannot
// touch it, closing it works without the module, and TokenLost closes the
// rest and wipes the kept PIN.
func TestSuspendedSessions(t *testing.T) {
	r := newRig(t, Limits{TokenWait: 200 * time.Millisecond}, 6)
	gen := r.gen(6)
	alice, bob := r.caller("alice"), r.caller("bob")
	a := r.open(alice, gen, true)
	a2 := r.open(alice, gen, false)
	if err := r.b.Login(alice, a.ID, pkcs11.CKU_USER, []byte(fmPIN)); err != nil {
		t.Fatal(err)
	}
	r.b.TokenAway(gen) // as the face does on TokenRemoved with Outage
	r.b.mu.Lock()
	sus := r.b.away[gen]
	r.b.mu.Unlock()
	if sus == nil || sus.login != alice.ID || sus.pin.Wiped() {
		t.Fatalf("suspension %+v: want alice's login with her PIN kept", sus)
	}
	start := time.Now()
	if _, err := r.b.FindObjects(alice, a.ID, Template{}); !errors.Is(err, ErrBusy) {
		t.Fatalf("FindObjects on a suspended session: %v, want ErrBusy", err)
	}
	if waited := time.Since(start); waited < 150*time.Millisecond {
		t.Fatalf("the call answered after %v, without waiting for the card", waited)
	}
	if err := r.b.CloseSession(bob, a.ID); !errors.Is(err, ErrAccessDenied) {
		t.Fatalf("bob closing alice's suspended session: %v, want ErrAccessDenied", err)
	}
	closes := len(r.calls("C_CloseSession"))
	if err := r.b.CloseSession(alice, a2.ID); err != nil {
		t.Fatalf("closing a suspended session: %v", err)
	}
	if got := len(r.calls("C_CloseSession")); got != closes {
		t.Fatalf("closing a suspended session called C_CloseSession")
	}
	r.b.TokenLost(gen)
	if _, err := r.b.FindObjects(alice, a.ID, Template{}); !errors.Is(err, ErrNoSuchSession) {
		t.Fatalf("FindObjects after TokenLost: %v, want ErrNoSuchSession", err)
	}
	if !sus.pin.Wiped() {
		t.Fatal("the kept PIN was not wiped when the token was lost")
	}
	if got := r.obs.of(a.ID); len(got) == 0 || got[len(got)-1] != "closed "+itoa(a.ID)+" (token removed)" {
		t.Fatalf("observer for alice's session: %v", got)
	}
}

func itoa(n uint64) string { return strconv.FormatUint(n, 10) }

// TestKeptPINsAreWiped: the PIN kept for a login is wiped when the login
// ends — at Logout, when the owner's last session closes, and when the
// token is removed — and none is kept with resume-login off.
func TestKeptPINsAreWiped(t *testing.T) {
	r := newRig(t, Limits{}, 7)
	gen := r.gen(7)
	alice := r.caller("alice")
	kept := func() *secret.Secret {
		r.b.mu.Lock()
		defer r.b.mu.Unlock()
		if ts := r.b.tokens[gen]; ts != nil {
			return ts.pin
		}
		return nil
	}
	for _, end := range []string{"Logout", "last session closed", "resume-login off", "token removed"} {
		t.Run(end, func(t *testing.T) {
			r.b.SetResumeLogin(end != "resume-login off")
			s := r.open(alice, gen, false)
			if err := r.b.Login(alice, s.ID, pkcs11.CKU_USER, []byte(fmPIN)); err != nil {
				t.Fatalf("Login: %v", err)
			}
			pin := kept()
			if end == "resume-login off" {
				if pin != nil {
					t.Fatal("a PIN was kept with resume-login off")
				}
				r.b.CloseSession(alice, s.ID)
				return
			}
			if pin == nil || pin.Wiped() {
				t.Fatal("no PIN kept for the login")
			}
			switch end {
			case "Logout":
				if err := r.b.Logout(alice, s.ID); err != nil {
					t.Fatal(err)
				}
				defer r.b.CloseSession(alice, s.ID)
			case "last session closed":
				if err := r.b.CloseSession(alice, s.ID); err != nil {
					t.Fatal(err)
				}
			case "token removed":
				r.b.TokenGone(gen) // last: the generation is dead for the broker
			}
			if !pin.Wiped() {
				t.Fatal("the kept PIN was not wiped")
			}
		})
	}
}

// TestSuspendedSessionFloodStallsNobodyElse: a client that floods calls on
// its suspended session has at most its own call slots waiting (the rest
// answer Busy at once), and another client's calls on another token go on
// meanwhile.
func TestSuspendedSessionFloodStallsNobodyElse(t *testing.T) {
	r := newRig(t, Limits{TokenWait: time.Second, ConcurrentCalls: 4}, 2, 3)
	genA, genB := r.gen(2), r.gen(3)
	mallory, alice := r.caller("mallory"), r.caller("alice")
	m := r.open(mallory, genA, false)
	a := r.open(alice, genB, false)
	r.b.TokenAway(genA)

	const flood = 40
	type answer struct {
		err  error
		took time.Duration
	}
	answers := make(chan answer, flood)
	for range flood {
		go func() {
			began := time.Now()
			_, err := r.b.FindObjects(mallory, m.ID, Template{})
			answers <- answer{err, time.Since(began)}
		}()
	}
	// Meanwhile alice's calls on her token are served at once.
	for i := range 20 {
		began := time.Now()
		if _, err := r.b.FindObjects(alice, a.ID, Template{}); err != nil {
			t.Fatalf("alice's call %d during the flood: %v", i, err)
		}
		if took := time.Since(began); took > 500*time.Millisecond {
			t.Fatalf("alice's call %d took %v during mallory's flood", i, took)
		}
	}
	quick := 0
	for range flood {
		ans := <-answers
		if !errors.Is(ans.err, ErrBusy) {
			t.Fatalf("a flooded call on a suspended session: %v, want ErrBusy", ans.err)
		}
		if ans.took < 900*time.Millisecond {
			quick++ // refused at once: past mallory's call slots
		}
	}
	if quick < flood-4 {
		t.Fatalf("%d of %d flooded calls were refused at once, want at least %d (4 call slots)", quick, flood, flood-4)
	}
	r.b.TokenLost(genA)
}
