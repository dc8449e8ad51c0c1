package monitor_test

// Tests with the fault-injection PKCS#11 module (tests/faultmod): what no
// real module does on demand — errors on cue, a wait that hangs.

import (
	"context"
	"testing"
	"time"

	"github.com/miekg/pkcs11"

	"github.com/slotwatch/slotwatch/module"
	"github.com/slotwatch/slotwatch/monitor"
	"github.com/slotwatch/slotwatch/tests/faultmod"
)

// faultWorld loads the fault module into a monitor (no PC/SC) and returns
// its control channel.
func faultWorld(t *testing.T, cfg monitor.Config) (*faultmod.Control, *monitor.Monitor, *monitor.Subscription) {
	t.Helper()
	path, err := faultmod.Path()
	if err != nil {
		t.Fatal(err)
	}
	mod := module.Open(path, module.Options{Name: "fault"})
	cfg.Modules = []monitor.Module{mod}
	if cfg.RetryMin == 0 {
		cfg.RetryMin = 20 * time.Millisecond
	}
	mon, err := monitor.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { mon.Close() })
	ctl, err := faultmod.DialTimeout(faultSocket, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	// The module stays loaded across tests (one process): start empty.
	clean := func() {
		ctl.Reset()
		for slot := range uint(4) {
			ctl.Remove(slot) // an empty slot answers an error; fine
		}
	}
	clean()
	t.Cleanup(func() { clean(); ctl.Close() })
	_, sub := mon.Subscribe()
	t.Cleanup(sub.Close)
	return ctl, mon, sub
}

// nextEvent returns the next event of one of kinds.
func nextEvent(t *testing.T, sub *monitor.Subscription, kinds ...monitor.EventKind) monitor.Event {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for {
		ev, err := sub.Next(ctx)
		if err != nil {
			t.Fatalf("waiting for %v: %v", kinds, err)
		}
		for _, k := range kinds {
			if ev.Kind == k {
				return ev
			}
		}
	}
}

// TestFailingModuleIsReinitialized (rule 6): a module whose reads keep
// failing with CKR_DEVICE_ERROR is reported failed, its tokens are removed,
// it is finalized and initialized again with backoff, and its token comes
// back with a new generation.
func TestFailingModuleIsReinitialized(t *testing.T) {
	ctl, mon, sub := faultWorld(t, monitor.Config{})
	if err := ctl.Insert(0, "Fault Token", "f0010001"); err != nil {
		t.Fatal(err)
	}
	first := nextEvent(t, sub, monitor.TokenInserted).Token

	// Three failed reads in a row make the module "failing".
	if err := ctl.Fail("GetSlotList", pkcs11.CKR_DEVICE_ERROR, 1, 3); err != nil {
		t.Fatal(err)
	}
	if err := ctl.Insert(1, "Second", "f0010002"); err != nil { // a wake-up
		t.Fatal(err)
	}
	removed := nextEvent(t, sub, monitor.TokenRemoved, monitor.TokenInserted)
	if removed.Kind != monitor.TokenRemoved || removed.Token.Generation != first.Generation {
		t.Fatalf("after the failures: %v, want removal of generation %d", removed, first.Generation)
	}
	if s := removed.Snapshot; s.State != monitor.StateDegraded {
		t.Fatalf("state %v (%q), want degraded", s.State, s.StateReason)
	}
	t.Logf("degraded: %s", removed.Snapshot.StateReason)
	back := map[string]uint64{}
	for len(back) < 2 {
		tok := nextEvent(t, sub, monitor.TokenInserted).Token
		back[tok.Serial] = tok.Generation
	}
	if back["f0010001"] <= first.Generation {
		t.Fatalf("token after re-initialization has generation %d, want > %d", back["f0010001"], first.Generation)
	}
	if !removed.Outage {
		t.Fatalf("%v: a failing module's token is not marked as lost to an outage", removed)
	}
	if tok, _ := mon.Snapshot().Token(back["f0010001"]); tok == nil || tok.Resumes != first.Generation {
		t.Fatalf("the same token after re-initialization: %+v, want Resumes %d", tok, first.Generation)
	}
	deadline := time.Now().Add(5 * time.Second)
	for mon.Snapshot().State != monitor.StateRunning {
		if time.Now().After(deadline) {
			t.Fatalf("state %v after recovery, want running", mon.Snapshot().State)
		}
		time.Sleep(10 * time.Millisecond)
	}
	calls, err := ctl.Calls()
	if err != nil {
		t.Fatal(err)
	}
	inits, finals := 0, 0
	for _, c := range calls {
		switch c.Func {
		case "C_Initialize":
			inits++
		case "C_Finalize":
			finals++
		}
	}
	if finals < 1 || inits < 2 {
		t.Fatalf("module saw %d C_Initialize and %d C_Finalize, want a re-initialization", inits, finals)
	}
}

