package tests

// The removal policy and desktop notifications on the real stack: private
// dbus-daemon, private pcscd with vpcd, OpenSC and virtual cards, with test
// peers on the private bus standing in for the screensaver, the session
// manager and the notification server.

import (
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	godbus "github.com/godbus/dbus/v5"

	"github.com/slotwatch/slotwatch/tests/stack"
	"github.com/slotwatch/slotwatch/tests/vcard"
)

// The desktop services the policy calls.
const (
	gnomeScreenSaverName = "org.gnome.ScreenSaver"
	gnomeScreenSaverPath = godbus.ObjectPath("/org/gnome/ScreenSaver")
	fdoScreenSaverName   = "org.freedesktop.ScreenSaver"
	fdoScreenSaverPath   = godbus.ObjectPath("/org/freedesktop/ScreenSaver")
	sessionManagerName   = "org.gnome.SessionManager"
	sessionManagerPath   = godbus.ObjectPath("/org/gnome/SessionManager")
	notificationsName    = "org.freedesktop.Notifications"
	notificationsPath    = godbus.ObjectPath("/org/freedesktop/Notifications")
)

// The test cards. Serials are even-length lower-case hex, which OpenSC
// shows unchanged.
var (
	loginCardProfile = vcard.Profile{Label: "Login Card", Serial: "10c10001"}
	otherCardProfile = vcard.Profile{Label: "Other", Serial: "0e000002"}
)

// loginEnv makes "Login Card" the session's login token.
var loginEnv = []string{"PKCS11_LOGIN_TOKEN_NAME=" + loginCardProfile.Label}

// peerCall is one method call a desktop peer received, as it came.
type peerCall struct {
	At        time.Time
	Member    string
	Path      godbus.ObjectPath
	Interface string
	Signature string
	Body      []any
	Sender    string
	Returned  uint32 // Notify: the id the peer returned
}

// desktopPeer is one desktop service on the private bus: its own
// connection, owning its well-known name and recording every call.
type desktopPeer struct {
	t    *testing.T
	name string
	conn *godbus.Conn

	mu      sync.Mutex
	calls   []peerCall
	nextID  uint32 // Notify: the last id handed out
	active  bool   // screensavers: what GetActive answers
	actives int    // screensavers: GetActive calls (not in calls)
}

// startDesktopPeer puts a stand-in for the service name (one of the names
// above) on the bus; it owns the name once this returns.
func startDesktopPeer(t *testing.T, bus *stack.DBus, name string) *desktopPeer {
	t.Helper()
	conn, err := godbus.Connect(bus.Address)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	p := &desktopPeer{t: t, name: name, conn: conn, nextID: 7000}
	switch name {
	case gnomeScreenSaverName:
		err = conn.Export(screenSaverMethods{p}, gnomeScreenSaverPath, gnomeScreenSaverName)
	case fdoScreenSaverName:
		err = conn.Export(screenSaverMethods{p}, fdoScreenSaverPath, fdoScreenSaverName)
	case sessionManagerName:
		err = conn.Export(sessionManagerMethods{p}, sessionManagerPath, sessionManagerName)
	case notificationsName:
		err = conn.Export(notificationsMethods{p}, notificationsPath, notificationsName)
	default:
		t.Fatalf("no stand-in for %s", name)
	}
	if err != nil {
		t.Fatalf("export %s: %v", name, err)
	}
	if r, err := conn.RequestName(name, godbus.NameFlagDoNotQueue); err != nil || r != godbus.RequestNameReplyPrimaryOwner {
		t.Fatalf("the stand-in could not own %s: %v %v", name, r, err)
	}
	return p
}

func (p *desktopPeer) record(msg godbus.Message, returned uint32) {
	c := peerCall{
		At:        time.Now(),
		Body:      append([]any(nil), msg.Body...),
		Signature: godbus.SignatureOf(msg.Body...).String(),
		Returned:  returned,
	}
	if v, ok := msg.Headers[godbus.FieldMember]; ok {
		c.Member, _ = v.Value().(string)
	}
	if v, ok := msg.Headers[godbus.FieldPath]; ok {
		c.Path, _ = v.Value().(godbus.ObjectPath)
	}
	if v, ok := msg.Headers[godbus.FieldInterface]; ok {
		c.Interface, _ = v.Value().(string)
	}
	if v, ok := msg.Headers[godbus.FieldSender]; ok {
		c.Sender, _ = v.Value().(string)
	}
	p.mu.Lock()
	p.calls = append(p.calls, c)
	p.mu.Unlock()
}

