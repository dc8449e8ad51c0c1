package main

import (
	"bufio"
	"bytes"
	"context"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	godbus "github.com/godbus/dbus/v5"

	"github.com/slotwatch/slotwatch/config"
	"github.com/slotwatch/slotwatch/tests/stack"
)

const installBusName = "io.github.slotwatch.Slotwatch1"

// TestInstall runs "make install" into a staging directory, as a package
// build would, and checks what lands there.
func TestInstall(t *testing.T) {
	if _, err := exec.LookPath("make"); err != nil {
		t.Skip("make is not installed; cannot test the install target")
	}
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	dest := t.TempDir()
	runMakeInstall(t, root, dest)

	// The binary.
	bin := filepath.Join(dest, "usr/bin/slotwatch")
	if fi, err := os.Stat(bin); err != nil || !fi.Mode().IsRegular() || fi.Mode().Perm() != 0o755 {
		t.Errorf("binary %s: %v, %v; want a regular file with mode 0755", bin, fi, err)
	}

	// The user unit, with @bindir@ filled in.
	unitPath := filepath.Join(dest, "usr/lib/systemd/user/slotwatch.service")
	unitText := readInstalled(t, unitPath, 0o644)
	if strings.Contains(unitText, "@bindir@") { // "@" alone: SystemCallFilter=~@clock ...
		t.Errorf("%s still has an @...@ placeholder:\n%s", unitPath, unitText)
	}
	unit := parseIniForInstallTest(t, unitPath, unitText, false)
	for _, kv := range [][3]string{
		{"Service", "ExecStart", "/usr/bin/slotwatch serve"},
		{"Service", "Type", "notify"},
		{"Service", "BusName", installBusName},
		{"Service", "WatchdogSec", "30s"},
		{"Service", "Restart", "on-failure"},
		{"Install", "WantedBy", "default.target"},
	} {
		if got := unit[kv[0]][kv[1]]; !slices.Equal(got, []string{kv[2]}) {
			t.Errorf("%s: [%s] %s = %q, want %q", unitPath, kv[0], kv[1], got, kv[2])
		}
	}

	// The D-Bus activation file goes through that unit.
	actPath := filepath.Join(dest, "usr/share/dbus-1/services", installBusName+".service")
	act := parseIniForInstallTest(t, actPath, readInstalled(t, actPath, 0o644), true)
	want := map[string]map[string][]string{"D-BUS Service": {
		"Name":           {installBusName},
		"Exec":           {"/bin/false"},
		"SystemdService": {filepath.Base(unitPath)},
	}}
	if !reflect.DeepEqual(act, want) {
		t.Errorf("%s = %q, want %q", actPath, act, want)
	}

	// Every interface XML, unchanged.
	xmls, err := filepath.Glob(filepath.Join(root, "xml", "*.xml"))
	if err != nil {
		t.Fatal(err)
	}
	if len(xmls) == 0 {
		t.Log("xml/ has no *.xml files yet; nothing to check under dbus-1/interfaces")
	}
	for _, src := range xmls {
		dst := filepath.Join(dest, "usr/share/dbus-1/interfaces", filepath.Base(src))
		if got, want := readInstalled(t, dst, 0o644), readFileForInstallTest(t, src); got != want {
			t.Errorf("%s differs from %s", dst, src)
		}
	}

	// The default config: the packaged file, and it means the defaults.
	confPath := filepath.Join(dest, "etc/slotwatch/slotwatch.conf")
	confText := readInstalled(t, confPath, 0o644)
	if confText != readFileForInstallTest(t, filepath.Join(root, "packaging/slotwatch.conf")) {
		t.Errorf("%s differs from packaging/slotwatch.conf", confPath)
	}
	cfg, err := config.Parse(strings.NewReader(confText), confPath)
	if err != nil {
		t.Errorf("installed config: %v", err)
	} else if d := config.Default(); cfg.RemovalAction != d.RemovalAction || cfg.RemovalActionSet || !reflect.DeepEqual(cfg.RemovalScope, d.RemovalScope) || cfg.RemovalGrace != d.RemovalGrace || cfg.Notify != d.Notify || cfg.Limits != d.Limits || len(cfg.Modules) != 0 {
		t.Errorf("installed config = %+v, want the defaults %+v", cfg, d)
	}
	// Every top-level setting is documented there, commented out, with
	// its default; uncommented, those lines mean the built-in defaults.
	documented := []string{
		"removal-action = none",
		"removal-scope = login-token",
		"removal-grace = 3",
		"notify = false",
		"max-sessions-per-token = 16",
		"max-concurrent-calls = 8",
		"max-find-results = 1000",
		"token-wait = 5",
	}
	for _, line := range documented {
		if !strings.Contains(confText, "\n#"+line+"\n") {
			t.Errorf("%s does not document the default \"#%s\"", confPath, line)
		}
	}
	if cfg, err := config.Parse(strings.NewReader(strings.Join(documented, "\n")), "documented defaults"); err != nil {
		t.Errorf("the documented defaults do not parse: %v", err)
	} else if d := config.Default(); cfg.RemovalAction != d.RemovalAction || !reflect.DeepEqual(cfg.RemovalScope, d.RemovalScope) || cfg.RemovalGrace != d.RemovalGrace || cfg.Notify != d.Notify || cfg.Limits != d.Limits {
		t.Errorf("the documented defaults = %+v, want the built-in ones %+v", cfg, d)
	}

	// Installing again keeps an edited config.
	edited := confText + "notify = true\n"
	if err := os.WriteFile(confPath, []byte(edited), 0o644); err != nil {
		t.Fatal(err)
	}
	runMakeInstall(t, root, dest)
	if got := readFileForInstallTest(t, confPath); got != edited {
		t.Errorf("a second make install overwrote the edited %s", confPath)
	}

	// The GNOME unit: the same service, with --gnome-compat, wired into
	// GNOME's session in place of gsd-smartcard; enabled only on request.
	gnomePath := filepath.Join(dest, "usr/lib/systemd/user/slotwatch-gnome.service")
	gnomeText := readInstalled(t, gnomePath, 0o644)
	if strings.Contains(gnomeText, "@bindir@") { // its comments name gnome-session@gnome.target
		t.Errorf("%s still has an @...@ placeholder:\n%s", gnomePath, gnomeText)
	}
	gnome := parseIniForInstallTest(t, gnomePath, gnomeText, false)
	for _, kv := range [][3]string{
		{"Service", "ExecStart", "/usr/bin/slotwatch serve --gnome-compat=replace"},
		{"Service", "Type", "notify"},
		{"Unit", "PartOf", "org.gnome.SettingsDaemon.Smartcard.target"},
		{"Install", "WantedBy", "org.gnome.SettingsDaemon.Smartcard.target"},
		{"Install", "Alias", "slotwatch.service"},
	} {
		if got := gnome[kv[0]][kv[1]]; !slices.Equal(got, []string{kv[2]}) {
			t.Errorf("%s: [%s] %s = %q, want %q", gnomePath, kv[0], kv[1], got, kv[2])
		}
	}
	// Apart from how it starts, it is the same service (sandboxing,
	// watchdog, restarts).
	plain, gnomeService := maps.Clone(unit["Service"]), maps.Clone(gnome["Service"])
	for _, k := range []string{"ExecStart", "Slice"} {
		delete(plain, k)
		delete(gnomeService, k)
	}
	if !reflect.DeepEqual(plain, gnomeService) {
		t.Errorf("[Service] of %s differs from slotwatch.service's beyond ExecStart and Slice:\n%q\n%q", gnomePath, gnomeService, plain)
	}
	if _, err := os.Lstat(filepath.Join(dest, "etc/systemd")); !os.IsNotExist(err) {
		t.Errorf("make install touched etc/systemd (only install-gnome may): %v", err)
	}

	t.Run("systemd-analyze", func(t *testing.T) { verifyUnitForInstallTest(t, "slotwatch.service", unitText, bin) })
	t.Run("systemd-analyze-gnome", func(t *testing.T) { verifyUnitForInstallTest(t, "slotwatch-gnome.service", gnomeText, bin) })
	socketText, err := os.ReadFile(filepath.Join(dest, "usr/lib/systemd/user/slotwatch-pkcs11.socket"))
	if err != nil {
		t.Fatalf("make install did not install the PKCS#11 socket unit: %v", err)
	}
	if !strings.Contains(string(socketText), "FileDescriptorName=pkcs11") {
		t.Errorf("the socket unit does not name its socket pkcs11, which slotwatch serve looks for")
	}
	t.Run("systemd-analyze-socket", func(t *testing.T) {
		verifyUnitForInstallTest(t, "slotwatch-pkcs11.socket", string(socketText), bin, "slotwatch.service", unitText)
	})
	for _, f := range []string{"slotwatch.module", "60-slotwatch-pkcs11.conf"} {
		if _, err := os.Stat(filepath.Join(dest, "usr/share/slotwatch/pkcs11", f)); err != nil {
			t.Errorf("make install did not install %s: %v", f, err)
		}
	}
	t.Run("dbus-daemon", func(t *testing.T) { checkActivatableForInstallTest(t, filepath.Dir(actPath)) })
}

