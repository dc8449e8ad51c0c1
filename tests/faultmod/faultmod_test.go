package faultmod

import (
	"bytes"
	"crypto/x509"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/miekg/pkcs11"
	"github.com/slotwatch/slotwatch/module"
)

// The module is loaded in this process, so its control socket is this
// process's: TestMain points FAULTMOD_CONTROL at a temp dir before anything
// loads it. All tests share the one instance and run one at a time.
var controlSocket string

// childEnv marks a child process a test runs (TestAbort, TestTokensEnv);
// its value names the test.
const childEnv = "FAULTMOD_TEST_CHILD"

const slots = 4

func TestMain(m *testing.M) {
	if os.Getenv(childEnv) != "" {
		// A child keeps the environment its parent gave it.
		controlSocket = os.Getenv("FAULTMOD_CONTROL")
		os.Exit(m.Run())
	}
	dir, err := os.MkdirTemp("", "faultmod-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	controlSocket = filepath.Join(dir, "control.sock")
	for _, kv := range Env(controlSocket, slots) {
		k, v, _ := strings.Cut(kv, "=")
		os.Setenv(k, v)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// setup initializes the module and returns it with a control connection,
// all slots empty, no events pending, no faults, an empty call record.
// Cleanup resets the faults and finalizes the module if the test did not.
func setup(t *testing.T) (*module.Module, *Control) {
	t.Helper()
	path, err := Path()
	if err != nil {
		t.Fatal(err)
	}
	m := module.Open(path, module.Options{Name: "faultmod"})
	if err := m.Initialize(); err != nil {
		t.Fatalf("Initialize: %v", err)
	}
	ctl, err := DialTimeout(controlSocket, 5*time.Second)
	if err != nil {
		m.Finalize()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := ctl.Reset(); err != nil {
			t.Errorf("Reset: %v", err)
		}
		for s := range uint(slots) {
			ctl.Remove(s) // "err slot N is empty" for most
		}
		ctl.Close()
		if m.Initialized() {
			if err := m.Finalize(); err != nil {
				t.Errorf("Finalize: %v", err)
			}
		}
	})
	must(t, ctl.Reset())
	for s := range uint(slots) {
		ctl.Remove(s)
	}
	drain(t, m)
	must(t, ctl.ClearCalls())
	return m, ctl
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// drain consumes pending slot events.
func drain(t *testing.T, m *module.Module) {
	t.Helper()
	for range 100 {
		if _, err := m.WaitForSlotEvent(true); errors.Is(err, module.ErrNoEvent) {
			return
		} else if err != nil {
			t.Fatalf("WaitForSlotEvent(dontBlock): %v", err)
		}
	}
	t.Fatal("events keep coming")
}

type waitResult struct {
	slot uint
	err  error
}

// startWait runs a blocking WaitForSlotEvent in a goroutine.
func startWait(m *module.Module) <-chan waitResult {
	ch := make(chan waitResult, 1)
	go func() {
		s, err := m.WaitForSlotEvent(false)
		ch <- waitResult{s, err}
	}()
	return ch
}

func expectBlocked(t *testing.T, ch <-chan waitResult, d time.Duration) {
	t.Helper()
	select {
	case r := <-ch:
		t.Fatalf("WaitForSlotEvent returned (%d, %v), want it blocked", r.slot, r.err)
	case <-time.After(d):
	}
}

func expectReturn(t *testing.T, ch <-chan waitResult) waitResult {
	t.Helper()
	select {
	case r := <-ch:
		return r
	case <-time.After(10 * time.Second):
		t.Fatal("WaitForSlotEvent still blocked after 10s")
	}
	return waitResult{}
}

// calls returns the record without C_GetFunctionList (package module calls
// it for every WaitForSlotEvent).
func calls(t *testing.T, ctl *Control) []Call {
	t.Helper()
	all, err := ctl.Calls()
	if err != nil {
		t.Fatal(err)
	}
	return slices.DeleteFunc(all, func(c Call) bool { return c.Func == "C_GetFunctionList" })
}

func TestBuild(t *testing.T) {
	path, err := Path()
	if err != nil {
		t.Fatal(err)
	}
	f, err := elf.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if f.Type != elf.ET_DYN {
		t.Errorf("%s: ELF type %v, want ET_DYN", path, f.Type)
	}
	syms, err := f.DynamicSymbols()
	if err != nil {
		t.Fatal(err)
	}
	exported := map[string]bool{}
	for _, s := range syms {
		if s.Section != elf.SHN_UNDEF && strings.HasPrefix(s.Name, "C_") {
			exported[s.Name] = true
		}
	}
	if len(exported) != 68 {
		t.Errorf("exports %d C_ functions, want the 68 of PKCS#11 v2.40", len(exported))
	}
	for _, fn := range []string{"C_GetFunctionList", "C_Initialize", "C_WaitForSlotEvent", "C_Login", "C_InitToken"} {
		if !exported[fn] {
			t.Errorf("%s not exported", fn)
		}
	}
	// -z nodelete: the control thread must survive the host's dlclose.
	if fl, err := f.DynValue(elf.DT_FLAGS_1); err != nil || len(fl) == 0 || fl[0]&uint64(elf.DF_1_NODELETE) == 0 {
		t.Errorf("DT_FLAGS_1 = %v (%v), want DF_1_NODELETE", fl, err)
	}
	// -Bsymbolic: the function list binds to faultmod's own functions.
	if fl, err := f.DynValue(elf.DT_FLAGS); err != nil || len(fl) == 0 || fl[0]&uint64(elf.DF_SYMBOLIC) == 0 {
		t.Errorf("DT_FLAGS = %v (%v), want DF_SYMBOLIC", fl, err)
	}

	// The sources compile warning-free with the Makefile's flags and only gcc.
	gcc, err := exec.LookPath("gcc")
	if err != nil {
		t.Fatalf("gcc: %v", err)
	}
	dir, err := packageDir()
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(t.TempDir(), "libfaultmod.so")
	cmd := exec.Command(gcc, "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror", "-pthread",
		"-Wl,-z,nodelete", "-Wl,-Bsymbolic", "-I"+filepath.Join(dir, "include"), "-o", out, filepath.Join(dir, "csrc", "faultmod.c"))
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%v: %v\n%s", cmd.Args, err, b)
	}
}

func TestSlotsAndTokens(t *testing.T) {
	m, ctl := setup(t)
	all, err := m.SlotList(false)
	must(t, err)
	if !slices.Equal(all, []uint{0, 1, 2, 3}) {
		t.Fatalf("SlotList(false) = %v, want [0 1 2 3]", all)
	}
	present, err := m.SlotList(true)
	must(t, err)
	if len(present) != 0 {
		t.Fatalf("SlotList(true) = %v, want none", present)
	}
	si, err := m.SlotInfo(2)
	must(t, err)
	if si.Description != "faultmod slot 2" || !si.Removable() || si.TokenPresent() {
		t.Errorf("SlotInfo(2) = %+v, want faultmod slot 2, removable, empty", si)
	}
	if _, err := m.TokenInfo(2); !errors.Is(err, module.ErrTokenNotPresent) {
		t.Errorf("TokenInfo(empty slot) = %v, want ErrTokenNotPresent", err)
	}

	must(t, ctl.Insert(2, "my card", "SN-0002"))
	present, err = m.SlotList(true)
	must(t, err)
	if !slices.Equal(present, []uint{2}) {
		t.Fatalf("after insert: SlotList(true) = %v, want [2]", present)
	}
	ti, err := m.TokenInfo(2)
	must(t, err)
	if ti.Label != "my card" || ti.Serial != "SN-0002" || ti.Model != "faultmod" {
		t.Errorf("TokenInfo = %+v, want label %q serial %q", ti, "my card", "SN-0002")
	}
	if si, _ := m.SlotInfo(2); !si.TokenPresent() {
		t.Errorf("SlotInfo(2) after insert: no CKF_TOKEN_PRESENT")
	}

	must(t, ctl.Swap(2, "other 100%", "SN-9"))
	ti, err = m.TokenInfo(2)
	must(t, err)
	if ti.Label != "other 100%" || ti.Serial != "SN-9" {
		t.Errorf("after swap: TokenInfo = %+v", ti)
	}

	must(t, ctl.Remove(2))
	present, err = m.SlotList(true)
	must(t, err)
	if len(present) != 0 {
		t.Errorf("after remove: SlotList(true) = %v", present)
	}

	var e *Error
	if err := ctl.Remove(2); !errors.As(err, &e) {
		t.Errorf("remove of an empty slot: %v, want an *Error", err)
	}
	must(t, ctl.Insert(0, "", "X"))
	if err := ctl.Insert(0, "a", "Y"); !errors.As(err, &e) {
		t.Errorf("insert into a full slot: %v, want an *Error", err)
	}
	if err := ctl.Insert(slots, "a", "Y"); !errors.As(err, &e) {
		t.Errorf("insert into slot %d of %d: %v, want an *Error", slots, slots, err)
	}
	if err := ctl.Insert(1, strings.Repeat("l", 33), "Y"); !errors.As(err, &e) {
		t.Errorf("33-byte label: %v, want an *Error", err)
	}
}

func TestProtocolErrors(t *testing.T) {
	_, ctl := setup(t)
	for _, line := range []string{
		"bogus", "insert", "insert 0 a", "remove x", "wait sometimes", "wait coalesce 0",
		"reuse-handles maybe", "fail NoSuchFunc CKR_DEVICE_ERROR 1", "fail GetInfo CKR_NO_SUCH 1",
		"fail GetInfo 0x30 0", "sleep GetInfo", "abort GetInfo 0", "insert 0 a %zz", "pin 0 1234",
	} {
		_, err := ctl.Command(line)
		var e *Error
		if !errors.As(err, &e) {
			t.Errorf("%q: %v, want an err reply", line, err)
		}
	}
	// The connection is still in step after all those.
	if _, err := ctl.Command("reset"); err != nil {
		t.Fatal(err)
	}
}

func TestWaitReturnsOnInsert(t *testing.T) {
	m, ctl := setup(t)
	ch := startWait(m)
	expectBlocked(t, ch, 150*time.Millisecond)
	must(t, ctl.Insert(3, "w", "W1"))
	r := expectReturn(t, ch)
	if r.err != nil || r.slot != 3 {
		t.Fatalf("WaitForSlotEvent = (%d, %v), want (3, nil)", r.slot, r.err)
	}
	// Removal is an event too.
	ch = startWait(m)
	must(t, ctl.Remove(3))
	if r := expectReturn(t, ch); r.err != nil || r.slot != 3 {
		t.Fatalf("after remove: (%d, %v), want (3, nil)", r.slot, r.err)
	}
}

func TestWaitUnblockedByFinalize(t *testing.T) {
	m, _ := setup(t)
	ch := startWait(m)
	expectBlocked(t, ch, 150*time.Millisecond)
	must(t, m.Finalize())
	r := expectReturn(t, ch)
	if !errors.Is(r.err, module.ErrNotInitialized) {
		t.Fatalf("WaitForSlotEvent after Finalize = (%d, %v), want ErrNotInitialized", r.slot, r.err)
	}
}

func TestWaitDontBlock(t *testing.T) {
	m, ctl := setup(t)
	if _, err := m.WaitForSlotEvent(true); !errors.Is(err, module.ErrNoEvent) {
		t.Fatalf("nothing pending: %v, want ErrNoEvent", err)
	}
	must(t, ctl.Insert(1, "a", "A"))
	must(t, ctl.Insert(0, "b", "B"))
	var got []uint
	for {
		s, err := m.WaitForSlotEvent(true)
		if errors.Is(err, module.ErrNoEvent) {
			break
		}
		must(t, err)
		got = append(got, s)
	}
	if !slices.Equal(got, []uint{0, 1}) {
		t.Fatalf("events %v, want [0 1]", got)
	}
}

func TestWaitReturnMode(t *testing.T) {
	m, ctl := setup(t)
	must(t, ctl.SetWait(WaitReturn, 0))
	for i := range 3 {
		r := expectReturn(t, startWait(m))
		if r.err != nil || r.slot != 0 {
			t.Fatalf("wait %d in return mode = (%d, %v), want (0, nil)", i, r.slot, r.err)
		}
	}
	must(t, ctl.SetWait(WaitBlock, 0))
	expectBlocked(t, startWait(m), 100*time.Millisecond)
	must(t, ctl.Insert(1, "x", "X")) // lets that wait go
}

func TestWaitCoalesce(t *testing.T) {
	m, ctl := setup(t)
	must(t, ctl.SetWait(WaitCoalesce, 3))
	must(t, ctl.Insert(0, "a", "A"))
	must(t, ctl.Insert(1, "b", "B"))
	if _, err := m.WaitForSlotEvent(true); !errors.Is(err, module.ErrNoEvent) {
		t.Fatalf("after 2 of 3 coalesced changes: %v, want ErrNoEvent", err)
	}
	must(t, ctl.Swap(0, "c", "C"))
	s, err := m.WaitForSlotEvent(true)
	if err != nil || s != 0 {
		t.Fatalf("after the 3rd change: (%d, %v), want (0, nil)", s, err)
	}
	if _, err := m.WaitForSlotEvent(true); !errors.Is(err, module.ErrNoEvent) {
		t.Fatalf("3 changes gave more than one event: %v", err)
	}
	// Back to normal.
	must(t, ctl.Remove(1))
	if s, err := m.WaitForSlotEvent(true); err != nil || s != 1 {
		t.Fatalf("after coalescing ended: (%d, %v), want (1, nil)", s, err)
	}
}

func TestWaitHang(t *testing.T) {
	m, ctl := setup(t)
	must(t, ctl.SetWait(WaitHang, 0))
	ch := startWait(m)
	expectBlocked(t, ch, 150*time.Millisecond)
	must(t, ctl.Insert(0, "a", "A"))
	expectBlocked(t, ch, 150*time.Millisecond)
	must(t, m.Finalize())
	expectBlocked(t, ch, 300*time.Millisecond)
	must(t, ctl.SetWait(WaitBlock, 0))
	r := expectReturn(t, ch)
	if !errors.Is(r.err, module.ErrNotInitialized) {
		t.Fatalf("hung wait released after Finalize = (%d, %v), want ErrNotInitialized", r.slot, r.err)
	}
}

func TestFailSlotList(t *testing.T) {
	m, ctl := setup(t)
	// The brief's exact command, by CKR name.
	if _, err := ctl.Command("fail GetSlotList CKR_DEVICE_ERROR 1"); err != nil {
		t.Fatal(err)
	}
	if _, err := m.SlotList(false); !errors.Is(err, module.ErrDeviceError) {
		t.Fatalf("first SlotList: %v, want ErrDeviceError", err)
	}
	if _, err := m.SlotList(false); err != nil {
		t.Fatalf("second SlotList: %v, want success", err)
	}
	got := calls(t, ctl)
	if len(got) < 1 || got[0].Func != "C_GetSlotList" || got[0].RV != pkcs11.CKR_DEVICE_ERROR {
		t.Fatalf("record %v, want C_GetSlotList with CKR_DEVICE_ERROR first", got)
	}
	for _, c := range got[1:] {
		if c.RV != pkcs11.CKR_OK {
			t.Errorf("later call failed: %v", c)
		}
	}
}

func TestFailNthCount(t *testing.T) {
	m, ctl := setup(t)
	must(t, ctl.Fail("C_GetInfo", pkcs11.CKR_GENERAL_ERROR, 2, 2))
	var errs []bool
	for range 5 {
		_, err := m.Info()
		if err != nil && !errors.Is(err, module.ErrGeneralError) {
			t.Fatalf("Info: %v", err)
		}
		errs = append(errs, err != nil)
	}
	if want := []bool{false, true, true, false, false}; !slices.Equal(errs, want) {
		t.Fatalf("failed calls %v, want %v", errs, want)
	}
	// count 0: from the nth on, until reset.
	must(t, ctl.Fail("GetInfo", pkcs11.CKR_DEVICE_REMOVED, 1, 0))
	for range 3 {
		if _, err := m.Info(); !errors.Is(err, module.ErrDeviceRemoved) {
			t.Fatalf("Info: %v, want ErrDeviceRemoved", err)
		}
	}
	must(t, ctl.Reset())
	if _, err := m.Info(); err != nil {
		t.Fatalf("after reset: %v", err)
	}
	// A failed wait returns at once with the code.
	must(t, ctl.Fail("WaitForSlotEvent", pkcs11.CKR_GENERAL_ERROR, 1, 1))
	if r := expectReturn(t, startWait(m)); !errors.Is(r.err, module.ErrGeneralError) {
		t.Fatalf("failed wait: %v, want ErrGeneralError", r.err)
	}
}

func TestSleep(t *testing.T) {
	m, ctl := setup(t)
	must(t, ctl.Sleep("GetInfo", 150*time.Millisecond))
	start := time.Now()
	_, err := m.Info()
	must(t, err)
	if d := time.Since(start); d < 150*time.Millisecond {
		t.Errorf("Info took %v with sleep 150ms", d)
	}
	must(t, ctl.Sleep("GetInfo", 0))
	start = time.Now()
	_, err = m.Info()
	must(t, err)
	if d := time.Since(start); d > 100*time.Millisecond {
		t.Errorf("Info took %v with sleep off", d)
	}
}

func TestRemovalInvalidatesSessions(t *testing.T) {
	m, ctl := setup(t)
	must(t, ctl.Insert(1, "a", "A"))
	s, err := m.OpenSession("test", 1, 1, false)
	must(t, err)
	info, err := m.SessionInfo(s.ID)
	must(t, err)
	if info.SlotID != 1 || info.State != pkcs11.CKS_RO_PUBLIC_SESSION {
		t.Errorf("SessionInfo = %+v", info)
	}
	must(t, ctl.Remove(1))
	if _, err := m.SessionInfo(s.ID); !errors.Is(err, module.ErrSessionHandleInvalid) {
		t.Fatalf("SessionInfo after removal: %v, want ErrSessionHandleInvalid", err)
	}
	got := calls(t, ctl)
	last := got[len(got)-1]
	if last.Func != "C_GetSessionInfo" || last.Handle != uint(s.Handle) || last.Serial != "" ||
		last.RV != pkcs11.CKR_SESSION_HANDLE_INVALID {
		t.Errorf("record of the dead-handle call: %v", last)
	}
	must(t, ctl.Insert(1, "b", "B"))
	if _, err := m.SessionInfo(s.ID); !errors.Is(err, module.ErrSessionHandleInvalid) {
		t.Fatalf("SessionInfo after reinsertion: %v, want ErrSessionHandleInvalid", err)
	}
}

func TestReuseHandles(t *testing.T) {
	m, ctl := setup(t)
	must(t, ctl.Insert(0, "a", "A"))
	must(t, ctl.Insert(1, "b", "B"))
	s1, err := m.OpenSession("test", 0, 1, false)
	must(t, err)
	s2, err := m.OpenSession("test", 1, 1, false)
	must(t, err)
	if s1.Handle == s2.Handle {
		t.Fatalf("two live sessions share handle %d", s1.Handle)
	}

	// Without reuse, a removal frees nothing for the next session.
	must(t, ctl.Remove(0))
	s3, err := m.OpenSession("test", 1, 1, false)
	must(t, err)
	if s3.Handle == s1.Handle {
		t.Fatalf("reuse off: new session got the dead handle %d", s1.Handle)
	}

	// With reuse, the next session anywhere gets the lowest freed value.
	must(t, ctl.ReuseHandles(true))
	s4, err := m.OpenSession("test", 1, 1, false)
	must(t, err)
	if s4.Handle != s1.Handle {
		t.Fatalf("reuse on: new session got handle %d, want the dead %d", s4.Handle, s1.Handle)
	}
	// The pool is empty now: fresh values again.
	s5, err := m.OpenSession("test", 1, 1, false)
	must(t, err)
	if s5.Handle == s1.Handle || s5.Handle == s2.Handle || s5.Handle == s3.Handle {
		t.Fatalf("handle %d handed out twice", s5.Handle)
	}
	// The old record says which token the value meant then and now.
	got := calls(t, ctl)
	var serials []string
	for _, c := range got {
		if c.Func == "C_OpenSession" && c.Handle == uint(s1.Handle) {
			serials = append(serials, c.Serial)
		}
	}
	if !slices.Equal(serials, []string{"A", "B"}) {
		t.Fatalf("C_OpenSession calls returning handle %d addressed %v, want [A B]", s1.Handle, serials)
	}
}

func TestCallRecord(t *testing.T) {
	m, ctl := setup(t)
	must(t, ctl.Insert(2, "rec", "R-1"))
	_, err := m.SlotList(true)
	must(t, err)
	s, err := m.OpenSession("test", 2, 1, true)
	must(t, err)
	must(t, m.Login(s.ID, pkcs11.CKU_USER, []byte("1234")))
	must(t, m.CloseSession(s.ID))
	if _, err := m.TokenInfo(1); !errors.Is(err, module.ErrTokenNotPresent) {
		t.Fatalf("TokenInfo(1): %v", err)
	}

	got := calls(t, ctl)
	h := uint(s.Handle)
	want := []Call{
		{Func: "C_GetSlotList", Slot: NoSlot},
		{Func: "C_GetSlotList", Slot: NoSlot},
		{Func: "C_OpenSession", Handle: h, Slot: 2, Serial: "R-1"},
		{Func: "C_Login", Handle: h, Slot: 2, Serial: "R-1"},
		{Func: "C_CloseSession", Handle: h, Slot: 2, Serial: "R-1"},
		{Func: "C_GetTokenInfo", RV: pkcs11.CKR_TOKEN_NOT_PRESENT, Slot: 1},
	}
	if len(got) != len(want) {
		t.Fatalf("record:\n%v\nwant %d calls", got, len(want))
	}
	for i := range want {
		g := got[i]
		want[i].Seq = g.Seq
		if g != want[i] {
			t.Errorf("call %d = %v, want %v", i, g, want[i])
		}
		if i > 0 && g.Seq <= got[i-1].Seq {
			t.Errorf("seq not increasing: %v after %v", g, got[i-1])
		}
	}
	// clear-calls empties the record, seq goes on.
	must(t, ctl.ClearCalls())
	_, err = m.Info()
	must(t, err)
	got = calls(t, ctl)
	if len(got) != 1 || got[0].Func != "C_GetInfo" || got[0].Seq <= want[len(want)-1].Seq {
		t.Errorf("after ClearCalls: %v", got)
	}
}

func TestObjectsLoginSign(t *testing.T) {
	m, ctl := setup(t)
	must(t, ctl.Insert(0, "objs", "O-1"))
	s, err := m.OpenSession("test", 0, 1, false)
	must(t, err)

	objs, err := m.FindObjects(s.ID, nil, 0)
	must(t, err)
	if len(objs) != 1 {
		t.Fatalf("before login: %d objects, want the certificate only", len(objs))
	}
	attrs, err := m.GetAttributes(s.ID, objs[0], []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, nil), pkcs11.NewAttribute(pkcs11.CKA_ID, nil),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, nil), pkcs11.NewAttribute(pkcs11.CKA_VALUE, nil),
	})
	must(t, err)
	if c := ulong(attrs[0].Value); c != pkcs11.CKO_CERTIFICATE {
		t.Errorf("CKA_CLASS = %d", c)
	}
	if !bytes.Equal(attrs[1].Value, []byte{1}) {
		t.Errorf("CKA_ID = %x, want 01", attrs[1].Value)
	}
	if len(attrs[2].Value) == 0 {
		t.Errorf("empty CKA_LABEL")
	}
	cert, err := x509.ParseCertificate(attrs[3].Value)
	if err != nil {
		t.Fatalf("CKA_VALUE: %v", err)
	}
	if cert.Subject.CommonName != "faultmod" {
		t.Errorf("certificate subject %v", cert.Subject)
	}

	if err := m.Login(s.ID, pkcs11.CKU_USER, []byte("0000")); !errors.Is(err, module.ErrPinIncorrect) {
		t.Fatalf("wrong PIN: %v, want ErrPinIncorrect", err)
	}
	must(t, m.Login(s.ID, pkcs11.CKU_USER, []byte("1234")))
	if err := m.Login(s.ID, pkcs11.CKU_USER, []byte("1234")); !errors.Is(err, module.ErrUserAlreadyLoggedIn) {
		t.Fatalf("second login: %v, want ErrUserAlreadyLoggedIn", err)
	}
	if st, err := m.SessionState(s.ID); err != nil || st != pkcs11.CKS_RO_USER_FUNCTIONS {
		t.Errorf("state after login = %d, %v", st, err)
	}
	keys, err := m.FindObjects(s.ID, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_ID, []byte{1}),
	}, 0)
	must(t, err)
	if len(keys) != 1 {
		t.Fatalf("private keys with id 01: %d, want 1", len(keys))
	}
	kattrs, err := m.GetAttributes(s.ID, keys[0], []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, nil), pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, nil),
	})
	must(t, err)
	if kt := ulong(kattrs[0].Value); kt != pkcs11.CKK_EC {
		t.Errorf("CKA_KEY_TYPE = %d, want CKK_EC", kt)
	}
	if !bytes.Equal(kattrs[1].Value, []byte{1}) {
		t.Errorf("CKA_PRIVATE = %x, want true", kattrs[1].Value)
	}
	mech := pkcs11.NewMechanism(pkcs11.CKM_ECDSA, nil)
	sig1, err := m.Sign(s.ID, mech, keys[0], []byte("data"))
	must(t, err)
	sig2, err := m.Sign(s.ID, mech, keys[0], []byte("data"))
	must(t, err)
	sig3, err := m.Sign(s.ID, mech, keys[0], []byte("other"))
	must(t, err)
	if len(sig1) != 64 || !bytes.Equal(sig1, sig2) || bytes.Equal(sig1, sig3) {
		t.Errorf("signatures %x, %x, %x: want 64 bytes, deterministic, data-dependent", sig1, sig2, sig3)
	}
	must(t, m.Logout(s.ID))
	if _, err := m.Sign(s.ID, mech, keys[0], []byte("data")); !errors.Is(err, module.ErrUserNotLoggedIn) {
		t.Errorf("Sign after logout: %v, want ErrUserNotLoggedIn", err)
	}

	must(t, ctl.SetPIN(0, "pin with space"))
	must(t, m.Login(s.ID, pkcs11.CKU_USER, []byte("pin with space")))
}

