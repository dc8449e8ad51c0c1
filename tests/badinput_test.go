package tests

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	godbus "github.com/godbus/dbus/v5"
)

const (
	errInvalidArgs   = "org.freedesktop.DBus.Error.InvalidArgs"
	errAccessDenied  = "org.freedesktop.DBus.Error.AccessDenied"
	errUnknownMethod = "org.freedesktop.DBus.Error.UnknownMethod"
	errUnknownIface  = "org.freedesktop.DBus.Error.UnknownInterface"
	errUnknownObject = "org.freedesktop.DBus.Error.UnknownObject"
	propsIface       = "org.freedesktop.DBus.Properties"
	modIface         = busName + ".Module"
	slotIface        = busName + ".Slot"

	ckmRSAPKCS       = uint32(0x1)
	ckmSHA256RSAPSS  = uint32(0x43)
	doomedLabel      = "Doomed"
	doomedAgainLabel = "Doomed Again"
	doomedLastLabel  = "Doomed Thrice"
)

// caller says which connection sends a row's call.
type caller int

const (
	owner caller = iota // the connection that owns the sessions
	other               // a second connection: no session of its own
	fresh               // a new connection for this row only
)

// badCall is one row of TestBadInput: a call and the one answer the
// contract allows for it. want "" means the call must succeed; more than
// one name only where the contract leaves the choice to the module.
type badCall struct {
	name   string
	from   caller
	path   godbus.ObjectPath
	method string // interface.member
	args   []any
	want   []string
}

func want(names ...string) []string { return names }

var success = want("")

// Hostile input, recognizable in the daemon's log: none of it may appear
// there in any encoding.
var (
	wrongPIN     = []byte("wr0ngPIN-7c1e")
	nulPIN       = []byte("nul\x00PIN\xff\x01-5d")
	doomedSO     = []byte("doomed-SO-9b2f")
	maxWrongPIN  = bytes.Repeat([]byte("MaxLenPIN-3a6e!"), 18)[:256] // at the limit
	overPIN      = bytes.Repeat([]byte("OverPIN-e41d"), 22)[:257]    // one past it
	hugePIN      = bytes.Repeat([]byte("HugePIN-0f9c5"), 800)[:10000]
	secretInputs = [][]byte{wrongPIN, nulPIN, doomedSO, maxWrongPIN, overPIN, hugePIN}
)

// secretForms returns how a secret could show up in a log: raw, quoted,
// hex, base64 and Go's %v of a byte slice (of a prefix for long ones).
func secretForms(b []byte) []string {
	p := b
	if len(p) > 16 {
		p = p[:16]
	}
	b64 := base64.StdEncoding.EncodeToString(p)
	dec := fmt.Sprint(p) // [119 114 ...]
	forms := []string{hex.EncodeToString(p), b64[:len(b64)-4], dec[1 : len(dec)-1]}
	if len(b) >= 6 && !bytes.ContainsAny(b[:6], "\x00\xff") {
		forms = append(forms, string(b[:len(p)]), strings.Trim(fmt.Sprintf("%q", string(p)), `"`))
	}
	return forms
}

// nested wraps v in depth variants.
func nested(v any, depth int) godbus.Variant {
	x := godbus.MakeVariant(v)
	for i := 1; i < depth; i++ {
		x = godbus.MakeVariant(x)
	}
	return x
}

type tmpl = map[string]godbus.Variant

func vr(v any) godbus.Variant { return godbus.MakeVariant(v) }

