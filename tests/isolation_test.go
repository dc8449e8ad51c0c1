package tests

import (
	"path"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	godbus "github.com/godbus/dbus/v5"

	"github.com/slotwatch/slotwatch/tests/faultmod"
	"github.com/slotwatch/slotwatch/tests/stack"
)

// TestIsolatedModuleCrashes: a module loaded with isolation (p11-kit
// remote) that abort()s takes down only its helper process: slotwatch
// shows the module failed and its token removed, starts it again, and the
// token comes back with a new generation — the daemon itself never
// restarts. make stress runs 100 crashes.
func TestIsolatedModuleCrashes(t *testing.T) {
	crashes := stressCount("SLOTWATCH_STRESS_CRASHES", 3)
	path, err := faultmod.Path()
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "faultmod.sock")
	bus := stack.StartDBusForTest(t, "")
	// The helper process loads the module; it inherits this environment
	// and starts with its token inserted, crash after crash.
	env := []string{"FAULTMOD_CONTROL=" + sock, faultmod.TokensEnv(faultmod.Token{Slot: 0, Label: "Isolated", Serial: "150a0001"})}
	d := startDaemon(t, bus, env, "--module", path, "--isolate", "--no-pcsc")
	pid := d.cmd.Process.Pid
	sub := subscribe(t, bus)
	conn := dial(t, bus)
	first := findToken(t, conn, "Isolated")
	last, _ := generationOf(first)

	for i := range crashes {
		ctl, err := faultmod.DialTimeout(sock, 10*time.Second)
		if err != nil {
			t.Fatalf("crash %d: control channel of the helper: %v", i, err)
		}
		if err := ctl.Abort("GetSlotList", 1); err != nil {
			t.Fatal(err)
		}
		ctl.Close()
		var removed, inserted uint64
		for inserted == 0 {
			sig := sub.nextOf(15*time.Second, sigRemoved, sigInserted)
			gen := sig.Body[2].(uint64)
			switch {
			case sig.Name == sigRemoved && gen == last:
				removed = gen
			case sig.Name == sigInserted && removed != 0:
				inserted = gen
			}
		}
		if inserted <= last {
			t.Fatalf("crash %d: token back as generation %d after %d", i, inserted, last)
		}
		last = inserted
		select {
		case <-d.exited:
			t.Fatalf("crash %d took the daemon down", i)
		default:
		}
	}
	if d.cmd.Process.Pid != pid {
		t.Fatal("the daemon was restarted")
	}
	var state uint32
	for start := time.Now(); ; time.Sleep(20 * time.Millisecond) {
		conn.Object(busName, rootPath).StoreProperty(mgrIface+".State", &state)
		if state == 1 {
			break
		}
		if time.Since(start) > 5*time.Second {
			t.Fatalf("Manager.State %d after the crashes, want 1", state)
		}
	}
	t.Logf("%d crashes of the isolated module: each time its token went and came back with a new generation; daemon pid %d throughout", crashes, pid)
}

// generationOf parses the generation at the end of a token path.
func generationOf(p godbus.ObjectPath) (uint64, bool) {
	g, err := strconv.ParseUint(path.Base(string(p)), 10, 64)
	return g, err == nil
}