func ulong(b []byte) uint {
	if len(b) != 8 {
		return ^uint(0)
	}
	return uint(binary.NativeEndian.Uint64(b))
}

func TestInitToken(t *testing.T) {
	m, ctl := setup(t)
	must(t, ctl.Insert(3, "old", "I-1"))
	s, err := m.OpenSession("test", 3, 1, true)
	must(t, err)
	if err := m.InitToken(3, []byte("1234"), "new"); !errors.Is(err, module.ErrSessionExists) {
		t.Fatalf("InitToken with a session open: %v, want ErrSessionExists", err)
	}
	must(t, m.CloseSession(s.ID))
	if err := m.InitToken(3, []byte("9999"), "new"); !errors.Is(err, module.ErrPinIncorrect) {
		t.Fatalf("InitToken with a wrong SO PIN: %v, want ErrPinIncorrect", err)
	}
	must(t, m.InitToken(3, []byte("1234"), "new label"))
	ti, err := m.TokenInfo(3)
	must(t, err)
	if ti.Label != "new label" || ti.Serial != "I-1" {
		t.Errorf("after InitToken: %+v", ti)
	}
}

func TestReinitialize(t *testing.T) {
	m, ctl := setup(t)
	must(t, ctl.Insert(0, "keep", "K-1"))
	s, err := m.OpenSession("test", 0, 1, false)
	must(t, err)
	must(t, m.Finalize())
	must(t, m.Initialize())
	// The token is still in its slot; handle values start over.
	ti, err := m.TokenInfo(0)
	must(t, err)
	if ti.Serial != "K-1" {
		t.Errorf("after reinitialize: %+v", ti)
	}
	s2, err := m.OpenSession("test", 0, 1, false)
	must(t, err)
	if s2.Handle != 1 || s.Handle != 1 {
		t.Errorf("handles %d before and %d after C_Initialize, want 1 and 1", s.Handle, s2.Handle)
	}
	// The control channel outlived the unload.
	must(t, ctl.Reset())
}

