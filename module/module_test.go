package module

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/pkcs11"
	"github.com/slotwatch/slotwatch/tests/stack"
)

// Every entry point answers ErrNotInitialized, without crashing, before the
// first Initialize.
func TestNotInitialized(t *testing.T) {
	m := Open(stack.SoftHSMModule, Options{Name: "softhsm"})
	if m.Initialized() {
		t.Fatal("Initialized before Initialize")
	}
	assertNotInitialized(t, m)
	if err := m.Finalize(); !errors.Is(err, ErrNotInitialized) {
		t.Errorf("Finalize without Initialize = %v, want ErrNotInitialized", err)
	}
	if n := m.ReclaimSlot(0, 1); n != 0 {
		t.Errorf("ReclaimSlot = %d", n)
	}
	if len(m.Sessions()) != 0 {
		t.Error("sessions without a module")
	}
}

func assertNotInitialized(t *testing.T, m *Module) {
	t.Helper()
	check := func(what string, err error) {
		t.Helper()
		if !errors.Is(err, ErrNotInitialized) {
			t.Errorf("%s = %v, want ErrNotInitialized", what, err)
		}
	}
	_, err := m.Info()
	check("Info", err)
	_, err = m.SlotList(false)
	check("SlotList", err)
	_, err = m.SlotInfo(0)
	check("SlotInfo", err)
	_, err = m.TokenInfo(0)
	check("TokenInfo", err)
	_, err = m.WaitForSlotEvent(true)
	check("WaitForSlotEvent(dontBlock)", err)
	_, err = m.WaitForSlotEvent(false)
	check("WaitForSlotEvent", err)
	_, err = m.OpenSession("a", 0, 1, false)
	check("OpenSession", err)
	check("CloseSession", m.CloseSession(1))
	check("Login", m.Login(1, pkcs11.CKU_USER, []byte("x")))
	check("Logout", m.Logout(1))
	_, err = m.SessionState(1)
	check("SessionState", err)
	_, err = m.FindObjects(1, nil, 0)
	check("FindObjects", err)
	_, err = m.GetAttributes(1, 1, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_LABEL, nil)})
	check("GetAttributes", err)
	_, err = m.Sign(1, pkcs11.NewMechanism(pkcs11.CKM_ECDSA, nil), 1, []byte("x"))
	check("Sign", err)
	check("InitToken", m.InitToken(0, []byte("x"), "x"))
}

func TestLoadError(t *testing.T) {
	m := Open("/nonexistent/libnothing.so", Options{Name: "nothing"})
	err := m.Initialize()
	if !errors.Is(err, ErrLoad) || !strings.Contains(err.Error(), "No such file") {
		t.Fatalf("Initialize = %v, want ErrLoad with dlerror's reason", err)
	}
	if m.Initialized() {
		t.Fatal("Initialized after a failed load")
	}
	if err := m.Finalize(); !errors.Is(err, ErrNotInitialized) {
		t.Errorf("Finalize after failed Initialize = %v", err)
	}
}

// Our declaration of CK_FUNCTION_LIST must put the functions we call where
// the library has them.
func TestFunctionListLayout(t *testing.T) {
	for _, path := range []string{stack.SoftHSMModule, openSCModule} {
		m := Open(path, Options{})
		if err := m.Initialize(); err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		lib, ok := refLoaded(path)
		if !ok {
			t.Fatalf("%s: no reference to the loaded library", path)
		}
		if !lib.layoutOK() {
			t.Errorf("%s: function list layout does not match the exported symbols", path)
		}
		lib.release()
		if err := m.Finalize(); err != nil {
			t.Fatal(err)
		}
		// Unloaded means unloaded: RTLD_NOLOAD finds nothing.
		if lib, ok := refLoaded(path); ok {
			lib.release()
			t.Errorf("%s still loaded after the last Finalize", path)
		}
	}
}