// Calls returns every call so far.
func (p *desktopPeer) Calls() []peerCall {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]peerCall(nil), p.calls...)
}

func (p *desktopPeer) count() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.calls)
}

func (p *desktopPeer) describe() string {
	var b strings.Builder
	for i, c := range p.Calls() {
		fmt.Fprintf(&b, "\n  %d: %s %s %s.%s(%s) %v", i, c.At.Format("15:04:05.000"), c.Path, c.Interface, c.Member, c.Signature, c.Body)
	}
	if b.Len() == 0 {
		return " none"
	}
	return b.String()
}

// waitCalls waits until the peer has received at least n calls and
// returns them; it fails the test after timeout.
func (p *desktopPeer) waitCalls(n int, timeout time.Duration, what string) []peerCall {
	p.t.Helper()
	deadline := time.Now().Add(timeout)
	for p.count() < n {
		if time.Now().After(deadline) {
			p.t.Fatalf("%s: %s got %d calls within %v, want %d; calls:%s", what, p.name, p.count(), timeout, n, p.describe())
		}
		time.Sleep(10 * time.Millisecond)
	}
	return p.Calls()
}

// quiet fails the test unless the peer has exactly n calls now and still
// exactly n after d.
func (p *desktopPeer) quiet(n int, d time.Duration, what string) {
	p.t.Helper()
	deadline := time.Now().Add(d)
	for {
		if got := p.count(); got != n {
			p.t.Fatalf("%s: %s has %d calls, want exactly %d; calls:%s", what, p.name, got, n, p.describe())
		}
		if time.Now().After(deadline) {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// The exported methods. A Message parameter is the raw call and does not
// count in the method's D-Bus signature, so a call with other arguments
// than the real service's is refused with InvalidArgs and never recorded.

type screenSaverMethods struct{ p *desktopPeer }

func (s screenSaverMethods) Lock(msg godbus.Message) *godbus.Error {
	s.p.record(msg, 0)
	return nil
}

// GetActive answers the peer's active flag (false unless setActive). The
// daemon asks it before every Lock, so it is counted apart from the calls
// the tests check.
func (s screenSaverMethods) GetActive() (bool, *godbus.Error) {
	s.p.mu.Lock()
	defer s.p.mu.Unlock()
	s.p.actives++
	return s.p.active, nil
}

// setActive sets what GetActive answers: true is a screen locked already.
func (p *desktopPeer) setActive(active bool) {
	p.mu.Lock()
	p.active = active
	p.mu.Unlock()
}

// activeCalls is the number of GetActive calls so far.
func (p *desktopPeer) activeCalls() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.actives
}

type sessionManagerMethods struct{ p *desktopPeer }

func (s sessionManagerMethods) Logout(msg godbus.Message, mode uint32) *godbus.Error {
	s.p.record(msg, 0)
	return nil
}

type notificationsMethods struct{ p *desktopPeer }

func (n notificationsMethods) Notify(msg godbus.Message, app string, replaces uint32, icon, summary, body string,
	actions []string, hints map[string]godbus.Variant, timeout int32) (uint32, *godbus.Error) {
	n.p.mu.Lock()
	n.p.nextID++
	id := n.p.nextID
	n.p.mu.Unlock()
	n.p.record(msg, id)
	return id, nil
}

// policyStack is one test's private pcscd (two vpcd readers), bus and
// client connection, and the daemon once started.
type policyStack struct {
	t     *testing.T
	pcscd *stack.PCSCD
	bus   *stack.DBus
	conn  *godbus.Conn
	obs   *stack.Observer
	d     *daemon
}

func newPolicyStack(t *testing.T) *policyStack {
	t.Helper()
	s := &policyStack{t: t}
	s.pcscd = stack.StartPCSCDForTest(t, stack.PCSCDConfig{Socket: pcscSocket, Dir: t.TempDir()})
	s.bus = stack.StartDBusForTest(t, "")
	s.conn = dial(t, s.bus)
	return s
}

// card makes a card for reader (0 or 1), closed at cleanup.
func (s *policyStack) card(reader int, p vcard.Profile) *vcard.Card {
	c := vcard.New(s.pcscd.Addr(reader), p)
	s.t.Cleanup(func() { c.Close() })
	return c
}

// insertBeforeStart inserts c and waits until pcscd shows the card in
// reader, so that the daemon finds it in its first look.
func (s *policyStack) insertBeforeStart(c *vcard.Card, reader int) {
	s.t.Helper()
	if s.obs == nil {
		s.obs = stack.NewObserverForTest(s.t, s.pcscd)
	}
	if err := c.Insert(); err != nil {
		s.t.Fatal(err)
	}
	if _, err := s.obs.WaitFor(s.pcscd.Readers()[reader], func(c stack.ObservedChange) bool { return c.Present }, 5*time.Second); err != nil {
		s.t.Fatal(err)
	}
}

// start runs the daemon on OpenSC with conf as its config file and env.
// A conf without a removal-grace line gets "removal-grace = 0": the tests
// in this file check that an action follows each removal at once; the
// grace has tests of its own (suspend_test.go).
func (s *policyStack) start(conf string, env []string, extra ...string) *daemon {
	s.t.Helper()
	if !strings.Contains(conf, "removal-grace") {
		conf = "removal-grace = 0\n" + conf
	}
	path := filepath.Join(s.t.TempDir(), "slotwatch.conf")
	if err := os.WriteFile(path, []byte(conf), 0o644); err != nil {
		s.t.Fatal(err)
	}
	s.d = startDaemon(s.t, s.bus, env, append([]string{"--module", stack.OpenSCModule, "--config", path}, extra...)...)
	return s.d
}

// hasLabel tells whether a token with label is on the bus.
func (s *policyStack) hasLabel(label string) bool {
	for _, ifaces := range managedObjects(s.t, s.conn) {
		if props, ok := ifaces[tokIface]; ok && props["Label"].Value() == label {
			return true
		}
	}
	return false
}

// waitLabel waits until the daemon shows (present) or no longer shows the
// token with label: the monitor has published the event, which the policy
// gets from the same monitor.
func (s *policyStack) waitLabel(label string, present bool) {
	s.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for s.hasLabel(label) != present {
		if time.Now().After(deadline) {
			s.t.Fatalf("token %q present=%v on the bus, want %v, after 10 s", label, !present, present)
		}
		time.Sleep(25 * time.Millisecond)
	}
}

// insert inserts c and waits until its token is on the bus.
func (s *policyStack) insert(c *vcard.Card, label string) {
	s.t.Helper()
	if err := c.Insert(); err != nil {
		s.t.Fatal(err)
	}
	s.waitLabel(label, true)
}

// remove removes c and waits until its token is gone from the bus.
func (s *policyStack) remove(c *vcard.Card, label string) {
	s.t.Helper()
	if err := c.Remove(); err != nil {
		s.t.Fatal(err)
	}
	s.waitLabel(label, false)
}

// stateReason is the Manager's StateReason.
func (s *policyStack) stateReason() string {
	s.t.Helper()
	v, err := s.conn.Object(busName, rootPath).GetProperty(mgrIface + ".StateReason")
	if err != nil {
		s.t.Fatalf("Get StateReason: %v", err)
	}
	r, ok := v.Value().(string)
	if !ok {
		s.t.Fatalf("StateReason is %s, want a string", v.Signature())
	}
	return r
}

// checkLock fails unless c is one Lock call, with no arguments, on the
// screensaver's object and interface.
func checkLock(t *testing.T, c peerCall, name string, path godbus.ObjectPath) {
	t.Helper()
	if c.Member != "Lock" || c.Interface != name || c.Path != path || len(c.Body) != 0 {
		t.Errorf("call %s %s.%s(%s) %v, want %s %s.Lock()", c.Path, c.Interface, c.Member, c.Signature, c.Body, path, name)
	}
}

// TestPolicyLoginTokenLock: removal-action = lock-screen with the
// login-token scope. The login card is in before the daemon starts, so the
// startup rule does not lock. Each removal of the login card locks exactly
// once (org.gnome.ScreenSaver.Lock, no arguments); inserting and removing
// another card, and reinserting the login card, do not.
func TestPolicyLoginTokenLock(t *testing.T) {
	s := newPolicyStack(t)
	ss := startDesktopPeer(t, s.bus, gnomeScreenSaverName)
	login := s.card(0, loginCardProfile)
	other := s.card(1, otherCardProfile)
	s.insertBeforeStart(login, 0)
	s.start("removal-action = lock-screen\nremoval-scope = login-token\n", loginEnv)
	s.waitLabel(loginCardProfile.Label, true)
	ss.quiet(0, time.Second, "login card present at start")

	s.remove(login, loginCardProfile.Label)
	calls := ss.waitCalls(1, 5*time.Second, "login card removed")
	checkLock(t, calls[0], gnomeScreenSaverName, gnomeScreenSaverPath)

	s.insert(other, otherCardProfile.Label)
	s.remove(other, otherCardProfile.Label)
	s.insert(login, loginCardProfile.Label)
	ss.quiet(1, 500*time.Millisecond, "another card inserted and removed, login card reinserted")

	s.remove(login, loginCardProfile.Label)
	calls = ss.waitCalls(2, 5*time.Second, "login card removed again")
	checkLock(t, calls[1], gnomeScreenSaverName, gnomeScreenSaverPath)
	ss.quiet(2, time.Second, "after the second removal")
	if r := s.stateReason(); r != "" {
		t.Errorf("StateReason %q after successful locks, want \"\"", r)
	}
}

// TestPolicyStartupRule: GNOME's rule — a session whose login token is not
// there when the daemon starts gets the removal action once, soon after
// the start, and never again; the rule does not apply to a serial scope or
// without PKCS11_LOGIN_TOKEN_NAME.
func TestPolicyStartupRule(t *testing.T) {
	for _, tc := range []struct {
		name  string
		conf  string
		env   []string
		other bool // "Other" is in reader 1 at start
		locks int
	}{
		{"no card", "removal-action = lock-screen\n", loginEnv, false, 1},
		{"another card only", "removal-action = lock-screen\nremoval-scope = login-token\n", loginEnv, true, 1},
		{"scope any", "removal-action = lock-screen\nremoval-scope = any\n", loginEnv, true, 1},
		{"scope serial", "removal-action = lock-screen\nremoval-scope = serial:" + loginCardProfile.Serial + "\n", loginEnv, false, 0},
		{"no login token name", "removal-action = lock-screen\nremoval-scope = any\n", nil, false, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newPolicyStack(t)
			ss := startDesktopPeer(t, s.bus, gnomeScreenSaverName)
			if tc.other {
				s.insertBeforeStart(s.card(1, otherCardProfile), 1)
			}
			started := time.Now()
			s.start(tc.conf, tc.env)
			if tc.other {
				s.waitLabel(otherCardProfile.Label, true)
			}
			if tc.locks > 0 {
				calls := ss.waitCalls(tc.locks, 5*time.Second, "login token absent at start")
				checkLock(t, calls[0], gnomeScreenSaverName, gnomeScreenSaverPath)
				t.Logf("startup lock %v after the daemon was started", calls[0].At.Sub(started).Round(time.Millisecond))
			}
			ss.quiet(tc.locks, time.Second, "after the start")
		})
	}
}

// TestPolicyScope: which removals lock, for the scopes "any" and
// "serial:": every removal of a token in scope locks exactly once,
// insertions never do. No login token is configured, so the startup rule
// stays out of it.
func TestPolicyScope(t *testing.T) {
	type step struct {
		insert bool
		card   int // 0: "Login Card" in reader 0, 1: "Other" in reader 1
		locks  int // the total number of Lock calls after the step
	}
	for _, tc := range []struct {
		name  string
		scope string
		steps []step
	}{
		{"any", "any", []step{
			{true, 0, 0}, {true, 1, 0}, {false, 0, 1}, {false, 1, 2}, {true, 1, 2}, {false, 1, 3}, {true, 0, 3}, {false, 0, 4},
		}},
		{"serial", "serial:" + otherCardProfile.Serial + ",00ff", []step{
			{true, 0, 0}, {true, 1, 0}, {false, 0, 0}, {false, 1, 1}, {true, 1, 1}, {false, 1, 2},
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newPolicyStack(t)
			ss := startDesktopPeer(t, s.bus, gnomeScreenSaverName)
			profiles := []vcard.Profile{loginCardProfile, otherCardProfile}
			cards := []*vcard.Card{s.card(0, profiles[0]), s.card(1, profiles[1])}
			s.start("removal-action = lock-screen\nremoval-scope = "+tc.scope+"\n", nil)
			locks := 0
			for i, st := range tc.steps {
				what := fmt.Sprintf("step %d: remove %s", i, profiles[st.card].Label)
				if st.insert {
					what = fmt.Sprintf("step %d: insert %s", i, profiles[st.card].Label)
					s.insert(cards[st.card], profiles[st.card].Label)
				} else {
					s.remove(cards[st.card], profiles[st.card].Label)
				}
				if st.locks > locks {
					calls := ss.waitCalls(st.locks, 5*time.Second, what)
					checkLock(t, calls[st.locks-1], gnomeScreenSaverName, gnomeScreenSaverPath)
					locks = st.locks
				}
				// Quiet long enough for a wrong lock to show before the
				// next step, and keep the last step's count for 1 s.
				d := 300 * time.Millisecond
				if i == len(tc.steps)-1 {
					d = time.Second
				}
				ss.quiet(locks, d, what)
			}
		})
	}
}

// TestPolicyForceLogout: removal-action = force-logout calls
// org.gnome.SessionManager.Logout with exactly one argument, uint32 2 (no
// confirmation), once per login token removal and once for the startup
// rule; the screensaver is not called.
func TestPolicyForceLogout(t *testing.T) {
	for _, tc := range []struct {
		name         string
		loginAtStart bool
	}{
		{"removal", true},
		{"startup", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newPolicyStack(t)
			ss := startDesktopPeer(t, s.bus, gnomeScreenSaverName)
			sm := startDesktopPeer(t, s.bus, sessionManagerName)
			login := s.card(0, loginCardProfile)
			if tc.loginAtStart {
				s.insertBeforeStart(login, 0)
			}
			s.start("removal-action = force-logout\n", loginEnv)
			if tc.loginAtStart {
				s.waitLabel(loginCardProfile.Label, true)
				sm.quiet(0, 500*time.Millisecond, "login card present at start")
				s.remove(login, loginCardProfile.Label)
			}
			c := sm.waitCalls(1, 5*time.Second, "login token gone")[0]
			if c.Member != "Logout" || c.Interface != sessionManagerName || c.Path != sessionManagerPath {
				t.Errorf("call %s %s.%s, want %s %s.Logout", c.Path, c.Interface, c.Member, sessionManagerPath, sessionManagerName)
			}
			if c.Signature != "u" || !reflect.DeepEqual(c.Body, []any{uint32(2)}) {
				t.Errorf("Logout(%s) %#v, want exactly one uint32 argument 2", c.Signature, c.Body)
			}
			sm.quiet(1, time.Second, "after the logout")
			ss.quiet(0, 0, "force-logout")
		})
	}
}

