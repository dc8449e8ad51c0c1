package tests

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	godbus "github.com/godbus/dbus/v5"
	"github.com/miekg/pkcs11"

	"github.com/slotwatch/slotwatch/tests/stack"
	"github.com/slotwatch/slotwatch/tests/vcard"
)

// The PKCS#11 face through real clients: pkcs11-tool and programs of our
// own, loading p11-kit's client module (p11-kit-client.so), which speaks
// p11-kit's RPC protocol to slotwatch's socket.

// p11Daemon starts a SoftHSM2 store (one token, one EC key) and slotwatch
// serving it on a PKCS#11 socket of the test's; it returns the bus and the
// socket.
func p11Daemon(t *testing.T, extra ...string) (*stack.DBus, string) {
	t.Helper()
	bus, sock, _ := p11DaemonWith(t, extra...)
	return bus, sock
}

// p11DaemonWith is p11Daemon, also returning the daemon.
func p11DaemonWith(t *testing.T, extra ...string) (*stack.DBus, string, *daemon) {
	t.Helper()
	hsm := hsmStore(t)
	bus := stack.StartDBusForTest(t, "")
	sock := p11Socket(t)
	d := startDaemon(t, bus, hsm.Env(), append([]string{"--module", stack.SoftHSMModule, "--no-pcsc", "--pkcs11-socket", sock}, extra...)...)
	return bus, sock, d
}

// p11Socket is a socket path of the test's, short enough for sun_path.
func p11Socket(t *testing.T) string {
	dir, err := os.MkdirTemp(testDir, "p11-")
	if err != nil {
		t.Fatal(err)
	}
	return filepath.Join(dir, "pkcs11")
}

// pkcs11Tool runs pkcs11-tool through p11-kit-client.so against sock.
func pkcs11Tool(t *testing.T, sock string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "pkcs11-tool", append([]string{"--module", stack.P11KitClientModule}, args...)...)
	cmd.Env = append(os.Environ(), stack.P11KitServerEnv(sock))
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		t.Fatalf("pkcs11-tool %v: %v\n%s", args, ctx.Err(), out)
	}
	return string(out), err
}

func TestPKCS11ToolThroughSlotwatch(t *testing.T) {
	_, sock := p11Daemon(t)

	out, err := pkcs11Tool(t, sock, "-I")
	if err != nil || !strings.Contains(out, "slotwatch") {
		t.Fatalf("pkcs11-tool -I: %v\n%s", err, out)
	}
	out, err = pkcs11Tool(t, sock, "-L")
	if err != nil || !strings.Contains(out, hsmLabel) {
		t.Fatalf("pkcs11-tool -L: %v\n%s", err, out)
	}
	// SoftHSM2 also shows an empty, uninitialized token: name ours.
	tok := []string{"--token-label", hsmLabel}
	out, err = pkcs11Tool(t, sock, append(tok, "-O", "--login", "--pin", hsmPIN)...)
	if err != nil || !strings.Contains(out, "Private Key Object; EC") || !strings.Contains(out, "signing key") {
		t.Fatalf("pkcs11-tool -O --login: %v\n%s", err, out)
	}
	out, err = pkcs11Tool(t, sock, append(tok, "-O", "--login", "--pin", "000000")...)
	if err == nil || !strings.Contains(out, "CKR_PIN_INCORRECT") {
		t.Fatalf("pkcs11-tool -O with a wrong PIN: %v\n%s", err, out)
	}

	// Sign a digest, and check the signature with the key's public half.
	dir := t.TempDir()
	digest := sha256.Sum256([]byte("slotwatch PKCS#11 face"))
	in, sig, pub := filepath.Join(dir, "in"), filepath.Join(dir, "sig"), filepath.Join(dir, "pub")
	if err := os.WriteFile(in, digest[:], 0o600); err != nil {
		t.Fatal(err)
	}
	out, err = pkcs11Tool(t, sock, append(tok, "--login", "--pin", hsmPIN, "--sign", "--mechanism", "ECDSA", "--id", "01", "-i", in, "-o", sig)...)
	if err != nil {
		t.Fatalf("pkcs11-tool --sign: %v\n%s", err, out)
	}
	out, err = pkcs11Tool(t, sock, append(tok, "--read-object", "--type", "pubkey", "--id", "01", "-o", pub)...)
	if err != nil {
		t.Fatalf("pkcs11-tool --read-object: %v\n%s", err, out)
	}
	verifyECDSA(t, pub, sig, digest[:])
}

// verifyECDSA checks a raw r||s signature file against a DER public key
// file.
func verifyECDSA(t *testing.T, pubFile, sigFile string, digest []byte) {
	t.Helper()
	der, err := os.ReadFile(pubFile)
	if err != nil {
		t.Fatal(err)
	}
	k, err := x509.ParsePKIXPublicKey(der)
	if err != nil {
		t.Fatalf("public key: %v", err)
	}
	pk, ok := k.(*ecdsa.PublicKey)
	if !ok {
		t.Fatalf("public key is a %T", k)
	}
	sig, err := os.ReadFile(sigFile)
	if err != nil {
		t.Fatal(err)
	}
	if len(sig) != 64 {
		t.Fatalf("signature of %d bytes, want 64 (r||s on P-256)", len(sig))
	}
	r, s := new(big.Int).SetBytes(sig[:32]), new(big.Int).SetBytes(sig[32:])
	if !ecdsa.Verify(pk, digest, r, s) {
		t.Fatal("the signature does not verify with the key's public half")
	}
}

