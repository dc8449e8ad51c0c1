package policy

import (
	"os"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/slotwatch/slotwatch/monitor"
	"github.com/slotwatch/slotwatch/tests/stack"
)

// Which removals lock, per scope. Every case runs on one bus with GNOME's
// screensaver; Lock calls are counted per case.
func TestRemovalScope(t *testing.T) {
	addr := startBus(t)
	ss := startPeer(t, addr, gnomeScreenSaver, false)
	conn := connect(t, addr)

	login := token(1, "Alice", "0123", "Reader 0")
	other := token(2, "Bob", "4567", "Reader 1")
	padded := token(3, "Carol", "89AB    ", "")
	tests := []struct {
		name   string
		cfg    Config
		events []monitor.Event
		locks  int
	}{
		{"login-token: the login token's removal locks once",
			Config{Action: ActionLockScreen, Scope: Scope{Kind: ScopeLoginToken}, LoginTokenName: "Alice"},
			[]monitor.Event{removed(login)}, 1},
		{"login-token is the zero scope",
			Config{Action: ActionLockScreen, LoginTokenName: "Alice"},
			[]monitor.Event{removed(login)}, 1},
		{"login-token: another token's removal does nothing",
			Config{Action: ActionLockScreen, Scope: Scope{Kind: ScopeLoginToken}, LoginTokenName: "Alice"},
			[]monitor.Event{removed(other), removed(padded)}, 0},
		{"login-token: insertion and change do nothing",
			Config{Action: ActionLockScreen, Scope: Scope{Kind: ScopeLoginToken}, LoginTokenName: "Alice"},
			[]monitor.Event{inserted(login), changed(login)}, 0},
		{"login-token without PKCS11_LOGIN_TOKEN_NAME: nothing",
			Config{Action: ActionLockScreen, Scope: Scope{Kind: ScopeLoginToken}},
			[]monitor.Event{removed(login), removed(other)}, 0},
		{"login-token: each removal of the login token locks",
			Config{Action: ActionLockScreen, LoginTokenName: "Alice"},
			[]monitor.Event{inserted(login), removed(login), inserted(token(4, "Alice", "0123", "")), removed(token(4, "Alice", "0123", ""))}, 2},
		{"any: every removal locks",
			Config{Action: ActionLockScreen, Scope: Scope{Kind: ScopeAny}, LoginTokenName: "Alice"},
			[]monitor.Event{removed(login), removed(other), removed(padded)}, 3},
		{"any: insertions do nothing",
			Config{Action: ActionLockScreen, Scope: Scope{Kind: ScopeAny}},
			[]monitor.Event{inserted(login), inserted(other)}, 0},
		{"serial: only listed serials, padding trimmed",
			Config{Action: ActionLockScreen, Scope: Scope{Kind: ScopeSerial, Serials: []string{"89AB", "4567"}}, LoginTokenName: "Alice"},
			[]monitor.Event{removed(login), removed(other), removed(padded)}, 2},
		{"action none: nothing",
			Config{Action: ActionNone, Scope: Scope{Kind: ScopeAny}},
			[]monitor.Event{removed(login)}, 0},
		{"no action and no gsettings: nothing",
			Config{Scope: Scope{Kind: ScopeAny}},
			[]monitor.Event{removed(login)}, 0},
		{"events without a token are ignored",
			Config{Action: ActionLockScreen, Scope: Scope{Kind: ScopeAny}},
			[]monitor.Event{{Kind: monitor.StateChanged, Snapshot: snapshotWith()}, {Kind: monitor.SlotRemoved, Slot: &monitor.Slot{}, Snapshot: snapshotWith()}}, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ss.reset()
			p, reports, logs := testPolicy(t, conn, tt.cfg)
			for _, ev := range tt.events {
				p.handle(ev)
			}
			if got := ss.count("Lock"); got != tt.locks {
				t.Errorf("%d Lock calls, want %d", got, tt.locks)
			}
			got := reports.get()
			if len(got) != tt.locks || strings.Join(got, "") != "" {
				t.Errorf("reports %q, want %d successes (\"\")", got, tt.locks)
			}
			if tt.locks > 0 {
				if n := logs.count("removal action"); n < tt.locks || !strings.Contains(logs.String(), "generation=") {
					t.Errorf("log does not show the action with the token's generation:\n%s", logs)
				}
			}
		})
	}
}

