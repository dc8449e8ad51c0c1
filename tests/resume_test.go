package tests

import (
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"testing"

	godbus "github.com/godbus/dbus/v5"

	"github.com/slotwatch/slotwatch/tests/stack"
	"github.com/slotwatch/slotwatch/tests/vcard"
)

// Sessions across a pcscd restart that kept the card (the seed story: an
// ssh-agent stuck on CKR_GENERAL_ERROR after pcscd restarted, until
// someone ran ssh-add -e/-s). The virtual card's connection dies with
// pcscd, so the tests put it back right after the restart: to slotwatch,
// the same card that stayed in its reader while pcscd restarted.

// cardDaemon is a daemon on OpenSC with the PKCS#11 face, and a virtual
// card in the first reader of its pcscd, its token on the bus.
type cardDaemon struct {
	pcscd *stack.PCSCD
	card  *vcard.Card
	conn  *godbus.Conn
	sock  string
	tok   godbus.ObjectPath
	gen   uint64
}

func startCardDaemon(t *testing.T, prof vcard.Profile, extra ...string) *cardDaemon {
	t.Helper()
	c := &cardDaemon{pcscd: stack.StartPCSCDForTest(t, stack.PCSCDConfig{Socket: pcscSocket}), sock: p11Socket(t)}
	bus := stack.StartDBusForTest(t, "")
	startDaemon(t, bus, nil, append([]string{"--module", stack.OpenSCModule, "--pkcs11-socket", c.sock}, extra...)...)
	c.card = vcard.New(c.pcscd.Addr(0), prof)
	t.Cleanup(func() { c.card.Close() })
	if err := c.card.Insert(); err != nil {
		t.Fatal(err)
	}
	c.conn = dial(t, bus)
	c.tok, c.gen = cardToken(t, c.conn, prof.Label, "")
	return c
}

// restartPCSCDKeepingCard kills pcscd, waits until slotwatch has the
// card's token off the bus, and brings pcscd and the card back.
func restartPCSCDKeepingCard(t *testing.T, pcscd *stack.PCSCD, card *vcard.Card, conn *godbus.Conn, tok godbus.ObjectPath) {
	t.Helper()
	if err := pcscd.Kill(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the token removed with pcscd", func() bool {
		_, ok := managedObjects(t, conn)[tok]
		return !ok
	})
	card.Remove()
	if err := pcscd.Restart(); err != nil {
		t.Fatal(err)
	}
	if err := card.Insert(); err != nil {
		t.Fatal(err)
	}
}

// cardToken waits for the token labelled label and returns its path and
// generation.
func cardToken(t *testing.T, conn *godbus.Conn, label string, not godbus.ObjectPath) (godbus.ObjectPath, uint64) {
	t.Helper()
	var p godbus.ObjectPath
	var gen uint64
	waitFor(t, "token "+label+" on the bus", func() bool {
		for path, ifs := range managedObjects(t, conn) {
			if props, ok := ifs[tokIface]; ok && props["Label"].Value() == label && path != not {
				p, gen = path, props["Generation"].Value().(uint64)
				return true
			}
		}
		return false
	})
	return p, gen
}

// sessionsOn waits until n Session objects point at token tok and returns
// their paths.
func sessionsOn(t *testing.T, conn *godbus.Conn, tok godbus.ObjectPath, n int) []godbus.ObjectPath {
	t.Helper()
	var on []godbus.ObjectPath
	waitFor(t, "sessions resumed on "+string(tok), func() bool {
		on = sessionObjects(t, conn, tok)
		return len(on) == n
	})
	return on
}

// sessionObjects returns the Session objects on the bus, those on token
// tok only unless tok is "".
func sessionObjects(t *testing.T, conn *godbus.Conn, tok godbus.ObjectPath) []godbus.ObjectPath {
	t.Helper()
	var out []godbus.ObjectPath
	for path, ifs := range managedObjects(t, conn) {
		if props, ok := ifs[sesIface]; ok && (tok == "" || props["Token"].Value() == tok) {
			out = append(out, path)
		}
	}
	return out
}

// TestSSHAgentSignsAcrossPcscdRestart is the seed story through the
// PKCS#11 face: ssh-agent loaded the card's key through slotwatch and
// signs; pcscd is killed and restarted with the card left in; the agent
// signs again, with no ssh-add -e/-s. Its session (the same Session
// object, owned by ssh-agent) moved to the card's new generation and was
// logged in again by slotwatch.
func TestSSHAgentSignsAcrossPcscdRestart(t *testing.T) {
	prof := vcard.Profile{Label: "SSH Card", Serial: "55a90001"}
	c := startCardDaemon(t, prof)
	pcscd, card, conn, sock, tok := c.pcscd, c.card, c.conn, c.sock, c.tok

	agent := startSSHAgent(t, sock, vcard.ProfilePIN(prof))
	pub := agent.addPKCS11()
	if !strings.HasPrefix(pub, "ecdsa-sha2-nistp256 ") {
		t.Fatalf("ssh-add -L: %q, want the card's EC key", pub)
	}
	if err := agent.sign(pub, "before the restart\n"); err != nil {
		t.Fatal(err)
	}
	before := sessionsOn(t, conn, tok, 1)

	restartPCSCDKeepingCard(t, pcscd, card, conn, tok)
	newTok, _ := cardToken(t, conn, prof.Label, tok)
	after := sessionsOn(t, conn, newTok, 1)
	if after[0] != before[0] {
		t.Fatalf("the agent's session is %s after the restart, was %s: want the same one, resumed", after[0], before[0])
	}
	state := managedObjects(t, conn)[after[0]][sesIface]["State"].Value().(uint32)
	if state != 1 && state != 3 { // CKS_RO_USER_FUNCTIONS, CKS_RW_USER_FUNCTIONS
		t.Fatalf("the resumed session's State is %d, want logged in", state)
	}
	if err := agent.sign(pub, "after the restart\n"); err != nil {
		t.Fatalf("the agent cannot sign after pcscd restarted: %v", err)
	}
}