// TestHelperPKCS11ClientProcess is not a test: it is a PKCS#11 program the
// tests below start, loading p11-kit-client.so (P11_KIT_SERVER_ADDRESS in
// its environment). It takes commands on stdin, one per line (p11Command:
// open LABEL, wait, signloop LABEL PIN, tokeninfo LABEL, closeall LABEL,
// login H PIN, state H, privkeys H, keys H, signh H KEY, closeh H, slots),
// and answers each on
// stdout, errors as "error ..." lines; EOF ends it.
func TestHelperPKCS11ClientProcess(t *testing.T) {
	if os.Getenv("SLOTWATCH_HELPER_P11") == "" {
		t.Skip("only runs as a helper process of the PKCS#11 face tests")
	}
	// miekg/pkcs11, not slotwatch's module package: that one calls
	// C_WaitForSlotEvent through a function list of its own, and
	// p11-kit-client.so makes a new, uninitialized instance for every
	// C_GetFunctionList.
	p := pkcs11.New(stack.P11KitClientModule)
	if p == nil {
		fmt.Println("error cannot load", stack.P11KitClientModule)
		os.Exit(1)
	}
	if err := p.Initialize(); err != nil {
		fmt.Println("error", err)
		os.Exit(1)
	}
	fmt.Println("ready")
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		cmd, arg, _ := strings.Cut(in.Text(), " ")
		answer, err := p11Command(p, cmd, arg, in)
		switch {
		case err != nil:
			fmt.Println("error", err)
		case answer != "":
			fmt.Println(answer)
		}
	}
	p.Finalize()
	os.Exit(0)
}

// p11Command runs one command of TestHelperPKCS11ClientProcess and returns
// its answer ("" when it printed its own, as signloop does).
func p11Command(p *pkcs11.Ctx, cmd, arg string, in *bufio.Scanner) (string, error) {
	// Commands on a session name it first: "login H PIN".
	hs, rest, _ := strings.Cut(arg, " ")
	hv, _ := strconv.ParseUint(hs, 10, 64)
	h := pkcs11.SessionHandle(hv)
	switch cmd {
	case "open":
		slot, err := slotOfToken(p, arg)
		if err != nil {
			return "", err
		}
		h, err := p.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION)
		return fmt.Sprint("session ", h), err
	case "wait":
		// miekg drops the CK_RV: the slot id and the slot list that
		// follows are what the tests check.
		ev := <-p.WaitForSlotEvent(0)
		return fmt.Sprint("event ", ev.SlotID), nil
	case "signloop":
		// signloop LABEL PIN: a session on token LABEL, logged in,
		// signs the same digest again and again with its first private
		// key, printing "sig HEX" or "err ..." each time, until "stop"
		// comes on stdin. The session is never reopened: a stale
		// session must never sign on another card.
		label, pin, _ := strings.Cut(arg, " ")
		signLoop(p, label, pin, in)
		return "", nil
	case "tokeninfo":
		slot, err := slotOfToken(p, arg)
		if err != nil {
			return "", err
		}
		ti, err := p.GetTokenInfo(slot)
		return fmt.Sprint("token ", ti.Label, " ", ti.SerialNumber), err
	case "closeall":
		slot, err := slotOfToken(p, arg)
		if err == nil {
			err = p.CloseAllSessions(slot)
		}
		return "closed all", err
	case "login":
		return "logged in", p.Login(h, pkcs11.CKU_USER, rest)
	case "state":
		info, err := p.GetSessionInfo(h)
		return fmt.Sprint("state ", info.State), err
	case "privkeys":
		if err := p.FindObjectsInit(h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY)}); err != nil {
			return "", err
		}
		keys, _, err := p.FindObjects(h, 16)
		p.FindObjectsFinal(h)
		return fmt.Sprint("privkeys ", len(keys)), err
	case "keys":
		// keys H: the handles of the private keys session H finds.
		if err := p.FindObjectsInit(h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY)}); err != nil {
			return "", err
		}
		keys, _, err := p.FindObjects(h, 16)
		p.FindObjectsFinal(h)
		return fmt.Sprint("keys ", keys), err
	case "signh":
		// signh H KEY: signs loopDigest with key handle KEY on session H.
		key, err := strconv.ParseUint(rest, 10, 64)
		if err != nil {
			return "", err
		}
		if err := p.SignInit(h, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_ECDSA, nil)}, pkcs11.ObjectHandle(key)); err != nil {
			return "", err
		}
		sig, err := p.Sign(h, loopDigest[:])
		return fmt.Sprintf("sig %x", sig), err
	case "closeh":
		// closeh H: C_CloseSession on a handle the test names (another
		// client's, in the attack tests).
		return "closed", p.CloseSession(h)
	case "slots":
		slots, err := p.GetSlotList(true)
		return fmt.Sprint("slots ", len(slots)), err
	}
	return "", fmt.Errorf("unknown command %q", cmd)
}

