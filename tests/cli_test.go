package tests

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	godbus "github.com/godbus/dbus/v5"

	"github.com/slotwatch/slotwatch/tests/stack"
	"github.com/slotwatch/slotwatch/tests/vcard"
)

// The client commands (list, sessions, init-token, monitor) run as the
// real binary against a private bus, the way a user runs them.

const cliNotRunning = "slotwatch: the daemon is not running on %s (start it with `slotwatch serve` or `systemctl --user start slotwatch`)"

// cliResult is what a finished client command left.
type cliResult struct {
	code           int
	stdout, stderr string
}

func (r cliResult) String() string {
	return fmt.Sprintf("exit %d\n--- stdout ---\n%s--- stderr ---\n%s", r.code, r.stdout, r.stderr)
}

// runCLI runs `slotwatch args...` with extra environment and stdin, and
// returns how it ended. It fails the test if it takes more than 30 s.
func runCLI(t *testing.T, env []string, stdin string, args ...string) cliResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, slotwatchBin(t), args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdin = strings.NewReader(stdin)
	var stdout, stderr lockedBuffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	r := cliResult{stdout: stdout.String(), stderr: stderr.String()}
	var exit *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &exit) && exit.Exited():
		r.code = exit.ExitCode()
	default:
		t.Fatalf("slotwatch %s: %v\n%s", strings.Join(args, " "), err, r)
	}
	return r
}

// cliList is `slotwatch list --json` as the tests read it.
type cliList struct {
	Manager struct {
		State          string `json:"state"`
		StateCode      uint32 `json:"state_code"`
		LastGeneration uint64 `json:"last_generation"`
	} `json:"manager"`
	Modules []struct {
		Name     string `json:"name"`
		Library  string `json:"library"`
		WaitMode string `json:"wait_mode"`
		State    string `json:"state"`
	} `json:"modules"`
	Slots []struct {
		Path  string `json:"path"`
		Token string `json:"token"`
	} `json:"slots"`
	Tokens []struct {
		Path       string `json:"path"`
		Generation uint64 `json:"generation"`
		Label      string `json:"label"`
		Serial     string `json:"serial"`
		Slot       string `json:"slot"`
		Module     string `json:"module"`
	} `json:"tokens"`
}

func listJSON(t *testing.T, bus *stack.DBus) cliList {
	t.Helper()
	r := runCLI(t, nil, "", "list", "--address", bus.Address, "--json")
	if r.code != 0 {
		t.Fatalf("list --json: %s", r)
	}
	var l cliList
	if err := json.Unmarshal([]byte(r.stdout), &l); err != nil {
		t.Fatalf("list --json is not one JSON document: %v\n%s", err, r)
	}
	return l
}

// TestCLIList: `list --json` shows the SoftHSM token with its generation,
// its slot and module, and the daemon's state; the text form shows it too.
func TestCLIList(t *testing.T) {
	bus, _ := hsmDaemon(t)
	conn := dial(t, bus)
	tok := findToken(t, conn, hsmLabel)
	var gen uint64
	if err := conn.Object(busName, tok).StoreProperty(tokIface+".Generation", &gen); err != nil {
		t.Fatal(err)
	}

	l := listJSON(t, bus)
	found := false
	for _, tk := range l.Tokens {
		if tk.Label != hsmLabel {
			continue
		}
		found = true
		if tk.Path != string(tok) || tk.Generation != gen || gen == 0 || !strings.HasSuffix(tk.Path, fmt.Sprintf("/tokens/%d", gen)) {
			t.Errorf("token %+v, want path %s, generation %d", tk, tok, gen)
		}
		if tk.Module != "softhsm2" || tk.Serial == "" || !strings.Contains(tk.Slot, "/slots/softhsm2_") {
			t.Errorf("token %+v: module, serial or slot wrong", tk)
		}
	}
	if !found {
		t.Fatalf("list --json has no token %q: %+v", hsmLabel, l.Tokens)
	}
	if l.Manager.State != "running" || l.Manager.StateCode != 1 || l.Manager.LastGeneration < gen {
		t.Errorf("manager %+v, want running with last generation >= %d", l.Manager, gen)
	}
	if len(l.Modules) != 1 || l.Modules[0].Library != stack.SoftHSMModule || l.Modules[0].State != "running" {
		t.Errorf("modules %+v", l.Modules)
	}

	r := runCLI(t, nil, "", "list", "--address", bus.Address)
	if r.code != 0 || !strings.Contains(r.stdout, `"`+hsmLabel+`"`) || !strings.Contains(r.stdout, "GENERATION") ||
		!strings.Contains(r.stdout, "on "+bus.Address+": running") {
		t.Fatalf("list: %s", r)
	}
	t.Logf("slotwatch list:\n%s", r.stdout)
}

