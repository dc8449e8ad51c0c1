package tests

// Suspend and resume on the real stack: the daemon follows a stand-in
// logind on a second private bus, passed to it as the system bus
// (DBUS_SYSTEM_BUS_ADDRESS), while pcscd restarts under it as readers
// re-enumerate after a resume. The removal policy's grace counts from the
// resume; a PrepareForSleep from anyone but logind's owner changes nothing;
// a screen that is locked already is not locked again.

import (
	"strings"
	"testing"
	"time"

	godbus "github.com/godbus/dbus/v5"

	"github.com/slotwatch/slotwatch/tests/stack"
	"github.com/slotwatch/slotwatch/tests/vcard"
)

// logind's names.
const (
	logindName   = "org.freedesktop.login1"
	logindPath   = godbus.ObjectPath("/org/freedesktop/login1")
	logindSignal = "org.freedesktop.login1.Manager.PrepareForSleep"
)

// What the daemon logs (slog text) that the tests wait for.
const (
	logFollowing  = `msg="following suspend and resume (logind's PrepareForSleep)"`
	logSleep      = `msg="the system is going to sleep"`
	logResumed    = `msg="the system resumed: re-reading every reader and module"`
	logBack       = `msg="token back within the removal grace; no removal action"`
	logForged     = `ignored a signal: PrepareForSleep not from logind`
	logLockedSkip = `msg="removal action lock-screen: the screen is locked already; not locking again"`
)

// suspendStack is a policy stack with a private system bus, a stand-in
// logind on it, the screensaver and session manager stand-ins, and the
// login card in reader 0 before the daemon starts.
type suspendStack struct {
	*policyStack
	system *stack.DBus
	logind *godbus.Conn
	ss, sm *desktopPeer
	login  *vcard.Card
}

// newSuspendStack starts everything and the daemon with conf (which must
// set removal-grace).
func newSuspendStack(t *testing.T, conf string) *suspendStack {
	t.Helper()
	s := &suspendStack{policyStack: newPolicyStack(t)}
	s.system = stack.StartDBusForTest(t, "")
	s.logind = s.systemClient()
	if r, err := s.logind.RequestName(logindName, godbus.NameFlagDoNotQueue); err != nil || r != godbus.RequestNameReplyPrimaryOwner {
		t.Fatalf("the stand-in logind could not own %s: %v %v", logindName, r, err)
	}
	s.ss = startDesktopPeer(t, s.bus, gnomeScreenSaverName)
	s.sm = startDesktopPeer(t, s.bus, sessionManagerName)
	s.login = s.card(0, loginCardProfile)
	s.insertBeforeStart(s.login, 0)
	env := append([]string{"DBUS_SYSTEM_BUS_ADDRESS=" + s.system.Address}, loginEnv...)
	s.start(conf, env)
	s.waitLabel(loginCardProfile.Label, true)
	// logind.Start runs before READY=1: subscribed by now (its log line
	// may still be on its way through the pipe).
	s.waitLog(logFollowing, 1)
	return s
}

// systemClient connects another client to the system bus.
func (s *suspendStack) systemClient() *godbus.Conn {
	s.t.Helper()
	conn, err := godbus.Connect(s.system.Address)
	if err != nil {
		s.t.Fatal(err)
	}
	s.t.Cleanup(func() { conn.Close() })
	return conn
}

// prepareForSleep has the stand-in logind emit PrepareForSleep(start),
// and waits until the daemon has logged it.
func (s *suspendStack) prepareForSleep(start bool) {
	s.t.Helper()
	want := logResumed
	if start {
		want = logSleep
	}
	n := strings.Count(s.d.stderr.String(), want)
	if err := s.logind.Emit(logindPath, logindSignal, start); err != nil {
		s.t.Fatalf("emit PrepareForSleep(%v): %v", start, err)
	}
	s.waitLog(want, n+1)
}

// waitLog waits until the daemon's log holds s at least n times.
func (s *suspendStack) waitLog(substr string, n int) {
	s.t.Helper()
	s.waitLogOrLock(substr, n, -1)
}