// loopDigest is what signloop signs.
var loopDigest = sha256.Sum256([]byte("which card signed this?"))

func signLoop(p *pkcs11.Ctx, label, pin string, in *bufio.Scanner) {
	slot, err := slotOfToken(p, label)
	if err != nil {
		fmt.Println("error", err)
		return
	}
	h, err := p.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION)
	if err == nil {
		err = p.Login(h, pkcs11.CKU_USER, pin)
	}
	var keys []pkcs11.ObjectHandle
	if err == nil {
		if err = p.FindObjectsInit(h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY)}); err == nil {
			keys, _, err = p.FindObjects(h, 1)
			p.FindObjectsFinal(h)
		}
	}
	if err != nil || len(keys) != 1 {
		fmt.Println("error", err, len(keys))
		return
	}
	fmt.Println("signing")
	stop := make(chan struct{})
	go func() {
		in.Scan() // "stop", or EOF
		close(stop)
	}()
	for {
		select {
		case <-stop:
			fmt.Println("stopped")
			return
		default:
		}
		err := p.SignInit(h, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_ECDSA, nil)}, keys[0])
		var sig []byte
		if err == nil {
			sig, err = p.Sign(h, loopDigest[:])
		}
		if err != nil {
			fmt.Println("err", err)
			time.Sleep(5 * time.Millisecond)
			continue
		}
		fmt.Printf("sig %x\n", sig)
	}
}

// slotOfToken finds the slot of the token labelled label.
func slotOfToken(p *pkcs11.Ctx, label string) (uint, error) {
	slots, err := p.GetSlotList(true)
	if err != nil {
		return 0, err
	}
	for _, s := range slots {
		if ti, err := p.GetTokenInfo(s); err == nil && ti.Label == label {
			return s, nil
		}
	}
	return 0, fmt.Errorf("no token %q in %d slots", label, len(slots))
}

// p11Client is a running TestHelperPKCS11ClientProcess.
type p11Client struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	lines chan string
}

func startP11Client(t *testing.T, sock string) *p11Client {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperPKCS11ClientProcess$")
	cmd.Env = append(os.Environ(), "SLOTWATCH_HELPER_P11=1", stack.P11KitServerEnv(sock))
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	c := &p11Client{cmd: cmd, stdin: stdin, lines: make(chan string, 16)}
	go func() {
		defer close(c.lines)
		r := bufio.NewScanner(stdout)
		for r.Scan() {
			c.lines <- r.Text()
		}
	}()
	if line := c.next(t, 15*time.Second); line != "ready" {
		t.Fatalf("PKCS#11 client: %q", line)
	}
	return c
}

// do sends a command and returns its answer.
func (c *p11Client) do(t *testing.T, cmd string) string {
	t.Helper()
	fmt.Fprintln(c.stdin, cmd)
	return c.next(t, 15*time.Second)
}

// next returns the client's next line, failing after timeout.
func (c *p11Client) next(t *testing.T, timeout time.Duration) string {
	t.Helper()
	select {
	case l, ok := <-c.lines:
		if !ok {
			t.Fatal("PKCS#11 client exited")
		}
		return l
	case <-time.After(timeout):
		t.Fatalf("PKCS#11 client said nothing within %v", timeout)
	}
	return ""
}

// TestPKCS11InitTokenNamesTheHolder: C_InitToken through the socket while
// another process holds a session answers CKR_SESSION_EXISTS, and that
// process is on the bus as the session's owner; when it is killed, its
// session closes.
func TestPKCS11InitTokenNamesTheHolder(t *testing.T) {
	bus, sock := p11Daemon(t)
	holder := startP11Client(t, sock)
	if ans := holder.do(t, "open "+hsmLabel); !strings.HasPrefix(ans, "session ") {
		t.Fatalf("holder's open: %q", ans)
	}
	out, err := pkcs11Tool(t, sock, "--token-label", hsmLabel, "--init-token", "--label", "wiped", "--so-pin", hsmSO)
	if err == nil || !strings.Contains(out, "CKR_SESSION_EXISTS") {
		t.Fatalf("pkcs11-tool --init-token with another process's session open: %v\n%s", err, out)
	}
	conn := dial(t, bus)
	sessions := func() map[godbus.ObjectPath]map[string]godbus.Variant {
		out := map[godbus.ObjectPath]map[string]godbus.Variant{}
		for p, ifaces := range managedObjects(t, conn) {
			if props, ok := ifaces[sesIface]; ok {
				out[p] = props
			}
		}
		return out
	}
	pid := uint32(holder.cmd.Process.Pid)
	found := false
	for p, props := range sessions() {
		owner, _ := props["Owner"].Value().(string)
		opid, _ := props["OwnerPid"].Value().(uint32)
		if opid == pid && strings.HasPrefix(owner, "pkcs11:pid "+strconv.Itoa(int(pid))+" (") {
			found = true
			t.Logf("the holder on the bus: %s Owner %q OwnerPid %d", p, owner, opid)
		}
	}
	if !found {
		t.Fatalf("no session on the bus owned by the holder (pid %d): %v", pid, sessions())
	}

	holder.cmd.Process.Signal(syscall.SIGKILL)
	deadline := time.Now().Add(5 * time.Second)
	for len(sessions()) != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("the killed holder's session is still open: %v", sessions())
		}
		time.Sleep(20 * time.Millisecond)
	}
	out, err = pkcs11Tool(t, sock, "--token-label", hsmLabel, "--init-token", "--label", "wiped", "--so-pin", hsmSO)
	if err != nil {
		t.Fatalf("pkcs11-tool --init-token once nobody holds a session: %v\n%s", err, out)
	}
}