// TestConcurrent hammers the module from several goroutines while tokens
// come and go; under -race, and for deadlocks.
func TestConcurrent(t *testing.T) {
	m, ctl := setup(t)
	stop := make(chan struct{})
	var workers, waiter sync.WaitGroup
	for g := range 3 {
		workers.Add(1)
		go func() {
			defer workers.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				slot := uint(g)
				if _, err := m.TokenInfo(slot); err != nil && !errors.Is(err, module.ErrTokenNotPresent) {
					t.Errorf("TokenInfo: %v", err)
					return
				}
				if s, err := m.OpenSession(fmt.Sprint("g", g), slot, 1, false); err == nil {
					m.SessionInfo(s.ID)
					m.CloseSession(s.ID)
				} else if !errors.Is(err, module.ErrTokenNotPresent) {
					t.Errorf("OpenSession: %v", err)
					return
				}
			}
		}()
	}
	events := make(chan struct{}, 1000)
	waiter.Add(1)
	go func() {
		defer waiter.Done()
		for {
			_, err := m.WaitForSlotEvent(false)
			if err != nil {
				return // ErrNotInitialized at the end
			}
			events <- struct{}{}
		}
	}()
	must(t, ctl.ReuseHandles(true))
	for i := range 60 {
		slot := uint(i % 3)
		if i%6 < 3 {
			must(t, ctl.Insert(slot, "c", fmt.Sprint("C", i)))
		} else {
			must(t, ctl.Remove(slot))
		}
		time.Sleep(2 * time.Millisecond)
	}
	close(stop)
	workers.Wait()
	must(t, m.Finalize()) // ends the waiter
	waiter.Wait()
	if len(events) == 0 {
		t.Error("the waiter saw no events")
	}
	if _, err := ctl.Calls(); err != nil {
		t.Fatal(err)
	}
}

