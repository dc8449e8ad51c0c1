package policy

import (
	"reflect"
	"strings"
	"testing"
	"time"
)

// The removal grace, sleep and resume, and the lock that is not repeated.
// Most cases drive handle, sleep, resume and expire directly with chosen
// times, so that nothing depends on how fast the machine is.

func TestGrace(t *testing.T) {
	addr := startBus(t)
	ss := startPeer(t, addr, gnomeScreenSaver, false)
	conn := connect(t, addr)
	const grace = time.Hour // expire is called with explicit times
	cfg := Config{Action: ActionLockScreen, LoginTokenName: "Alice", RemovalGrace: grace}
	alice := token(1, "Alice", "0123", "Reader 0")

	t.Run("back within the grace: no action", func(t *testing.T) {
		ss.reset()
		p, reports, logs := testPolicy(t, conn, cfg)
		p.handle(removed(alice))
		p.handle(inserted(token(2, "Alice", "0123    ", "Reader 1"))) // serial padding and reader do not matter
		p.expire(time.Now().Add(2 * grace))
		if n := ss.count("Lock"); n != 0 || len(reports.get()) != 0 {
			t.Errorf("%d Lock calls, reports %q; want none", n, reports.get())
		}
		if !strings.Contains(logs.String(), "token back within the removal grace; no removal action") {
			t.Errorf("the log does not say why nothing happened:\n%s", logs)
		}
	})

	t.Run("not back: one action once the grace is over", func(t *testing.T) {
		ss.reset()
		p, reports, logs := testPolicy(t, conn, cfg)
		before := time.Now()
		p.handle(removed(alice))
		p.expire(before.Add(grace - time.Second))
		if n := ss.count("Lock"); n != 0 {
			t.Fatalf("%d Lock calls before the grace was over", n)
		}
		p.expire(time.Now().Add(grace))
		p.expire(time.Now().Add(2 * grace))
		if n := ss.count("Lock"); n != 1 {
			t.Errorf("%d Lock calls after the grace, want 1", n)
		}
		if got := reports.get(); !reflect.DeepEqual(got, []string{""}) {
			t.Errorf("reports %q, want one success", got)
		}
		if !strings.Contains(logs.String(), "not back within the removal grace") || !strings.Contains(logs.String(), "generation=1") {
			t.Errorf("the log does not show the action with the reason and generation:\n%s", logs)
		}
	})

	t.Run("another card does not cancel it", func(t *testing.T) {
		ss.reset()
		p, _, _ := testPolicy(t, conn, cfg)
		p.handle(removed(alice))
		p.handle(inserted(token(2, "Alice", "9999", "")))   // same label, another serial
		p.handle(inserted(token(3, "Mallory", "0123", ""))) // same serial, another label
		p.expire(time.Now().Add(grace))
		if n := ss.count("Lock"); n != 1 {
			t.Errorf("%d Lock calls, want 1", n)
		}
	})

	t.Run("each removal waits on its own", func(t *testing.T) {
		ss.reset()
		p, _, _ := testPolicy(t, conn, cfg)
		p.handle(removed(alice))
		p.handle(inserted(token(2, "Alice", "0123", "")))
		p.handle(removed(token(2, "Alice", "0123", "")))
		p.expire(time.Now().Add(grace))
		if n := ss.count("Lock"); n != 1 {
			t.Errorf("removed, back, removed again: %d Lock calls, want 1", n)
		}
	})

	t.Run("out of scope: nothing waits", func(t *testing.T) {
		ss.reset()
		p, _, _ := testPolicy(t, conn, cfg)
		p.handle(removed(token(4, "Bob", "4567", "")))
		if len(p.pending) != 0 {
			t.Errorf("%d removals waiting, want 0", len(p.pending))
		}
	})

	t.Run("the startup rule does not wait", func(t *testing.T) {
		ss.reset()
		p, _, _ := testPolicy(t, conn, cfg)
		p.startup(snapshotWith())
		if n := ss.count("Lock"); n != 1 {
			t.Errorf("%d Lock calls at startup, want 1", n)
		}
	})

	t.Run("grace 0 acts at once, also while asleep", func(t *testing.T) {
		ss.reset()
		c := cfg
		c.RemovalGrace = 0
		p, _, _ := testPolicy(t, conn, c)
		p.sleep(time.Now())
		p.handle(removed(alice))
		if n := ss.count("Lock"); n != 1 {
			t.Errorf("%d Lock calls, want 1", n)
		}
	})
}