// TestDBusSessionAcrossPcscdRestart: the same for a D-Bus client — its
// Session object stays, its Token and Generation follow the card, and Sign
// works without a new Login. With resume-login = false the session stays
// but is logged out: Sign answers NotLoggedIn until the client logs in
// again.
func TestDBusSessionAcrossPcscdRestart(t *testing.T) {
	for _, keep := range []bool{true, false} {
		t.Run(map[bool]string{true: "PIN kept", false: "resume-login off"}[keep], func(t *testing.T) {
			conf := filepath.Join(t.TempDir(), "slotwatch.conf")
			if err := os.WriteFile(conf, []byte(map[bool]string{true: "", false: "resume-login = false\n"}[keep]), 0o600); err != nil {
				t.Fatal(err)
			}
			prof := vcard.Profile{Label: "Resumed Card", Serial: "5e5e0001"}
			c := startCardDaemon(t, prof, "--config", conf)
			pcscd, card, conn, tok, gen := c.pcscd, c.card, c.conn, c.tok, c.gen
			sess := openSession(t, conn, tok)
			obj := conn.Object(busName, sess)
			if err := obj.Call(sesIface+".Login", 0, uint32(1), []byte(vcard.ProfilePIN(prof))).Err; err != nil {
				t.Fatalf("Login: %v", err)
			}
			digest := sha256.Sum256([]byte("across a pcscd restart"))
			sign := func() ([]byte, error) {
				var sig []byte
				err := obj.Call(sesIface+".Sign", 0, vcard.KeyID(), uint32(ckmECDSA), digest[:]).Store(&sig)
				return sig, err
			}
			if _, err := sign(); err != nil {
				t.Fatalf("Sign: %v", err)
			}

			restartPCSCDKeepingCard(t, pcscd, card, conn, tok)
			newTok, newGen := cardToken(t, conn, prof.Label, tok)
			if newGen <= gen {
				t.Fatalf("generation %d after the restart, want > %d", newGen, gen)
			}
			if got := sessionsOn(t, conn, newTok, 1); got[0] != sess {
				t.Fatalf("session on the new token is %s, want %s", got[0], sess)
			}
			var g uint64
			if err := obj.Call("org.freedesktop.DBus.Properties.Get", 0, sesIface, "Generation").Store(&g); err != nil || g != newGen {
				t.Fatalf("the session's Generation: %d, %v; want %d", g, err, newGen)
			}
			sig, err := sign()
			if !keep {
				if errName(err) != errPfx+"NotLoggedIn" {
					t.Fatalf("Sign on a session resumed without a kept PIN: %v, want NotLoggedIn", err)
				}
				if err := obj.Call(sesIface+".Login", 0, uint32(1), []byte(vcard.ProfilePIN(prof))).Err; err != nil {
					t.Fatalf("Login again: %v", err)
				}
				sig, err = sign()
			}
			if err != nil {
				t.Fatalf("Sign after the restart: %v", err)
			}
			if !verifiesWith(vcard.PublicKey(prof), digest[:], sig) {
				t.Fatal("the signature after the restart does not verify with the card's key")
			}
		})
	}
}

// TestPKCS11SessionAcrossPcscdRestart: a PKCS#11 client's session handle
// keeps working across a pcscd restart that kept the card: still logged
// in, its private key found again and signing with it.
func TestPKCS11SessionAcrossPcscdRestart(t *testing.T) {
	prof := vcard.Profile{Label: "Handle Card", Serial: "4a4d0001"}
	c := startCardDaemon(t, prof)
	pcscd, card, conn, sock, tok := c.pcscd, c.card, c.conn, c.sock, c.tok
	client := startP11Client(t, sock)
	var h string
	waitFor(t, "a session on the card", func() bool {
		ans := client.do(t, "open "+prof.Label)
		h = strings.TrimPrefix(ans, "session ")
		return ans != h
	})
	if ans := client.do(t, "login "+h+" "+vcard.ProfilePIN(prof)); ans != "logged in" {
		t.Fatalf("login: %q", ans)
	}
	keysBefore := client.do(t, "keys "+h)
	t.Logf("before: %s", keysBefore)

	restartPCSCDKeepingCard(t, pcscd, card, conn, tok)
	newTok, _ := cardToken(t, conn, prof.Label, tok)
	sessionsOn(t, conn, newTok, 1)
	if ans := client.do(t, "state "+h); ans != "state 1" { // CKS_RO_USER_FUNCTIONS
		t.Fatalf("the session after the restart: %q, want state 1 (logged in)", ans)
	}
	keysAfter := client.do(t, "keys "+h)
	t.Logf("after: %s", keysAfter)
	key := strings.Trim(strings.TrimPrefix(keysAfter, "keys "), "[]")
	if key == "" || strings.Contains(key, " ") {
		t.Fatalf("private keys found after the restart: %q, want the card's one", keysAfter)
	}
	ans := client.do(t, "signh "+h+" "+key)
	sig, err := hex.DecodeString(strings.TrimPrefix(ans, "sig "))
	if err != nil || !verifiesWith(vcard.PublicKey(prof), loopDigest[:], sig) {
		t.Fatalf("signing after the restart: %q", ans)
	}
}
