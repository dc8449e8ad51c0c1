package tests

import (
	"path/filepath"
	"testing"
	"time"

	godbus "github.com/godbus/dbus/v5"
	"github.com/miekg/pkcs11"

	"github.com/slotwatch/slotwatch/tests/faultmod"
	"github.com/slotwatch/slotwatch/tests/stack"
)

// faultDaemon runs slotwatch serve with the fault-injection module and
// returns its control channel.
func faultDaemon(t *testing.T) (*stack.DBus, *faultmod.Control) {
	bus, ctl, _ := faultDaemonProc(t)
	return bus, ctl
}

// faultDaemonProc is faultDaemon that also returns the daemon process.
func faultDaemonProc(t *testing.T) (*stack.DBus, *faultmod.Control, *daemon) {
	t.Helper()
	path, err := faultmod.Path()
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "faultmod.sock")
	bus := stack.StartDBusForTest(t, "")
	d := startDaemon(t, bus, []string{"FAULTMOD_CONTROL=" + sock}, "--module", path, "--no-pcsc")
	ctl, err := faultmod.DialTimeout(sock, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ctl.Close() })
	return bus, ctl, d
}

// TestDBusAnswersWhileTheModuleIsSlowOrFailing (rules 5, 6 over the bus):
// while the monitor is stuck in a slow module call, property reads and
// GetManagedObjects answer at once; a module that keeps failing is shown
// degraded, its tokens go, and after its re-initialization they come back
// with new generations and the state is running again.
func TestDBusAnswersWhileTheModuleIsSlowOrFailing(t *testing.T) {
	bus, ctl := faultDaemon(t)
	conn := dial(t, bus)
	sub := subscribe(t, bus)
	if err := ctl.Insert(0, "Fault Card", "fa000001"); err != nil {
		t.Fatal(err)
	}
	first := sub.next(sigInserted, 5*time.Second).Body[2].(uint64)

	if err := ctl.Sleep("GetSlotList", 2*time.Second); err != nil {
		t.Fatal(err)
	}
	if err := ctl.Insert(1, "Wake", "fa000002"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond) // the monitor is now inside the slow C_GetSlotList
	start := time.Now()
	var state uint32
	if err := conn.Object(busName, rootPath).StoreProperty(mgrIface+".State", &state); err != nil {
		t.Fatal(err)
	}
	managedObjects(t, conn)
	if d := time.Since(start); d > 500*time.Millisecond {
		t.Fatalf("a property Get and GetManagedObjects took %v while the module was slow", d)
	}
	ctl.Sleep("GetSlotList", 0)
	sub.next(sigInserted, 5*time.Second) // the "Wake" token, once the slow read is over

	if err := ctl.Fail("GetSlotList", pkcs11.CKR_GENERAL_ERROR, 1, 3); err != nil {
		t.Fatal(err)
	}
	if err := ctl.Remove(1); err != nil { // a wake-up
		t.Fatal(err)
	}
	sawDegraded := false
	removedFirst := false
	var again uint64
	deadline := time.After(10 * time.Second)
	for again == 0 {
		select {
		case sig := <-sub.ch:
			switch sig.Name {
			case sigPropChange:
				if sig.Path == rootPath {
					if v, ok := sig.Body[1].(map[string]godbus.Variant)["State"]; ok && v.Value().(uint32) == 2 {
						sawDegraded = true
					}
				}
			case sigRemoved:
				removedFirst = removedFirst || sig.Body[2].(uint64) == first
			case sigInserted:
				if removedFirst {
					again = sig.Body[2].(uint64)
				}
			}
		case <-deadline:
			t.Fatalf("no recovery: degraded %v, first token removed %v", sawDegraded, removedFirst)
		}
	}
	if !sawDegraded || again <= first {
		t.Fatalf("degraded seen %v, token back as generation %d (was %d)", sawDegraded, again, first)
	}
	for start := time.Now(); ; time.Sleep(20 * time.Millisecond) {
		conn.Object(busName, rootPath).StoreProperty(mgrIface+".State", &state)
		if state == 1 {
			break
		}
		if time.Since(start) > 5*time.Second {
			t.Fatalf("Manager.State %d after recovery, want 1", state)
		}
	}
}