// Notifications do not wait for the grace.
func TestGraceNotifiesAtOnce(t *testing.T) {
	addr := startBus(t)
	ns := startPeer(t, addr, notifications, false)
	ss := startPeer(t, addr, gnomeScreenSaver, false)
	p, _, _ := testPolicy(t, connect(t, addr), Config{Action: ActionLockScreen, Scope: Scope{Kind: ScopeAny}, Notify: true, RemovalGrace: time.Hour})
	p.handle(removed(token(1, "Alice", "1", "R")))
	if got := ns.notifications(); len(got) != 1 || got[0].Summary != "Smart card removed" {
		t.Errorf("notifications %+v, want the removal at once", got)
	}
	if n := ss.count("Lock"); n != 0 {
		t.Errorf("%d Lock calls within the grace", n)
	}
}

// Between sleep and resume no grace runs; at the resume every waiting
// removal gets its whole grace, also one whose grace was running when the
// system went to sleep.
func TestGraceAcrossSleep(t *testing.T) {
	addr := startBus(t)
	ss := startPeer(t, addr, gnomeScreenSaver, false)
	conn := connect(t, addr)
	const grace = 3 * time.Second
	cfg := Config{Action: ActionLockScreen, LoginTokenName: "Alice", RemovalGrace: grace}
	alice := token(1, "Alice", "0123", "Reader 0")

	t.Run("removed while asleep, not back", func(t *testing.T) {
		ss.reset()
		p, _, logs := testPolicy(t, conn, cfg)
		t0 := time.Now()
		p.sleep(t0)
		p.handle(removed(alice))
		p.expire(t0.Add(time.Minute)) // asleep: nothing runs out
		if n := ss.count("Lock"); n != 0 {
			t.Fatalf("%d Lock calls while asleep", n)
		}
		t1 := t0.Add(90 * time.Second)
		p.resume(t1, "resumed from sleep")
		p.expire(t1.Add(grace - time.Millisecond))
		if n := ss.count("Lock"); n != 0 {
			t.Fatalf("%d Lock calls before the grace after the resume was over", n)
		}
		p.expire(t1.Add(grace))
		if n := ss.count("Lock"); n != 1 {
			t.Errorf("%d Lock calls after the grace, want 1", n)
		}
		for _, want := range []string{"going to sleep", "removal graces start now"} {
			if !strings.Contains(logs.String(), want) {
				t.Errorf("the log does not say %q:\n%s", want, logs)
			}
		}
	})

	t.Run("removed while asleep, back after the resume within the grace", func(t *testing.T) {
		ss.reset()
		p, _, _ := testPolicy(t, conn, cfg)
		t0 := time.Now()
		p.sleep(t0)
		p.handle(removed(alice))
		p.resume(t0.Add(time.Second), "resumed from sleep")
		p.handle(inserted(token(2, "Alice", "0123", "Reader 0")))
		p.expire(t0.Add(time.Hour))
		if n := ss.count("Lock"); n != 0 {
			t.Errorf("%d Lock calls, want 0", n)
		}
	})

	t.Run("grace running at sleep starts again at the resume", func(t *testing.T) {
		ss.reset()
		p, _, _ := testPolicy(t, conn, cfg)
		p.handle(removed(alice)) // due in 3 s
		t0 := time.Now()
		p.sleep(t0)
		p.expire(t0.Add(time.Minute))
		if n := ss.count("Lock"); n != 0 {
			t.Fatalf("%d Lock calls while asleep", n)
		}
		t1 := t0.Add(time.Minute)
		p.resume(t1, "resumed from sleep")
		p.expire(t1.Add(grace - time.Millisecond))
		if n := ss.count("Lock"); n != 0 {
			t.Fatalf("%d Lock calls before the grace after the resume was over", n)
		}
		p.expire(t1.Add(grace))
		if n := ss.count("Lock"); n != 1 {
			t.Errorf("%d Lock calls, want 1", n)
		}
	})

	t.Run("no resume: the wait ends after sleepHoldLimit", func(t *testing.T) {
		ss.reset()
		p, _, logs := testPolicy(t, conn, cfg)
		t0 := time.Now()
		p.sleep(t0)
		p.handle(removed(alice))
		limit := t0.Add(sleepHoldLimit)
		p.expire(limit.Add(-time.Millisecond))
		if p.asleep != true || ss.count("Lock") != 0 {
			t.Fatalf("asleep %v, %d Lock calls before the limit", p.asleep, ss.count("Lock"))
		}
		p.expire(limit)
		if p.asleep || ss.count("Lock") != 0 {
			t.Fatalf("asleep %v, %d Lock calls at the limit; want awake and the grace running", p.asleep, ss.count("Lock"))
		}
		p.expire(limit.Add(grace))
		if n := ss.count("Lock"); n != 1 {
			t.Errorf("%d Lock calls, want 1", n)
		}
		if !strings.Contains(logs.String(), "level=WARN msg=\"no resume within the limit") {
			t.Errorf("no warning about the missing resume:\n%s", logs)
		}
	})

	t.Run("resume without sleep, sleep twice", func(t *testing.T) {
		ss.reset()
		p, _, _ := testPolicy(t, conn, cfg)
		t0 := time.Now()
		p.resume(t0, "resumed from sleep")
		if p.asleep {
			t.Fatal("asleep after a lone resume")
		}
		p.sleep(t0)
		p.sleep(t0.Add(time.Minute)) // the limit counts from the first
		if want := t0.Add(sleepHoldLimit); !p.sleepLimit.Equal(want) {
			t.Errorf("sleep limit %v, want %v", p.sleepLimit, want)
		}
	})
}