// TestCLISessions: `sessions --json` shows a session this test's own
// connection opened, with the right owner, pid and command, and the token.
func TestCLISessions(t *testing.T) {
	bus, _ := hsmDaemon(t)
	conn := dial(t, bus)
	tok := findToken(t, conn, hsmLabel)
	sess := openSession(t, conn, tok)
	var gen uint64
	if err := conn.Object(busName, tok).StoreProperty(tokIface+".Generation", &gen); err != nil {
		t.Fatal(err)
	}

	r := runCLI(t, []string{"DBUS_SESSION_BUS_ADDRESS=" + bus.Address}, "", "sessions", "--json") // the address from the environment
	if r.code != 0 {
		t.Fatalf("sessions --json: %s", r)
	}
	var out struct {
		Sessions []struct {
			Path       string `json:"path"`
			Token      string `json:"token"`
			TokenLabel string `json:"token_label"`
			Generation uint64 `json:"generation"`
			Owner      string `json:"owner"`
			OwnerPid   uint32 `json:"owner_pid"`
			Command    string `json:"command"`
			ReadWrite  bool   `json:"read_write"`
			State      string `json:"state"`
		} `json:"sessions"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &out); err != nil {
		t.Fatalf("sessions --json: %v\n%s", err, r)
	}
	if len(out.Sessions) != 1 {
		t.Fatalf("sessions --json lists %d sessions, want 1: %s", len(out.Sessions), r)
	}
	s := out.Sessions[0]
	if s.Path != string(sess) || s.Token != string(tok) || s.TokenLabel != hsmLabel || s.Generation != gen {
		t.Errorf("session %+v, want %s on %s (%q, generation %d)", s, sess, tok, hsmLabel, gen)
	}
	if s.Owner != conn.Names()[0] || s.OwnerPid != uint32(os.Getpid()) {
		t.Errorf("owner %s pid %d, want %s pid %d", s.Owner, s.OwnerPid, conn.Names()[0], os.Getpid())
	}
	if !strings.Contains(s.Command, filepath.Base(os.Args[0])) {
		t.Errorf("command %q does not name this test binary %s", s.Command, os.Args[0])
	}
	if s.ReadWrite || s.State != "ro-public" {
		t.Errorf("read_write %v, state %q; want a read-only public session", s.ReadWrite, s.State)
	}

	r = runCLI(t, nil, "", "sessions", "--address", bus.Address)
	if r.code != 0 || !strings.Contains(r.stdout, conn.Names()[0]) || !strings.Contains(r.stdout, fmt.Sprint(os.Getpid())) || !strings.Contains(r.stdout, "read-only") {
		t.Fatalf("sessions: %s", r)
	}
	t.Logf("slotwatch sessions:\n%s", r.stdout)
}

// TestCLIInitToken: init-token refuses while a session is open (exit 3, the
// message names our pid), fails on a wrong PIN (exit 1 with the error
// name), and with --force closes the session and renames the token.
func TestCLIInitToken(t *testing.T) {
	bus, _ := hsmDaemon(t)
	conn := dial(t, bus)
	sub := subscribe(t, bus)
	tok := findToken(t, conn, hsmLabel)
	sess := openSession(t, conn, tok)
	var oldGen uint64
	if err := conn.Object(busName, tok).StoreProperty(tokIface+".Generation", &oldGen); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	pinFile, wrongFile := filepath.Join(dir, "so.pin"), filepath.Join(dir, "wrong.pin")
	os.WriteFile(pinFile, []byte(hsmSO+"\n"), 0o600)
	os.WriteFile(wrongFile, []byte("00000000\n"), 0o600)
	const newLabel = "CLI Renamed"

	r := runCLI(t, nil, "", "init-token", "--address", bus.Address, "--label", hsmLabel, "--label-new", newLabel, "--so-pin-file", pinFile)
	if r.code != 3 || !strings.Contains(r.stderr, errPfx+"SessionsExist") ||
		!strings.Contains(r.stderr, fmt.Sprintf("pid %d", os.Getpid())) || !strings.Contains(r.stderr, "--force") {
		t.Fatalf("init-token while we hold a session: %s\nwant exit 3, SessionsExist naming pid %d, a hint about --force", r, os.Getpid())
	}
	t.Logf("init-token without --force:\n%s", r.stderr)
	if _, ok := managedObjects(t, conn)[sess]; !ok {
		t.Fatal("init-token without --force closed our session")
	}

	// Usage errors never reach the daemon: the PIN as an argument does not
	// exist; no PIN source on a token without PIN pad is refused.
	r = runCLI(t, nil, "", "init-token", "--address", bus.Address, "--label", hsmLabel, "--label-new", newLabel, "--so-pin", hsmSO)
	if r.code != 64 || !strings.Contains(r.stderr, "flag provided but not defined: -so-pin") {
		t.Fatalf("init-token --so-pin: %s", r)
	}
	r = runCLI(t, nil, "", "init-token", "--address", bus.Address, "--token", fmt.Sprint(oldGen), "--label-new", newLabel)
	if r.code != 64 || !strings.Contains(r.stderr, "--so-pin-file") {
		t.Fatalf("init-token without a PIN: %s", r)
	}

	r = runCLI(t, nil, "", "init-token", "--address", bus.Address, "--token", string(tok), "--label-new", newLabel, "--so-pin-file", wrongFile, "--force")
	if r.code != 1 || !strings.Contains(r.stderr, errPfx+"PinIncorrect") {
		t.Fatalf("init-token with a wrong SO PIN: %s\nwant exit 1 and PinIncorrect", r)
	}

	r = runCLI(t, nil, hsmSO+"\n", "init-token", "--address", bus.Address, "--serial", tokenSerial(t, conn, tok), "--label-new", newLabel, "--so-pin-stdin", "--force")
	if r.code != 0 {
		t.Fatalf("init-token --force: %s", r)
	}
	t.Logf("init-token --force:\n%s", r.stdout)
	if _, ok := managedObjects(t, conn)[sess]; ok {
		t.Errorf("our session %s is still there after init-token --force", sess)
	}
	for {
		s := sub.next(sigRemoved, 5*time.Second)
		if s.Body[0].(godbus.ObjectPath) == tok {
			break
		}
	}

	// SoftHSM is polled every 2 s: the renamed token shows up in list.
	deadline := time.Now().Add(10 * time.Second)
	for {
		l := listJSON(t, bus)
		for _, tk := range l.Tokens {
			if tk.Label == hsmLabel {
				t.Fatalf("the old token is still listed after init-token: %+v", tk)
			}
			if tk.Label == newLabel {
				if tk.Generation <= oldGen {
					t.Fatalf("renamed token has generation %d, the old one had %d", tk.Generation, oldGen)
				}
				t.Logf("renamed token: generation %d (was %d)", tk.Generation, oldGen)
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no token %q in list within 10 s: %+v", newLabel, l.Tokens)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func tokenSerial(t *testing.T, conn *godbus.Conn, tok godbus.ObjectPath) string {
	t.Helper()
	var serial string
	if err := conn.Object(busName, tok).StoreProperty(tokIface+".Serial", &serial); err != nil || serial == "" {
		t.Fatalf("Serial of %s: %q, %v", tok, serial, err)
	}
	return serial
}

// cliMonitor is a running `slotwatch monitor --json`.
type cliMonitor struct {
	cmd    *exec.Cmd
	lines  chan map[string]any
	stderr *lockedBuffer
	exited chan struct{}
}

func startMonitor(t *testing.T, bus *stack.DBus) *cliMonitor {
	t.Helper()
	m := &cliMonitor{lines: make(chan map[string]any, 1000), stderr: &lockedBuffer{}, exited: make(chan struct{})}
	m.cmd = exec.Command(slotwatchBin(t), "monitor", "--json", "--address", bus.Address)
	m.cmd.Stderr = m.stderr
	stdout, err := m.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := m.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(stdout)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			var line map[string]any
			if err := json.Unmarshal(sc.Bytes(), &line); err != nil {
				line = map[string]any{"event": "not JSON", "text": sc.Text()}
			}
			m.lines <- line
		}
		close(m.lines)
	}()
	go func() { m.cmd.Wait(); close(m.exited) }()
	t.Cleanup(func() {
		select {
		case <-m.exited:
		default:
			m.cmd.Process.Kill()
			<-m.exited
		}
		if t.Failed() {
			t.Logf("slotwatch monitor stderr:\n%s", m.stderr.String())
		}
	})
	if first := m.next(t, 10*time.Second, "state"); first["snapshot"] == nil {
		t.Fatalf("first line without a snapshot: %v", first)
	}
	return m
}

// next returns the next line whose event is one of events, skipping others.
func (m *cliMonitor) next(t *testing.T, timeout time.Duration, events ...string) map[string]any {
	t.Helper()
	deadline := time.After(timeout)
	for {
		select {
		case line, ok := <-m.lines:
			if !ok {
				<-m.exited
				t.Fatalf("slotwatch monitor ended (%v) before %v\n%s", m.cmd.ProcessState, events, m.stderr.String())
			}
			for _, e := range events {
				if line["event"] == e {
					return line
				}
			}
			if line["event"] == "not JSON" {
				t.Errorf("monitor --json printed a line that is not JSON: %q", line["text"])
			}
		case <-deadline:
			t.Fatalf("no %v from slotwatch monitor within %v", events, timeout)
		}
	}
}

// wait waits for the monitor to exit and returns its exit code.
func (m *cliMonitor) wait(t *testing.T, timeout time.Duration) int {
	t.Helper()
	select {
	case <-m.exited:
		return m.cmd.ProcessState.ExitCode()
	case <-time.After(timeout):
		t.Fatalf("slotwatch monitor did not exit within %v", timeout)
		return -1
	}
}

// TestCLIMonitor: `monitor --json` prints the state, then a virtual card's
// reader change, insertion (with label and serial) and removal (with the
// label it remembered), and exits 0 on SIGINT.
func TestCLIMonitor(t *testing.T) {
	pcscd := stack.StartPCSCDForTest(t, stack.PCSCDConfig{Socket: pcscSocket, Dir: t.TempDir()})
	bus := stack.StartDBusForTest(t, "")
	startDaemon(t, bus, nil, "--module", stack.OpenSCModule)
	m := startMonitor(t, bus)
	card := vcard.New(pcscd.Addr(0), vcard.Profile{Label: "CLI Card", Serial: "c1100001"})
	t.Cleanup(func() { card.Close() })

	if err := card.Insert(); err != nil {
		t.Fatal(err)
	}
	sawReader := false
	var ins map[string]any
	for ins == nil {
		line := m.next(t, 10*time.Second, "token_inserted", "reader_changed")
		if line["event"] == "reader_changed" {
			if line["state"] == "present" {
				sawReader = true
			}
			continue
		}
		ins = line
	}
	gen, _ := ins["generation"].(float64)
	if ins["label"] != "CLI Card" || ins["serial"] != "c1100001" || gen < 1 ||
		ins["token"] != fmt.Sprintf("%s/tokens/%d", rootPath, int(gen)) || !strings.Contains(fmt.Sprint(ins["slot"]), "/slots/") || ins["time"] == nil {
		t.Fatalf("token_inserted line %v", ins)
	}
	if !sawReader {
		// PC/SC may report the reader after the module's slot event.
		m.next(t, 5*time.Second, "reader_changed")
	}

	if err := card.Remove(); err != nil {
		t.Fatal(err)
	}
	rm := m.next(t, 10*time.Second, "token_removed")
	if rm["generation"] != ins["generation"] || rm["token"] != ins["token"] || rm["label"] != "CLI Card" || rm["serial"] != "c1100001" {
		t.Fatalf("token_removed line %v after insertion %v", rm, ins)
	}

	m.cmd.Process.Signal(os.Interrupt)
	if code := m.wait(t, 5*time.Second); code != 0 {
		t.Fatalf("slotwatch monitor exited %d on SIGINT, want 0\n%s", code, m.stderr.String())
	}
}

// TestCLIMonitorDaemonLeaves: when the daemon stops, monitor says so and
// exits non-zero (2).
func TestCLIMonitorDaemonLeaves(t *testing.T) {
	bus, d := hsmDaemon(t)
	m := startMonitor(t, bus)
	d.cmd.Process.Signal(syscall.SIGTERM)
	<-d.exited
	m.next(t, 5*time.Second, "daemon_left")
	if code := m.wait(t, 5*time.Second); code != 2 || !strings.Contains(m.stderr.String(), "the daemon left the bus") {
		t.Fatalf("slotwatch monitor after the daemon left: exit %d, stderr %q; want 2 and a message", code, m.stderr.String())
	}
}

// TestCLIDaemonNotRunning: every command against a bus without the daemon
// exits 2 with the message, with --address and with the environment.
func TestCLIDaemonNotRunning(t *testing.T) {
	bus := stack.StartDBusForTest(t, "")
	pinFile := filepath.Join(t.TempDir(), "so.pin")
	os.WriteFile(pinFile, []byte("1234\n"), 0o600)
	want := fmt.Sprintf(cliNotRunning, bus.Address)
	for _, args := range [][]string{
		{"list"},
		{"list", "--json"},
		{"sessions"},
		{"sessions", "--json"},
		{"monitor"},
		{"monitor", "--json"},
		{"init-token", "--label", "x", "--label-new", "y", "--so-pin-file", pinFile},
	} {
		for _, viaEnv := range []bool{false, true} {
			var env []string
			a := args
			if viaEnv {
				env = []string{"DBUS_SESSION_BUS_ADDRESS=" + bus.Address}
			} else {
				a = append([]string{args[0], "--address", bus.Address}, args[1:]...)
			}
			r := runCLI(t, env, "", a...)
			if r.code != 2 || strings.TrimSpace(r.stderr) != want || r.stdout != "" {
				t.Errorf("slotwatch %s (address from the environment: %v): %s\nwant exit 2 and %q", strings.Join(a, " "), viaEnv, r, want)
			}
		}
	}
	// No bus at all: exit 2 too.
	gone := "unix:path=" + filepath.Join(t.TempDir(), "no-bus")
	if r := runCLI(t, nil, "", "list", "--address", gone); r.code != 2 || !strings.Contains(r.stderr, fmt.Sprintf(cliNotRunning, gone)) {
		t.Errorf("list on a bus that does not exist: %s", r)
	}
}

// TestCLIActivation: on a bus where slotwatch is activatable but not
// running, list starts it (through the bus) and shows its token.
func TestCLIActivation(t *testing.T) {
	hsm, err := stack.NewSoftHSM(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if err := hsm.InitToken(hsmLabel, hsmSO, hsmPIN); err != nil {
		t.Fatal(err)
	}
	services := t.TempDir()
	execLine := fmt.Sprintf("/usr/bin/env %s %s serve --module %s --no-pcsc", hsm.Env()[0], slotwatchBin(t), stack.SoftHSMModule)
	if err := os.WriteFile(filepath.Join(services, busName+".service"),
		[]byte("[D-BUS Service]\nName="+busName+"\nExec="+execLine+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	bus := stack.StartDBusForTest(t, services)
	conn := dial(t, bus)
	// The activated daemon is the bus's child, not ours: stop it by its
	// pid before the bus goes (cleanups run last-in, first-out).
	t.Cleanup(func() {
		var owner string
		var pid uint32
		if conn.BusObject().Call("org.freedesktop.DBus.GetNameOwner", 0, busName).Store(&owner) != nil ||
			conn.BusObject().Call("org.freedesktop.DBus.GetConnectionUnixProcessID", 0, owner).Store(&pid) != nil || pid == 0 {
			return
		}
		syscall.Kill(int(pid), syscall.SIGTERM)
		for start := time.Now(); time.Since(start) < 5*time.Second; time.Sleep(20 * time.Millisecond) {
			var has bool
			if conn.BusObject().Call("org.freedesktop.DBus.NameHasOwner", 0, busName).Store(&has) != nil || !has {
				return
			}
		}
		syscall.Kill(int(pid), syscall.SIGKILL)
		t.Errorf("activated slotwatch (pid %d) did not stop within 5 s of SIGTERM", pid)
	})

	l := listJSON(t, bus)
	for _, tk := range l.Tokens {
		if tk.Label == hsmLabel {
			return
		}
	}
	t.Fatalf("list on an activatable bus: no token %q in %+v\n--- bus log ---\n%s", hsmLabel, l.Tokens, bus.Log())
}