// TestPolicyLockTarget: org.gnome.ScreenSaver is preferred; with only
// org.freedesktop.ScreenSaver on the bus, its Lock is called instead.
func TestPolicyLockTarget(t *testing.T) {
	for _, tc := range []struct {
		name     string
		gnome    bool
		wantName string
		wantPath godbus.ObjectPath
	}{
		{"freedesktop fallback", false, fdoScreenSaverName, fdoScreenSaverPath},
		{"gnome preferred", true, gnomeScreenSaverName, gnomeScreenSaverPath},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newPolicyStack(t)
			fdo := startDesktopPeer(t, s.bus, fdoScreenSaverName)
			var gnome *desktopPeer
			if tc.gnome {
				gnome = startDesktopPeer(t, s.bus, gnomeScreenSaverName)
			}
			card := s.card(0, otherCardProfile)
			s.start("removal-action = lock-screen\nremoval-scope = any\n", nil)
			s.insert(card, otherCardProfile.Label)
			s.remove(card, otherCardProfile.Label)
			want, unwanted := fdo, gnome
			if tc.gnome {
				want, unwanted = gnome, fdo
			}
			checkLock(t, want.waitCalls(1, 5*time.Second, "card removed")[0], tc.wantName, tc.wantPath)
			want.quiet(1, time.Second, "after the removal")
			if unwanted != nil {
				unwanted.quiet(0, 0, "the other screensaver")
			}
			if r := s.stateReason(); r != "" {
				t.Errorf("StateReason %q after a successful lock, want \"\"", r)
			}
		})
	}
}