// TestPKCS11WaitForSlotEvent: a PKCS#11 program blocked in
// C_WaitForSlotEvent through slotwatch sees a card inserted and removed,
// and C_GetSlotList(TRUE) follows (p11-kit server answers
// CKR_FUNCTION_NOT_SUPPORTED to the wait and freezes the slot list).
func TestPKCS11WaitForSlotEvent(t *testing.T) {
	pcscd := stack.StartPCSCDForTest(t, stack.PCSCDConfig{Socket: pcscSocket})
	bus := stack.StartDBusForTest(t, "")
	sock := p11Socket(t)
	startDaemon(t, bus, nil, "--module", stack.OpenSCModule, "--pkcs11-socket", sock)
	card := vcard.New(pcscd.Addr(0), vcard.Profile{Label: "Hotplug", Serial: "4f700001"})
	t.Cleanup(func() { card.Close() })

	client := startP11Client(t, sock)
	if ans := client.do(t, "slots"); ans != "slots 0" {
		t.Fatalf("slots with a token before the card: %q", ans)
	}
	for i, step := range []struct {
		do    func() error
		slots string
	}{
		{card.Insert, "slots 1"},
		{card.Remove, "slots 0"},
		{card.Insert, "slots 1"},
	} {
		fmt.Fprintln(client.stdin, "wait")
		if err := step.do(); err != nil {
			t.Fatal(err)
		}
		if ans := client.next(t, 15*time.Second); !strings.HasPrefix(ans, "event ") {
			t.Fatalf("step %d: C_WaitForSlotEvent answered %q", i, ans)
		}
		if ans := client.do(t, "slots"); ans != step.slots {
			t.Fatalf("step %d: after the event, %q, want %q", i, ans, step.slots)
		}
	}
}

// TestPKCS11SSHAgent: ssh-agent loads p11-kit-client.so (ssh-add -s) and
// signs through slotwatch (ssh-keygen -Y sign through the agent).
func TestPKCS11SSHAgent(t *testing.T) {
	_, sock := p11Daemon(t)
	agent := startSSHAgent(t, sock, hsmPIN)
	pub := agent.addPKCS11()
	if !strings.HasPrefix(pub, "ecdsa-sha2-nistp256 ") {
		t.Fatalf("ssh-add -L: %q, want the token's EC key", pub)
	}
	if err := agent.sign(pub, "signed by a token through slotwatch\n"); err != nil {
		t.Fatal(err)
	}
}

// TestPKCS11P11Tool: GnuTLS's p11tool lists the token through slotwatch.
func TestPKCS11P11Tool(t *testing.T) {
	_, sock := p11Daemon(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "p11tool", "--provider", stack.P11KitClientModule, "--list-tokens")
	cmd.Env = append(os.Environ(), stack.P11KitServerEnv(sock))
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "Label: "+hsmLabel) {
		t.Fatalf("p11tool --list-tokens: %v\n%s", err, out)
	}
}