// TestSlowModuleDoesNotBlockSnapshots (rule 5): while the monitor's loop
// is stuck in a slow module call, the snapshot stays readable at once.
func TestSlowModuleDoesNotBlockSnapshots(t *testing.T) {
	ctl, mon, sub := faultWorld(t, monitor.Config{})
	if err := ctl.Insert(0, "Slow Token", "51050001"); err != nil {
		t.Fatal(err)
	}
	nextEvent(t, sub, monitor.TokenInserted)
	if err := ctl.Sleep("GetSlotList", 2*time.Second); err != nil {
		t.Fatal(err)
	}
	if err := ctl.Insert(1, "Another", "51050002"); err != nil { // the loop now reads, slowly
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	start := time.Now()
	for range 1000 {
		if s := mon.Snapshot(); len(s.Tokens()) == 0 {
			t.Fatal("snapshot lost its token")
		}
	}
	if d := time.Since(start); d > 100*time.Millisecond {
		t.Fatalf("1000 snapshot reads took %v while the module was slow", d)
	}
	ctl.Sleep("GetSlotList", 0)
}

// TestCloseWithAHungWait: a module whose C_WaitForSlotEvent ignores
// C_Finalize cannot hold Close forever: the waiter is given up after 2 s.
func TestCloseWithAHungWait(t *testing.T) {
	ctl, mon, _ := faultWorld(t, monitor.Config{})
	if err := ctl.SetWait(faultmod.WaitHang, 0); err != nil {
		t.Fatal(err)
	}
	if err := ctl.Insert(0, "Hang", "4a000001"); err != nil { // make the waiter enter the hanging wait
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond)
	start := time.Now()
	done := make(chan struct{})
	go func() { mon.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(4 * time.Second):
		t.Fatal("Close did not return within 4 s with a hung wait")
	}
	t.Logf("Close returned after %v with a wait that ignores C_Finalize", time.Since(start).Round(time.Millisecond))
	ctl.SetWait(faultmod.WaitBlock, 0) // let the lost thread go
}

// countCalls counts the module's calls of one function in its record.
func countCalls(t *testing.T, ctl *faultmod.Control, fn string) int {
	t.Helper()
	calls, err := ctl.Calls()
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, c := range calls {
		if c.Func == fn {
			n++
		}
	}
	return n
}

// TestSpinningWaitIsRateLimited: a module whose C_WaitForSlotEvent returns
// at once, forever, makes the monitor re-read it at most once per
// MinWakeGap instead of spinning; changes are still seen.
func TestSpinningWaitIsRateLimited(t *testing.T) {
	ctl, _, sub := faultWorld(t, monitor.Config{MinWakeGap: 20 * time.Millisecond})
	if err := ctl.SetWait(faultmod.WaitReturn, 0); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond)
	ctl.ClearCalls()
	time.Sleep(time.Second)
	reads := countCalls(t, ctl, "C_GetSlotList")
	// Each re-read calls C_GetSlotList twice (length, then list): at most
	// 50 re-reads a second, with some slack for scheduling.
	if reads > 2*60 {
		t.Fatalf("%d C_GetSlotList calls in 1 s with a wait that returns at once, want at most ~100", reads)
	}
	if err := ctl.Insert(2, "Spin", "59150001"); err != nil {
		t.Fatal(err)
	}
	if tok := nextEvent(t, sub, monitor.TokenInserted).Token; tok.Serial != "59150001" {
		t.Fatalf("inserted %+v", tok)
	}
	t.Logf("%d C_GetSlotList calls in 1 s of a spinning wait", reads)
	ctl.SetWait(faultmod.WaitBlock, 0)
}

