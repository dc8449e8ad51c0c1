package tests

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	godbus "github.com/godbus/dbus/v5"

	"github.com/slotwatch/slotwatch/tests/stack"
)

const activationFile = busName + ".service"

// readServiceFile parses a D-Bus activation file (or a systemd unit): the
// key=value lines of section, comments and blank lines skipped. Keys may
// repeat in units; the last wins here.
func readServiceFile(t *testing.T, path, section string) map[string]string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	kv := map[string]string{}
	var cur string
	found := false
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		l := strings.TrimSpace(sc.Text())
		switch {
		case l == "" || strings.HasPrefix(l, "#") || strings.HasPrefix(l, ";"):
		case strings.HasPrefix(l, "[") && strings.HasSuffix(l, "]"):
			cur = l[1 : len(l)-1]
			found = found || cur == section
		case cur == section:
			k, v, ok := strings.Cut(l, "=")
			if !ok {
				t.Fatalf("%s: line %q in [%s] is not key=value", path, l, section)
			}
			kv[strings.TrimSpace(k)] = strings.TrimSpace(v)
		}
	}
	if !found {
		t.Fatalf("%s has no [%s] section", path, section)
	}
	return kv
}

// procGone reports whether pid has exited (no /proc entry, or a zombie
// its parent has not reaped yet).
func procGone(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	// pid (comm) state ...; comm may hold spaces and parentheses.
	s := string(b)
	if i := strings.LastIndexByte(s, ')'); i >= 0 && i+2 < len(s) {
		return s[i+2] == 'Z' || s[i+2] == 'X'
	}
	return false
}

// parentPID returns the parent of pid (0 if unknown).
func parentPID(pid int) int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 2 {
		return 0
	}
	ppid, _ := strconv.Atoi(f[1])
	return ppid
}