// waitFor polls cond until it holds, failing after 10 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("waiting for %s: timed out", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestPKCS11SignOnTheCard: Login and Sign run card-side, through pcscd and
// OpenSC, for a PKCS#11 client of slotwatch and for a D-Bus client; the
// signatures verify with the card's key.
func TestPKCS11SignOnTheCard(t *testing.T) {
	pcscd := stack.StartPCSCDForTest(t, stack.PCSCDConfig{Socket: pcscSocket})
	bus := stack.StartDBusForTest(t, "")
	sock := p11Socket(t)
	startDaemon(t, bus, nil, "--module", stack.OpenSCModule, "--pkcs11-socket", sock)
	prof := vcard.Profile{Label: "Signing Card", Serial: "5e9c0001"}
	card := vcard.New(pcscd.Addr(0), prof)
	t.Cleanup(func() { card.Close() })
	if err := card.Insert(); err != nil {
		t.Fatal(err)
	}
	conn := dial(t, bus)
	var tok godbus.ObjectPath
	waitFor(t, "the card's token on the bus", func() bool {
		for p, ifs := range managedObjects(t, conn) {
			if ifs[tokIface]["Label"].Value() == prof.Label {
				tok = p
				return true
			}
		}
		return false
	})

	dir := t.TempDir()
	digest := sha256.Sum256([]byte("signed on the virtual card"))
	in, sigFile := filepath.Join(dir, "in"), filepath.Join(dir, "sig")
	if err := os.WriteFile(in, digest[:], 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := pkcs11Tool(t, sock, "--token-label", prof.Label, "--login", "--pin", vcard.ProfilePIN(prof),
		"--sign", "--mechanism", "ECDSA", "--id", vcard.KeyIDHex, "-i", in, "-o", sigFile)
	if err != nil {
		t.Fatalf("pkcs11-tool --sign through slotwatch on the card: %v\n%s", err, out)
	}
	sig, err := os.ReadFile(sigFile)
	if err != nil {
		t.Fatal(err)
	}
	if !verifiesWith(vcard.PublicKey(prof), digest[:], sig) {
		t.Fatalf("pkcs11-tool's signature (%x) does not verify with the card's key", sig)
	}

	// The same over D-Bus.
	sess := openSession(t, conn, tok)
	if err := conn.Object(busName, sess).Call(sesIface+".Login", 0, uint32(1), []byte(vcard.ProfilePIN(prof))).Err; err != nil {
		t.Fatalf("Login on the card: %v", err)
	}
	var dsig []byte
	if err := conn.Object(busName, sess).Call(sesIface+".Sign", 0, vcard.KeyID(), uint32(ckmECDSA), digest[:]).Store(&dsig); err != nil {
		t.Fatalf("Sign on the card: %v", err)
	}
	if !verifiesWith(vcard.PublicKey(prof), digest[:], dsig) {
		t.Fatalf("the D-Bus signature (%x) does not verify with the card's key", dsig)
	}
}

// verifiesWith checks an r||s signature.
func verifiesWith(pk *ecdsa.PublicKey, digest, sig []byte) bool {
	if len(sig) != 64 {
		return false
	}
	return ecdsa.Verify(pk, digest, new(big.Int).SetBytes(sig[:32]), new(big.Int).SetBytes(sig[32:]))
}

// TestPKCS11RapidReplugNeverSignsWithTheWrongCard: a client signs in a
// loop on card A's session while cards A and B are swapped in the reader
// again and again; every signature it gets verifies with A's key, none
// comes after the first refusal (the session died with A's removal, also
// when A comes back), and slotwatch stays up.
func TestPKCS11RapidReplugNeverSignsWithTheWrongCard(t *testing.T) {
	pcscd := stack.StartPCSCDForTest(t, stack.PCSCDConfig{Socket: pcscSocket})
	bus := stack.StartDBusForTest(t, "")
	sock := p11Socket(t)
	startDaemon(t, bus, nil, "--module", stack.OpenSCModule, "--pkcs11-socket", sock)
	a := vcard.Profile{Label: "CardA", Serial: "a0a0a0a1"} // no blank: signloop's arguments are split on one
	b := vcard.Profile{Label: "CardB", Serial: "b0b0b0b1"}
	card := vcard.New(pcscd.Addr(0), a)
	t.Cleanup(func() { card.Close() })
	obs := stack.NewObserverForTest(t, pcscd)
	reader := pcscd.Readers()[0]
	if err := card.Insert(); err != nil {
		t.Fatal(err)
	}
	client := startP11Client(t, sock)
	var ans string
	waitFor(t, "card A's token through slotwatch", func() bool {
		// "error no token" until slotwatch shows the card.
		ans = client.do(t, "signloop "+a.Label+" "+vcard.ProfilePIN(a))
		return ans == "signing"
	})

	// A signature may complete while A is being pulled; what must never
	// happen is a signature by another card, or one after the session
	// was refused.
	var sigs, errs int
	var lastErr string
	read := func(until time.Time) {
		for time.Now().Before(until) {
			select {
			case l, ok := <-client.lines:
				if !ok {
					t.Fatal("the client exited")
				}
				switch {
				case strings.HasPrefix(l, "sig "):
					sig, err := hex.DecodeString(strings.TrimPrefix(l, "sig "))
					if err != nil || !verifiesWith(vcard.PublicKey(a), loopDigest[:], sig) {
						t.Fatalf("a signature that card A did not make: %s", l)
					}
					if errs > 0 {
						// Refused once (A was pulled): the session
						// is dead for good, also when A comes back.
						t.Fatalf("a signature on A's session after it was refused (%s): %s", lastErr, l)
					}
					sigs++
				case strings.HasPrefix(l, "err "):
					errs++
					lastErr = l
				}
			case <-time.After(time.Until(until)):
				return
			}
		}
	}
	read(time.Now().Add(300 * time.Millisecond))
	if sigs == 0 {
		t.Fatalf("no signature from card A before the swaps (%d errors, last %q)", errs, lastErr)
	}
	for i := range 6 {
		next := b
		if i%2 == 1 {
			next = a
		}
		if err := card.Remove(); err != nil {
			t.Fatal(err)
		}
		if _, err := obs.WaitFor(reader, func(c stack.ObservedChange) bool { return !c.Present }, 10*time.Second); err != nil {
			t.Fatal(err)
		}
		card.SetProfile(next)
		if err := card.Insert(); err != nil {
			t.Fatal(err)
		}
		if _, err := obs.WaitFor(reader, func(c stack.ObservedChange) bool { return c.Present }, 10*time.Second); err != nil {
			t.Fatal(err)
		}
		read(time.Now().Add(200 * time.Millisecond))
	}
	fmt.Fprintln(client.stdin, "stop")
	read(time.Now().Add(500 * time.Millisecond))
	t.Logf("%d signatures, all card A's, then %d refusals (last: %s)", sigs, errs, lastErr)
	if errs == 0 {
		t.Fatal("no refusal after card A was pulled")
	}
	if out, err := pkcs11Tool(t, sock, "-L"); err != nil {
		t.Fatalf("slotwatch after the swaps: %v\n%s", err, out)
	}
}

// TestPKCS11StrangersSessions: session handles are small numbers; a client
// that names another client's session (to close it, to use it) gets
// CKR_SESSION_HANDLE_INVALID, and the owner's session stays.
func TestPKCS11StrangersSessions(t *testing.T) {
	bus, sock := p11Daemon(t)
	owner, stranger := startP11Client(t, sock), startP11Client(t, sock)
	ans := owner.do(t, "open "+hsmLabel)
	h, ok := strings.CutPrefix(ans, "session ")
	if !ok {
		t.Fatalf("owner's open: %q", ans)
	}
	if ans := stranger.do(t, "closeh "+h); !strings.Contains(ans, "CKR_SESSION_HANDLE_INVALID") {
		t.Fatalf("a stranger closing the owner's session %s: %q, want CKR_SESSION_HANDLE_INVALID", h, ans)
	}
	if n := len(sessionObjects(t, dial(t, bus), "")); n != 1 {
		t.Fatalf("%d sessions on the bus after the stranger's attempt, want the owner's 1", n)
	}
	if ans := owner.do(t, "closeh "+h); ans != "closed" {
		t.Fatalf("the owner closing its session: %q", ans)
	}
}

// TestPKCS11SocketActivation: given its socket by a service manager
// (LISTEN_FDS, FileDescriptorName=pkcs11, as packaging's
// slotwatch-pkcs11.socket does), slotwatch serves the PKCS#11 face on it,
// and leaves the socket file, which is the manager's, when it stops.
func TestPKCS11SocketActivation(t *testing.T) {
	hsm := hsmStore(t)
	bus := stack.StartDBusForTest(t, "")
	sock := p11Socket(t)
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	f, err := l.File()
	l.Close()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	// LISTEN_PID must be the daemon's own pid: the shell's, which exec
	// hands on.
	cmd := exec.Command("sh", "-c", `LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=pkcs11 exec "$0" "$@"`,
		slotwatchBin(t), "serve", "--address", bus.Address, "--module", stack.SoftHSMModule, "--no-pcsc")
	cmd.ExtraFiles = []*os.File{f}
	rt, err := os.MkdirTemp(testDir, "rt-")
	if err != nil {
		t.Fatal(err)
	}
	cmd.Env = append(os.Environ(), append(hsm.Env(), "XDG_RUNTIME_DIR="+rt,
		"DBUS_SYSTEM_BUS_ADDRESS=unix:path="+filepath.Join(t.TempDir(), "no-system-bus"))...)
	out := &lockedBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	stop := func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(5 * time.Second):
			cmd.Process.Kill()
			<-exited
			t.Errorf("slotwatch serve did not stop within 5 s of SIGTERM")
		}
	}
	t.Cleanup(stop)
	// A client may connect before the daemon is up: the socket queues it.
	o, err := pkcs11Tool(t, sock, "-L")
	if err != nil || !strings.Contains(o, hsmLabel) {
		t.Fatalf("pkcs11-tool -L on the activated socket: %v\n%s\n--- slotwatch:\n%s", err, o, out.String())
	}
	// Its log comes through a pipe: wait for the line, do not read once.
	waitFor(t, "the daemon saying it serves the PKCS#11 face", func() bool { return strings.Contains(out.String(), "PKCS#11 face") })
	if _, err := os.Stat(filepath.Join(rt, "slotwatch", "pkcs11")); err == nil {
		t.Errorf("the daemon made its own socket as well as serving the activated one")
	}
	stop()
	if st, err := os.Stat(sock); err != nil || st.Mode().Type() != os.ModeSocket {
		t.Errorf("the activated socket file is gone after the daemon stopped: %v", err)
	}
}