// TestPolicyMissingScreenSaver: without any screensaver on the bus, the
// login token's removal puts a problem naming the screensaver into the
// Manager's StateReason, and the daemon goes on: it keeps its name,
// answers GetManagedObjects and sees the next insertion. Once a
// screensaver is there, the next removal locks and the problem is gone.
func TestPolicyMissingScreenSaver(t *testing.T) {
	s := newPolicyStack(t)
	login := s.card(0, loginCardProfile)
	other := s.card(1, otherCardProfile)
	s.insertBeforeStart(login, 0)
	d := s.start("removal-action = lock-screen\n", loginEnv)
	s.waitLabel(loginCardProfile.Label, true)
	if r := s.stateReason(); r != "" {
		t.Fatalf("StateReason %q before any removal, want \"\"", r)
	}

	s.remove(login, loginCardProfile.Label)
	deadline := time.Now().Add(5 * time.Second)
	reason := s.stateReason()
	for !strings.Contains(strings.ToLower(reason), "screensaver") {
		if time.Now().After(deadline) {
			t.Fatalf("StateReason %q 5 s after the login token's removal without a screensaver, want a problem naming the screensaver", reason)
		}
		time.Sleep(25 * time.Millisecond)
		reason = s.stateReason()
	}
	t.Logf("StateReason: %s", reason)
	if strings.Contains(reason, "\n") {
		t.Errorf("StateReason %q is not one line", reason)
	}

	// Not fatal.
	select {
	case <-d.exited:
		t.Fatalf("the daemon exited after the failed lock: %v", d.cmd.ProcessState)
	default:
	}
	var has bool
	if err := s.conn.BusObject().Call("org.freedesktop.DBus.NameHasOwner", 0, busName).Store(&has); err != nil || !has {
		t.Fatalf("%s has no owner after the failed lock (%v)", busName, err)
	}
	managedObjects(t, s.conn)
	s.insert(other, otherCardProfile.Label)
	if r := s.stateReason(); r != reason {
		t.Errorf("StateReason changed to %q by an insertion, want the problem %q kept", r, reason)
	}

	ss := startDesktopPeer(t, s.bus, gnomeScreenSaverName)
	s.insert(login, loginCardProfile.Label)
	s.remove(login, loginCardProfile.Label)
	checkLock(t, ss.waitCalls(1, 5*time.Second, "login card removed with a screensaver")[0], gnomeScreenSaverName, gnomeScreenSaverPath)
	deadline = time.Now().Add(5 * time.Second)
	for r := s.stateReason(); strings.Contains(strings.ToLower(r), "screensaver"); r = s.stateReason() {
		if time.Now().After(deadline) {
			t.Fatalf("StateReason %q 5 s after a successful lock, want the problem gone", r)
		}
		time.Sleep(25 * time.Millisecond)
	}
	ss.quiet(1, 500*time.Millisecond, "after the lock")
	s.waitLabel(otherCardProfile.Label, true)
}