// TestAbort runs itself again as a child that loads the module and has it
// abort() inside C_GetInfo; the child must die of SIGABRT.
func TestAbort(t *testing.T) {
	if os.Getenv(childEnv) == "abort" {
		abortChild(t)
		return
	}
	out, err := runChild(t, "TestAbort", Env(filepath.Join(t.TempDir(), "child.sock"), 2)...)
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		t.Fatalf("child: %v, want it killed by SIGABRT\n%s", err, out)
	}
	ws, ok := ee.Sys().(syscall.WaitStatus)
	if !ok || !ws.Signaled() || ws.Signal() != syscall.SIGABRT {
		t.Fatalf("child: %v, want it killed by SIGABRT\n%s", err, out)
	}
	if !bytes.Contains(out, []byte("child: about to call C_GetInfo the 2nd time")) {
		t.Fatalf("child died before it got to the abort:\n%s", out)
	}
}

func abortChild(t *testing.T) {
	// No core file from the abort we are about to cause.
	if err := syscall.Setrlimit(syscall.RLIMIT_CORE, &syscall.Rlimit{}); err != nil {
		t.Fatal(err)
	}
	path, err := Path()
	if err != nil {
		t.Fatal(err)
	}
	m := module.Open(path, module.Options{})
	must(t, m.Initialize())
	ctl, err := DialTimeout(controlSocket, 5*time.Second)
	must(t, err)
	must(t, ctl.Abort("GetInfo", 2))
	_, err = m.Info()
	must(t, err)
	fmt.Println("child: about to call C_GetInfo the 2nd time")
	os.Stdout.Sync()
	m.Info()
	t.Fatal("child: still alive after the aborting call")
}