// TestPKCS11PINs: C_SetPIN and C_InitPIN through slotwatch change the PIN
// the token checks, and no PIN appears in the daemon's output, not even
// with every PKCS#11 call logged.
func TestPKCS11PINs(t *testing.T) {
	_, sock, d := p11DaemonWith(t, "--log-calls")
	tok := []string{"--token-label", hsmLabel}
	const changed, reset = "135791", "864200"
	out, err := pkcs11Tool(t, sock, append(tok, "--change-pin", "--pin", hsmPIN, "--new-pin", changed)...)
	if err != nil {
		t.Fatalf("pkcs11-tool --change-pin: %v\n%s", err, out)
	}
	if out, err := pkcs11Tool(t, sock, append(tok, "-O", "--login", "--pin", hsmPIN)...); err == nil {
		t.Fatalf("the old PIN still logs in after C_SetPIN:\n%s", out)
	}
	if out, err := pkcs11Tool(t, sock, append(tok, "-O", "--login", "--pin", changed)...); err != nil {
		t.Fatalf("the new PIN after C_SetPIN: %v\n%s", err, out)
	}
	out, err = pkcs11Tool(t, sock, append(tok, "--init-pin", "--login", "--login-type", "so", "--so-pin", hsmSO, "--new-pin", reset)...)
	if err != nil {
		t.Fatalf("pkcs11-tool --init-pin: %v\n%s", err, out)
	}
	if out, err := pkcs11Tool(t, sock, append(tok, "-O", "--login", "--pin", reset)...); err != nil {
		t.Fatalf("the PIN the SO set with C_InitPIN: %v\n%s", err, out)
	}
	// The log comes through a pipe: wait until it shows the calls (else
	// the PIN check would prove nothing), then look for the PINs.
	waitFor(t, "the daemon's log of C_SetPIN and C_InitPIN", func() bool {
		logs := d.stderr.String()
		return strings.Contains(logs, "C_SetPIN") && strings.Contains(logs, "C_InitPIN")
	})
	logs := d.stderr.String()
	for _, pin := range []string{hsmPIN, changed, reset, hsmSO} {
		if strings.Contains(logs, pin) {
			t.Errorf("PIN %q in the daemon's output", pin)
		}
	}
}