func TestLockFallsBackToFreedesktop(t *testing.T) {
	addr := startBus(t)
	fdo := startPeer(t, addr, fdoScreenSaver, false)
	p, reports, _ := testPolicy(t, connect(t, addr), Config{Action: ActionLockScreen, Scope: Scope{Kind: ScopeAny}})
	p.handle(removed(token(7, "Alice", "1", "")))
	if got := fdo.count("Lock"); got != 1 {
		t.Errorf("%d org.freedesktop.ScreenSaver.Lock calls, want 1", got)
	}
	if got := reports.get(); !reflect.DeepEqual(got, []string{""}) {
		t.Errorf("reports %q, want one success", got)
	}
}

// With both screensavers, GNOME's is used and the other is left alone.
func TestLockPrefersGnome(t *testing.T) {
	addr := startBus(t)
	gnome := startPeer(t, addr, gnomeScreenSaver, false)
	fdo := startPeer(t, addr, fdoScreenSaver, false)
	p, _, _ := testPolicy(t, connect(t, addr), Config{Action: ActionLockScreen, Scope: Scope{Kind: ScopeAny}})
	p.handle(removed(token(7, "Alice", "1", "")))
	if g, f := gnome.count("Lock"), fdo.count("Lock"); g != 1 || f != 0 {
		t.Errorf("Lock calls: gnome %d, freedesktop %d; want 1, 0", g, f)
	}
}

func TestForceLogout(t *testing.T) {
	addr := startBus(t)
	sm := startPeer(t, addr, sessionManager, false)
	ss := startPeer(t, addr, gnomeScreenSaver, false)
	p, reports, _ := testPolicy(t, connect(t, addr), Config{Action: ActionForceLogout, LoginTokenName: "Alice"})
	p.handle(removed(token(3, "Alice", "1", "")))
	if got, want := sm.Calls(), []call{{"Logout", []any{uint32(2)}}}; !reflect.DeepEqual(got, want) {
		t.Errorf("session manager calls %+v, want %+v", got, want)
	}
	if n := ss.count("Lock"); n != 0 {
		t.Errorf("force-logout also locked (%d)", n)
	}
	if got := reports.get(); !reflect.DeepEqual(got, []string{""}) {
		t.Errorf("reports %q, want one success", got)
	}
}

func TestForceLogoutFailureIsReported(t *testing.T) {
	addr := startBus(t)
	p, reports, _ := testPolicy(t, connect(t, addr), Config{Action: ActionForceLogout, Scope: Scope{Kind: ScopeAny}})
	p.handle(removed(token(3, "Alice", "1", "")))
	got := reports.get()
	if len(got) != 1 || !strings.HasPrefix(got[0], "removal action force-logout failed: ") || !strings.Contains(got[0], "org.gnome.SessionManager") {
		t.Errorf("reports %q, want one naming org.gnome.SessionManager", got)
	}
}