// TestPolicyNotify: with notify = true, an insertion and a removal are two
// org.freedesktop.Notifications.Notify calls naming the token's label; the
// second replaces the first (its replaces_id is the id the server returned
// for the first). With notify = false (also the default), none.
func TestPolicyNotify(t *testing.T) {
	for _, tc := range []struct {
		name     string
		conf     string
		notified bool
	}{
		{"notify", "notify = true\n", true},
		{"notify false", "notify = false\n", false},
		{"default", "", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newPolicyStack(t)
			ns := startDesktopPeer(t, s.bus, notificationsName)
			ss := startDesktopPeer(t, s.bus, gnomeScreenSaverName)
			label := "Notify Card"
			card := s.card(1, vcard.Profile{Label: label, Serial: "4e000001"})
			s.start(tc.conf, nil)

			s.insert(card, label)
			if tc.notified {
				ns.waitCalls(1, 5*time.Second, "card inserted")
			}
			s.remove(card, label)
			if !tc.notified {
				ns.quiet(0, time.Second, "notifications off")
				ss.quiet(0, 0, "removal action none")
				return
			}
			calls := ns.waitCalls(2, 5*time.Second, "card removed")
			ns.quiet(2, time.Second, "after the removal")
			ss.quiet(0, 0, "removal action none")
			const sig = "susssasa{sv}i"
			for i, c := range calls {
				if c.Member != "Notify" || c.Interface != notificationsName || c.Path != notificationsPath || c.Signature != sig {
					t.Fatalf("call %d: %s %s.%s(%s), want %s %s.Notify(%s)", i, c.Path, c.Interface, c.Member, c.Signature, notificationsPath, notificationsName, sig)
				}
				if body := c.Body[4].(string); !strings.Contains(body, label) {
					t.Errorf("notification %d: body %q does not name the token %q", i, body, label)
				}
			}
			if got := calls[0].Body[1].(uint32); got != 0 {
				t.Errorf("first notification: replaces_id %d, want 0 (a new one)", got)
			}
			if got, want := calls[1].Body[1].(uint32), calls[0].Returned; got != want {
				t.Errorf("second notification: replaces_id %d, want %d (the id returned for the first)", got, want)
			}
			ins, rem := strings.ToLower(calls[0].Body[3].(string)), strings.ToLower(calls[1].Body[3].(string))
			if !strings.Contains(ins, "insert") || !strings.Contains(rem, "remov") {
				t.Errorf("summaries %q then %q, want an insertion then a removal", calls[0].Body[3], calls[1].Body[3])
			}
		})
	}
}