// TestPKCS11ConnectionsAreIndependent: two programs on one token —
// C_CloseAllSessions closes the caller's own sessions only, and one
// program's login neither logs the other's sessions in nor shows it the
// private key.
func TestPKCS11ConnectionsAreIndependent(t *testing.T) {
	bus, sock := p11Daemon(t)
	a, b := startP11Client(t, sock), startP11Client(t, sock)
	ha, ok := strings.CutPrefix(a.do(t, "open "+hsmLabel), "session ")
	if !ok {
		t.Fatal("a's open failed")
	}
	hb, ok := strings.CutPrefix(b.do(t, "open "+hsmLabel), "session ")
	if !ok {
		t.Fatal("b's open failed")
	}
	if ans := a.do(t, "login "+ha+" "+hsmPIN); ans != "logged in" {
		t.Fatalf("a's login: %q", ans)
	}
	if ans := a.do(t, "privkeys "+ha); ans != "privkeys 1" {
		t.Fatalf("a's search for its private key: %q", ans)
	}
	if ans := b.do(t, "state "+hb); ans != fmt.Sprintf("state %d", pkcs11.CKS_RO_PUBLIC_SESSION) {
		t.Fatalf("b's session under a's login: %q, want public", ans)
	}
	if ans := b.do(t, "privkeys "+hb); ans != "privkeys 0" {
		t.Fatalf("b's search for private keys under a's login: %q, want none", ans)
	}
	if ans := b.do(t, "closeall "+hsmLabel); ans != "closed all" {
		t.Fatalf("b's C_CloseAllSessions: %q", ans)
	}
	if ans := a.do(t, "privkeys "+ha); ans != "privkeys 1" {
		t.Fatalf("a's session after b's C_CloseAllSessions: %q, want it open and logged in", ans)
	}
	if ans := b.do(t, "state "+hb); !strings.Contains(ans, "CKR_SESSION_HANDLE_INVALID") {
		t.Fatalf("b's own session after its C_CloseAllSessions: %q, want closed", ans)
	}
	if n := len(sessionObjects(t, dial(t, bus), "")); n != 1 {
		t.Fatalf("%d sessions on the bus, want a's 1", n)
	}
}