// Without any screensaver the failure is reported and the policy goes on;
// once a screensaver is there, the next removal locks and clears the
// problem.
func TestNoScreenSaver(t *testing.T) {
	addr := startBus(t)
	p, reports, logs := testPolicy(t, connect(t, addr), Config{Action: ActionLockScreen, Scope: Scope{Kind: ScopeAny}})
	src := newFakeSource()
	p.start(snapshotWith(), src)

	src.ch <- removed(token(1, "Alice", "1", ""))
	waitFor(t, "a report", func() bool { return len(reports.get()) == 1 })
	problem := reports.get()[0]
	for _, want := range []string{"removal action lock-screen failed: no screensaver on the bus (neither org.gnome.ScreenSaver nor org.freedesktop.ScreenSaver)"} {
		if !strings.Contains(problem, want) {
			t.Errorf("problem %q does not contain %q", problem, want)
		}
	}
	if strings.Contains(problem, "\n") {
		t.Errorf("problem %q is not one line", problem)
	}
	if !strings.Contains(logs.String(), "level=ERROR") {
		t.Errorf("the failure was not logged as an error:\n%s", logs)
	}

	ss := startPeer(t, addr, gnomeScreenSaver, false)
	src.ch <- removed(token(2, "Bob", "2", ""))
	waitFor(t, "a second report", func() bool { return len(reports.get()) == 2 })
	if got := reports.get()[1]; got != "" {
		t.Errorf("second report %q, want \"\" (success)", got)
	}
	if n := ss.count("Lock"); n != 1 {
		t.Errorf("%d Lock calls, want 1", n)
	}
}

// GNOME's rule: a session whose login token is gone when slotwatch starts
// gets the action at once.
func TestStartupRule(t *testing.T) {
	addr := startBus(t)
	ss := startPeer(t, addr, gnomeScreenSaver, false)
	conn := connect(t, addr)
	alice := token(5, "Alice", "1", "Reader 0")
	bob := token(6, "Bob", "2", "Reader 1")
	tests := []struct {
		name  string
		cfg   Config
		snap  *monitor.Snapshot
		locks int
	}{
		{"login token absent", Config{Action: ActionLockScreen, LoginTokenName: "Alice"}, snapshotWith(bob), 1},
		{"no token at all", Config{Action: ActionLockScreen, LoginTokenName: "Alice"}, snapshotWith(), 1},
		{"scope any, login token absent", Config{Action: ActionLockScreen, Scope: Scope{Kind: ScopeAny}, LoginTokenName: "Alice"}, snapshotWith(bob), 1},
		{"login token present", Config{Action: ActionLockScreen, LoginTokenName: "Alice"}, snapshotWith(bob, alice), 0},
		{"no login token name", Config{Action: ActionLockScreen, Scope: Scope{Kind: ScopeAny}}, snapshotWith(), 0},
		{"scope serial", Config{Action: ActionLockScreen, Scope: Scope{Kind: ScopeSerial, Serials: []string{"1"}}, LoginTokenName: "Alice"}, snapshotWith(), 0},
		{"action none", Config{Action: ActionNone, LoginTokenName: "Alice"}, snapshotWith(), 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ss.reset()
			p, reports, logs := testPolicy(t, conn, tt.cfg)
			p.startup(tt.snap)
			if got := ss.count("Lock"); got != tt.locks {
				t.Errorf("%d Lock calls, want %d", got, tt.locks)
			}
			if len(reports.get()) != tt.locks {
				t.Errorf("reports %q, want %d", reports.get(), tt.locks)
			}
			if tt.locks > 0 && !strings.Contains(logs.String(), "login token absent at startup") {
				t.Errorf("the log does not say why:\n%s", logs)
			}
		})
	}

	// Through Start, with a real (empty) monitor: once, and not again.
	t.Run("Start", func(t *testing.T) {
		ss.reset()
		mon, err := monitor.New(monitor.Config{})
		if err != nil {
			t.Fatal(err)
		}
		defer mon.Close()
		reports := &reportLog{}
		p := Start(conn, mon, Config{Action: ActionLockScreen, LoginTokenName: "Alice", Report: reports.add})
		defer p.Close()
		waitFor(t, "the startup lock", func() bool { return len(reports.get()) == 1 })
		time.Sleep(50 * time.Millisecond)
		if got := ss.count("Lock"); got != 1 {
			t.Errorf("%d Lock calls, want 1", got)
		}
		// The monitor closing ends the policy's goroutine; Close still works.
		mon.Close()
		select {
		case <-p.done:
		case <-time.After(5 * time.Second):
			t.Fatal("the policy did not end with its monitor")
		}
		p.Close()
	})
}