// TestBadInput sends malformed and hostile calls to every method of every
// interface of a daemon serving SoftHSM, each row asserting the exact error
// the contract (DESIGN.md, xml/) requires; afterwards the daemon must still
// serve, and its log must hold no panic, no race report and none of the
// PINs sent.
func TestBadInput(t *testing.T) {
	bus, d := hsmDaemon(t)
	conn, conn2 := dial(t, bus), dial(t, bus)
	tok := findToken(t, conn, hsmLabel)
	sess := openSession(t, conn, tok)

	// Every other kind of object.
	var module, slot, freeTok godbus.ObjectPath
	for p, ifaces := range managedObjects(t, conn) {
		switch {
		case ifaces[modIface] != nil:
			module = p
		case ifaces[slotIface] != nil && ifaces[slotIface]["Token"].Value() == tok:
			slot = p
		case ifaces[tokIface] != nil && ifaces[tokIface]["Label"].Value() == "":
			freeTok = p // SoftHSM's uninitialized token in its free slot
		}
	}
	if module == "" || slot == "" || freeTok == "" {
		t.Fatalf("want a module, the token's slot and SoftHSM's free token: %q %q %q\n%v", module, slot, freeTok, managedObjects(t, conn))
	}

	// Dead generations, made by re-initializing the free token:
	// deadTok1 died with no session; deadTok2 with a session of ours that
	// InitToken's force closed first (deadSessForced); deadTok3 by an
	// initialization from outside slotwatch while our session was open
	// (deadSessDropped, which went with its token).
	deadTok1 := freeTok
	if err := conn.Object(busName, freeTok).Call(tokIface+".InitToken", 0, doomedSO, doomedLabel, false).Err; err != nil {
		t.Fatalf("InitToken of SoftHSM's free token: %v", err)
	}
	deadTok2 := findToken(t, conn, doomedLabel)
	waitGone(t, conn, deadTok1)
	deadSessForced := openSession(t, conn, deadTok2)
	if err := conn.Object(busName, deadTok2).Call(tokIface+".InitToken", 0, doomedSO, doomedAgainLabel, true).Err; err != nil {
		t.Fatalf("InitToken with force: %v", err)
	}
	deadTok3 := findToken(t, conn, doomedAgainLabel)
	waitGone(t, conn, deadTok2)
	deadSessDropped := openSession(t, conn, deadTok3)
	reinitOutside(t, d, doomedAgainLabel, doomedLastLabel)
	findToken(t, conn, doomedLastLabel)
	waitGone(t, conn, deadTok3)
	waitGone(t, conn, deadSessDropped)

	// A session closed normally.
	closedSess := openSession(t, conn, tok)
	if err := conn.Object(busName, closedSess).Call(sesIface+".Close", 0).Err; err != nil {
		t.Fatalf("Close: %v", err)
	}

	digest := sha256.Sum256([]byte("slotwatch bad input"))
	data := digest[:]
	keyID := []byte{1}
	mib := bytes.Repeat([]byte{0xA5}, 1<<20)
	label33 := strings.Repeat("L", 33)
	euro33 := strings.Repeat("€", 11) // 11 characters, 33 bytes
	manyKeys := tmpl{}
	for i := range 10000 {
		manyKeys[fmt.Sprintf("k%d", i)] = vr(uint32(i))
	}
	otherName := conn2.Names()[0]

	const (
		mgrReload = mgrIface + ".Reload"
		getMO     = "org.freedesktop.DBus.ObjectManager.GetManagedObjects"
		introsp   = "org.freedesktop.DBus.Introspectable.Introspect"
		ping      = "org.freedesktop.DBus.Peer.Ping"
		pGet      = propsIface + ".Get"
		pGetAll   = propsIface + ".GetAll"
		pSet      = propsIface + ".Set"
		tOpen     = tokIface + ".OpenSession"
		tCloseAll = tokIface + ".CloseAllSessions"
		tInit     = tokIface + ".InitToken"
		tList     = tokIface + ".ListCertificates"
		sLogin    = sesIface + ".Login"
		sLogout   = sesIface + ".Logout"
		sClose    = sesIface + ".Close"
		sFind     = sesIface + ".FindObjects"
		sSign     = sesIface + ".Sign"
	)
	IA, AD, TR := want(errInvalidArgs), want(errAccessDenied), want(errPfx+"TokenRemoved")
	UO, UM, UI := want(errUnknownObject), want(errUnknownMethod), want(errUnknownIface)
	r := rootPath

	notLoggedIn := []badCall{
		// Manager, ObjectManager, Introspectable, Peer at the root.
		{"Reload with an argument", owner, r, mgrReload, []any{"x"}, IA},
		{"Reload with a variant argument", owner, r, mgrReload, []any{vr(uint32(1))}, IA},
		{"unknown Manager method", owner, r, mgrIface + ".Frobnicate", nil, UM},
		{"Token method on the Manager interface", owner, r, mgrIface + ".OpenSession", []any{false}, UM},
		{"unknown interface at the root", owner, r, busName + ".Nope.Reload", nil, UI},
		{"Token interface at the root", owner, r, tOpen, []any{false}, UI},
		{"GetManagedObjects with an argument", owner, r, getMO, []any{uint32(1)}, IA},
		{"Introspect with an argument", owner, r, introsp, []any{"x"}, IA},
		{"Ping", owner, r, ping, nil, success},
		{"unknown Peer method", owner, r, "org.freedesktop.DBus.Peer.Pong", nil, UM},

		// Properties at the root.
		{"Get with one argument", owner, r, pGet, []any{mgrIface}, IA},
		{"Get with three arguments", owner, r, pGet, []any{mgrIface, "Version", "x"}, IA},
		{"Get with numbers for names", owner, r, pGet, []any{uint32(0x4d), uint32(0x56)}, IA},
		{"Get with byte arrays for names", owner, r, pGet, []any{[]byte(mgrIface), []byte("Version")}, IA},
		{"Get of an unknown property", owner, r, pGet, []any{mgrIface, "Nope"}, IA},
		{"Get of an unknown interface", owner, r, pGet, []any{"org.example.Nope", "Version"}, IA},
		{"Get of a property of another interface", owner, r, pGet, []any{tokIface, "Label"}, IA},
		{"GetAll without arguments", owner, r, pGetAll, nil, IA},
		{"GetAll of an unknown interface", owner, r, pGetAll, []any{"org.example.Nope"}, IA},
		{"Set of read-only Version", owner, r, pSet, []any{mgrIface, "Version", vr("9.9.9")}, IA},
		{"Set of read-only State", owner, r, pSet, []any{mgrIface, "State", vr(uint32(2))}, IA},
		{"Set of read-only LastGeneration, wrong type", owner, r, pSet, []any{mgrIface, "LastGeneration", vr("x")}, IA},
		{"Set of an unknown property", owner, r, pSet, []any{mgrIface, "Nope", vr(uint32(1))}, IA},
		{"Set without a value", owner, r, pSet, []any{mgrIface, "Version"}, IA},

		// Module and slot objects: properties only, all read-only.
		{"Set of read-only Module.Library", owner, module, pSet, []any{modIface, "Library", vr("/tmp/evil.so")}, IA},
		{"Set of read-only Slot.Token", owner, slot, pSet, []any{slotIface, "Token", vr(deadTok1)}, IA},
		{"Get of an unknown Slot property", owner, slot, pGet, []any{slotIface, "Nope"}, IA},
		{"Token method on a module", owner, module, tOpen, []any{false}, UI},
		{"Manager method on a slot", owner, slot, mgrReload, nil, UI},

		// Paths that do not exist.
		{"path that does not exist", owner, r + "/nope", mgrReload, nil, UO},
		{"the bus root path", owner, "/", mgrReload, nil, UO},
		{"modules collection", owner, r + "/modules", pGetAll, []any{modIface}, UO},
		{"module that does not exist", owner, r + "/modules/nope", pGet, []any{modIface, "Library"}, UO},
		{"slot that does not exist", owner, r + "/slots/nope_1", pGet, []any{slotIface, "Token"}, UO},
		{"tokens collection: OpenSession", owner, r + "/tokens", tOpen, []any{false}, UO},
		{"tokens collection: Get", owner, r + "/tokens", pGet, []any{tokIface, "Label"}, UO},
		{"sessions collection: Close", owner, r + "/sessions", sClose, nil, UO},
		{"sessions collection: GetAll", owner, r + "/sessions", pGetAll, []any{sesIface}, UO},
		{"token generation never issued: OpenSession", owner, r + "/tokens/999999", tOpen, []any{false}, UO},
		{"token generation never issued: InitToken", owner, r + "/tokens/999999", tInit, []any{wrongPIN, "x", true}, UO},
		{"token generation never issued: Get", owner, r + "/tokens/999999", pGet, []any{tokIface, "Label"}, UO},
		{"token generation 0", owner, r + "/tokens/0", tOpen, []any{false}, UO},
		{"token generation 2^64-1", owner, r + "/tokens/18446744073709551615", tOpen, []any{false}, UO},
		{"token generation not a number", owner, r + "/tokens/abc", tList, nil, UO},
		{"path below a live token", owner, tok + "/x", tOpen, []any{false}, UO},
		{"session never issued: Login", owner, r + "/sessions/999999", sLogin, []any{uint32(1), wrongPIN}, UO},
		{"session 0: Close", owner, r + "/sessions/0", sClose, nil, UO},
		{"session closed normally: Close", owner, closedSess, sClose, nil, UO},
		{"session closed normally: Sign", owner, closedSess, sSign, []any{keyID, ckmECDSA, data}, UO},

		// Dead generations: TokenRemoved on every method.
		{"dead token: OpenSession", owner, deadTok1, tOpen, []any{false}, TR},
		{"dead token: CloseAllSessions", owner, deadTok1, tCloseAll, nil, TR},
		{"dead token: InitToken", owner, deadTok1, tInit, []any{doomedSO, "Revived", true}, TR},
		{"dead token: ListCertificates", owner, deadTok1, tList, nil, TR},
		{"dead token: Get", owner, deadTok1, pGet, []any{tokIface, "Label"}, TR},
		{"dead token: GetAll", owner, deadTok1, pGetAll, []any{tokIface}, TR},
		{"dead token: Set", owner, deadTok1, pSet, []any{tokIface, "Label", vr("x")}, TR},
		{"dead token: OpenSession from another connection", other, deadTok1, tOpen, []any{true}, TR},
		{"dead token: OpenSession without its argument", owner, deadTok1, tOpen, nil, IA},
		{"dead token (force-closed session): OpenSession", owner, deadTok2, tOpen, []any{false}, TR},
		{"dead token (re-initialized outside): ListCertificates", owner, deadTok3, tList, nil, TR},
		{"dead token (re-initialized outside): CloseAllSessions", owner, deadTok3, tCloseAll, nil, TR},
		{"session of a dead token: Login", owner, deadSessDropped, sLogin, []any{uint32(1), wrongPIN}, TR},
		{"session of a dead token: Logout", owner, deadSessDropped, sLogout, nil, TR},
		{"session of a dead token: Close", owner, deadSessDropped, sClose, nil, TR},
		{"session of a dead token: FindObjects", owner, deadSessDropped, sFind, []any{tmpl{}}, TR},
		{"session of a dead token: Sign", owner, deadSessDropped, sSign, []any{keyID, ckmECDSA, data}, TR},
		{"session of a dead token: Get", owner, deadSessDropped, pGet, []any{sesIface, "Owner"}, TR},
		{"session of a dead token, from another connection: Close", other, deadSessDropped, sClose, nil, TR},
		{"force-closed session of a dead token: Login", owner, deadSessForced, sLogin, []any{uint32(1), wrongPIN}, TR},
		{"force-closed session of a dead token: Logout", owner, deadSessForced, sLogout, nil, TR},
		{"force-closed session of a dead token: Close", owner, deadSessForced, sClose, nil, TR},
		{"force-closed session of a dead token: FindObjects", owner, deadSessForced, sFind, []any{tmpl{}}, TR},
		{"force-closed session of a dead token: Sign", owner, deadSessForced, sSign, []any{keyID, ckmECDSA, data}, TR},

		// Token: wrong argument types and counts.
		{"OpenSession without arguments", owner, tok, tOpen, nil, IA},
		{"OpenSession with a string", owner, tok, tOpen, []any{"true"}, IA},
		{"OpenSession with a number", owner, tok, tOpen, []any{uint32(1)}, IA},
		{"OpenSession with two booleans", owner, tok, tOpen, []any{false, false}, IA},
		{"OpenSession with a variant", owner, tok, tOpen, []any{vr(false)}, IA},
		{"OpenSession with nested variants", owner, tok, tOpen, []any{nested(false, 3)}, IA},
		{"CloseAllSessions with an argument", owner, tok, tCloseAll, []any{true}, IA},
		{"ListCertificates with an argument", owner, tok, tList, []any{"x"}, IA},
		{"InitToken without arguments", owner, tok, tInit, nil, IA},
		{"InitToken with two arguments", owner, tok, tInit, []any{wrongPIN, "Label"}, IA},
		{"InitToken with four arguments", owner, tok, tInit, []any{wrongPIN, "Label", false, false}, IA},
		{"InitToken with so_pin as a string", owner, tok, tInit, []any{string(wrongPIN), "Label", false}, IA},
		{"InitToken with label as ay", owner, tok, tInit, []any{wrongPIN, []byte("Label"), false}, IA},
		{"InitToken with force as a string", owner, tok, tInit, []any{wrongPIN, "Label", "false"}, IA},
		{"InitToken with force as a number", owner, tok, tInit, []any{wrongPIN, "Label", uint32(0)}, IA},
		{"InitToken with variants", owner, tok, tInit, []any{vr(wrongPIN), vr("Label"), vr(false)}, IA},
		{"InitToken with arguments in the wrong order", owner, tok, tInit, []any{"Label", wrongPIN, false}, IA},
		// Token: bad values.
		{"InitToken with an empty so_pin (no PIN pad)", owner, tok, tInit, []any{[]byte{}, "Label", false}, IA},
		{"InitToken with a 10000-byte so_pin", owner, tok, tInit, []any{hugePIN, "Label", false}, IA},
		{"InitToken with a 257-byte so_pin", owner, tok, tInit, []any{overPIN, "Label", false}, IA},
		{"InitToken with an empty label", owner, tok, tInit, []any{wrongPIN, "", false}, IA},
		{"InitToken with a 33-byte label", owner, tok, tInit, []any{wrongPIN, label33, false}, IA},
		{"InitToken with a 33-byte UTF-8 label of 11 characters", owner, tok, tInit, []any{wrongPIN, euro33, false}, IA},
		{"InitToken with a 1 MiB label", owner, tok, tInit, []any{wrongPIN, strings.Repeat("x", 1<<20), false}, IA},
		{"InitToken with a wrong so_pin while a session is open", owner, tok, tInit, []any{wrongPIN, "Label", false}, want(errPfx + "SessionsExist")},
		{"unknown Token method", owner, tok, tokIface + ".Destroy", nil, UM},
		{"Session method on a token", owner, tok, sClose, nil, UI},
		{"Set of read-only Token.Label", owner, tok, pSet, []any{tokIface, "Label", vr("Hijacked")}, IA},
		{"Set of read-only Token.Flags", owner, tok, pSet, []any{tokIface, "Flags", vr(uint32(0))}, IA},
		{"Set of read-only Token.UsedForLogin", owner, tok, pSet, []any{tokIface, "UsedForLogin", vr(true)}, IA},
		{"Get of an unknown Token property", owner, tok, pGet, []any{tokIface, "Pin"}, IA},
		{"Get of a Session property on a token", owner, tok, pGet, []any{sesIface, "Owner"}, IA},
		{"CloseAllSessions from a connection without sessions", other, tok, tCloseAll, nil, success},
		{"ListCertificates from another connection", other, tok, tList, nil, success},

		// Session: wrong argument types and counts.
		{"Login without arguments", owner, sess, sLogin, nil, IA},
		{"Login without a PIN", owner, sess, sLogin, []any{uint32(1)}, IA},
		{"Login with arguments swapped", owner, sess, sLogin, []any{wrongPIN, uint32(1)}, IA},
		{"Login with user type as a string", owner, sess, sLogin, []any{"1", wrongPIN}, IA},
		{"Login with user type as int32", owner, sess, sLogin, []any{int32(1), wrongPIN}, IA},
		{"Login with user type as uint64 2^32+1", owner, sess, sLogin, []any{uint64(1<<32 | 1), wrongPIN}, IA},
		{"Login with user type as a double", owner, sess, sLogin, []any{float64(1), wrongPIN}, IA},
		{"Login with user type as a boolean", owner, sess, sLogin, []any{true, wrongPIN}, IA},
		{"Login with the PIN as a string", owner, sess, sLogin, []any{uint32(1), string(wrongPIN)}, IA},
		{"Login with the PIN as an array of u", owner, sess, sLogin, []any{uint32(1), []uint32{1, 2, 3, 4}}, IA},
		{"Login with variants", owner, sess, sLogin, []any{vr(uint32(1)), vr(wrongPIN)}, IA},
		{"Login with three arguments", owner, sess, sLogin, []any{uint32(1), wrongPIN, wrongPIN}, IA},
		// Session: bad values.
		{"Login as user type 3", owner, sess, sLogin, []any{uint32(3), wrongPIN}, IA},
		{"Login as user type 0xFFFFFFFF", owner, sess, sLogin, []any{uint32(0xFFFFFFFF), wrongPIN}, IA},
		{"Login context-specific", owner, sess, sLogin, []any{uint32(2), wrongPIN}, want(errPfx + "NotSupported")},
		{"Login with an empty PIN (no PIN pad)", owner, sess, sLogin, []any{uint32(1), []byte{}}, IA},
		{"Login with a 10000-byte PIN", owner, sess, sLogin, []any{uint32(1), hugePIN}, IA},
		{"Login as SO with a 10000-byte PIN", owner, sess, sLogin, []any{uint32(0), hugePIN}, IA},
		{"Login with a 257-byte PIN", owner, sess, sLogin, []any{uint32(1), overPIN}, IA},
		{"Login with a wrong 256-byte PIN", owner, sess, sLogin, []any{uint32(1), maxWrongPIN}, want(errPfx+"PinIncorrect", errPfx+"PinInvalid")},
		{"Login with a wrong PIN", owner, sess, sLogin, []any{uint32(1), wrongPIN}, want(errPfx + "PinIncorrect")},
		{"Login with a wrong PIN holding NUL and 0xFF", owner, sess, sLogin, []any{uint32(1), nulPIN}, want(errPfx + "PinIncorrect")},
		{"Login as SO on a read-only session", owner, sess, sLogin, []any{uint32(0), wrongPIN}, want(errPfx + "SessionsExist")},
		{"Logout with an argument", owner, sess, sLogout, []any{"x"}, IA},
		{"Logout when not logged in", owner, sess, sLogout, nil, want(errPfx + "NotLoggedIn")},
		{"Close with an argument", owner, sess, sClose, []any{uint32(1)}, IA},
		{"FindObjects without arguments", owner, sess, sFind, nil, IA},
		{"FindObjects with a string", owner, sess, sFind, []any{"class"}, IA},
		{"FindObjects with an array of strings", owner, sess, sFind, []any{[]string{"class"}}, IA},
		{"FindObjects with a{ss}", owner, sess, sFind, []any{map[string]string{"label": "signing key"}}, IA},
		{"FindObjects with a{su}", owner, sess, sFind, []any{map[string]uint32{"class": ckoPriv}}, IA},
		{"FindObjects with a{uv}", owner, sess, sFind, []any{map[uint32]godbus.Variant{0: vr(ckoPriv)}}, IA},
		{"FindObjects with two templates", owner, sess, sFind, []any{tmpl{}, tmpl{}}, IA},
		{"FindObjects with an unknown key", owner, sess, sFind, []any{tmpl{"foo": vr(uint32(1))}}, IA},
		{"FindObjects with an empty key", owner, sess, sFind, []any{tmpl{"": vr(uint32(1))}}, IA},
		{"FindObjects with the result-only key value", owner, sess, sFind, []any{tmpl{"value": vr([]byte{1})}}, IA},
		{"FindObjects with key CLASS", owner, sess, sFind, []any{tmpl{"CLASS": vr(ckoPriv)}}, IA},
		{"FindObjects with 10000 unknown keys", owner, sess, sFind, []any{manyKeys}, IA},
		{"FindObjects with class as a string", owner, sess, sFind, []any{tmpl{"class": vr("3")}}, IA},
		{"FindObjects with class as t", owner, sess, sFind, []any{tmpl{"class": vr(uint64(3))}}, IA},
		{"FindObjects with class as i", owner, sess, sFind, []any{tmpl{"class": vr(int32(3))}}, IA},
		{"FindObjects with class in a nested variant", owner, sess, sFind, []any{tmpl{"class": nested(ckoPriv, 2)}}, IA},
		{"FindObjects with class 20 variants deep", owner, sess, sFind, []any{tmpl{"class": nested(ckoPriv, 20)}}, IA},
		{"FindObjects with id as a string", owner, sess, sFind, []any{tmpl{"id": vr("01")}}, IA},
		{"FindObjects with id as au", owner, sess, sFind, []any{tmpl{"id": vr([]uint32{1})}}, IA},
		{"FindObjects with id in a nested variant", owner, sess, sFind, []any{tmpl{"id": nested([]byte{1}, 2)}}, IA},
		{"FindObjects with a 1 MiB id", owner, sess, sFind, []any{tmpl{"id": vr(mib)}}, IA},
		{"FindObjects with label as ay", owner, sess, sFind, []any{tmpl{"label": vr([]byte("signing key"))}}, IA},
		{"FindObjects with a 1 MiB label", owner, sess, sFind, []any{tmpl{"label": vr(strings.Repeat("x", 1<<20))}}, IA},
		{"FindObjects with key_type as a string", owner, sess, sFind, []any{tmpl{"key_type": vr("EC")}}, IA},
		{"FindObjects with key_type as b", owner, sess, sFind, []any{tmpl{"key_type": vr(true)}}, IA},
		{"FindObjects with a struct value", owner, sess, sFind, []any{tmpl{"class": vr(struct{ A, B uint32 }{3, 3})}}, IA},
		{"FindObjects with an empty template", owner, sess, sFind, []any{tmpl{}}, success},
		{"FindObjects with class 0xFFFFFFFF", owner, sess, sFind, []any{tmpl{"class": vr(uint32(0xFFFFFFFF))}}, success},
		{"FindObjects with an id no object has", owner, sess, sFind, []any{tmpl{"id": vr([]byte{0xde, 0xad})}}, success},
		{"FindObjects with an empty id", owner, sess, sFind, []any{tmpl{"id": vr([]byte{})}}, success},
		{"FindObjects with a 33-byte label", owner, sess, sFind, []any{tmpl{"label": vr(label33)}}, success},
		{"Sign without arguments", owner, sess, sSign, nil, IA},
		{"Sign with two arguments", owner, sess, sSign, []any{keyID, ckmECDSA}, IA},
		{"Sign with four arguments", owner, sess, sSign, []any{keyID, ckmECDSA, data, data}, IA},
		{"Sign with mechanism as a string", owner, sess, sSign, []any{keyID, "4161", data}, IA},
		{"Sign with arguments in the wrong order", owner, sess, sSign, []any{ckmECDSA, keyID, data}, IA},
		{"Sign with an empty key id", owner, sess, sSign, []any{[]byte{}, ckmECDSA, data}, IA},
		{"Sign with a 257-byte key id", owner, sess, sSign, []any{bytes.Repeat([]byte{1}, 257), ckmECDSA, data}, IA},
		{"Sign with a 1 MiB key id", owner, sess, sSign, []any{mib, ckmECDSA, data}, IA},
		{"Sign with empty data", owner, sess, sSign, []any{keyID, ckmECDSA, []byte{}}, IA},
		{"Sign with 65537 bytes of data", owner, sess, sSign, []any{keyID, ckmECDSA, mib[:65537]}, IA},
		{"Sign with 1 MiB of data", owner, sess, sSign, []any{keyID, ckmECDSA, mib}, IA},
		{"Sign with mechanism 0xFFFFFFFF", owner, sess, sSign, []any{keyID, uint32(0xFFFFFFFF), data}, want(errPfx + "NotSupported")},
		{"Sign with mechanism 0 (a key generation mechanism)", owner, sess, sSign, []any{keyID, uint32(0), data}, want(errPfx + "NotSupported")},
		// The token needs a login (CKF_LOGIN_REQUIRED) and its keys are
		// private: before one, no key is visible, whatever the id.
		{"Sign with a key id no key has, before login", owner, sess, sSign, []any{[]byte{0xde, 0xad}, ckmECDSA, data}, want(errPfx + "NotLoggedIn")},
		{"Sign before login (key not visible)", owner, sess, sSign, []any{keyID, ckmECDSA, data}, want(errPfx + "NotLoggedIn")},
		{"unknown Session method", owner, sess, sesIface + ".Export", nil, UM},
		{"Set of read-only Session.Owner to another connection", owner, sess, pSet, []any{sesIface, "Owner", vr(otherName)}, IA},
		{"Set of read-only Session.ReadWrite", owner, sess, pSet, []any{sesIface, "ReadWrite", vr(true)}, IA},

		// Another connection's session.
		{"another's session: Login", other, sess, sLogin, []any{uint32(1), wrongPIN}, AD},
		{"another's session: Logout", other, sess, sLogout, nil, AD},
		{"another's session: FindObjects", other, sess, sFind, []any{tmpl{}}, AD},
		{"another's session: Sign", other, sess, sSign, []any{keyID, ckmECDSA, data}, AD},
		{"another's session: Close", other, sess, sClose, nil, AD},
		{"another's session: Get Owner (readable by all)", other, sess, pGet, []any{sesIface, "Owner"}, success},
		{"another's session: Set Owner to itself", other, sess, pSet, []any{sesIface, "Owner", vr(otherName)}, IA},
		{"another's session, from a new connection: Close", fresh, sess, sClose, nil, AD},

		// Strings D-Bus forbids (NUL): godbus refuses to marshal them
		// and dbus-daemon drops such a message and its sender, so the
		// daemon never sees one.
		{"InitToken with a label holding NUL", fresh, tok, tInit, []any{wrongPIN, "La\x00bel", false}, want(cannotSend)},
	}
	loggedIn := []badCall{
		{"Login with the right PIN", owner, sess, sLogin, []any{uint32(1), []byte(hsmPIN)}, success},
		{"Login again", owner, sess, sLogin, []any{uint32(1), []byte(hsmPIN)}, want(errPfx + "AlreadyLoggedIn")},
		{"Sign (the key is visible now)", owner, sess, sSign, []any{keyID, ckmECDSA, data}, success},
		{"Sign with a key id no key has", owner, sess, sSign, []any{[]byte{0xde, 0xad}, ckmECDSA, data}, IA},
		{"Sign with key id as a string", owner, sess, sSign, []any{string(keyID), ckmECDSA, data}, IA},
		{"Sign with data as a string", owner, sess, sSign, []any{keyID, ckmECDSA, strings.Repeat("d", 32)}, IA},
		{"Sign with mechanism as t", owner, sess, sSign, []any{keyID, uint64(ckmECDSA), data}, IA},
		{"Sign with mechanism as uint64 2^32+CKM_ECDSA", owner, sess, sSign, []any{keyID, uint64(1<<32) | uint64(ckmECDSA), data}, IA},
		{"Sign with variants", owner, sess, sSign, []any{vr(keyID), vr(ckmECDSA), vr(data)}, IA},
		{"Sign with mechanism 0xFFFFFFFF", owner, sess, sSign, []any{keyID, uint32(0xFFFFFFFF), data}, want(errPfx + "NotSupported")},
		{"Sign with an RSA mechanism and an EC key", owner, sess, sSign, []any{keyID, ckmRSAPKCS, data}, want(errPfx + "NotSupported")},
		{"Sign with RSA-PSS and an EC key", owner, sess, sSign, []any{keyID, ckmSHA256RSAPSS, data}, want(errPfx + "NotSupported")},
		{"Sign with 1 MiB of data", owner, sess, sSign, []any{keyID, ckmECDSA, mib}, IA},
		{"another's session while logged in: Sign", other, sess, sSign, []any{keyID, ckmECDSA, data}, AD},
		{"another's session while logged in: FindObjects", other, sess, sFind, []any{tmpl{"class": vr(ckoPriv)}}, AD},
		{"another's session while logged in: Logout", other, sess, sLogout, nil, AD},
		{"Logout", owner, sess, sLogout, nil, success},
		{"Logout again", owner, sess, sLogout, nil, want(errPfx + "NotLoggedIn")},
	}

	run := func(rows []badCall) {
		for _, c := range rows {
			t.Run(c.name, func(t *testing.T) {
				var cn *godbus.Conn
				switch c.from {
				case owner:
					cn = conn
				case other:
					cn = conn2
				case fresh:
					var err error
					if cn, err = godbus.Connect(bus.Address); err != nil {
						t.Fatal(err)
					}
					defer cn.Close()
				}
				ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				defer cancel()
				call := cn.Object(busName, c.path).CallWithContext(ctx, c.method, 0, c.args...)
				got := errName(call.Err)
				if len(c.want) == 1 && c.want[0] == cannotSend {
					if _, ok := call.Err.(godbus.Error); call.Err == nil || ok {
						t.Errorf("%s on %s %s: got %q %v, want the message to be refused before it reaches the daemon", c.method, c.path, describeArgs(c.args), got, call.Err)
					}
					t.Logf("%s: %v", c.name, call.Err)
					return
				}
				for _, w := range c.want {
					if got == w {
						return
					}
				}
				msg := ""
				if call.Err != nil {
					msg = call.Err.Error()
				} else {
					msg = fmt.Sprintf("reply %s", describeArgs(call.Body))
				}
				t.Errorf("%s on %s, args %s:\n got  %q (%s)\n want %s", c.method, c.path, describeArgs(c.args), got, msg, strings.Join(quoteAll(c.want), " or "))
			})
		}
	}
	run(notLoggedIn)
	run(loggedIn)

	// The daemon survived all of it and still serves.
	select {
	case <-d.exited:
		t.Fatalf("slotwatch serve exited: %v", d.cmd.ProcessState)
	default:
	}
	if err := conn.Object(busName, rootPath).Call("org.freedesktop.DBus.Peer.Ping", 0).Err; err != nil {
		t.Errorf("Ping after the table: %v", err)
	}
	var state uint32
	if err := conn.Object(busName, rootPath).StoreProperty(mgrIface+".State", &state); err != nil || state != 1 {
		t.Errorf("Manager.State after the table: %d, %v; want 1 (running)", state, err)
	}
	var objs []map[string]godbus.Variant
	if err := conn.Object(busName, sess).Call(sesIface+".FindObjects", 0, tmpl{}).Store(&objs); err != nil {
		t.Errorf("the test's session after the table: %v", err)
	}
	if _, ok := managedObjects(t, conn)[tok]; !ok {
		t.Errorf("token %s is gone after the table", tok)
	}

	log := d.stderr.String()
	// "panic: " as Go prints it: the log names callers by their command
	// line, and this test binary's has -test.paniconexit0.
	for _, bad := range []string{"panic: ", "DATA RACE", "fatal error", "goroutine "} {
		if strings.Contains(log, bad) {
			t.Errorf("the daemon's log contains %q", bad)
		}
	}
	for _, s := range secretInputs {
		for _, f := range secretForms(s) {
			if strings.Contains(log, f) {
				t.Errorf("the daemon's log contains PIN bytes %q (form %q)", s[:min(len(s), 16)], f)
			}
		}
	}
	pin := []byte(hsmPIN) // short and digits only: look for it as a value
	for _, f := range []string{`"` + hsmPIN + `"`, "=" + hsmPIN, hex.EncodeToString(pin), base64.StdEncoding.EncodeToString(pin), fmt.Sprint(pin)} {
		if strings.Contains(log, f) {
			t.Errorf("the daemon's log contains the user PIN (%q)", f)
		}
	}
	for _, l := range strings.Split(log, "\n") {
		if strings.Contains(l, "level=ERROR") || strings.Contains(l, "level=WARN") {
			t.Logf("daemon log: %s", l)
		}
	}
}

