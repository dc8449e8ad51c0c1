package tests

import (
	"net"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/slotwatch/slotwatch/tests/stack"
)

// TestSdNotify: under a (fake) service manager the daemon says READY=1 once
// its objects are on the bus, pings the watchdog at half its interval, and
// says STOPPING=1 on SIGTERM.
func TestSdNotify(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "notify")
	l, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	hsm, err := stack.NewSoftHSM(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if err := hsm.InitToken(hsmLabel, hsmSO, hsmPIN); err != nil {
		t.Fatal(err)
	}
	bus := stack.StartDBusForTest(t, "")
	// A 400 ms watchdog: the daemon must ping at half of it.
	d := startDaemon(t, bus, append(hsm.Env(), "NOTIFY_SOCKET="+sock, "WATCHDOG_USEC=400000"), "--module", stack.SoftHSMModule, "--no-pcsc")

	read := func() string {
		t.Helper()
		buf := make([]byte, 4096)
		l.SetReadDeadline(time.Now().Add(5 * time.Second))
		n, err := l.Read(buf)
		if err != nil {
			t.Fatalf("no sd_notify message: %v", err)
		}
		return string(buf[:n])
	}
	if msg := read(); !strings.Contains(msg, "READY=1") {
		t.Fatalf("first notification %q, want READY=1", msg)
	}
	// READY came after the objects: the token is there at once.
	conn := dial(t, bus)
	found := false
	for _, ifs := range managedObjects(t, conn) {
		if v, ok := ifs[tokIface]["Label"]; ok && v.Value() == hsmLabel {
			found = true
		}
	}
	if !found {
		t.Fatal("READY=1 before the token was on the bus")
	}
	var state uint32
	if err := conn.Object(busName, rootPath).StoreProperty(mgrIface+".State", &state); err != nil || state != 1 {
		t.Fatalf("Manager.State %d (%v), want 1 (running)", state, err)
	}

	pings := 0
	for start := time.Now(); time.Since(start) < time.Second; {
		if msg := read(); strings.Contains(msg, "WATCHDOG=1") {
			pings++
		}
	}
	if pings < 3 {
		t.Fatalf("%d watchdog pings in 1 s with WatchdogSec=400ms, want about 5", pings)
	}

	d.cmd.Process.Signal(syscall.SIGTERM)
	for {
		msg := read()
		if strings.Contains(msg, "STOPPING=1") {
			break
		}
		if !strings.Contains(msg, "WATCHDOG=1") {
			t.Fatalf("notification after SIGTERM %q, want STOPPING=1", msg)
		}
	}
	select {
	case <-d.exited:
	case <-time.After(2 * time.Second):
		t.Fatal("daemon still running 2 s after SIGTERM")
	}
	var has bool
	conn.BusObject().Call("org.freedesktop.DBus.NameHasOwner", 0, busName).Store(&has)
	if has {
		t.Fatal("name still owned after the daemon exited")
	}
}

// TestBusGoesAway: when its bus stops, the daemon stops too (with an
// error, so that systemd's Restart=on-failure applies) instead of running
// on unreachable.
func TestBusGoesAway(t *testing.T) {
	hsm, err := stack.NewSoftHSM(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if err := hsm.InitToken(hsmLabel, hsmSO, hsmPIN); err != nil {
		t.Fatal(err)
	}
	bus := stack.StartDBusForTest(t, "")
	d := startDaemon(t, bus, hsm.Env(), "--module", stack.SoftHSMModule, "--no-pcsc")
	if err := bus.Stop(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-d.exited:
		if d.cmd.ProcessState.ExitCode() == 0 {
			t.Fatalf("daemon exited 0 after losing its bus; want a failure exit\n%s", d.stderr.String())
		}
	case <-time.After(3 * time.Second):
		t.Fatalf("daemon still running 3 s after its bus stopped\n%s", d.stderr.String())
	}
}