// runChild runs test in a child process of this test binary, with extra
// environment entries.
func runChild(t *testing.T, test string, env ...string) ([]byte, error) {
	t.Helper()
	if _, err := Path(); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^"+test+"$", "-test.count=1", "-test.v")
	cmd.Env = append(os.Environ(), childEnv+"="+strings.TrimPrefix(strings.ToLower(test), "test"))
	cmd.Env = append(cmd.Env, env...)
	if os.Getenv("GORACE") == "" {
		cmd.Env = append(cmd.Env, "GORACE=atexit_sleep_ms=0") // a -race child's exit waits 1s otherwise
	}
	return cmd.CombinedOutput()
}

// TestTokensEnv starts a process with FAULTMOD_TOKENS: its tokens are there
// from the first C_GetSlotList, with no events.
func TestTokensEnv(t *testing.T) {
	if os.Getenv(childEnv) == "tokensenv" {
		tokensChild(t)
		return
	}
	env := append(Env(filepath.Join(t.TempDir(), "child.sock"), 3),
		TokensEnv(Token{Slot: 2, Label: "two; with blanks", Serial: "S2"}, Token{Slot: 0, Label: "", Serial: "-"}))
	out, err := runChild(t, "TestTokensEnv", env...)
	if err != nil || !bytes.Contains(out, []byte("--- PASS: TestTokensEnv")) {
		t.Fatalf("child: %v\n%s", err, out)
	}
}