// TestInstallGnome: make install-gnome masks gsd-smartcard's user unit,
// enables slotwatch-gnome.service (also as slotwatch.service) for every
// user, and puts the greeter's autostart entries in place; running it
// again works, it refuses to replace a real file, and uninstall-gnome
// removes exactly what it made.
func TestInstallGnome(t *testing.T) {
	if _, err := exec.LookPath("make"); err != nil {
		t.Skip("make is not installed; cannot test the install-gnome target")
	}
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	dest := t.TempDir()
	runMake(t, root, dest, "install-gnome")
	units := filepath.Join(dest, "etc/systemd/user")
	links := map[string]string{
		"org.gnome.SettingsDaemon.Smartcard.service": "/dev/null",
		"slotwatch.service":                          "/usr/lib/systemd/user/slotwatch-gnome.service",
		"org.gnome.SettingsDaemon.Smartcard.target.wants/slotwatch-gnome.service": "/usr/lib/systemd/user/slotwatch-gnome.service",
	}
	for name, want := range links {
		if got, err := os.Readlink(filepath.Join(units, name)); err != nil || got != want {
			t.Errorf("%s -> %q (%v), want -> %s", name, got, err, want)
		}
	}
	autostart := filepath.Join(dest, "usr/share/gdm/greeter/autostart")
	ours := readInstalled(t, filepath.Join(autostart, "slotwatch-gnome.desktop"), 0o644)
	if !strings.Contains(ours, "\nExec=/usr/bin/slotwatch serve --gnome-compat=replace\n") {
		t.Errorf("slotwatch-gnome.desktop does not start slotwatch --gnome-compat:\n%s", ours)
	}
	if hidden := readInstalled(t, filepath.Join(autostart, "org.gnome.SettingsDaemon.Smartcard.desktop"), 0o644); !strings.Contains(hidden, "\nHidden=true") {
		t.Errorf("the greeter's gsd-smartcard entry is not hidden:\n%s", hidden)
	}
	runMake(t, root, dest, "install-gnome") // again: fine

	runMake(t, root, dest, "uninstall-gnome")
	for name := range links {
		if _, err := os.Lstat(filepath.Join(units, name)); !os.IsNotExist(err) {
			t.Errorf("uninstall-gnome left %s: %v", name, err)
		}
	}
	for _, f := range []string{"slotwatch-gnome.desktop", "org.gnome.SettingsDaemon.Smartcard.desktop"} {
		if _, err := os.Lstat(filepath.Join(autostart, f)); !os.IsNotExist(err) {
			t.Errorf("uninstall-gnome left %s: %v", f, err)
		}
	}

	// A unit file the administrator wrote is never replaced by a link.
	own := filepath.Join(units, "slotwatch.service")
	if err := os.WriteFile(own, []byte("[Service]\nExecStart=/bin/true\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := makeCommand(context.Background(), root, dest, "install-gnome").CombinedOutput(); err == nil {
		t.Errorf("install-gnome over a real %s succeeded:\n%s", own, out)
	}
	if fi, err := os.Lstat(own); err != nil || !fi.Mode().IsRegular() {
		t.Errorf("install-gnome replaced the administrator's %s: %v %v", own, fi, err)
	}
}

func runMakeInstall(t *testing.T, root, dest string) { runMake(t, root, dest, "install") }

// makeCommand is "make TARGET" in root, staged under dest with PREFIX=/usr,
// built with the go that runs this test.
func makeCommand(ctx context.Context, root, dest, target string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, "make", "--no-print-directory", "-C", root, target, "DESTDIR="+dest, "PREFIX=/usr")
	if goBin, err := exec.LookPath("go"); err == nil {
		cmd.Args = append(cmd.Args, "GO="+goBin)
	}
	// A make or go build started by an outer make must not join its jobserver.
	cmd.Env = append(os.Environ(), "MAKEFLAGS=", "MFLAGS=", "MAKELEVEL=")
	return cmd
}