// Through the goroutine: Sleep and Resume from another goroutine, the
// removal seen while asleep, the lock one grace after the resume.
func TestSleepResumeRunning(t *testing.T) {
	addr := startBus(t)
	ss := startPeer(t, addr, gnomeScreenSaver, false)
	const grace = 200 * time.Millisecond
	p, reports, logs := testPolicy(t, connect(t, addr), Config{Action: ActionLockScreen, LoginTokenName: "Alice", RemovalGrace: grace})
	src := newFakeSource()
	p.start(snapshotWith(token(1, "Alice", "1", "")), src)

	p.Sleep()
	waitFor(t, "the policy asleep", func() bool { return strings.Contains(logs.String(), "going to sleep") })
	src.ch <- removed(token(1, "Alice", "1", ""))
	waitFor(t, "the removal waiting", func() bool { return strings.Contains(logs.String(), "the removal action waits for the grace") })
	resumed := time.Now()
	p.Resume()
	waitFor(t, "the lock", func() bool { return ss.count("Lock") == 1 })
	if d := time.Since(resumed); d < grace {
		t.Errorf("locked %v after the resume, before the %v grace was over", d, grace)
	}
	waitFor(t, "the report", func() bool { return len(reports.get()) == 1 })

	// Back within the grace: no second lock. Nothing else would happen
	// but a lock after the grace, so wait the grace out (bounded).
	src.ch <- inserted(token(2, "Alice", "1", ""))
	src.ch <- removed(token(2, "Alice", "1", ""))
	src.ch <- inserted(token(3, "Alice", "1", ""))
	waitFor(t, "the card back", func() bool { return strings.Contains(logs.String(), "token back within the removal grace") })
	time.Sleep(2 * grace)
	if n := ss.count("Lock"); n != 1 {
		t.Errorf("%d Lock calls, want 1", n)
	}
	p.Close()
	p.Sleep() // after Close: harmless
}