func tokensChild(t *testing.T) {
	path, err := Path()
	must(t, err)
	m := module.Open(path, module.Options{})
	must(t, m.Initialize())
	defer m.Finalize()
	present, err := m.SlotList(true)
	must(t, err)
	if !slices.Equal(present, []uint{0, 2}) {
		t.Fatalf("SlotList(true) = %v, want [0 2]", present)
	}
	for slot, want := range map[uint][2]string{0: {"", "-"}, 2: {"two; with blanks", "S2"}} {
		ti, err := m.TokenInfo(slot)
		must(t, err)
		if ti.Label != want[0] || ti.Serial != want[1] {
			t.Errorf("slot %d: label %q serial %q, want %q %q", slot, ti.Label, ti.Serial, want[0], want[1])
		}
	}
	if _, err := m.WaitForSlotEvent(true); !errors.Is(err, module.ErrNoEvent) {
		t.Errorf("initial tokens raised an event: %v", err)
	}
	all, err := m.SlotList(false)
	must(t, err)
	if len(all) != 3 {
		t.Errorf("FAULTMOD_SLOTS=3: %d slots", len(all))
	}
	// The control socket is this process's.
	ctl, err := DialTimeout(controlSocket, 5*time.Second)
	must(t, err)
	defer ctl.Close()
	must(t, ctl.Remove(2))
	if s, err := m.WaitForSlotEvent(true); err != nil || s != 2 {
		t.Errorf("after remove: (%d, %v), want (2, nil)", s, err)
	}
}