// stopForeignProcess stops a process that is not our child (the bus
// started it): SIGTERM, wait up to 5 s for it to go, then SIGKILL. It
// reports how it went.
func stopForeignProcess(t *testing.T, pid int, what string) {
	t.Helper()
	if pid <= 0 || procGone(pid) {
		return
	}
	if err := syscall.Kill(pid, syscall.SIGTERM); err != nil {
		if errors.Is(err, syscall.ESRCH) {
			return
		}
		t.Errorf("SIGTERM to %s (pid %d): %v", what, pid, err)
	}
	start := time.Now()
	for !procGone(pid) {
		if time.Since(start) > 5*time.Second {
			syscall.Kill(pid, syscall.SIGKILL)
			t.Errorf("%s (pid %d) did not exit within 5 s of SIGTERM; killed", what, pid)
			for i := 0; i < 100 && !procGone(pid); i++ {
				time.Sleep(20 * time.Millisecond)
			}
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("%s (pid %d) took %v to stop after SIGTERM", what, pid, took)
	}
}

func nameHasOwner(t *testing.T, conn *godbus.Conn, name string) bool {
	t.Helper()
	var has bool
	if err := conn.BusObject().Call("org.freedesktop.DBus.NameHasOwner", 0, name).Store(&has); err != nil {
		t.Fatalf("NameHasOwner: %v", err)
	}
	return has
}

// TestActivation: on a bus whose service directory holds an activation
// file for slotwatch, the first call to the bus name starts `slotwatch
// serve` (the bus's child, with the environment of the file's Exec), which
// then answers it and serves the token store it was pointed at.
func TestActivation(t *testing.T) {
	bin := slotwatchBin(t)
	hsm, err := stack.NewSoftHSM(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	const label = "Activated HSM"
	if err := hsm.InitToken(label, hsmSO, hsmPIN); err != nil {
		t.Fatal(err)
	}

	// dbus-daemon gives an activated service its own environment, not
	// ours; the store's SOFTHSM2_CONF goes in through env(1) in Exec.
	// The bus sets DBUS_SESSION_BUS_ADDRESS of a session bus for its
	// services, so serve needs no --address.
	serviceDir := t.TempDir()
	for _, p := range []string{bin, hsm.Conf, stack.SoftHSMModule} {
		if strings.ContainsAny(p, " \t\n'\"\\") {
			t.Fatalf("path %q cannot go into Exec= unquoted", p)
		}
	}
	execLine := fmt.Sprintf("/usr/bin/env SOFTHSM2_CONF=%s %s serve --module %s --no-pcsc --log-level debug", hsm.Conf, bin, stack.SoftHSMModule)
	svc := fmt.Sprintf("[D-BUS Service]\nName=%s\nExec=%s\n", busName, execLine)
	if err := os.WriteFile(filepath.Join(serviceDir, activationFile), []byte(svc), 0o644); err != nil {
		t.Fatal(err)
	}
	bus := stack.StartDBusForTest(t, serviceDir)
	conn := dial(t, bus)

	// The activated daemon is the bus's, not ours; stop it by pid before
	// the bus goes (cleanups run last-registered first).
	var pid int
	t.Cleanup(func() {
		if pid == 0 {
			// Activation may have started it although the call failed.
			var p uint32
			if conn.BusObject().Call("org.freedesktop.DBus.GetConnectionUnixProcessID", 0, busName).Store(&p) == nil {
				pid = int(p)
			}
		}
		stopForeignProcess(t, pid, "activated slotwatch serve")
		if t.Failed() {
			t.Logf("dbus-daemon log (with the activated daemon's output):\n%s", bus.Log())
		}
	})

	var activatable []string
	if err := conn.BusObject().Call("org.freedesktop.DBus.ListActivatableNames", 0).Store(&activatable); err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(activatable, busName) {
		t.Fatalf("%s is not activatable on the bus: %v\n%s", busName, activatable, bus.Log())
	}
	if nameHasOwner(t, conn, busName) {
		t.Fatalf("%s is owned before the first call", busName)
	}

	// The first call activates the daemon and is answered by it.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	start := time.Now()
	var version string
	err = conn.Object(busName, rootPath).CallWithContext(ctx, "org.freedesktop.DBus.Properties.Get", 0, mgrIface, "Version").Store(&version)
	if err != nil {
		t.Fatalf("first call (activation): %v (%s)\n%s", err, errName(err), bus.Log())
	}
	t.Logf("activated in %v; Version %q", time.Since(start).Round(time.Millisecond), version)
	if version == "" {
		t.Errorf("Manager.Version is empty")
	}
	if !nameHasOwner(t, conn, busName) {
		t.Fatalf("%s is not owned after it answered", busName)
	}
	var p uint32
	if err := conn.BusObject().Call("org.freedesktop.DBus.GetConnectionUnixProcessID", 0, busName).Store(&p); err != nil {
		t.Fatalf("GetConnectionUnixProcessID: %v", err)
	}
	pid = int(p)

	// It is `slotwatch serve` (env exec'd it), started by the bus.
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		t.Fatalf("pid %d of %s: %v", pid, busName, err)
	}
	argv := strings.Split(strings.TrimRight(string(cmdline), "\x00"), "\x00")
	if len(argv) < 2 || argv[0] != bin || argv[1] != "serve" {
		t.Fatalf("pid %d owning %s runs %q, want %s serve ...", pid, busName, argv, bin)
	}
	if !slices.Contains(argv, "--no-pcsc") || !slices.Contains(argv, stack.SoftHSMModule) {
		t.Errorf("activated daemon's command line %q is not the one of the activation file", argv)
	}
	// dbus-daemon double-forks services (they end up orphans, not its
	// children); what matters is that the bus started it, not we.
	for q := pid; q > 1; q = parentPID(q) {
		if q == os.Getpid() {
			t.Errorf("activated daemon (pid %d) is a descendant of this test process", pid)
			break
		}
	}
	if log := bus.Log(); !strings.Contains(log, "Activating service name='"+busName+"'") || !strings.Contains(log, "Successfully activated service '"+busName+"'") {
		t.Errorf("dbus-daemon's log does not show it activating %s:\n%s", busName, log)
	}
	environ, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
	if err == nil && !slices.Contains(strings.Split(string(environ), "\x00"), "SOFTHSM2_CONF="+hsm.Conf) {
		t.Errorf("activated daemon's environment lacks SOFTHSM2_CONF=%s", hsm.Conf)
	}

	// It serves the store it was given, and a second call goes to the
	// same daemon.
	tok := findToken(t, conn, label)
	var instance1, instance2 string
	if err := conn.Object(busName, rootPath).StoreProperty(mgrIface+".InstanceId", &instance1); err != nil {
		t.Fatal(err)
	}
	s := openSession(t, conn, tok)
	if err := conn.Object(busName, s).Call(sesIface+".Close", 0).Err; err != nil {
		t.Errorf("Close: %v", err)
	}
	if err := conn.Object(busName, rootPath).StoreProperty(mgrIface+".InstanceId", &instance2); err != nil {
		t.Fatal(err)
	}
	var p2 uint32
	if err := conn.BusObject().Call("org.freedesktop.DBus.GetConnectionUnixProcessID", 0, busName).Store(&p2); err != nil || int(p2) != pid || instance1 != instance2 {
		t.Errorf("later calls reached pid %d (%v) instance %s, first was pid %d instance %s", p2, err, instance2, pid, instance1)
	}

	// Stopping it gives the name up; the next call activates a new
	// instance (a new InstanceId).
	stopForeignProcess(t, pid, "activated slotwatch serve")
	deadline := time.Now().Add(5 * time.Second)
	for nameHasOwner(t, conn, busName) {
		if time.Now().After(deadline) {
			t.Fatalf("%s still owned 5 s after its daemon (pid %d) exited", busName, pid)
		}
		time.Sleep(20 * time.Millisecond)
	}
	pid = 0
	var instance3 string
	if err := conn.Object(busName, rootPath).CallWithContext(ctx, "org.freedesktop.DBus.Properties.Get", 0, mgrIface, "InstanceId").Store(&instance3); err != nil {
		t.Fatalf("call after the daemon stopped (re-activation): %v", err)
	}
	if err := conn.BusObject().Call("org.freedesktop.DBus.GetConnectionUnixProcessID", 0, busName).Store(&p); err != nil {
		t.Fatalf("GetConnectionUnixProcessID: %v", err)
	}
	pid = int(p)
	if instance3 == "" || instance3 == instance1 {
		t.Errorf("re-activated daemon has InstanceId %q, the first had %q", instance3, instance1)
	}
}

// TestActivationFilePackaged: the installed activation file names the bus
// name and hands activation to the systemd user unit, which owns that
// name; on a bus without systemd it fails visibly instead of starting an
// unsupervised daemon.
func TestActivationFilePackaged(t *testing.T) {
	pkg := filepath.Join("..", "packaging", activationFile)
	kv := readServiceFile(t, pkg, "D-BUS Service")
	if kv["Name"] != busName {
		t.Errorf("%s: Name=%q, want %s", pkg, kv["Name"], busName)
	}
	if kv["SystemdService"] != "slotwatch.service" {
		t.Errorf("%s: SystemdService=%q, want slotwatch.service", pkg, kv["SystemdService"])
	}
	if kv["Exec"] == "" {
		t.Errorf("%s: no Exec= (dbus-daemon requires one)", pkg)
	}
	unit := readServiceFile(t, filepath.Join("..", "packaging", "slotwatch.service"), "Service")
	if unit["BusName"] != busName {
		t.Errorf("packaging/slotwatch.service: BusName=%q, want %s", unit["BusName"], busName)
	}

	// On a bus without systemd activation the packaged file's Exec runs;
	// it must fail the call, not start anything.
	serviceDir := t.TempDir()
	b, err := os.ReadFile(pkg)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(serviceDir, activationFile), b, 0o644); err != nil {
		t.Fatal(err)
	}
	bus := stack.StartDBusForTest(t, serviceDir)
	conn := dial(t, bus)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	err = conn.Object(busName, rootPath).CallWithContext(ctx, "org.freedesktop.DBus.Properties.Get", 0, mgrIface, "Version").Err
	if !strings.HasPrefix(errName(err), "org.freedesktop.DBus.Error.Spawn.") {
		t.Errorf("call through the packaged activation file on a bus without systemd: %v (%s), want a Spawn error", err, errName(err))
	}
	if nameHasOwner(t, conn, busName) {
		t.Errorf("%s is owned after the packaged file's activation", busName)
	}
}
