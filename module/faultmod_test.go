package module

import (
	"errors"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/pkcs11"
	"github.com/slotwatch/slotwatch/tests/faultmod"
)

// Tests on faultmod, the fault-injection module (tests/faultmod): slow calls
// and reused session handles, which no real module does on demand. There is
// one faultmod instance per process, shared by these tests; each starts with
// faults off, fresh tokens and an empty call record, and finalizes the
// module at the end (C_Initialize restarts handle values and the reuse pool).

// fmSlots is how many slots faultmod has in this process.
const fmSlots = 4

// fmPIN is the PIN of every faultmod token.
const fmPIN = "1234"

var fmRun atomic.Uint64 // makes every test's serials unique in the call record

// fmTokens is what openFaultmod put into slots 0 and 1.
type fmTokens struct{ serial [2]string }

// openFaultmod initializes faultmod and connects to its control socket. Slots
// 0 and 1 hold tokens with serials unique to this test; other slots are empty.
func openFaultmod(t *testing.T, opts Options) (*Module, *faultmod.Control, fmTokens) {
	t.Helper()
	if fmSocket == "" {
		t.Fatal("no faultmod control socket in this process")
	}
	path, err := faultmod.Path()
	if err != nil {
		t.Fatal(err)
	}
	if opts.Name == "" {
		opts.Name = "faultmod"
	}
	m := Open(path, opts)
	if err := m.Initialize(); err != nil {
		t.Fatalf("Initialize: %v", err)
	}
	t.Cleanup(func() { finalizeAll(m) })
	ctl, err := faultmod.DialTimeout(fmSocket, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ctl.Close() })
	// Runs before the Finalize above: sleeps off, so nothing we wait for sleeps.
	t.Cleanup(func() {
		if err := ctl.Reset(); err != nil {
			t.Errorf("faultmod reset: %v", err)
		}
	})
	if err := ctl.Reset(); err != nil {
		t.Fatal(err)
	}
	run := fmRun.Add(1)
	var tok fmTokens
	for slot := range uint(fmSlots) {
		_ = ctl.Remove(slot) // an empty slot answers err; either way it is empty now
		if slot < 2 {
			tok.serial[slot] = fmt.Sprintf("r%d-s%d", run, slot)
			if err := ctl.Insert(slot, fmt.Sprintf("fm%d", slot), tok.serial[slot]); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := ctl.ClearCalls(); err != nil {
		t.Fatal(err)
	}
	return m, ctl, tok
}

// waitInCall waits until a call on session id holds the session's lock: it
// is inside the module, or a few instructions from it (nothing else here
// holds it up). Bounded, so a call that never comes fails the test instead
// of hanging it.
func waitInCall(t *testing.T, m *Module, id uint64) {
	t.Helper()
	s := record(t, m, id)
	deadline := time.Now().Add(10 * time.Second)
	for s.mu.TryLock() {
		s.mu.Unlock()
		if time.Now().After(deadline) {
			t.Fatalf("no call entered session %d within 10s", id)
		}
		time.Sleep(time.Millisecond)
	}
}

var certTemplate = []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_CERTIFICATE)}

// A slow login (a PIN pad: 3 s in C_Login) on slot 0 holds up nobody on
// another slot: opening a session there, searching it and closing it take
// their usual few milliseconds, not the rest of the login.
func TestSlowLoginDoesNotStallOtherSlots(t *testing.T) {
	const loginTime = 3 * time.Second
	m, ctl, tok := openFaultmod(t, Options{})
	pinpad, err := m.OpenSession(":1.pinpad", 0, 1, false)
	if err != nil {
		t.Fatal(err)
	}
	if err := ctl.Sleep("C_Login", loginTime); err != nil {
		t.Fatal(err)
	}
	loginDone := make(chan error, 1)
	loginStart := time.Now()
	go func() { loginDone <- m.Login(pinpad.ID, pkcs11.CKU_USER, []byte(fmPIN)) }()
	waitInCall(t, m, pinpad.ID)

	start := time.Now()
	other, err := m.OpenSession(":1.other", 1, 1, false)
	if err != nil {
		t.Fatal(err)
	}
	certs, err := m.FindObjects(other.ID, certTemplate, 0)
	if err != nil || len(certs) != 1 {
		t.Fatalf("FindObjects on slot 1 = %v, %v; want the token's certificate", certs, err)
	}
	if err := m.CloseSession(other.ID); err != nil {
		t.Fatal(err)
	}
	took := time.Since(start)
	t.Logf("OpenSession+FindObjects+CloseSession on slot 1 during a %v C_Login on slot 0: %v", loginTime, took)
	if took >= time.Second {
		t.Errorf("slot 1 took %v while slot 0 logged in; want well under the login's %v", took, loginTime)
	}

	if err := <-loginDone; err != nil {
		t.Fatalf("Login: %v", err)
	}
	if d := time.Since(loginStart); d < loginTime {
		t.Errorf("Login returned after %v, before faultmod's %v sleep", d, loginTime)
	}
	// The slot 1 calls are in the record, each with slot 1's token, and
	// all of them returned before the login did.
	calls, err := ctl.Calls()
	if err != nil {
		t.Fatal(err)
	}
	login := -1
	for i, c := range calls {
		if c.Func == "C_Login" {
			login = i
		}
	}
	if login < 0 || calls[login].Serial != tok.serial[0] {
		t.Fatalf("no C_Login on slot 0's token in the call record:\n%s", callList(calls))
	}
	for _, c := range calls[login+1:] {
		if c.Serial == tok.serial[1] {
			t.Fatalf("slot 1 call returned after the login: %v\n%s", c, callList(calls))
		}
	}
}

