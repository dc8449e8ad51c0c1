package tests

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
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
// environment and returns once the daemon is ready, as systemd (Type=notify)
// sees it: it said READY=1 on a notify socket of the test's. The daemon
// says that after everything a test may use at once: its objects are
// exported, io.github.slotwatch.Slotwatch1 is owned, with --gnome-compat
// org.gnome.SettingsDaemon.Smartcard is requested (the daemon asks for it
// only after its own name), and the removal policy follows the monitor
// (it starts after the names). Owning the native name alone is not ready:
// a test that then called the GNOME name failed, now and then, with
// ServiceUnknown.
//
// At READY=1 the names must be there: the native one owned and, with
// --gnome-compat, the daemon's connection the GNOME name's owner or in its
// queue (another connection may own it: TestGnomeNameOwned). A caller that
// sets NOTIFY_SOCKET itself (TestSdNotify) reads the notifications itself;
// startDaemon then waits for those names alone.
//
// Cleanup stops it by PID (SIGTERM) and fails the test if it takes more
// than 2 s.
func startDaemon(t *testing.T, bus *stack.DBus, env []string, args ...string) *daemon {
	t.Helper()
	d := &daemon{stderr: &lockedBuffer{}, exited: make(chan struct{})}
	var ready <-chan struct{} // closed at READY=1; nil: the caller listens
	if !slices.ContainsFunc(env, func(kv string) bool { return strings.HasPrefix(kv, "NOTIFY_SOCKET=") }) {
		var sock string
		sock, ready = listenNotify(t)
		env = append(slices.Clip(env), "NOTIFY_SOCKET="+sock)
	}
	if !slices.ContainsFunc(env, func(kv string) bool { return strings.HasPrefix(kv, "XDG_RUNTIME_DIR=") }) {
		// Its own runtime directory, so its PKCS#11 socket
		// (XDG_RUNTIME_DIR/slotwatch/pkcs11) is the test's alone.
		rt, err := os.MkdirTemp(testDir, "rt-")
		if err != nil {
			t.Fatal(err)
		}
		env = append(slices.Clip(env), "XDG_RUNTIME_DIR="+rt)
	}
	if !slices.ContainsFunc(env, func(kv string) bool { return strings.HasPrefix(kv, "DBUS_SYSTEM_BUS_ADDRESS=") }) {
		// Never the machine's system bus (and its logind): a test that
		// wants suspend and resume gives a private one.
		env = append(slices.Clip(env), "DBUS_SYSTEM_BUS_ADDRESS=unix:path="+filepath.Join(t.TempDir(), "no-system-bus"))
	}
	d.cmd = exec.Command(slotwatchBin(t), append([]string{"serve", "--address", bus.Address, "--log-level", "debug"}, args...)...)
	// Not the service manager of whoever runs the tests: only env says
	// where notifications go.
	d.cmd.Env = append(withoutEnv(os.Environ(), "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"), env...)
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
	gnome := gnomeCompat(args)
	const timeout = 15 * time.Second
	deadline := time.After(timeout)
	poll := time.NewTicker(20 * time.Millisecond)
	defer poll.Stop()
	for {
		select {
		case <-d.exited:
			t.Fatalf("slotwatch serve exited: %v\n%s", d.cmd.ProcessState, d.stderr.String())
		case <-deadline:
			what := "said READY=1"
			if ready == nil {
				what = "owned its names"
			}
			t.Fatalf("slotwatch serve has not %s within %v (%s)\n%s", what, timeout, daemonNames(conn, gnome), d.stderr.String())
		case <-ready:
			if missing := daemonNames(conn, gnome); missing != "" {
				t.Fatalf("slotwatch serve said READY=1 before its names were there: %s\n%s", missing, d.stderr.String())
			}
			return d
		case <-poll.C:
			if ready == nil && daemonNames(conn, gnome) == "" {
				return d
			}
		}
	}
}

// listenNotify listens on a new sd_notify socket (a unixgram socket, as
// systemd's) and returns its path and a channel that is closed when a
// message with READY=1 arrives. The socket is closed after that message
// (later notifications are refused, which the daemon ignores) or at
// cleanup.
func listenNotify(t *testing.T) (string, <-chan struct{}) {
	t.Helper()
	// testDir, not t.TempDir(): a long test name would not fit in a
	// unix socket address (107 bytes).
	dir, err := os.MkdirTemp(testDir, "notify-")
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "s")
	l, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		l.Close()
		os.RemoveAll(dir)
	})
	ready := make(chan struct{})
	go func() {
		defer l.Close()
		buf := make([]byte, 4096)
		for {
			n, err := l.Read(buf)
			if err != nil {
				return
			}
			if slices.Contains(strings.Split(string(buf[:n]), "\n"), "READY=1") {
				close(ready)
				return
			}
		}
	}()
	return sock, ready
}

// gnomeCompat tells whether serve args ask for the GNOME name
// (--gnome-compat, =true, =queue or =replace; the last one counts).
func gnomeCompat(args []string) bool {
	on := false
	for _, a := range args {
		if a == "--" {
			break
		}
		name, val, hasVal := strings.Cut(strings.TrimLeft(a, "-"), "=")
		if !strings.HasPrefix(a, "-") || name != "gnome-compat" {
			continue
		}
		on = !hasVal || val != "false"
	}
	return on
}

// daemonNames returns "" if io.github.slotwatch.Slotwatch1 is owned and,
// with gnome, its owner is the owner of org.gnome.SettingsDaemon.Smartcard
// or queued for it; otherwise what is missing.
func daemonNames(conn *godbus.Conn, gnome bool) string {
	var owner string
	if err := conn.BusObject().Call("org.freedesktop.DBus.GetNameOwner", 0, busName).Store(&owner); err != nil {
		return busName + " has no owner"
	}
	if !gnome {
		return ""
	}
	var queued []string
	if err := conn.BusObject().Call("org.freedesktop.DBus.ListQueuedOwners", 0, gnomeName).Store(&queued); err != nil {
		return fmt.Sprintf("%s (owner of %s) has not requested %s: %v", owner, busName, gnomeName, err)
	}
	if !slices.Contains(queued, owner) {
		return fmt.Sprintf("%s (owner of %s) has not requested %s (owner and queue: %q)", owner, busName, gnomeName, queued)
	}
	return ""
}

// withoutEnv returns env without the given variables.
func withoutEnv(env []string, names ...string) []string {
	return slices.DeleteFunc(slices.Clone(env), func(kv string) bool {
		return slices.ContainsFunc(names, func(n string) bool { return strings.HasPrefix(kv, n+"=") })
	})
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