func TestNotifications(t *testing.T) {
	addr := startBus(t)
	ns := startPeer(t, addr, notifications, false)
	ss := startPeer(t, addr, gnomeScreenSaver, false)
	p, reports, _ := testPolicy(t, connect(t, addr), Config{Action: ActionLockScreen, Notify: true, Scope: Scope{Kind: ScopeAny}})
	src := newFakeSource()
	p.start(snapshotWith(), src)
	tok := token(9, "A&B <x>", "1", "Virtual <PCD> 00 00")
	src.ch <- inserted(tok)
	src.ch <- removed(tok)
	src.ch <- changed(tok)
	waitFor(t, "two notifications", func() bool { return len(ns.notifications()) == 2 })
	waitFor(t, "the report of the lock", func() bool { return len(reports.get()) == 1 })
	time.Sleep(50 * time.Millisecond)

	got := ns.notifications()
	if len(got) != 2 {
		t.Fatalf("%d notifications, want 2: %+v", len(got), got)
	}
	for i, want := range []struct{ summary, category string }{{"Smart card inserted", "device.added"}, {"Smart card removed", "device.removed"}} {
		n := got[i]
		if n.App != "slotwatch" || n.Summary != want.summary || n.Icon == "" || n.Timeout != -1 || len(n.Actions) != 0 {
			t.Errorf("notification %d = %+v", i, n)
		}
		if n.Body != "A&amp;B &lt;x&gt; in Virtual &lt;PCD&gt; 00 00" {
			t.Errorf("notification %d body %q, want the escaped label and reader", i, n.Body)
		}
		if c, ok := n.Hints["category"].Value().(string); !ok || c != want.category {
			t.Errorf("notification %d category %v, want %s", i, n.Hints["category"], want.category)
		}
		if tr, ok := n.Hints["transient"].Value().(bool); !ok || !tr {
			t.Errorf("notification %d transient %v, want true", i, n.Hints["transient"])
		}
	}
	if got[0].Replaces != 0 {
		t.Errorf("first notification replaces %d, want 0", got[0].Replaces)
	}
	if got[1].Replaces != got[0].ID || got[0].ID == 0 {
		t.Errorf("second notification replaces %d, want the first's id %d", got[1].Replaces, got[0].ID)
	}
	if n := ss.count("Lock"); n != 1 {
		t.Errorf("%d Lock calls, want 1", n)
	}
}

func TestNotificationBodyWithoutReader(t *testing.T) {
	addr := startBus(t)
	ns := startPeer(t, addr, notifications, false)
	p, _, _ := testPolicy(t, connect(t, addr), Config{Notify: true})
	p.handle(inserted(token(1, "Token", "1", "")))
	p.handle(inserted(token(2, "", "2", "R")))
	got := ns.notifications()
	if len(got) != 2 || got[0].Body != "Token" || !strings.HasSuffix(got[1].Body, " in R") || got[1].Body == " in R" {
		t.Errorf("notifications %+v", got)
	}
}

func TestNotifyOff(t *testing.T) {
	addr := startBus(t)
	ns := startPeer(t, addr, notifications, false)
	p, _, _ := testPolicy(t, connect(t, addr), Config{Scope: Scope{Kind: ScopeAny}})
	tok := token(1, "Alice", "1", "R")
	p.handle(inserted(tok))
	p.handle(removed(tok))
	if got := ns.Calls(); len(got) != 0 {
		t.Errorf("calls with Notify false: %+v", got)
	}
}