func callList(calls []faultmod.Call) string {
	var s string
	for _, c := range calls {
		s += c.String() + "\n"
	}
	return s
}

// record returns the session record for id, white-box.
func record(t *testing.T, m *Module, id uint64) *session {
	t.Helper()
	m.regMu.Lock()
	defer m.regMu.Unlock()
	s, ok := m.sessions[id]
	if !ok {
		t.Fatalf("session %d not registered", id)
	}
	return s
}

// openedAt returns the position in calls of the C_OpenSession that returned
// s's handle on s's slot, failing if there is none.
func openedAt(t *testing.T, calls []faultmod.Call, s *Session) int {
	t.Helper()
	for i, c := range calls {
		if c.Func == "C_OpenSession" && c.RV == 0 && c.Handle == uint(s.Handle) && c.Slot == s.Slot {
			return i
		}
	}
	t.Fatalf("no C_OpenSession returned handle %d on slot %d:\n%s", s.Handle, s.Slot, callList(calls))
	return -1
}

// After a token removal the module hands its session's handle value to the
// next session opened, on another slot. The old record is stale: nothing
// done with it reaches the module, not even C_CloseSession by way of a record
// looked up before the reuse; the new session works.
func TestReusedHandleNeverReachedThroughStaleRecord(t *testing.T) {
	m, ctl, tok := openFaultmod(t, Options{})
	if err := ctl.ReuseHandles(true); err != nil {
		t.Fatal(err)
	}
	old, err := m.OpenSession(":1.old", 0, 1, false)
	if err != nil {
		t.Fatal(err)
	}
	oldRec := record(t, m, old.ID) // as a CloseSession racing the reuse would hold it
	if err := ctl.Remove(0); err != nil {
		t.Fatal(err)
	}
	fresh, err := m.OpenSession(":1.fresh", 1, 1, false)
	if err != nil {
		t.Fatal(err)
	}
	if fresh.Handle != old.Handle {
		t.Fatalf("faultmod gave handle %d, not the freed %d: the test needs reuse", fresh.Handle, old.Handle)
	}

	if _, ok := m.Session(old.ID); ok {
		t.Error("stale record still registered")
	}
	if _, err := m.SessionInfo(old.ID); !errors.Is(err, ErrNoSuchSession) {
		t.Errorf("SessionInfo(stale) = %v, want ErrNoSuchSession", err)
	}
	if err := m.Login(old.ID, pkcs11.CKU_USER, []byte(fmPIN)); !errors.Is(err, ErrNoSuchSession) {
		t.Errorf("Login(stale) = %v, want ErrNoSuchSession", err)
	}
	if _, err := m.FindObjects(old.ID, certTemplate, 0); !errors.Is(err, ErrNoSuchSession) {
		t.Errorf("FindObjects(stale) = %v, want ErrNoSuchSession", err)
	}
	if err := m.CloseSession(old.ID); !errors.Is(err, ErrNoSuchSession) {
		t.Errorf("CloseSession(stale) = %v, want ErrNoSuchSession", err)
	}
	m.life.RLock()
	err = m.closeOne(oldRec)
	m.life.RUnlock()
	if err != nil {
		t.Errorf("closeOne(stale record) = %v, want nil (only forgotten)", err)
	}

	calls, err := ctl.Calls()
	if err != nil {
		t.Fatal(err)
	}
	opened := openedAt(t, calls, fresh)
	if after := calls[opened+1:]; len(after) != 0 {
		t.Errorf("calls reached the module through the stale record:\n%s", callList(after))
	}

	// The new session is slot 1's, and nobody closed it.
	if info, err := m.SessionInfo(fresh.ID); err != nil || info.SlotID != 1 {
		t.Errorf("SessionInfo(new) = %+v, %v", info, err)
	}
	if certs, err := m.FindObjects(fresh.ID, certTemplate, 0); err != nil || len(certs) != 1 {
		t.Errorf("FindObjects(new) = %v, %v", certs, err)
	}
	calls, err = ctl.Calls()
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range calls[opened+1:] {
		if c.Serial != tok.serial[1] || c.RV != 0 {
			t.Errorf("call on the new session: %v", c)
		}
	}
}

