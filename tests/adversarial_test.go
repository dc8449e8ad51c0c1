package tests

import (
	"crypto/sha256"
	"fmt"
	"testing"
	"time"

	godbus "github.com/godbus/dbus/v5"

	"github.com/slotwatch/slotwatch/tests/faultmod"
	"github.com/slotwatch/slotwatch/tests/stack"
)

// Adversarial clients on a private bus against the daemon with the fault
// module: each test is one way a stranger on the same bus could reach
// another client's sessions or login, or stall it (issue 9's cases; the
// broker's own tests cover the races in process).

const fmPIN = "1234" // faultmod's PIN unless set

// adversaryRig is the daemon over faultmod with tokens in the given
// slots, labelled "adv N".
func adversaryRig(t *testing.T, slots ...uint) (*stack.DBus, *faultmod.Control, map[uint]godbus.ObjectPath) {
	t.Helper()
	bus, ctl := faultDaemon(t)
	conn := dial(t, bus)
	toks := map[uint]godbus.ObjectPath{}
	for _, s := range slots {
		label := fmt.Sprintf("adv %d", s)
		if err := ctl.Insert(s, label, fmt.Sprintf("adv%d", s)); err != nil {
			t.Fatal(err)
		}
		toks[s] = findToken(t, conn, label)
	}
	return bus, ctl, toks
}

// sendSignal sends a signal with any header a client can set, to dest
// ("" for a broadcast).
func sendSignal(t *testing.T, conn *godbus.Conn, dest string, path godbus.ObjectPath, iface, member string, body ...any) {
	t.Helper()
	msg := &godbus.Message{
		Type: godbus.TypeSignal,
		Headers: map[godbus.HeaderField]godbus.Variant{
			godbus.FieldPath:      godbus.MakeVariant(path),
			godbus.FieldInterface: godbus.MakeVariant(iface),
			godbus.FieldMember:    godbus.MakeVariant(member),
		},
		Body: body,
	}
	if dest != "" {
		msg.Headers[godbus.FieldDestination] = godbus.MakeVariant(dest)
	}
	if len(body) > 0 {
		msg.Headers[godbus.FieldSignature] = godbus.MakeVariant(godbus.SignatureOf(body...))
	}
	call := conn.Send(msg, nil)
	if call.Err != nil {
		t.Fatal(call.Err)
	}
}

func hasSession(t *testing.T, conn *godbus.Conn, p godbus.ObjectPath) bool {
	_, ok := managedObjects(t, conn)[p]
	return ok
}