// A screensaver that is active already is not asked to lock again.
func TestLockNotRepeated(t *testing.T) {
	tok := token(1, "Alice", "1", "")
	for _, tc := range []struct {
		name        string
		gnome, fdo  *bool // nil: not on the bus; else what GetActive answers
		gnomeLocks  int
		fdoLocks    int
		wantSkipped bool
	}{
		{"gnome active", ptr(true), nil, 0, 0, true},
		{"gnome not active", ptr(false), nil, 1, 0, false},
		{"freedesktop active", nil, ptr(true), 0, 0, true},
		{"freedesktop not active", nil, ptr(false), 0, 1, false},
		{"gnome decides first", ptr(false), ptr(true), 1, 0, false},
		{"gnome active and freedesktop not", ptr(true), ptr(false), 0, 0, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			addr := startBus(t)
			var gnome, fdo *peer
			if tc.gnome != nil {
				gnome = startPeer(t, addr, gnomeScreenSaver, false)
				gnome.setActive(*tc.gnome)
			}
			if tc.fdo != nil {
				fdo = startPeer(t, addr, fdoScreenSaver, false)
				fdo.setActive(*tc.fdo)
			}
			p, reports, logs := testPolicy(t, connect(t, addr), Config{Action: ActionLockScreen, Scope: Scope{Kind: ScopeAny}})
			p.handle(removed(tok))
			if gnome != nil && gnome.count("Lock") != tc.gnomeLocks {
				t.Errorf("%d GNOME Lock calls, want %d", gnome.count("Lock"), tc.gnomeLocks)
			}
			if fdo != nil && fdo.count("Lock") != tc.fdoLocks {
				t.Errorf("%d freedesktop Lock calls, want %d", fdo.count("Lock"), tc.fdoLocks)
			}
			if got := reports.get(); !reflect.DeepEqual(got, []string{""}) {
				t.Errorf("reports %q, want one success", got)
			}
			skipped := strings.Contains(logs.String(), "level=INFO msg=\"removal action lock-screen: the screen is locked already; not locking again\"")
			if skipped != tc.wantSkipped {
				t.Errorf("logged a skipped lock: %v, want %v:\n%s", skipped, tc.wantSkipped, logs)
			}
			if tc.fdo != nil && tc.gnome != nil && fdo.activeCalls() != 0 {
				t.Errorf("freedesktop asked GetActive %d times although GNOME's answered", fdo.activeCalls())
			}
		})
	}

	t.Run("force-logout does not ask", func(t *testing.T) {
		addr := startBus(t)
		ss := startPeer(t, addr, gnomeScreenSaver, false)
		ss.setActive(true)
		sm := startPeer(t, addr, sessionManager, false)
		p, _, _ := testPolicy(t, connect(t, addr), Config{Action: ActionForceLogout, Scope: Scope{Kind: ScopeAny}})
		p.handle(removed(tok))
		if n := len(sm.Calls()); n != 1 || ss.activeCalls() != 0 {
			t.Errorf("%d Logout calls and %d GetActive calls, want 1 and 0", n, ss.activeCalls())
		}
	})
}

func ptr[T any](v T) *T { return &v }

// SetConfig changes the grace of later removals.
func TestSetConfigGrace(t *testing.T) {
	addr := startBus(t)
	ss := startPeer(t, addr, gnomeScreenSaver, false)
	p, _, _ := testPolicy(t, connect(t, addr), Config{Action: ActionLockScreen, Scope: Scope{Kind: ScopeAny}, RemovalGrace: time.Hour})
	p.handle(removed(token(1, "A", "1", "")))
	if n := ss.count("Lock"); n != 0 {
		t.Fatalf("%d Lock calls within the grace", n)
	}
	p.SetConfig(Config{Action: ActionLockScreen, Scope: Scope{Kind: ScopeAny}})
	p.takeConfig()
	p.handle(removed(token(2, "B", "2", "")))
	if n := ss.count("Lock"); n != 1 {
		t.Errorf("%d Lock calls after SetConfig without a grace, want 1", n)
	}
	if len(p.pending) != 1 || p.pending[0].tok.Generation != 1 {
		t.Errorf("waiting %+v, want the first removal still waiting", p.pending)
	}
}