// An operation of several calls is under way on a session when its token is
// pulled and another slot's C_OpenSession gets the freed handle value. The
// operation's C_FindObjects is inside the module (faultmod sleeps in it)
// when C_OpenSession starts, and returns while C_OpenSession still runs; its
// next call, C_FindObjectsFinal, waits at the open gate and is then refused:
// it never reaches the new session.
func TestStaleOperationStopsBeforeReusedHandle(t *testing.T) {
	const (
		findSleep = time.Second     // the stale operation's C_FindObjects
		openSleep = 3 * time.Second // the C_OpenSession that reuses its handle
	)
	m, ctl, tok := openFaultmod(t, Options{})
	if err := ctl.ReuseHandles(true); err != nil {
		t.Fatal(err)
	}
	old, err := m.OpenSession(":1.old", 0, 1, false)
	if err != nil {
		t.Fatal(err)
	}
	if err := ctl.Sleep("C_FindObjects", findSleep); err != nil {
		t.Fatal(err)
	}
	findDone := make(chan error, 1)
	go func() {
		_, err := m.FindObjects(old.ID, certTemplate, 0)
		findDone <- err
	}()
	// Wait for C_FindObjectsInit to have returned on the old token: the
	// operation is then in (or on its way into) C_FindObjects.
	waitForCall(t, ctl, func(c faultmod.Call) bool {
		return c.Func == "C_FindObjectsInit" && c.Handle == uint(old.Handle)
	})

	if err := ctl.Remove(0); err != nil { // frees old's handle value
		t.Fatal(err)
	}
	if err := ctl.Sleep("C_OpenSession", openSleep); err != nil {
		t.Fatal(err)
	}
	type opened struct {
		s   *Session
		err error
	}
	openDone := make(chan opened, 1)
	go func() {
		s, err := m.OpenSession(":1.fresh", 1, 1, false)
		openDone <- opened{s, err}
	}()
	// The gate is shut (C_OpenSession is in progress) while the stale
	// C_FindObjects is still asleep in the module.
	deadline := time.Now().Add(10 * time.Second)
	for {
		m.regMu.Lock()
		shut := m.opening > 0
		m.regMu.Unlock()
		if shut {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("OpenSession did not start within 10s")
		}
		time.Sleep(time.Millisecond)
	}
	if calls, err := ctl.Calls(); err != nil {
		t.Fatal(err)
	} else if c, ok := findCall(calls, "C_FindObjects", old.Handle); ok {
		t.Fatalf("the stale C_FindObjects returned (%v) before C_OpenSession started: too slow a machine for a %v margin", c, findSleep)
	}

	o := <-openDone
	if o.err != nil {
		t.Fatal(o.err)
	}
	fresh := o.s
	if fresh.Handle != old.Handle {
		t.Fatalf("faultmod gave handle %d, not the freed %d: the test needs reuse", fresh.Handle, old.Handle)
	}
	err = <-findDone
	if !errors.Is(err, ErrNoSuchSession) && !errors.Is(err, ErrStaleGeneration) {
		t.Errorf("stale FindObjects = %v, want ErrNoSuchSession or ErrStaleGeneration", err)
	}
	t.Logf("stale FindObjects: %v", err)

	calls, err := ctl.Calls()
	if err != nil {
		t.Fatal(err)
	}
	at := openedAt(t, calls, fresh)
	find, ok := findCall(calls, "C_FindObjects", old.Handle)
	switch {
	case !ok:
		t.Errorf("no stale C_FindObjects in the record:\n%s", callList(calls))
	case find.Seq > calls[at].Seq:
		t.Errorf("the stale C_FindObjects returned after the C_OpenSession: the test did not set up what it means to:\n%s", callList(calls))
	case find.Serial != "" || find.RV != pkcs11.CKR_SESSION_HANDLE_INVALID:
		t.Errorf("the stale C_FindObjects reached a live session: %v", find)
	}
	for _, c := range calls[at+1:] {
		t.Errorf("a call reached the module after the C_OpenSession that reused the handle: %v (new token %q)\n%s",
			c, tok.serial[1], callList(calls))
	}
	if _, ok := findCall(calls, "C_FindObjectsFinal", old.Handle); ok {
		t.Errorf("C_FindObjectsFinal with the reused handle:\n%s", callList(calls))
	}
	// The new session was left alone.
	if err := ctl.Reset(); err != nil {
		t.Fatal(err)
	}
	if certs, err := m.FindObjects(fresh.ID, certTemplate, 0); err != nil || len(certs) != 1 {
		t.Errorf("FindObjects(new) = %v, %v", certs, err)
	}
}

// findCall returns the first call of fn with handle h.
func findCall(calls []faultmod.Call, fn string, h pkcs11.SessionHandle) (faultmod.Call, bool) {
	for _, c := range calls {
		if c.Func == fn && c.Handle == uint(h) {
			return c, true
		}
	}
	return faultmod.Call{}, false
}

// waitForCall polls the call record until a call matching match has
// returned; bounded.
func waitForCall(t *testing.T, ctl *faultmod.Control, match func(faultmod.Call) bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		calls, err := ctl.Calls()
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range calls {
			if match(c) {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("the awaited call did not come within 10s:\n%s", callList(calls))
		}
		time.Sleep(2 * time.Millisecond)
	}
}