// A missing notification server is warned about once per outage, is not
// reported, and does not stop later notifications.
func TestNotifyOutage(t *testing.T) {
	addr := startBus(t)
	p, reports, logs := testPolicy(t, connect(t, addr), Config{Notify: true})
	tok := token(1, "Alice", "1", "R")
	p.handle(inserted(tok))
	p.handle(removed(tok))
	if n := logs.count("desktop notification failed"); n != 1 {
		t.Errorf("%d warnings for two failed notifications, want 1:\n%s", n, logs)
	}
	if got := reports.get(); len(got) != 0 {
		t.Errorf("notification failures were reported: %q", got)
	}
	ns := startPeer(t, addr, notifications, false)
	p.handle(inserted(tok))
	p.handle(removed(tok))
	got := ns.notifications()
	if len(got) != 2 || got[0].Replaces != 0 || got[1].Replaces != got[0].ID {
		t.Errorf("notifications after the server came: %+v", got)
	}
	if !strings.Contains(logs.String(), "desktop notifications work again") {
		t.Errorf("the recovery was not logged:\n%s", logs)
	}
}

// gsettingsEnv is the whole environment of a gsettings child in a private
// GSettings world with schemaXML ("" for none).
func gsettingsEnv(t *testing.T, schemaXML string) []string {
	return append(os.Environ(), stack.GSettingsForTest(t, schemaXML)...)
}

// otherSchema is some schema that is not GNOME's smartcard one.
const otherSchema = `<schemalist>
  <schema id="org.example.slotwatch.other" path="/org/example/slotwatch/other/">
    <key name="removal-action" type="s">
      <default>'lock-screen'</default>
    </key>
  </schema>
</schemalist>
`

func gsettingsSet(t *testing.T, env []string, value string) {
	stack.SetGSetting(t, env, gsettingsSchema, gsettingsKey, value)
}

func TestGSettings(t *testing.T) {
	addr := startBus(t)
	ss := startPeer(t, addr, gnomeScreenSaver, false)
	sm := startPeer(t, addr, sessionManager, false)
	conn := connect(t, addr)
	tok := token(1, "Alice", "1", "")
	cfg := Config{GSettings: true, LoginTokenName: "Alice"}

	t.Run("the value at each removal applies", func(t *testing.T) {
		ss.reset()
		sm.reset()
		env := gsettingsEnv(t, stack.SmartcardSchema)
		p, reports, _ := testPolicy(t, conn, cfg)
		p.env = env

		p.handle(removed(tok)) // the default: none
		if n := ss.count("Lock"); n != 0 || len(reports.get()) != 0 {
			t.Errorf("default none: %d Lock calls, reports %q", n, reports.get())
		}
		gsettingsSet(t, env, "lock-screen")
		p.handle(removed(tok))
		if n := ss.count("Lock"); n != 1 {
			t.Errorf("lock-screen: %d Lock calls, want 1", n)
		}
		gsettingsSet(t, env, "force-logout")
		p.handle(removed(tok))
		if got := sm.Calls(); len(got) != 1 || !reflect.DeepEqual(got[0].Args, []any{uint32(2)}) {
			t.Errorf("force-logout: session manager calls %+v", got)
		}
		gsettingsSet(t, env, "none")
		p.handle(removed(tok))
		if n, m := ss.count("Lock"), len(sm.Calls()); n != 1 || m != 1 {
			t.Errorf("none: %d Lock and %d Logout calls after, want 1 and 1", n, m)
		}
		if got := reports.get(); !reflect.DeepEqual(got, []string{"", ""}) {
			t.Errorf("reports %q, want two successes", got)
		}
	})

	t.Run("the configured action wins", func(t *testing.T) {
		ss.reset()
		sm.reset()
		env := gsettingsEnv(t, stack.SmartcardSchema)
		gsettingsSet(t, env, "force-logout")
		c := cfg
		c.Action = ActionLockScreen
		p, _, _ := testPolicy(t, conn, c)
		p.env = env
		p.handle(removed(tok))
		if n, m := ss.count("Lock"), len(sm.Calls()); n != 1 || m != 0 {
			t.Errorf("%d Lock and %d Logout calls, want 1 and 0", n, m)
		}
	})

	t.Run("without GSettings the setting is not read", func(t *testing.T) {
		ss.reset()
		env := gsettingsEnv(t, stack.SmartcardSchema)
		gsettingsSet(t, env, "lock-screen")
		c := cfg
		c.GSettings = false
		p, _, _ := testPolicy(t, conn, c)
		p.env = env
		p.handle(removed(tok))
		if n := ss.count("Lock"); n != 0 {
			t.Errorf("%d Lock calls, want 0", n)
		}
	})

	for _, tc := range []struct{ name, schema, gsettings string }{
		{"schema missing", otherSchema, ""},
		{"no schemas at all", "", ""},
		{"gsettings missing", stack.SmartcardSchema, "slotwatch-test-no-such-gsettings"},
		{"gsettings missing (absolute path)", stack.SmartcardSchema, "/nonexistent/gsettings"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ss.reset()
			env := gsettingsEnv(t, tc.schema)
			if tc.schema == stack.SmartcardSchema {
				gsettingsSet(t, env, "lock-screen")
			}
			p, reports, logs := testPolicy(t, conn, cfg)
			p.env = env
			if tc.gsettings != "" {
				p.gsettings = tc.gsettings
			}
			p.handle(removed(tok))
			p.handle(removed(tok))
			p.startup(snapshotWith())
			if n := ss.count("Lock"); n != 0 || len(reports.get()) != 0 {
				t.Errorf("%d Lock calls, reports %q; want none", n, reports.get())
			}
			if n := logs.count("setting is not available"); n != 1 {
				t.Errorf("%d log lines about the missing setting, want 1:\n%s", n, logs)
			}
		})
	}

	t.Run("an unknown value is reported", func(t *testing.T) {
		ss.reset()
		env := gsettingsEnv(t, stack.SmartcardSchema)
		gsettingsSet(t, env, "'lock'")
		p, reports, _ := testPolicy(t, conn, cfg)
		p.env = env
		p.handle(removed(tok))
		got := reports.get()
		if len(got) != 1 || !strings.Contains(got[0], `unknown value "lock"`) || ss.count("Lock") != 0 {
			t.Errorf("reports %q, %d Lock calls; want one problem naming the value and no lock", got, ss.count("Lock"))
		}
	})
}

