package tests

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	godbus "github.com/godbus/dbus/v5"

	"github.com/slotwatch/slotwatch/tests/stack"
	"github.com/slotwatch/slotwatch/version"
)

// fileSum is the sha256 of a file's contents.
func fileSum(t *testing.T, path string) [32]byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	var s [32]byte
	copy(s[:], h.Sum(nil))
	return s
}

// procStatusField returns a "Key:" line's value of /proc/PID/status.
func procStatusField(pid int, key string) string {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, key+":"); ok {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

// pollUntil polls cond every 20 ms until it holds or d passed.
func pollUntil(d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
	return true
}

// TestUserManagerActivation runs the package's files under a real
// systemd user manager (tests/stack/usermanager.go: a private mount
// namespace with the package laid over /usr and /etc, a cgroup of its
// own, and the session bus as dbus-user-session runs it, with systemd
// activation). A drop-in gives the unit a SoftHSM2 store and --no-pcsc,
// as a user's "systemctl --user edit" would. Then:
//
//   - the first call to io.github.slotwatch.Slotwatch1 starts
//     slotwatch.service by D-Bus activation (the package's activation
//     file, SystemdService=), run from the package's /usr/bin/slotwatch by
//     the manager, not by the bus;
//   - systemctl --user shows it active (Type=notify: it said READY=1)
//     with its watchdog (WatchdogUSec=30s, and WATCHDOG_USEC/WATCHDOG_PID
//     in its environment) and the unit's sandbox in force (no new
//     privileges, a seccomp filter, no core dumps);
//   - a D-Bus session opened through Token.OpenSession is closed when
//     "systemctl --user stop" stops the daemon (its InterfacesRemoved
//     comes before the name goes), the stop is clean (Result=success, no
//     restart) and leaves no process.
//
// Nothing touches the machine's /run, buses or user manager; every
// process is stopped by pid at cleanup, the manager included.
func TestUserManagerActivation(t *testing.T) {
	if _, err := os.Stat(stack.SystemdPath); err != nil {
		t.Fatalf("%s: %v (make deps installs systemd)", stack.SystemdPath, err)
	}
	b := builtDeb(t)
	root := extractDeb(t, b.Path)
	if err := stack.CheckUserManagerNamespace(root); err != nil {
		t.Skipf("SKIP: this machine cannot run a systemd user manager in a private namespace: %v", err)
	}

	hsm, err := stack.NewSoftHSM(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	const label = "User Manager HSM"
	if err := hsm.InitToken(label, hsmSO, hsmPIN); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	daemonLog := filepath.Join(dir, "slotwatch.log")
	for _, p := range []string{hsm.Conf, daemonLog} {
		if strings.ContainsAny(p, " \t\n\"'\\%$;") {
			t.Fatalf("path %q cannot go into a unit file as it is", p)
		}
	}
	dropIn := fmt.Sprintf(`[Service]
Environment=SOFTHSM2_CONF=%s
ExecStart=
ExecStart=/usr/bin/slotwatch serve --no-pcsc --module %s --log-level debug
StandardOutput=append:%s
StandardError=inherit
`, hsm.Conf, stack.SoftHSMModule, daemonLog)
	m := stack.StartUserManagerForTest(t, stack.UserManagerConfig{
		Dir:   dir,
		Root:  root,
		Units: map[string]string{"slotwatch.service.d/50-test.conf": dropIn},
	})
	logs := func() string {
		d, _ := os.ReadFile(daemonLog)
		return fmt.Sprintf("--- slotwatch serve ---\n%s\n--- session bus ---\n%s\n--- systemd --user ---\n%s", d, m.BusLog(), m.Log())
	}
	show := func(props ...string) map[string]string {
		t.Helper()
		kv, err := m.Show("slotwatch.service", props...)
		if err != nil {
			t.Fatalf("%v\n%s", err, logs())
		}
		return kv
	}

	// The unit is the package's, with the test's drop-in, and not
	// enabled: the package starts nothing.
	pre := show("LoadState", "ActiveState", "FragmentPath", "DropInPaths", "UnitFileState")
	for k, v := range map[string]string{
		"LoadState":     "loaded",
		"ActiveState":   "inactive",
		"FragmentPath":  "/usr/lib/systemd/user/slotwatch.service",
		"UnitFileState": "disabled",
	} {
		if pre[k] != v {
			t.Errorf("before the first call, slotwatch.service %s=%q, want %q", k, pre[k], v)
		}
	}
	if !strings.Contains(pre["DropInPaths"], "50-test.conf") {
		t.Errorf("the test's drop-in is not applied: DropInPaths=%q", pre["DropInPaths"])
	}

	// Connecting starts the session bus (socket activation); the manager
	// joins it once dbus.service runs.
	conn, err := godbus.Connect(m.BusAddress, godbus.WithSignalHandler(godbus.NewSequentialSignalHandler()))
	if err != nil {
		t.Fatalf("connect to the session bus: %v\n%s", err, logs())
	}
	t.Cleanup(func() { conn.Close() })
	if !pollUntil(15*time.Second, func() bool { return nameHasOwner(t, conn, "org.freedesktop.systemd1") }) {
		t.Fatalf("systemd --user did not join the session bus within 15 s\n%s", logs())
	}
	var activatable []string
	if err := conn.BusObject().Call("org.freedesktop.DBus.ListActivatableNames", 0).Store(&activatable); err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(activatable, busName) {
		t.Fatalf("%s is not activatable on the session bus (the package's activation file is not found): %q", busName, activatable)
	}
	if nameHasOwner(t, conn, busName) {
		t.Fatalf("%s is owned before the first call", busName)
	}

	// Watch the daemon's objects and name, to see the session go.
	if err := conn.AddMatchSignal(godbus.WithMatchInterface("org.freedesktop.DBus.ObjectManager"), godbus.WithMatchMember("InterfacesRemoved")); err != nil {
		t.Fatal(err)
	}
	if err := conn.AddMatchSignal(godbus.WithMatchSender("org.freedesktop.DBus"), godbus.WithMatchMember("NameOwnerChanged"), godbus.WithMatchArg(0, busName)); err != nil {
		t.Fatal(err)
	}
	signals := make(chan *godbus.Signal, 256)
	conn.Signal(signals)

	// The first call activates slotwatch.service and is answered by it.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var ver string
	if err := conn.Object(busName, rootPath).CallWithContext(ctx, "org.freedesktop.DBus.Properties.Get", 0, mgrIface, "Version").Store(&ver); err != nil {
		t.Fatalf("first call (activation): %v (%s)\n%s", err, errName(err), logs())
	}
	if ver != version.Version {
		t.Errorf("Manager.Version is %q, want %q", ver, version.Version)
	}
	var busPID uint32
	if err := conn.BusObject().Call("org.freedesktop.DBus.GetConnectionUnixProcessID", 0, busName).Store(&busPID); err != nil {
		t.Fatal(err)
	}
	pid := int(busPID)
	t.Cleanup(func() { stopForeignProcess(t, pid, "slotwatch serve of the user manager") })

	st := show("ActiveState", "SubState", "Type", "MainPID", "WatchdogUSec", "NRestarts", "BusName", "Result")
	for k, v := range map[string]string{
		"ActiveState":  "active",
		"SubState":     "running",
		"Type":         "notify",
		"MainPID":      strconv.Itoa(pid),
		"WatchdogUSec": "30s",
		"NRestarts":    "0",
		"BusName":      busName,
	} {
		if st[k] != v {
			t.Errorf("after activation, slotwatch.service %s=%q, want %q", k, st[k], v)
		}
	}
	status, err := m.Systemctl("status", "slotwatch.service")
	if err != nil || !strings.Contains(status, "Active: active (running)") {
		t.Errorf("systemctl --user status slotwatch.service: %v\n%s", err, status)
	}
	t.Logf("systemctl --user status slotwatch.service:\n%s", status)
	if log := m.BusLog(); !strings.Contains(log, "Activating via systemd: service name='"+busName+"' unit='slotwatch.service'") {
		t.Errorf("the session bus did not hand the activation to systemd:\n%s", log)
	}

	// The process: the package's binary, started by the manager, with
	// the watchdog's environment and the unit's sandbox.
	if got, want := fileSum(t, fmt.Sprintf("/proc/%d/exe", pid)), fileSum(t, filepath.Join(root, "usr/bin/slotwatch")); got != want {
		t.Errorf("pid %d does not run the package's /usr/bin/slotwatch", pid)
	}
	cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if argv := strings.Split(strings.TrimRight(string(cmdline), "\x00"), "\x00"); len(argv) < 2 || argv[0] != "/usr/bin/slotwatch" || argv[1] != "serve" {
		t.Errorf("pid %d runs %q, want /usr/bin/slotwatch serve ...", pid, argv)
	}
	if pp := parentPID(pid); pp != m.PID {
		t.Errorf("slotwatch serve's parent is pid %d, want the user manager (%d)", pp, m.PID)
	}
	environ, _ := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
	env := strings.Split(string(environ), "\x00")
	for _, kv := range []string{
		"WATCHDOG_USEC=30000000",
		"WATCHDOG_PID=" + strconv.Itoa(pid),
		"NOTIFY_SOCKET=" + filepath.Join(m.RuntimeDir, "systemd/notify"),
		"SOFTHSM2_CONF=" + hsm.Conf,
		"DBUS_SESSION_BUS_ADDRESS=" + m.BusAddress,
		"XDG_RUNTIME_DIR=" + m.RuntimeDir,
	} {
		if !slices.Contains(env, kv) {
			t.Errorf("slotwatch serve's environment lacks %s", kv)
		}
	}
	if v := procStatusField(pid, "NoNewPrivs"); v != "1" {
		t.Errorf("slotwatch serve has NoNewPrivs %q, want 1 (NoNewPrivileges=yes)", v)
	}
	if v := procStatusField(pid, "Seccomp"); v != "2" {
		t.Errorf("slotwatch serve has Seccomp %q, want 2, a filter (SystemCallFilter=)", v)
	}
	if limits, _ := os.ReadFile(fmt.Sprintf("/proc/%d/limits", pid)); !bytes.Contains(limits, []byte("Max core file size        0                    0")) {
		t.Errorf("slotwatch serve may dump core (LimitCORE=0):\n%s", limits)
	}

	// A session, through the daemon's Token.OpenSession.
	tok := findToken(t, conn, label)
	var sess godbus.ObjectPath
	if err := conn.Object(busName, tok).Call(tokIface+".OpenSession", 0, false).Store(&sess); err != nil {
		t.Fatalf("OpenSession: %v\n%s", err, logs())
	}
	if _, ok := managedObjects(t, conn)[sess][sesIface]; !ok {
		t.Fatalf("session %s is not on the bus", sess)
	}

	// systemctl --user stop: SIGTERM; the daemon closes the session,
	// releases its name and exits, within its 2 s budget.
	start := time.Now()
	if out, err := m.Systemctl("stop", "slotwatch.service"); err != nil {
		t.Fatalf("%v\n%s\n%s", err, out, logs())
	}
	took := time.Since(start)
	t.Logf("systemctl --user stop slotwatch.service took %v", took.Round(time.Millisecond))
	if took > 3*time.Second {
		t.Errorf("stopping slotwatch.service took %v (its shutdown budget is 2 s)", took)
	}
	var sessionRemoved, nameGone bool
	deadline := time.After(5 * time.Second)
	for !nameGone {
		select {
		case s := <-signals:
			switch s.Name {
			case "org.freedesktop.DBus.ObjectManager.InterfacesRemoved":
				if len(s.Body) > 0 && s.Body[0] == sess {
					if nameGone {
						t.Errorf("the session's InterfacesRemoved came after the name was released")
					}
					sessionRemoved = true
				}
			case "org.freedesktop.DBus.NameOwnerChanged":
				if len(s.Body) == 3 && s.Body[0] == busName && s.Body[2] == "" {
					nameGone = true
				}
			}
		case <-deadline:
			t.Fatalf("no NameOwnerChanged for %s within 5 s of the stop\n%s", busName, logs())
		}
	}
	if !sessionRemoved {
		t.Errorf("session %s was not removed (InterfacesRemoved) before the daemon left the bus\n%s", sess, logs())
	}
	if d, _ := os.ReadFile(daemonLog); !bytes.Contains(d, []byte(`msg="session closed" session=`+string(sess))) || !bytes.Contains(d, []byte("msg=stopping")) {
		t.Errorf("the daemon's log does not show it stopping and closing %s:\n%s", sess, d)
	}
	if !pollUntil(2*time.Second, func() bool { return procGone(pid) }) {
		t.Errorf("slotwatch serve (pid %d) is still there after the stop", pid)
	}
	st = show("ActiveState", "SubState", "MainPID", "Result", "NRestarts")
	for k, v := range map[string]string{
		"ActiveState": "inactive",
		"SubState":    "dead",
		"MainPID":     "0",
		"Result":      "success",
		"NRestarts":   "0",
	} {
		if st[k] != v {
			t.Errorf("after the stop, slotwatch.service %s=%q, want %q", k, st[k], v)
		}
	}
	// No process left: of the manager's, only the session bus remains,
	// and the unit's cgroup is empty.
	var busDaemon uint32
	if err := conn.BusObject().Call("org.freedesktop.DBus.GetConnectionUnixProcessID", 0, "org.freedesktop.DBus").Store(&busDaemon); err != nil {
		t.Fatal(err)
	}
	kids, err := m.Descendants()
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(kids, []int{int(busDaemon)}) {
		var what []string
		for _, k := range kids {
			c, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", k))
			what = append(what, fmt.Sprintf("%d %q", k, strings.ReplaceAll(string(c), "\x00", " ")))
		}
		t.Errorf("after the stop, the manager's processes are %q, want only the bus (pid %d)", what, busDaemon)
	}
	if procs, err := os.ReadFile(filepath.Join(m.Cgroup, "app.slice/slotwatch.service/cgroup.procs")); err == nil && len(bytes.TrimSpace(procs)) > 0 {
		t.Errorf("slotwatch.service's cgroup still holds %q", strings.Fields(string(procs)))
	}
	if nameHasOwner(t, conn, busName) {
		t.Errorf("%s is owned again after the stop", busName)
	}
}
