package tests

import (
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	godbus "github.com/godbus/dbus/v5"

	"github.com/slotwatch/slotwatch/tests/stack"
)

const (
	busName  = "io.github.slotwatch.Slotwatch1"
	rootPath = godbus.ObjectPath("/io/github/slotwatch/Slotwatch1")
	mgrIface = busName + ".Manager"
	tokIface = busName + ".Token"
	sesIface = busName + ".Session"
	errPfx   = busName + ".Error."
)

// daemon is a `slotwatch serve` process on a private bus.
type daemon struct {
	cmd    *exec.Cmd
	stderr *lockedBuffer
	exited chan struct{}
}

// startDaemon runs `slotwatch serve --address BUS args...` with extra
// environment and waits until it owns its name. Cleanup stops it by PID
// (SIGTERM) and fails the test if it takes more than 2 s.
func startDaemon(t *testing.T, bus *stack.DBus, env []string, args ...string) *daemon {
	t.Helper()
	d := &daemon{stderr: &lockedBuffer{}, exited: make(chan struct{})}
	d.cmd = exec.Command(slotwatchBin(t), append([]string{"serve", "--address", bus.Address, "--log-level", "debug"}, args...)...)
	d.cmd.Env = append(os.Environ(), env...)
	d.cmd.Stdout, d.cmd.Stderr = d.stderr, d.stderr
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { d.cmd.Wait(); close(d.exited) }()
	t.Cleanup(func() {
		d.cmd.Process.Signal(syscall.SIGTERM)
		start := time.Now()
		select {
		case <-d.exited:
			if took := time.Since(start); took > 2*time.Second {
				t.Errorf("slotwatch serve took %v to stop", took)
			}
		case <-time.After(5 * time.Second):
			d.cmd.Process.Kill()
			<-d.exited
			t.Errorf("slotwatch serve did not stop within 5 s of SIGTERM\n%s", d.stderr.String())
		}
		if t.Failed() {
			t.Logf("slotwatch serve output:\n%s", d.stderr.String())
		}
	})
	conn := dial(t, bus)
	deadline := time.Now().Add(15 * time.Second)
	for {
		var has bool
		if err := conn.BusObject().Call("org.freedesktop.DBus.NameHasOwner", 0, busName).Store(&has); err == nil && has {
			return d
		}
		select {
		case <-d.exited:
			t.Fatalf("slotwatch serve exited: %v\n%s", d.cmd.ProcessState, d.stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("slotwatch serve did not own %s within 15 s\n%s", busName, d.stderr.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// dial connects a client to the private bus, with in-order signals.
func dial(t *testing.T, bus *stack.DBus) *godbus.Conn {
	t.Helper()
	conn, err := godbus.Connect(bus.Address, godbus.WithSignalHandler(godbus.NewSequentialSignalHandler()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// errName returns the D-Bus error name of err ("" for nil).
func errName(err error) string {
	if err == nil {
		return ""
	}
	if e, ok := err.(godbus.Error); ok {
		return e.Name
	}
	if e, ok := err.(*godbus.Error); ok {
		return e.Name
	}
	return "not a D-Bus error: " + err.Error()
}

// managedObjects returns the service's GetManagedObjects.
func managedObjects(t *testing.T, conn *godbus.Conn) map[godbus.ObjectPath]map[string]map[string]godbus.Variant {
	t.Helper()
	var objs map[godbus.ObjectPath]map[string]map[string]godbus.Variant
	if err := conn.Object(busName, rootPath).Call("org.freedesktop.DBus.ObjectManager.GetManagedObjects", 0).Store(&objs); err != nil {
		t.Fatal(err)
	}
	return objs
}

// findToken returns the path of the token with label, from
// GetManagedObjects, waiting up to 10 s for it.
func findToken(t *testing.T, conn *godbus.Conn, label string) godbus.ObjectPath {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		for p, ifaces := range managedObjects(t, conn) {
			if props, ok := ifaces[tokIface]; ok && props["Label"].Value() == label {
				return p
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no token %q on the bus", label)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func isUnder(p godbus.ObjectPath, prefix string) bool {
	return strings.HasPrefix(string(p), string(rootPath)+"/"+prefix+"/")
}