func TestInfo(t *testing.T) {
	m := openSoftHSM(t, Options{})
	info, err := m.Info()
	if err != nil {
		t.Fatal(err)
	}
	if info.Manufacturer != "SoftHSM" || !strings.HasPrefix(info.Description, "Implementation of PKCS11") {
		t.Errorf("Info = %+v", info)
	}
	if info.CryptokiVersion.Major != 2 {
		t.Errorf("Cryptoki version %v", info.CryptokiVersion)
	}
	slot := slotOf(t, m, alphaLabel)
	si, err := m.SlotInfo(slot)
	if err != nil {
		t.Fatal(err)
	}
	if !si.TokenPresent() || si.Description == "" || strings.HasSuffix(si.Description, " ") {
		t.Errorf("SlotInfo = %+v", si)
	}
	ti, err := m.TokenInfo(slot)
	if err != nil {
		t.Fatal(err)
	}
	if ti.Label != alphaLabel || ti.Manufacturer != "SoftHSM project" || ti.Model != "SoftHSM v2" || ti.Serial == "" ||
		strings.HasSuffix(ti.Serial, " ") || ti.Flags&pkcs11.CKF_TOKEN_INITIALIZED == 0 {
		t.Errorf("TokenInfo = %+v", ti)
	}
	if _, err := m.SlotInfo(12345); !errors.Is(err, ErrSlotIDInvalid) {
		t.Errorf("SlotInfo(bad) = %v", err)
	}
}

// The refcount: 50 goroutines take and give up holds at once while using
// sessions. First with nobody else holding the module, so it may be loaded
// and unloaded several times in between, but never while one of the workers
// holds it; then with a long-lived holder whose session survives all of it.
// The module is finalized exactly when the last hold goes, and can be
// initialized again.
func TestConcurrentInitializeFinalize(t *testing.T) {
	log := newLogBuffer()
	m := Open(stack.SoftHSMModule, Options{Name: "softhsm", CallLog: log.logger})
	t.Cleanup(func() { finalizeAll(m) })
	if hsmErr != nil {
		t.Fatal(hsmErr)
	}
	if err := m.Initialize(); err != nil {
		t.Fatal(err)
	}
	slot := slotOf(t, m, alphaLabel)
	if err := m.Finalize(); err != nil {
		t.Fatal(err)
	}

	storm(t, m, slot, nil)
	if m.Initialized() {
		t.Fatal("still initialized after every worker's Finalize")
	}

	if err := m.Initialize(); err != nil {
		t.Fatal(err)
	}
	keeper, err := m.OpenSession("keeper", slot, 1, false)
	if err != nil {
		t.Fatal(err)
	}
	storm(t, m, slot, keeper)

	// The keeper never let go, so its session is still the module's.
	if !m.Initialized() {
		t.Fatal("finalized while the keeper holds it")
	}
	if st, err := m.SessionState(keeper.ID); err != nil || st != pkcs11.CKS_RO_PUBLIC_SESSION {
		t.Fatalf("keeper SessionState = %v, %v", st, err)
	}
	if got := m.Sessions(); len(got) != 1 || got[0].ID != keeper.ID {
		t.Fatalf("sessions left: %+v", got)
	}

	if err := m.Finalize(); err != nil {
		t.Fatal(err)
	}
	if m.Initialized() {
		t.Fatal("still initialized after the last Finalize")
	}
	assertNotInitialized(t, m)
	if len(m.Sessions()) != 0 {
		t.Fatal("session records survived the last Finalize")
	}
	if err := m.Finalize(); !errors.Is(err, ErrNotInitialized) {
		t.Errorf("extra Finalize = %v", err)
	}

	// C_Initialize and C_Finalize alternate: the module was never
	// initialized twice, nor finalized under a holder and then used.
	var seq []string
	for _, line := range log.find("msg=C_") {
		for _, fn := range []string{"msg=C_Initialize ", "msg=C_Finalize "} {
			if strings.Contains(line, fn) {
				seq = append(seq, fn)
			}
		}
	}
	for i, fn := range seq {
		if want := []string{"msg=C_Initialize ", "msg=C_Finalize "}[i%2]; fn != want {
			t.Fatalf("load sequence %q", seq)
		}
	}
	t.Logf("the module was loaded %d times", len(seq)/2)

	if err := m.Initialize(); err != nil {
		t.Fatalf("Initialize again: %v", err)
	}
	s, err := m.OpenSession("again", slotOf(t, m, alphaLabel), 2, false)
	if err != nil {
		t.Fatal(err)
	}
	if s.ID <= keeper.ID {
		t.Errorf("registry id %d reused (keeper had %d)", s.ID, keeper.ID)
	}
	if _, err := m.SessionState(keeper.ID); !errors.Is(err, ErrNoSuchSession) {
		t.Errorf("old session after reinit = %v, want ErrNoSuchSession", err)
	}
}