// runMake runs makeCommand and fails t if it fails.
func runMake(t *testing.T, root, dest, target string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := makeCommand(ctx, root, dest, target)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(cmd.Args, " "), err, out)
	}
	t.Logf("%s:\n%s", strings.Join(cmd.Args, " "), out)
}

func readFileForInstallTest(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// readInstalled reads an installed file and checks its mode.
func readInstalled(t *testing.T, path string, perm os.FileMode) string {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatalf("not installed: %v", err)
	}
	if fi.Mode().Perm() != perm {
		t.Errorf("%s has mode %v, want %v", path, fi.Mode().Perm(), perm)
	}
	return readFileForInstallTest(t, path)
}

// parseIniForInstallTest reads a systemd unit or D-Bus .service file:
// [Section] headers, Key=Value lines, "#" (and for units ";") comments on
// lines of their own. Repeated keys accumulate. strict: every line must
// be one of those (D-Bus's parser has no continuation lines either).
func parseIniForInstallTest(t *testing.T, name, text string, strict bool) map[string]map[string][]string {
	t.Helper()
	out := map[string]map[string][]string{}
	section := ""
	sc := bufio.NewScanner(strings.NewReader(text))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "" || line[0] == '#' || (!strict && line[0] == ';'):
		case line[0] == '[' && strings.HasSuffix(line, "]"):
			section = line[1 : len(line)-1]
			if out[section] == nil {
				out[section] = map[string][]string{}
			}
		default:
			k, v, ok := strings.Cut(line, "=")
			if !ok || section == "" || strings.HasSuffix(line, `\`) {
				t.Errorf("%s:%d: unexpected line %q", name, n, line)
				continue
			}
			k = strings.TrimSpace(k)
			out[section][k] = append(out[section][k], strings.TrimSpace(v))
		}
	}
	return out
}

// verifyUnitForInstallTest runs systemd-analyze verify --user on the
// installed unit. ExecStart points at /usr/bin/slotwatch, which is not
// there outside DESTDIR, so the copy verified runs the staged binary; any
// complaint about the unit (unknown key, unparsable value, bad ExecStart)
// fails the test.
func verifyUnitForInstallTest(t *testing.T, name, unitText, bin string, others ...string) {
	sa, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skip("systemd-analyze is not installed; the unit is not verified")
	}
	dir := t.TempDir()
	unit := filepath.Join(dir, name)
	text := strings.Replace(unitText, "ExecStart=/usr/bin/slotwatch ", "ExecStart="+bin+" ", 1)
	if err := os.WriteFile(unit, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	// Units it refers to (a socket's service), as name, text pairs.
	for i := 0; i+1 < len(others); i += 2 {
		text := strings.Replace(others[i+1], "ExecStart=/usr/bin/slotwatch ", "ExecStart="+bin+" ", 1)
		if err := os.WriteFile(filepath.Join(dir, others[i]), []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	runDir := filepath.Join(dir, "runtime") // a user manager needs XDG_RUNTIME_DIR
	if err := os.Mkdir(runDir, 0o700); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, sa, "verify", "--user", "--man=no", unit)
	cmd.Env = append(os.Environ(), "XDG_RUNTIME_DIR="+runDir, "SYSTEMD_LOG_COLOR=0")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err = cmd.Run()
	var ours []string
	for _, l := range strings.Split(out.String(), "\n") {
		if strings.Contains(l, name) {
			ours = append(ours, l)
		}
	}
	if len(ours) > 0 {
		t.Errorf("systemd-analyze verify --user complains about the unit:\n%s", strings.Join(ours, "\n"))
	}
	if err != nil && len(ours) == 0 {
		// Not about our unit: this machine cannot run a user manager
		// for verification (no user session, sandboxed container...).
		t.Skipf("systemd-analyze verify --user could not check the unit here (%v):\n%s", err, out.String())
	}
	if err == nil {
		t.Logf("systemd-analyze verify --user: unit OK%s", strings.TrimRight("\n"+out.String(), "\n"))
	}
}

// checkActivatableForInstallTest starts a private dbus-daemon whose only
// service directory is the installed one and checks the bus lists our
// name as activatable (it parsed the file), without activating it.
func checkActivatableForInstallTest(t *testing.T, servicesDir string) {
	if _, err := exec.LookPath("dbus-daemon"); err != nil {
		t.Skip("dbus-daemon is not installed; the activation file is not checked")
	}
	bus := stack.StartDBusForTest(t, servicesDir)
	conn, err := godbus.Connect(bus.Address)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	var names []string
	if err := conn.BusObject().Call("org.freedesktop.DBus.ListActivatableNames", 0).Store(&names); err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(names, installBusName) {
		t.Errorf("activatable names %q lack %s\n--- dbus-daemon log ---\n%s", names, installBusName, bus.Log())
	}
	if log := bus.Log(); strings.Contains(log, installBusName) {
		t.Errorf("dbus-daemon complains about the activation file:\n%s", log)
	}
}

// TestUnitHardening: both packaged user units carry the same process
// hardening (see the comments in packaging/slotwatch.service): no core
// dumps, a private session keyring, memory and task ceilings, and a
// system-call deny-list that leaves @privileged and @resources (setrlimit,
// setpriority: the Go runtime and modules call them) alone; and none of
// the settings that, in a user manager, need a user namespace
// (PrivateUsers=), which fails to start the unit where unprivileged user
// namespaces are disabled.
func TestUnitHardening(t *testing.T) {
	want := map[string]string{
		"LimitCORE":               "0",
		"KeyringMode":             "private",
		"MemoryMax":               "256M",
		"TasksMax":                "1024",
		"SystemCallFilter":        "~@clock @cpu-emulation @debug @module @mount @obsolete @raw-io @reboot @swap",
		"SystemCallErrorNumber":   "EPERM",
		"SystemCallArchitectures": "native",
		"NoNewPrivileges":         "yes",
		"LockPersonality":         "yes",
		"RestrictRealtime":        "yes",
		"RestrictSUIDSGID":        "yes",
	}
	needUserNamespace := []string{
		"PrivateUsers", "ProtectClock", "ProtectSystem", "ProtectHome", "PrivateTmp",
		"PrivateDevices", "PrivateMounts", "ProtectKernelTunables", "ProtectKernelModules",
		"ProtectKernelLogs", "ProtectControlGroups", "ProtectHostname", "ProtectProc", "ProcSubset",
	}
	for _, name := range []string{"slotwatch.service", "gnome/slotwatch-gnome.service"} {
		path := filepath.Join("..", "packaging", name)
		service := parseIniForInstallTest(t, path, readFileForInstallTest(t, path), false)["Service"]
		for _, k := range slices.Sorted(maps.Keys(want)) {
			if got := service[k]; !slices.Equal(got, []string{want[k]}) {
				t.Errorf("%s: %s= %q, want exactly %q", path, k, got, want[k])
			}
		}
		for _, v := range service["SystemCallFilter"] {
			for _, f := range strings.Fields(v) {
				if g := strings.TrimPrefix(f, "~"); g == "@privileged" || g == "@resources" || g == "setrlimit" {
					t.Errorf("%s: SystemCallFilter= denies %s, which holds calls the Go runtime and modules make", path, g)
				}
			}
		}
		for _, k := range needUserNamespace {
			if v, ok := service[k]; ok {
				t.Errorf("%s: %s=%q needs a user namespace in a user manager; leave it out", path, k, v)
			}
		}
	}
}