// TestHungWaitIsCaughtBySafetyReads: with a wait that never returns, the
// periodic re-read still shows changes, and after missed events the module
// is initialized again (a fresh wait).
func TestHungWaitIsCaughtBySafetyReads(t *testing.T) {
	ctl, _, sub := faultWorld(t, monitor.Config{SafetyInterval: 300 * time.Millisecond})
	time.Sleep(100 * time.Millisecond) // the waiter is blocked in its wait
	if err := ctl.SetWait(faultmod.WaitHang, 0); err != nil {
		t.Fatal(err)
	}
	initsBefore := countCalls(t, ctl, "C_Initialize")
	if err := ctl.Insert(0, "Unannounced", "4a4a0001"); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	tok := nextEvent(t, sub, monitor.TokenInserted).Token
	t.Logf("a change the hung wait did not announce showed after %v", time.Since(start).Round(time.Millisecond))
	if err := ctl.Remove(0); err != nil {
		t.Fatal(err)
	}
	if r := nextEvent(t, sub, monitor.TokenRemoved).Token; r.Generation != tok.Generation {
		t.Fatalf("removed %+v", r)
	}
	// Two missed events: the module is initialized again.
	deadline := time.Now().Add(5 * time.Second)
	for countCalls(t, ctl, "C_Initialize") <= initsBefore {
		if time.Now().After(deadline) {
			t.Fatal("the module was not initialized again after missed events")
		}
		time.Sleep(50 * time.Millisecond)
	}
	ctl.SetWait(faultmod.WaitBlock, 0)
}

// TestModuleErrorsOnCue (rule 6): each failure code the issue names, on
// cue from the module's reads, ends in a re-initialization and the token
// back with a new generation. CKR_CRYPTOKI_NOT_INITIALIZED (the module lost
// its state) needs one occurrence; the others three in a row.
func TestModuleErrorsOnCue(t *testing.T) {
	for _, tc := range []struct {
		name  string
		rv    uint
		count int
	}{
		{"CKR_GENERAL_ERROR", pkcs11.CKR_GENERAL_ERROR, 3},
		{"CKR_DEVICE_ERROR", pkcs11.CKR_DEVICE_ERROR, 3},
		{"CKR_DEVICE_REMOVED", pkcs11.CKR_DEVICE_REMOVED, 3},
		{"CKR_CRYPTOKI_NOT_INITIALIZED", pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctl, _, sub := faultWorld(t, monitor.Config{})
			if err := ctl.Insert(0, "Cue", "c0e00001"); err != nil {
				t.Fatal(err)
			}
			first := nextEvent(t, sub, monitor.TokenInserted).Token
			inits := countCalls(t, ctl, "C_Initialize")
			if err := ctl.Fail("GetSlotList", tc.rv, 1, tc.count); err != nil {
				t.Fatal(err)
			}
			if err := ctl.Insert(1, "Wake", "c0e00002"); err != nil {
				t.Fatal(err)
			}
			var back *monitor.Token
			for back == nil {
				ev := nextEvent(t, sub, monitor.TokenInserted, monitor.TokenRemoved)
				if ev.Kind == monitor.TokenInserted && ev.Token.Serial == "c0e00001" {
					back = ev.Token
				}
			}
			if back.Generation <= first.Generation {
				t.Fatalf("token back as generation %d, was %d", back.Generation, first.Generation)
			}
			if countCalls(t, ctl, "C_Initialize") <= inits {
				t.Fatal("the module was not initialized again")
			}
		})
	}
}

// TestRescan: Rescan re-reads every module at once, without an event from
// any source (what a resume from suspend needs): a token inserted while
// the module's wait hangs shows up right after Rescan, long before the
// safety re-read.
func TestRescan(t *testing.T) {
	ctl, mon, sub := faultWorld(t, monitor.Config{SafetyInterval: time.Hour})
	if err := ctl.SetWait(faultmod.WaitHang, 0); err != nil {
		t.Fatal(err)
	}
	if err := ctl.Insert(1, "Resumed", "f0020001"); err != nil {
		t.Fatal(err)
	}
	if _, ok := mon.Snapshot().Slot(monitor.SlotKey{Module: "fault", ID: 1}); !ok {
		t.Fatal("no slot 1 in the snapshot")
	}
	mon.Rescan()
	ev := nextEvent(t, sub, monitor.TokenInserted)
	if ev.Token.Label != "Resumed" || ev.Token.Slot.ID != 1 {
		t.Fatalf("after Rescan: %v, want the token inserted in slot 1", ev)
	}
}