// TestPolicyGnomeSettings: with --gnome-compat and no removal-action in the
// config, GNOME's removal-action setting decides, read at each removal:
// lock-screen locks on the login token's removal. A removal-action line in
// the config (even none) wins, and without --gnome-compat the setting is
// not read.
func TestPolicyGnomeSettings(t *testing.T) {
	for _, tc := range []struct {
		name  string
		conf  string
		gnome bool
		locks int
	}{
		{"setting decides", "removal-scope = login-token\n", true, 1},
		{"config wins", "removal-action = none\n", true, 0},
		{"without gnome-compat", "removal-scope = login-token\n", false, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			gs := stack.GSettingsForTest(t, stack.SmartcardSchema)
			stack.SetGSetting(t, gs, "org.gnome.settings-daemon.peripherals.smartcard", "removal-action", "lock-screen")
			s := newPolicyStack(t)
			ss := startDesktopPeer(t, s.bus, gnomeScreenSaverName)
			login := s.card(0, loginCardProfile)
			s.insertBeforeStart(login, 0)
			var extra []string
			if tc.gnome {
				extra = []string{"--gnome-compat"}
			}
			s.start(tc.conf, append(append([]string(nil), loginEnv...), gs...), extra...)
			s.waitLabel(loginCardProfile.Label, true)
			s.remove(login, loginCardProfile.Label)
			if tc.locks > 0 {
				checkLock(t, ss.waitCalls(tc.locks, 5*time.Second, "login card removed")[0], gnomeScreenSaverName, gnomeScreenSaverPath)
			}
			ss.quiet(tc.locks, time.Second, "after the removal")
			if r := s.stateReason(); r != "" {
				t.Errorf("StateReason %q, want \"\"", r)
			}
		})
	}
}

// TestPolicyReload: Manager.Reload applies a changed removal-action
// without a restart.
func TestPolicyReload(t *testing.T) {
	s := newPolicyStack(t)
	ss := startDesktopPeer(t, s.bus, gnomeScreenSaverName)
	other := s.card(1, otherCardProfile)
	d := s.start("removal-action = none\nremoval-scope = any\n", nil)
	conf := d.cmd.Args[slices.Index(d.cmd.Args, "--config")+1]

	s.insert(other, otherCardProfile.Label)
	s.remove(other, otherCardProfile.Label)
	ss.quiet(0, 500*time.Millisecond, "a removal with removal-action none")

	if err := os.WriteFile(conf, []byte("removal-action = lock-screen\nremoval-scope = any\nremoval-grace = 0\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := s.conn.Object(busName, rootPath).Call(mgrIface+".Reload", 0).Err; err != nil {
		t.Fatalf("Reload: %v", err)
	}
	s.insert(other, otherCardProfile.Label)
	s.remove(other, otherCardProfile.Label)
	checkLock(t, ss.waitCalls(1, 5*time.Second, "a removal after Reload to lock-screen")[0], gnomeScreenSaverName, gnomeScreenSaverPath)
}