// Close is idempotent, returns at once when idle, and abandons a call in
// flight rather than waiting for its timeout.
func TestClose(t *testing.T) {
	addr := startBus(t)
	conn := connect(t, addr)

	t.Run("idle", func(t *testing.T) {
		p, _, _ := testPolicy(t, conn, Config{Action: ActionLockScreen})
		p.start(snapshotWith(), newFakeSource())
		start := time.Now()
		p.Close()
		p.Close()
		if d := time.Since(start); d > time.Second {
			t.Errorf("Close took %v", d)
		}
	})

	t.Run("never started", func(t *testing.T) {
		p, _, _ := testPolicy(t, conn, Config{})
		p.Close()
		p.Close()
	})

	t.Run("during a stuck Lock call", func(t *testing.T) {
		ss := startPeer(t, addr, gnomeScreenSaver, true) // never answers
		p, reports, _ := testPolicy(t, conn, Config{Action: ActionLockScreen, Scope: Scope{Kind: ScopeAny}})
		p.timeout = callTimeout // the real one
		src := newFakeSource()
		p.start(snapshotWith(), src)
		src.ch <- removed(token(1, "Alice", "1", ""))
		waitFor(t, "the Lock call", func() bool { return ss.count("Lock") == 1 })
		start := time.Now()
		done := make(chan struct{})
		go func() {
			p.Close()
			p.Close()
			close(done)
		}()
		select {
		case <-done:
		case <-time.After(callTimeout + 2*time.Second):
			t.Fatal("Close hangs on a stuck call")
		}
		if d := time.Since(start); d > time.Second {
			t.Errorf("Close took %v with a call in flight, want it abandoned at once", d)
		}
		if got := reports.get(); len(got) != 0 {
			t.Errorf("an abandoned action was reported: %q", got)
		}
	})

	t.Run("a stuck call times out and the policy goes on", func(t *testing.T) {
		addr := startBus(t)
		stuck := startPeer(t, addr, gnomeScreenSaver, true)
		fdo := startPeer(t, addr, fdoScreenSaver, false)
		p, reports, _ := testPolicy(t, connect(t, addr), Config{Action: ActionLockScreen, Scope: Scope{Kind: ScopeAny}})
		p.timeout = 200 * time.Millisecond
		p.handle(removed(token(1, "Alice", "1", "")))
		if g, f := stuck.count("Lock"), fdo.count("Lock"); g != 1 || f != 1 {
			t.Errorf("Lock calls: gnome %d, freedesktop %d; want 1 and 1 (fallback after the timeout)", g, f)
		}
		if got := reports.get(); !reflect.DeepEqual(got, []string{""}) {
			t.Errorf("reports %q, want one success", got)
		}
	})
}