// TestForgedDepartureClosesNothing (case 1): a client that sends
// NameOwnerChanged(victim, victim, "") — straight to slotwatch's unique
// name, or broadcast with the bus driver's path — and a forged NameLost,
// closes none of the victim's sessions. A real departure still does.
func TestForgedDepartureClosesNothing(t *testing.T) {
	bus, _, toks := adversaryRig(t, 0)
	victim, mallory, carol := dial(t, bus), dial(t, bus), dial(t, bus)
	vs := openSession(t, victim, toks[0])
	cs := openSession(t, carol, toks[0])
	var daemonName string
	if err := mallory.BusObject().Call("org.freedesktop.DBus.GetNameOwner", 0, busName).Store(&daemonName); err != nil {
		t.Fatal(err)
	}
	v := victim.Names()[0]
	for _, dest := range []string{daemonName, ""} {
		sendSignal(t, mallory, dest, "/org/freedesktop/DBus", "org.freedesktop.DBus", "NameOwnerChanged", v, v, "")
		sendSignal(t, mallory, dest, "/", "org.freedesktop.DBus", "NameOwnerChanged", v, v, "")
	}
	sendSignal(t, mallory, daemonName, "/org/freedesktop/DBus", "org.freedesktop.DBus", "NameLost", busName)
	// Signals reach the daemon in order: once carol's real departure has
	// closed her session, the forged ones were handled too.
	carol.Close()
	deadline := time.Now().Add(10 * time.Second)
	for hasSession(t, victim, cs) {
		if time.Now().After(deadline) {
			t.Fatal("carol's session stays after she left")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if !hasSession(t, victim, vs) {
		t.Fatal("a forged NameOwnerChanged closed the victim's session")
	}
	if err := victim.Object(busName, vs).Call(sesIface+".FindObjects", 0, map[string]godbus.Variant{}).Err; err != nil {
		t.Fatalf("the victim's session after the forgeries: %v", err)
	}
	// The daemon still owns its name (a forged NameLost changes nothing).
	var owner string
	if err := mallory.BusObject().Call("org.freedesktop.DBus.GetNameOwner", 0, busName).Store(&owner); err != nil || owner != daemonName {
		t.Fatalf("owner of %s: %q, %v", busName, owner, err)
	}
}

// TestStrangerGetsAccessDeniedFirst (case 8): a call on another client's
// session answers AccessDenied whatever its arguments, so a stranger
// learns nothing from argument checks.
func TestStrangerGetsAccessDeniedFirst(t *testing.T) {
	bus, _, toks := adversaryRig(t, 0)
	alice, mallory := dial(t, bus), dial(t, bus)
	s := openSession(t, alice, toks[0])
	for _, c := range []struct {
		method string
		args   []any
	}{
		{"Sign", []any{[]byte{}, uint32(0x1041), []byte{}}},
		{"Sign", []any{[]byte{1}, uint32(0xffff), []byte{1}}},
		{"Login", []any{uint32(7), []byte{}}},
		{"FindObjects", []any{map[string]godbus.Variant{"bogus": godbus.MakeVariant(1)}}},
		{"Close", nil},
	} {
		err := mallory.Object(busName, s).Call(sesIface+"."+c.method, 0, c.args...).Err
		if errName(err) != "org.freedesktop.DBus.Error.AccessDenied" {
			t.Errorf("a stranger's %s%v on alice's session: %v, want AccessDenied", c.method, c.args, err)
		}
	}
}

// TestSignNeverRunsUnderAnotherClientsLogin (case 2) over the bus.
func TestSignNeverRunsUnderAnotherClientsLogin(t *testing.T) {
	bus, ctl, toks := adversaryRig(t, 0)
	alice, bob := dial(t, bus), dial(t, bus)
	as, bs := openSession(t, alice, toks[0]), openSession(t, bob, toks[0])
	if err := ctl.Sleep("C_FindObjectsInit", 500*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	digest := sha256.Sum256([]byte("x"))
	signed := make(chan *godbus.Call, 1)
	go func() { signed <- bob.Object(busName, bs).Call(sesIface+".Sign", 0, []byte{1}, ckmECDSA, digest[:]) }()
	// Wait until bob's Sign is inside the module (faultmod records calls
	// when they return, so wait for the first one of his Sign to return:
	// none does before the sleep ends; instead wait for alice's Login to
	// have to wait: it returns only after bob's call).
	time.Sleep(100 * time.Millisecond) // only makes the race likely; the assertion holds either way
	if err := alice.Object(busName, as).Call(sesIface+".Login", 0, uint32(1), []byte(fmPIN)).Err; err != nil {
		t.Fatalf("alice's Login: %v", err)
	}
	call := <-signed
	var sig []byte
	if call.Err == nil {
		call.Store(&sig)
	}
	if len(sig) > 0 {
		t.Fatalf("bob signed with alice's login: %x", sig)
	}
	if err := bob.Object(busName, bs).Call(sesIface+".Sign", 0, []byte{1}, ckmECDSA, digest[:]).Err; errName(err) != errPfx+"NotLoggedIn" {
		t.Fatalf("bob's Sign while alice is logged in: %v, want NotLoggedIn", err)
	}
}

// TestLoginEndsWhenItsOwnerLeaves (case 3): the owner's connection drops
// while slotwatch's own ListCertificates session is open; the next
// client's session is public and sees no private key.
func TestLoginEndsWhenItsOwnerLeaves(t *testing.T) {
	bus, ctl, toks := adversaryRig(t, 0)
	alice, carol := dial(t, bus), dial(t, bus)
	as := openSession(t, alice, toks[0])
	if err := alice.Object(busName, as).Call(sesIface+".Login", 0, uint32(1), []byte(fmPIN)).Err; err != nil {
		t.Fatal(err)
	}
	if err := ctl.Sleep("C_FindObjectsInit", 400*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	listed := make(chan error, 1)
	go func() { listed <- carol.Object(busName, toks[0]).Call(tokIface+".ListCertificates", 0).Err }()
	time.Sleep(100 * time.Millisecond) // only makes the race likely
	alice.Close()
	if err := <-listed; err != nil {
		t.Fatalf("carol's ListCertificates: %v", err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for hasSession(t, carol, as) {
		if time.Now().After(deadline) {
			t.Fatal("alice's session stays after she left")
		}
		time.Sleep(5 * time.Millisecond)
	}
	ctl.Sleep("C_FindObjectsInit", 0)
	cs := openSession(t, carol, toks[0])
	var state uint32
	if err := carol.Object(busName, cs).StoreProperty(sesIface+".State", &state); err != nil || state != 0 {
		t.Fatalf("carol's session after alice left: State %d (%v), want 0 (public)", state, err)
	}
	var objs []map[string]godbus.Variant
	if err := carol.Object(busName, cs).Call(sesIface+".FindObjects", 0, map[string]godbus.Variant{"class": godbus.MakeVariant(ckoPriv)}).Store(&objs); err != nil || len(objs) != 0 {
		t.Fatalf("carol's FindObjects(private keys) after alice left: %v, %v; want none", objs, err)
	}
}

// TestSlowLoginStallsOnlyItsToken (case 4): while a 3 s Login (a PIN pad)
// runs on one token, another client's OpenSession + FindObjects + Close on
// another token is served at once, and a call on the same token answers
// Busy within the token wait, not after the login.
func TestSlowLoginStallsOnlyItsToken(t *testing.T) {
	bus, ctl, toks := adversaryRig(t, 0, 1)
	alice, bob := dial(t, bus), dial(t, bus)
	as := openSession(t, alice, toks[0])
	// A baseline of the same calls, nothing else running.
	pair := func() time.Duration {
		start := time.Now()
		s := openSession(t, bob, toks[1])
		if err := bob.Object(busName, s).Call(sesIface+".FindObjects", 0, map[string]godbus.Variant{}).Err; err != nil {
			t.Fatal(err)
		}
		if err := bob.Object(busName, s).Call(sesIface+".Close", 0).Err; err != nil {
			t.Fatal(err)
		}
		return time.Since(start)
	}
	base := pair()
	if err := ctl.Sleep("C_Login", 3*time.Second); err != nil {
		t.Fatal(err)
	}
	loggedIn := make(chan error, 1)
	go func() {
		loggedIn <- alice.Object(busName, as).Call(sesIface+".Login", 0, uint32(1), []byte(fmPIN)).Err
	}()
	// Run the pairs back to back until the login returns: were they held
	// up, the first would end only after the login, and few would run.
	var worst time.Duration
	pairs := 0
	for {
		d := pair()
		pairs++
		worst = max(worst, d)
		select {
		case err := <-loggedIn:
			if err != nil {
				t.Fatalf("alice's Login: %v", err)
			}
			t.Logf("OpenSession+FindObjects+Close on another token: %v alone; during a 3 s Login %d pairs, the slowest %v (%v extra)", base, pairs, worst, worst-base)
			if pairs < 5 || worst > base+time.Second {
				t.Errorf("a 3 s login on one token held up another token's calls: %d pairs ran meanwhile, the slowest took %v", pairs, worst)
			}
			return
		default:
		}
	}
}

// TestInitTokenAttacks (case 5): a wrong SO PIN with force closes nobody's
// session, and two InitTokens at once do not both initialize.
func TestInitTokenAttacks(t *testing.T) {
	bus, ctl, toks := adversaryRig(t, 0)
	bob, mallory := dial(t, bus), dial(t, bus)
	bs := openSession(t, bob, toks[0])
	// Bob's session is read-write: then slotwatch can check the SO PIN
	// before closing anything.
	if err := bob.Object(busName, bs).Call(sesIface+".Close", 0).Err; err != nil {
		t.Fatal(err)
	}
	if err := bob.Object(busName, toks[0]).Call(tokIface+".OpenSession", 0, true).Store(&bs); err != nil {
		t.Fatal(err)
	}
	err := mallory.Object(busName, toks[0]).Call(tokIface+".InitToken", 0, []byte("0000"), "pwned", true).Err
	if errName(err) != errPfx+"PinIncorrect" {
		t.Fatalf("InitToken with force and a wrong SO PIN: %v, want PinIncorrect", err)
	}
	if !hasSession(t, bob, bs) {
		t.Fatal("a wrong SO PIN closed bob's session")
	}
	if err := bob.Object(busName, bs).Call(sesIface+".Close", 0).Err; err != nil {
		t.Fatal(err)
	}

	// Two InitTokens at once: whichever comes second while the first runs
	// answers Busy, and the card is initialized once.
	if err := ctl.Sleep("C_InitToken", 500*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	if err := ctl.ClearCalls(); err != nil {
		t.Fatal(err)
	}
	results := make(chan error, 2)
	for _, c := range []*godbus.Conn{mallory, bob} {
		go func() {
			results <- c.Object(busName, toks[0]).Call(tokIface+".InitToken", 0, []byte(fmPIN), "raced", false).Err
		}()
	}
	r1, r2 := <-results, <-results
	ok, refused := 0, 0
	for _, err := range []error{r1, r2} {
		switch errName(err) {
		case "":
			ok++
		case errPfx + "Busy", errPfx + "TokenRemoved": // TokenRemoved: the first's new label was seen first
			refused++
		}
	}
	calls, err := ctl.Calls()
	if err != nil {
		t.Fatal(err)
	}
	inits := 0
	for _, c := range calls {
		if c.Func == "C_InitToken" {
			inits++
		}
	}
	if ok != 1 || refused != 1 || inits != 1 {
		t.Fatalf("two InitTokens at once: %v and %v, %d C_InitToken calls; want one success, the other Busy, one call", r1, r2, inits)
	}
}

// TestSessionLimitKeepsOthersServed (case 7): one client opening sessions
// without end gets Busy past its limit (max-sessions-per-token, 16 by
// default) and other clients still open theirs.
func TestSessionLimitKeepsOthersServed(t *testing.T) {
	bus, _, toks := adversaryRig(t, 0)
	greedy, other := dial(t, bus), dial(t, bus)
	var err error
	n := 0
	for ; n < 100; n++ {
		var p godbus.ObjectPath
		if err = greedy.Object(busName, toks[0]).Call(tokIface+".OpenSession", 0, false).Store(&p); err != nil {
			break
		}
	}
	if errName(err) != errPfx+"Busy" || n != 16 {
		t.Fatalf("after %d sessions: %v; want Busy after the 16th", n, err)
	}
	openSession(t, other, toks[0])
}