// cannotSend as a row's want: the message is not valid D-Bus; the client
// library or the bus refuses it before it reaches the daemon.
const cannotSend = "(not valid D-Bus: cannot be sent)"

func quoteAll(s []string) []string {
	out := make([]string, len(s))
	for i, x := range s {
		if x == "" {
			x = "success"
		}
		out[i] = fmt.Sprintf("%q", x)
	}
	return out
}

// describeArgs prints call arguments short: long byte strings and strings
// by length.
func describeArgs(args []any) string {
	var parts []string
	for _, a := range args {
		parts = append(parts, describeArg(a))
	}
	return "(" + strings.Join(parts, ", ") + ")"
}

func describeArg(a any) string {
	switch x := a.(type) {
	case []byte:
		if len(x) > 16 {
			return fmt.Sprintf("ay[%d bytes]", len(x))
		}
		return fmt.Sprintf("ay%q", x)
	case string:
		if len(x) > 40 {
			return fmt.Sprintf("s[%d bytes]", len(x))
		}
		return fmt.Sprintf("s%q", x)
	case godbus.Variant:
		return "v<" + describeArg(x.Value()) + ">"
	case map[string]godbus.Variant:
		if len(x) > 4 {
			return fmt.Sprintf("a{sv}[%d keys]", len(x))
		}
		var kv []string
		for k, v := range x {
			kv = append(kv, fmt.Sprintf("%q: %s", k, describeArg(v)))
		}
		return "a{sv}{" + strings.Join(kv, ", ") + "}"
	}
	return fmt.Sprintf("%s %v", godbus.SignatureOf(a), a)
}

// waitGone waits up to 10 s for p to leave GetManagedObjects.
func waitGone(t *testing.T, conn *godbus.Conn, p godbus.ObjectPath) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, ok := managedObjects(t, conn)[p]; !ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s still on the bus after 10 s", p)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// reinitOutside initializes the token labelled from with softhsm2-util,
// behind slotwatch's back, in the daemon's SoftHSM store; the daemon sees
// a new label, i.e. the old generation is removed.
func reinitOutside(t *testing.T, d *daemon, from, to string) {
	t.Helper()
	var conf string
	for _, e := range d.cmd.Env {
		if v, ok := strings.CutPrefix(e, "SOFTHSM2_CONF="); ok {
			conf = v
		}
	}
	if conf == "" {
		t.Fatal("the daemon has no SOFTHSM2_CONF")
	}
	cmd := exec.Command("softhsm2-util", "--init-token", "--token", from, "--label", to, "--so-pin", string(doomedSO), "--pin", "doomed-user-8c")
	cmd.Env = append(os.Environ(), "SOFTHSM2_CONF="+conf)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("softhsm2-util --init-token --token %q: %v\n%s", from, err, out)
	}
}
