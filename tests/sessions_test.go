package tests

import (
	"bufio"
	"crypto/sha256"
	"fmt"
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
	hsmLabel = "Session HSM"
	hsmSO    = "87654321"
	hsmPIN   = "246810"
	ckoPriv  = uint32(3)      // CKO_PRIVATE_KEY
	ckmECDSA = uint32(0x1041) // CKM_ECDSA
)

// hsmDaemon starts a private bus, a SoftHSM2 store with one token and one
// EC key, and slotwatch serving it.
func hsmDaemon(t *testing.T) (*stack.DBus, *daemon) {
	t.Helper()
	hsm := hsmStore(t)
	bus := stack.StartDBusForTest(t, "")
	d := startDaemon(t, bus, hsm.Env(), "--module", stack.SoftHSMModule, "--no-pcsc")
	return bus, d
}

// hsmStore makes a SoftHSM2 store with the tests' token (hsmLabel, its SO
// PIN and PIN) holding one EC P-256 key pair, id 01, "signing key".
func hsmStore(t testing.TB) *stack.SoftHSM {
	t.Helper()
	hsm, err := stack.NewSoftHSM(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if err := hsm.InitToken(hsmLabel, hsmSO, hsmPIN); err != nil {
		t.Fatal(err)
	}
	if err := hsm.GenerateECKey(hsmLabel, hsmPIN, "01", "signing key"); err != nil {
		t.Fatal(err)
	}
	return hsm
}

func openSession(t *testing.T, conn *godbus.Conn, tok godbus.ObjectPath) godbus.ObjectPath {
	t.Helper()
	var p godbus.ObjectPath
	if err := conn.Object(busName, tok).Call(tokIface+".OpenSession", 0, false).Store(&p); err != nil {
		t.Fatalf("OpenSession: %v", err)
	}
	return p
}

// TestSessionsBelongToTheirCaller: sessions work against SoftHSM2 (login,
// find, sign), belong to the connection that opened them, and
// CloseAllSessions closes only the caller's own.
func TestSessionsBelongToTheirCaller(t *testing.T) {
	bus, _ := hsmDaemon(t)
	alice, bob := dial(t, bus), dial(t, bus)
	tok := findToken(t, alice, hsmLabel)

	a1 := openSession(t, alice, tok)
	a2 := openSession(t, alice, tok)
	b1 := openSession(t, bob, tok)

	var owner string
	if err := alice.Object(busName, a1).StoreProperty(sesIface+".Owner", &owner); err != nil || owner != alice.Names()[0] {
		t.Fatalf("Owner %q (%v), want %q", owner, err, alice.Names()[0])
	}
	var pid uint32
	if err := alice.Object(busName, a1).StoreProperty(sesIface+".OwnerPid", &pid); err != nil || pid != uint32(os.Getpid()) {
		t.Fatalf("OwnerPid %d (%v), want %d", pid, err, os.Getpid())
	}

	// Wrong PIN, then the right one.
	err := alice.Object(busName, a1).Call(sesIface+".Login", 0, uint32(1), []byte("000000")).Err
	if errName(err) != errPfx+"PinIncorrect" {
		t.Fatalf("Login with a wrong PIN: %v, want PinIncorrect", err)
	}
	if err := alice.Object(busName, a1).Call(sesIface+".Login", 0, uint32(1), []byte(hsmPIN)).Err; err != nil {
		t.Fatalf("Login: %v", err)
	}
	var objs []map[string]godbus.Variant
	if err := alice.Object(busName, a1).Call(sesIface+".FindObjects", 0, map[string]godbus.Variant{"class": godbus.MakeVariant(ckoPriv)}).Store(&objs); err != nil {
		t.Fatalf("FindObjects: %v", err)
	}
	if len(objs) != 1 || fmt.Sprintf("%x", objs[0]["id"].Value()) != "01" || objs[0]["label"].Value() != "signing key" {
		t.Fatalf("FindObjects(private keys) = %v", objs)
	}
	digest := sha256.Sum256([]byte("slotwatch"))
	var sig []byte
	if err := alice.Object(busName, a1).Call(sesIface+".Sign", 0, []byte{1}, ckmECDSA, digest[:]).Store(&sig); err != nil {
		t.Fatalf("Sign: %v", err)
	}
	if len(sig) != 64 {
		t.Fatalf("ECDSA P-256 signature of %d bytes, want 64", len(sig))
	}

	// Alice's login is hers: Bob's session on the same token sees no
	// private object, cannot sign, log in over her, or log her out.
	var bobObjs []map[string]godbus.Variant
	if err := bob.Object(busName, b1).Call(sesIface+".FindObjects", 0, map[string]godbus.Variant{"class": godbus.MakeVariant(ckoPriv)}).Store(&bobObjs); err != nil || len(bobObjs) != 0 {
		t.Fatalf("bob's FindObjects(private keys) while alice is logged in = %v, %v; want none", bobObjs, err)
	}
	if err := bob.Object(busName, b1).Call(sesIface+".Sign", 0, []byte{1}, ckmECDSA, digest[:]).Err; errName(err) != errPfx+"NotLoggedIn" {
		t.Fatalf("bob's Sign with alice's login: %v, want NotLoggedIn", err)
	}
	if err := bob.Object(busName, b1).Call(sesIface+".Login", 0, uint32(1), []byte(hsmPIN)).Err; errName(err) != errPfx+"AlreadyLoggedIn" {
		t.Fatalf("bob's Login while alice is logged in: %v, want AlreadyLoggedIn", err)
	}
	if err := bob.Object(busName, b1).Call(sesIface+".Logout", 0).Err; errName(err) != errPfx+"NotLoggedIn" {
		t.Fatalf("bob's Logout of alice's login: %v, want NotLoggedIn", err)
	}
	var aliceState, bobState uint32
	alice.Object(busName, a1).StoreProperty(sesIface+".State", &aliceState)
	bob.Object(busName, b1).StoreProperty(sesIface+".State", &bobState)
	if aliceState != 1 || bobState != 0 {
		t.Fatalf("session states alice %d, bob %d; want 1 (CKS_RO_USER_FUNCTIONS) and 0 (CKS_RO_PUBLIC_SESSION)", aliceState, bobState)
	}

	// Bob cannot touch Alice's session.
	for _, call := range []struct {
		method string
		args   []any
	}{
		{"Close", nil},
		{"Logout", nil},
		{"Login", []any{uint32(1), []byte(hsmPIN)}},
		{"FindObjects", []any{map[string]godbus.Variant{}}},
		{"Sign", []any{[]byte{1}, ckmECDSA, digest[:]}},
	} {
		err := bob.Object(busName, a1).Call(sesIface+"."+call.method, 0, call.args...).Err
		if errName(err) != "org.freedesktop.DBus.Error.AccessDenied" {
			t.Errorf("bob calling %s on alice's session: %v, want AccessDenied", call.method, err)
		}
	}

	// Alice closes all of hers; Bob's survives.
	if err := alice.Object(busName, tok).Call(tokIface+".CloseAllSessions", 0).Err; err != nil {
		t.Fatal(err)
	}
	objects := managedObjects(t, bob)
	for _, p := range []godbus.ObjectPath{a1, a2} {
		if _, ok := objects[p]; ok {
			t.Errorf("alice's session %s still exported after her CloseAllSessions", p)
		}
	}
	if _, ok := objects[b1]; !ok {
		t.Fatalf("bob's session %s went with alice's CloseAllSessions", b1)
	}
	if err := bob.Object(busName, b1).Call(sesIface+".FindObjects", 0, map[string]godbus.Variant{}).Store(&objs); err != nil {
		t.Fatalf("bob's session after alice's CloseAllSessions: %v", err)
	}
	// Alice's login left with her last session: Bob can log in now.
	if err := bob.Object(busName, b1).Call(sesIface+".Login", 0, uint32(1), []byte(hsmPIN)).Err; err != nil {
		t.Fatalf("bob's Login after alice left: %v", err)
	}
}

// TestHelperClientProcess is not a test: it is the client process the
// tests below start (and kill). It opens a session and waits.
func TestHelperClientProcess(t *testing.T) {
	addr, tok := os.Getenv("SLOTWATCH_HELPER_BUS"), os.Getenv("SLOTWATCH_HELPER_TOKEN")
	if addr == "" {
		t.Skip("only runs as a helper process of TestSessionsOfADeadClient and TestInitTokenNamesHolders")
	}
	conn, err := godbus.Connect(addr)
	if err != nil {
		fmt.Println("error", err)
		os.Exit(1)
	}
	var p godbus.ObjectPath
	if err := conn.Object(busName, godbus.ObjectPath(tok)).Call(tokIface+".OpenSession", 0, false).Store(&p); err != nil {
		fmt.Println("error", err)
		os.Exit(1)
	}
	fmt.Println("session", p)
	time.Sleep(time.Minute)
	os.Exit(0)
}

// startClient runs a helper client process that opens a session on tok; it
// returns the process and its session path.
func startClient(t *testing.T, bus *stack.DBus, tok godbus.ObjectPath) (*exec.Cmd, godbus.ObjectPath) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperClientProcess$")
	cmd.Env = append(os.Environ(), "SLOTWATCH_HELPER_BUS="+bus.Address, "SLOTWATCH_HELPER_TOKEN="+string(tok))
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil || !strings.HasPrefix(line, "session ") {
		t.Fatalf("helper client: %q %v", line, err)
	}
	return cmd, godbus.ObjectPath(strings.TrimSpace(strings.TrimPrefix(line, "session ")))
}