// storm runs 50 workers that each Initialize, use sessions, Finalize. While a
// worker holds the module, none of its calls may fail. keeper, if not nil,
// is a session every worker also uses.
func storm(t *testing.T, m *Module, slot uint, keeper *Session) {
	t.Helper()
	const workers = 50
	var (
		wg    sync.WaitGroup
		start = make(chan struct{})
		errs  = make(chan error, workers*16)
	)
	for i := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			// Arrive in waves, so that without a keeper the holds can drop
			// to zero and the module is unloaded and loaded again meanwhile.
			time.Sleep(time.Duration(i%5) * 20 * time.Millisecond)
			if err := m.Initialize(); err != nil {
				errs <- fmt.Errorf("worker %d Initialize: %w", i, err)
				return
			}
			owner := fmt.Sprintf("worker-%d", i)
			var left []uint64
			for j := range 3 {
				s, err := m.OpenSession(owner, slot, 1, j%2 == 0)
				if err != nil {
					errs <- fmt.Errorf("worker %d OpenSession: %w", i, err)
					break
				}
				if _, err := m.SessionState(s.ID); err != nil {
					errs <- fmt.Errorf("worker %d SessionState: %w", i, err)
				}
				if _, err := m.FindObjects(s.ID, nil, 10); err != nil {
					errs <- fmt.Errorf("worker %d FindObjects: %w", i, err)
				}
				if _, err := m.SlotList(true); err != nil {
					errs <- fmt.Errorf("worker %d SlotList: %w", i, err)
				}
				left = append(left, s.ID)
				if j == 1 || j == 2 { // session 1 at once, 0 and 2 after 2 was used
					ids := left[len(left)-1:]
					if j == 2 {
						ids = []uint64{left[0], left[2]}
					}
					for _, id := range ids {
						if err := m.CloseSession(id); err != nil {
							errs <- fmt.Errorf("worker %d CloseSession: %w", i, err)
						}
					}
				}
			}
			if keeper != nil { // used by everyone, one call at a time
				if _, err := m.SessionState(keeper.ID); err != nil {
					errs <- fmt.Errorf("worker %d keeper SessionState: %w", i, err)
				}
			}
			if err := m.Finalize(); err != nil {
				errs <- fmt.Errorf("worker %d Finalize: %w", i, err)
			}
		}()
	}
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// Initialize and Finalize racing with every kind of call: calls either work
// or say ErrNotInitialized, never crash (run with -race).
func TestCallsRacingFinalize(t *testing.T) {
	m := openSoftHSM(t, Options{})
	slot := slotOf(t, m, alphaLabel)
	if err := m.Finalize(); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for i := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				ok := func(err error) bool {
					return err == nil || errors.Is(err, ErrNotInitialized) || errors.Is(err, ErrNoSuchSession)
				}
				s, err := m.OpenSession(fmt.Sprint("racer", i), slot, 1, false)
				if !ok(err) {
					t.Errorf("OpenSession: %v", err)
					return
				}
				if err == nil {
					if _, err := m.FindObjects(s.ID, nil, 0); !ok(err) {
						t.Errorf("FindObjects: %v", err)
					}
					if err := m.CloseSession(s.ID); !ok(err) {
						t.Errorf("CloseSession: %v", err)
					}
				}
				if _, err := m.WaitForSlotEvent(true); err != nil && !errors.Is(err, ErrNoEvent) && !errors.Is(err, ErrNotInitialized) {
					t.Errorf("WaitForSlotEvent: %v", err)
				}
			}
		}()
	}
	for range 30 {
		if err := m.Initialize(); err != nil {
			t.Fatal(err)
		}
		if err := m.Finalize(); err != nil {
			t.Fatal(err)
		}
	}
	close(stop)
	wg.Wait()
}