// TestPKCS11NSS: NSS (Firefox's and Chromium's crypto library) loads
// p11-kit-client.so as a module (modutil -add) and sees slotwatch's token
// and, logged in, its private key (certutil -K).
func TestPKCS11NSS(t *testing.T) {
	_, sock := p11Daemon(t)
	db := "sql:" + t.TempDir()
	run := func(name string, args ...string) string {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		cmd := exec.CommandContext(ctx, name, args...)
		cmd.Env = append(os.Environ(), stack.P11KitServerEnv(sock))
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("%s %v: %v\n%s", name, args, err, out)
		}
		return string(out)
	}
	run("certutil", "-N", "-d", db, "--empty-password")
	run("modutil", "-dbdir", db, "-add", "slotwatch", "-libfile", stack.P11KitClientModule, "-force")
	if out := run("modutil", "-dbdir", db, "-list", "slotwatch"); !strings.Contains(out, hsmLabel) {
		t.Fatalf("modutil -list does not show the token:\n%s", out)
	}
	pinFile := filepath.Join(t.TempDir(), "pin")
	if err := os.WriteFile(pinFile, []byte(hsmPIN+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if out := run("certutil", "-K", "-d", db, "-h", hsmLabel, "-f", pinFile); !regexp.MustCompile(`(?m)^<\s*\d+>\s+ec\s`).MatchString(out) {
		t.Fatalf("certutil -K does not list the token's EC key:\n%s", out)
	}
}

// TestPKCS11PollingKeepsNoCard: a program that polls C_GetTokenInfo (as
// NSS and others do) does not keep a released OpenSC initialized: once the
// module was read, the answers come from what it said while the card is
// untouched, and an exclusive user can still have the card.
func TestPKCS11PollingKeepsNoCard(t *testing.T) {
	pcscd := stack.StartPCSCDForTest(t, stack.PCSCDConfig{Socket: pcscSocket})
	bus := stack.StartDBusForTest(t, "")
	sock := p11Socket(t)
	conf := filepath.Join(t.TempDir(), "slotwatch.conf")
	if err := os.WriteFile(conf, []byte("idle-release-grace = 0.2\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	d := startDaemon(t, bus, nil, "--module", stack.OpenSCModule, "--pkcs11-socket", sock, "--config", conf)
	prof := vcard.Profile{Label: "Polled", Serial: "9011ed01"}
	card := vcard.New(pcscd.Addr(0), prof)
	t.Cleanup(func() { card.Close() })
	if err := card.Insert(); err != nil {
		t.Fatal(err)
	}
	client := startP11Client(t, sock)
	want := "token " + prof.Label + " " + prof.Serial
	waitFor(t, "the card through slotwatch", func() bool { return client.do(t, "tokeninfo "+prof.Label) == want })

	conn := dial(t, bus)
	released := func() bool {
		for _, ifs := range managedObjects(t, conn) {
			if m, ok := ifs[modIface]; ok {
				r, _ := m["Released"].Value().(bool)
				return r
			}
		}
		return false
	}
	waitFor(t, "OpenSC released", released)
	// Every wake-up so far was followed by a release; wait until the log
	// (through a pipe) shows that, so the count below starts complete.
	count := func(line string) int { return strings.Count(d.stderr.String(), line) }
	waitFor(t, "the daemon's log to catch up", func() bool {
		return count("releasing an idle module") > count("initializing a released module")
	})
	wakes := count("initializing a released module")
	for range 20 {
		if ans := client.do(t, "tokeninfo "+prof.Label); ans != want {
			t.Fatalf("C_GetTokenInfo while released: %q, want %q", ans, want)
		}
	}
	if n := count("initializing a released module"); n != wakes {
		t.Fatalf("20 C_GetTokenInfo calls initialized the released module %d times", n-wakes)
	}
	if !released() {
		t.Fatal("the module is not released after the polling")
	}
}

// TestPKCS11GarbageOnTheSocket: bytes that are not p11-kit's protocol — a
// wrong handshake, a frame header announcing 4 GiB, a frame cut short —
// cost the sender its connection or a CKR, never the daemon: a real client
// is served afterwards, and meanwhile.
func TestPKCS11GarbageOnTheSocket(t *testing.T) {
	_, sock := p11Daemon(t)
	for _, tc := range []struct {
		name  string
		bytes []byte
	}{
		{"no handshake, just text", []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n")},
		{"handshake, then a 4 GiB frame header", append([]byte{0}, 0, 0, 0, 16, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff)},
		{"handshake, then a frame cut short", append([]byte{0}, 0, 0, 0, 16, 0, 0, 0, 0, 0, 0, 1, 0, 1, 2, 3)},
		{"handshake, then a call before C_Initialize", append([]byte{0}, 0, 0, 0, 16, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 5, 0, 0, 0, 1, 'u')},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := net.Dial("unix", sock)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if _, err := c.Write(tc.bytes); err != nil {
				t.Fatal(err)
			}
			// Whatever it answers, a real client is served meanwhile.
			if out, err := pkcs11Tool(t, sock, "-L"); err != nil || !strings.Contains(out, hsmLabel) {
				t.Fatalf("pkcs11-tool -L while a garbage connection is open: %v\n%s", err, out)
			}
			c.(*net.UnixConn).CloseWrite()
			c.SetReadDeadline(time.Now().Add(10 * time.Second))
			if _, err := io.Copy(io.Discard, c); err != nil {
				t.Fatalf("the daemon did not end the garbage connection: %v", err)
			}
		})
	}
	if out, err := pkcs11Tool(t, sock, "-L"); err != nil || !strings.Contains(out, hsmLabel) {
		t.Fatalf("pkcs11-tool -L after the garbage: %v\n%s", err, out)
	}
}

// TestPKCS11ConnectionFlood: a program that opens connection after
// connection gets at most 256 served at once; the others are closed at
// once, and once some are let go a real client is served again.
func TestPKCS11ConnectionFlood(t *testing.T) {
	_, sock := p11Daemon(t)
	const dialed, limit = 300, 256
	var conns []net.Conn
	t.Cleanup(func() {
		for _, c := range conns {
			c.Close()
		}
	})
	// Connections that say nothing: a served one waits in the handshake.
	for range dialed {
		c, err := net.Dial("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
	}
	// Which ones the daemon turns away depends on the order it takes
	// them in; how many does not. Wait until it has decided for all.
	closed := map[int]bool{}
	waitFor(t, fmt.Sprintf("%d of %d connections closed by the daemon", dialed-limit, dialed), func() bool {
		for i, c := range conns {
			if closed[i] {
				continue
			}
			c.SetReadDeadline(time.Now().Add(time.Millisecond))
			if _, err := c.Read(make([]byte, 1)); errors.Is(err, io.EOF) {
				closed[i] = true
			}
		}
		return len(closed) >= dialed-limit
	})
	if len(closed) != dialed-limit {
		t.Fatalf("the daemon closed %d of %d connections, want %d (it serves %d at once)", len(closed), dialed, dialed-limit, limit)
	}
	// Let 8 served ones go: a real client is served again.
	n := 0
	for i, c := range conns {
		if !closed[i] && n < 8 {
			c.Close()
			n++
		}
	}
	waitFor(t, "a real client served again", func() bool {
		out, err := pkcs11Tool(t, sock, "-L")
		return err == nil && strings.Contains(out, hsmLabel)
	})
}