// TestSessionsOfADeadClient: a client killed while holding a session loses
// it within 1 s; another client's session stays.
func TestSessionsOfADeadClient(t *testing.T) {
	bus, _ := hsmDaemon(t)
	conn := dial(t, bus)
	tok := findToken(t, conn, hsmLabel)
	mine := openSession(t, conn, tok)
	client, theirs := startClient(t, bus, tok)
	if _, ok := managedObjects(t, conn)[theirs]; !ok {
		t.Fatalf("the client's session %s is not on the bus", theirs)
	}
	client.Process.Signal(syscall.SIGKILL)
	killed := time.Now()
	for {
		if _, ok := managedObjects(t, conn)[theirs]; !ok {
			break
		}
		if time.Since(killed) > time.Second {
			t.Fatalf("the dead client's session %s is still there after 1 s", theirs)
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Logf("dead client's session closed %v after the kill", time.Since(killed).Round(time.Millisecond))
	if _, ok := managedObjects(t, conn)[mine]; !ok {
		t.Fatal("another client's session went too")
	}
	err := conn.Object(busName, theirs).Call(sesIface+".Close", 0).Err
	if errName(err) != errPfx+"TokenRemoved" && errName(err) != "org.freedesktop.DBus.Error.UnknownObject" {
		t.Fatalf("Close on the dead client's session: %v", err)
	}
}

// TestInitTokenNamesHolders: InitToken without force names every holder
// (unique name, pid, command); with force it closes them and initializes.
func TestInitTokenNamesHolders(t *testing.T) {
	bus, _ := hsmDaemon(t)
	conn := dial(t, bus)
	sub := subscribe(t, bus)
	tok := findToken(t, conn, hsmLabel)
	client, theirs := startClient(t, bus, tok)

	err := conn.Object(busName, tok).Call(tokIface+".InitToken", 0, []byte(hsmSO), "Renamed", false).Err
	if errName(err) != errPfx+"SessionsExist" {
		t.Fatalf("InitToken while a client holds a session: %v, want SessionsExist", err)
	}
	msg := err.(godbus.Error).Body[0].(string)
	// The holder's program, not its arguments: a command line may hold
	// secrets (pkcs11-tool --pin ...), and this message goes to another
	// client.
	if !strings.Contains(msg, fmt.Sprintf("pid %d", client.Process.Pid)) || !strings.Contains(msg, os.Args[0]) {
		t.Fatalf("SessionsExist message %q does not name pid %d and its program %s", msg, client.Process.Pid, os.Args[0])
	}
	if strings.Contains(msg, "TestHelperClientProcess") {
		t.Fatalf("SessionsExist message %q shows the holder's arguments", msg)
	}
	t.Logf("SessionsExist: %s", msg)

	if err := conn.Object(busName, tok).Call(tokIface+".InitToken", 0, []byte(hsmSO), "Renamed", true).Err; err != nil {
		t.Fatalf("InitToken with force: %v", err)
	}
	for {
		sig := sub.next(sigIfRemoved, 5*time.Second)
		if sig.Body[0].(godbus.ObjectPath) == theirs {
			break
		}
	}
	findToken(t, conn, "Renamed")
}

// TestPINsNeverLogged: with --log-calls and debug logging, a login with a
// known PIN (right and wrong) and an InitToken with a known SO PIN leave no
// trace of either PIN in anything the daemon wrote.
func TestPINsNeverLogged(t *testing.T) {
	hsm, err := stack.NewSoftHSM(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	const userPIN, soPIN, wrongPIN = "739164", "58203917", "602518"
	if err := hsm.InitToken(hsmLabel, soPIN, userPIN); err != nil {
		t.Fatal(err)
	}
	bus := stack.StartDBusForTest(t, "")
	d := startDaemon(t, bus, hsm.Env(), "--module", stack.SoftHSMModule, "--no-pcsc", "--log-calls")
	conn := dial(t, bus)
	tok := findToken(t, conn, hsmLabel)
	s := openSession(t, conn, tok)
	conn.Object(busName, s).Call(sesIface+".Login", 0, uint32(1), []byte(wrongPIN))
	if err := conn.Object(busName, s).Call(sesIface+".Login", 0, uint32(1), []byte(userPIN)).Err; err != nil {
		t.Fatalf("Login: %v", err)
	}
	conn.Object(busName, s).Call(sesIface+".Logout", 0)
	if err := conn.Object(busName, tok).Call(tokIface+".InitToken", 0, []byte(soPIN), "Relabelled", true).Err; err != nil {
		t.Fatalf("InitToken: %v", err)
	}
	// The daemon writes the call log before it replies, but the lines
	// reach d.stderr through a pipe and a copying goroutine: wait for them.
	out := d.stderr.String()
	for deadline := time.Now().Add(5 * time.Second); !strings.Contains(out, "C_Login") || !strings.Contains(out, "C_InitToken"); out = d.stderr.String() {
		if time.Now().After(deadline) {
			t.Fatalf("--log-calls did not log the calls:\n%s", out)
		}
		time.Sleep(10 * time.Millisecond)
	}
	for _, pin := range []string{userPIN, soPIN, wrongPIN} {
		for _, form := range pinForms(pin) {
			if strings.Contains(out, form) {
				t.Fatalf("PIN %s appears in the daemon's log as %q", pin, form)
			}
		}
	}
}

// pinForms are the ways a PIN could show up in a log: as text, hex, and
// as Go's rendering of a byte slice.
func pinForms(pin string) []string {
	b := []byte(pin)
	dec := make([]string, len(b))
	for i, c := range b {
		dec[i] = fmt.Sprint(c)
	}
	return []string{pin, fmt.Sprintf("%x", b), fmt.Sprintf("% x", b), strings.Join(dec, " "), strings.Join(dec, ",")}
}