// The connection the policy uses is the daemon's: the policy never closes
// it.
func TestConnStaysOpen(t *testing.T) {
	addr := startBus(t)
	conn := connect(t, addr)
	p, _, _ := testPolicy(t, conn, Config{})
	p.start(snapshotWith(), newFakeSource())
	p.Close()
	if err := conn.BusObject().Call("org.freedesktop.DBus.Peer.Ping", 0).Err; err != nil {
		t.Errorf("the bus connection is unusable after Close: %v", err)
	}
}

// TestStartupRuleWaitsForRunning: a first snapshot taken while the monitor
// is degraded (pcscd down) may miss the login card, so the startup rule
// waits for the first running snapshot and decides on it.
func TestStartupRuleWaitsForRunning(t *testing.T) {
	addr := startBus(t)
	ss := startPeer(t, addr, gnomeScreenSaver, false)
	conn := connect(t, addr)
	alice := token(5, "Alice", "1", "Reader 0")
	degraded := snapshotWith()
	degraded.State = monitor.StateDegraded
	for _, tt := range []struct {
		name    string
		running *monitor.Snapshot
		locks   int
	}{
		{"login token there once running", snapshotWith(alice), 0},
		{"login token absent once running", snapshotWith(), 1},
	} {
		t.Run(tt.name, func(t *testing.T) {
			ss.reset()
			p, _, _ := testPolicy(t, conn, Config{Action: ActionLockScreen, LoginTokenName: "Alice"})
			p.startup(degraded)
			if got := ss.count("Lock"); got != 0 {
				t.Fatalf("%d Lock calls on a degraded first snapshot", got)
			}
			p.handle(monitor.Event{Kind: monitor.StateChanged, Snapshot: tt.running})
			p.handle(monitor.Event{Kind: monitor.StateChanged, Snapshot: tt.running}) // decided once
			if got := ss.count("Lock"); got != tt.locks {
				t.Errorf("%d Lock calls, want %d", got, tt.locks)
			}
		})
	}
}

// TestSetConfig: a new configuration (Manager.Reload) applies from the
// next event on.
func TestSetConfig(t *testing.T) {
	addr := startBus(t)
	ss := startPeer(t, addr, gnomeScreenSaver, false)
	conn := connect(t, addr)
	bob := token(6, "Bob", "2", "Reader 1")
	p, _, _ := testPolicy(t, conn, Config{Action: ActionNone, Scope: Scope{Kind: ScopeAny}})
	p.takeConfig()
	p.handle(removed(bob))
	if got := ss.count("Lock"); got != 0 {
		t.Fatalf("%d Lock calls with action none", got)
	}
	p.SetConfig(Config{Action: ActionLockScreen, Scope: Scope{Kind: ScopeAny}})
	p.takeConfig()
	p.handle(removed(bob))
	if got := ss.count("Lock"); got != 1 {
		t.Fatalf("%d Lock calls after SetConfig(lock-screen), want 1", got)
	}
}