// waitLogOrLock waits until the daemon's log holds s at least n times, or
// the screensaver has more than locks Lock calls (-1: only the log):
// whichever shows that the policy has decided.
func (s *suspendStack) waitLogOrLock(substr string, n, locks int) {
	s.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for strings.Count(s.d.stderr.String(), substr) < n && (locks < 0 || s.ss.count() <= locks) {
		if time.Now().After(deadline) {
			s.t.Fatalf("the daemon did not log %s (%d times) within 10 s:\n%s", substr, n, s.d.stderr.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// restartPCSCD restarts pcscd as readers re-enumerate at a resume: the
// card's connection dies with pcscd, the token leaves the bus.
func (s *suspendStack) restartPCSCD() {
	s.t.Helper()
	if err := s.pcscd.Restart(); err != nil {
		s.t.Fatal(err)
	}
	s.waitLabel(loginCardProfile.Label, false)
	if err := s.login.Remove(); err != nil { // its connection died with pcscd
		s.t.Fatal(err)
	}
}

// noAction fails the test unless the screensaver has locks Lock calls and
// the session manager none, now and for d.
func (s *suspendStack) noAction(locks int, d time.Duration, what string) {
	s.t.Helper()
	s.sm.quiet(0, 0, what)
	s.ss.quiet(locks, d, what)
	s.sm.quiet(0, 0, what)
}

// TestSuspendLoginTokenBack: PrepareForSleep(true), pcscd restarts (the
// login card is removed and comes back), PrepareForSleep(false): with the
// card back inside the grace, neither Lock nor Logout — whether it is back
// before the resume or within the grace after it.
func TestSuspendLoginTokenBack(t *testing.T) {
	for _, tc := range []struct {
		name         string
		backAfterRes bool
	}{
		{"back before the resume", false},
		{"back within the grace after the resume", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			const grace = 5 * time.Second
			s := newSuspendStack(t, "removal-action = lock-screen\nremoval-grace = 5\n")
			s.prepareForSleep(true)
			s.restartPCSCD()
			var resumed time.Time
			if tc.backAfterRes {
				resumed = time.Now()
				s.prepareForSleep(false)
			}
			s.insert(s.login, loginCardProfile.Label)
			s.waitLogOrLock(logBack, 1, 0)
			if tc.backAfterRes {
				t.Logf("the card was back %v after the resume (grace %v)", time.Since(resumed).Round(time.Millisecond), grace)
			}
			if !tc.backAfterRes {
				resumed = time.Now()
				s.prepareForSleep(false)
			}
			// The removal was dropped (logged); what is left to show is
			// that nothing acts when the grace after the resume ends, so
			// wait that out (bounded: the grace and a second).
			s.noAction(0, time.Until(resumed.Add(grace+time.Second)), "login card back within the grace")
			if got := strings.Count(s.d.stderr.String(), logResumed); got != 1 {
				t.Errorf("%d resumes logged, want 1", got)
			}
		})
	}
}

// TestSuspendLoginTokenNotBack: with a small grace and the card back only
// after it, exactly one action, and not before the grace after the resume
// is over (nor while the system sleeps).
func TestSuspendLoginTokenNotBack(t *testing.T) {
	const grace = 500 * time.Millisecond
	s := newSuspendStack(t, "removal-action = lock-screen\nremoval-grace = 0.5\n")
	s.prepareForSleep(true)
	s.restartPCSCD()
	// Asleep, the grace does not run: counted from the removal it would
	// have ended within this wait (bounded: four graces).
	s.noAction(0, 4*grace, "login card removed while asleep")

	resumed := time.Now()
	s.prepareForSleep(false)
	c := s.ss.waitCalls(1, 10*time.Second, "login card not back after the resume")[0]
	checkLock(t, c, gnomeScreenSaverName, gnomeScreenSaverPath)
	if d := c.At.Sub(resumed); d < grace {
		t.Errorf("locked %v after the resume, before the %v grace was over", d.Round(time.Millisecond), grace)
	} else {
		t.Logf("locked %v after the resume (grace %v)", d.Round(time.Millisecond), grace)
	}

	s.insert(s.login, loginCardProfile.Label)
	// Back after the lock: nothing more (bounded: two graces).
	s.noAction(1, 2*grace, "login card back after the grace")
	if r := s.stateReason(); r != "" {
		t.Errorf("StateReason %q after a successful lock, want \"\"", r)
	}
}

// TestSuspendForgedSignal: another client of the system bus sends
// PrepareForSleep, broadcast and straight to every connection (a unicast
// signal needs no match rule). Neither its sleep nor its resume reaches
// the policy or the monitor, and the daemon keeps serving.
func TestSuspendForgedSignal(t *testing.T) {
	const grace = 500 * time.Millisecond
	s := newSuspendStack(t, "removal-action = lock-screen\nremoval-grace = 0.5\n")
	attacker := s.systemClient()
	forge := func(start bool) {
		t.Helper()
		n := strings.Count(s.d.stderr.String(), logForged)
		if err := attacker.Emit(logindPath, logindSignal, start); err != nil {
			t.Fatal(err)
		}
		var names []string
		if err := attacker.BusObject().Call("org.freedesktop.DBus.ListNames", 0).Store(&names); err != nil {
			t.Fatal(err)
		}
		sent := 0
		for _, name := range names {
			if !strings.HasPrefix(name, ":") || name == attacker.Names()[0] {
				continue
			}
			msg := &godbus.Message{
				Type: godbus.TypeSignal,
				Headers: map[godbus.HeaderField]godbus.Variant{
					godbus.FieldPath:        godbus.MakeVariant(logindPath),
					godbus.FieldInterface:   godbus.MakeVariant("org.freedesktop.login1.Manager"),
					godbus.FieldMember:      godbus.MakeVariant("PrepareForSleep"),
					godbus.FieldDestination: godbus.MakeVariant(name),
					godbus.FieldSignature:   godbus.MakeVariant(godbus.SignatureOf(start)),
				},
				Body: []any{start},
			}
			if call := attacker.Send(msg, nil); call.Err != nil {
				t.Fatal(call.Err)
			}
			sent++
		}
		if sent < 2 { // logind's stand-in and the daemon at least
			t.Fatalf("forged to %d connections of %v", sent, names)
		}
		// Wait until the daemon has handled the one sent to it: dropped
		// it (logged), or — the bug the checks below catch — followed it.
		followed := logResumed
		if start {
			followed = logSleep
		}
		f := strings.Count(s.d.stderr.String(), followed)
		deadline := time.Now().Add(10 * time.Second)
		for strings.Count(s.d.stderr.String(), logForged) <= n && strings.Count(s.d.stderr.String(), followed) <= f {
			if time.Now().After(deadline) {
				t.Fatalf("the daemon did not handle the forged PrepareForSleep(%v) within 10 s:\n%s", start, s.d.stderr.String())
			}
			time.Sleep(10 * time.Millisecond)
		}
	}

	// A forged sleep: had it counted, this removal would wait for a
	// resume; it locks one grace later.
	forge(true)
	if strings.Contains(s.d.stderr.String(), logSleep) {
		t.Fatalf("a forged PrepareForSleep(true) was followed:\n%s", s.d.stderr.String())
	}
	s.remove(s.login, loginCardProfile.Label)
	checkLock(t, s.ss.waitCalls(1, 10*time.Second, "login card removed after a forged sleep")[0], gnomeScreenSaverName, gnomeScreenSaverPath)
	s.insert(s.login, loginCardProfile.Label)

	// A forged resume while logind's sleep holds a removal: had it
	// counted, the lock would come one grace later; wait that out
	// (bounded: four graces). logind's own resume then locks.
	s.prepareForSleep(true)
	s.remove(s.login, loginCardProfile.Label)
	forge(false)
	s.noAction(1, 4*grace, "forged resume")
	if n := strings.Count(s.d.stderr.String(), logResumed); n != 0 {
		t.Fatalf("a forged PrepareForSleep(false) was followed (%d resumes logged):\n%s", n, s.d.stderr.String())
	}
	s.prepareForSleep(false)
	checkLock(t, s.ss.waitCalls(2, 10*time.Second, "logind's resume")[1], gnomeScreenSaverName, gnomeScreenSaverPath)

	// Still serving: the name, the objects, the next insertion.
	var has bool
	if err := s.conn.BusObject().Call("org.freedesktop.DBus.NameHasOwner", 0, busName).Store(&has); err != nil || !has {
		t.Fatalf("%s has no owner after the forged signals (%v)", busName, err)
	}
	s.insert(s.login, loginCardProfile.Label)
	s.noAction(2, 2*grace, "after logind's resume")
	if n := strings.Count(s.d.stderr.String(), logResumed); n != 1 {
		t.Errorf("%d resumes logged, want 1 (logind's)", n)
	}
}

// TestSuspendLockNotRepeated: the screen locked on suspend (the
// screensaver's GetActive says true) is not locked again when the login
// card is not back after the resume; once unlocked, the next removal locks,
// and with the screen locked again a further removal does not.
func TestSuspendLockNotRepeated(t *testing.T) {
	const grace = 500 * time.Millisecond
	s := newSuspendStack(t, "removal-action = lock-screen\nremoval-grace = 0.5\n")
	s.prepareForSleep(true)
	s.ss.setActive(true) // the desktop locks on suspend
	s.restartPCSCD()
	s.prepareForSleep(false)
	s.waitLogOrLock(logLockedSkip, 1, 0)
	if s.ss.activeCalls() == 0 {
		t.Error("the daemon did not ask GetActive")
	}
	s.noAction(0, 0, "locked on suspend")

	// Unlocked: the next removal locks.
	s.ss.setActive(false)
	s.insert(s.login, loginCardProfile.Label)
	s.remove(s.login, loginCardProfile.Label)
	checkLock(t, s.ss.waitCalls(1, 10*time.Second, "login card removed, screen unlocked")[0], gnomeScreenSaverName, gnomeScreenSaverPath)

	// Locked (by that Lock): no second Lock.
	s.ss.setActive(true)
	s.insert(s.login, loginCardProfile.Label)
	s.remove(s.login, loginCardProfile.Label)
	s.waitLogOrLock(logLockedSkip, 2, 1)
	s.noAction(1, 2*grace, "login card removed, screen locked")
	if r := s.stateReason(); r != "" {
		t.Errorf("StateReason %q, want \"\"", r)
	}
}
