package tests

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	godbus "github.com/godbus/dbus/v5"

	"github.com/slotwatch/slotwatch/tests/stack"
)

// TestReload: Manager.Reload re-reads the config file; a module whose
// section is gone leaves the bus with its tokens (TokenRemoved), and the
// call answers once the new state is on the bus.
func TestReload(t *testing.T) {
	hsm, err := stack.NewSoftHSM(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if err := hsm.InitToken(hsmLabel, hsmSO, hsmPIN); err != nil {
		t.Fatal(err)
	}
	conf := filepath.Join(t.TempDir(), "slotwatch.conf")
	write := func(text string) {
		if err := os.WriteFile(conf, []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write("[module hsm]\npath = " + stack.SoftHSMModule + "\n")
	bus := stack.StartDBusForTest(t, "")
	// XDG_CONFIG_HOME points at an empty dir so that no user p11-kit
	// registration of this machine joins in.
	startDaemon(t, bus, append(hsm.Env(), "XDG_CONFIG_HOME="+t.TempDir()), "--config", conf, "--no-pcsc")
	conn := dial(t, bus)
	sub := subscribe(t, bus)
	tok := findToken(t, conn, hsmLabel)
	hsmModule := rootPath + "/modules/hsm"
	if _, ok := managedObjects(t, conn)[hsmModule]; !ok {
		t.Fatalf("no %s on the bus", hsmModule)
	}

	// The section goes: module "hsm" must go with its token.
	write("# no modules of our own\n")
	if err := conn.Object(busName, rootPath).Call(mgrIface+".Reload", 0).Err; err != nil {
		t.Fatalf("Reload: %v", err)
	}
	objs := managedObjects(t, conn)
	if _, ok := objs[hsmModule]; ok {
		t.Fatalf("%s still on the bus after Reload", hsmModule)
	}
	if _, ok := objs[tok]; ok {
		t.Fatalf("token %s of the removed module still on the bus after Reload", tok)
	}
	for {
		sig := sub.next(sigRemoved, 5*time.Second)
		if sig.Body[0].(godbus.ObjectPath) == tok {
			break
		}
	}

	// A broken config is refused with its line, and nothing changes.
	write("[module bad]\nfrobnicate = yes\n")
	err = conn.Object(busName, rootPath).Call(mgrIface+".Reload", 0).Err
	if errName(err) != errPfx+"InvalidConfig" || !strings.Contains(err.Error(), ":2") {
		t.Fatalf("Reload with a broken config: %v, want InvalidConfig naming line 2", err)
	}
}
