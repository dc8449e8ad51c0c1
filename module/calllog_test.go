package module

import (
	"bytes"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"

	"github.com/miekg/pkcs11"
)

// logBuffer is a call log that writes into memory.
type logBuffer struct {
	mu     sync.Mutex
	buf    bytes.Buffer
	logger *slog.Logger
}

func newLogBuffer() *logBuffer { return newLogBufferWith(false) }

func newLogBufferWith(json bool) *logBuffer {
	l := &logBuffer{}
	opts := &slog.HandlerOptions{Level: slog.LevelDebug}
	if json {
		l.logger = slog.New(slog.NewJSONHandler(l, opts))
	} else {
		l.logger = slog.New(slog.NewTextHandler(l, opts))
	}
	return l
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

func (l *logBuffer) reset() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.buf.Reset()
}

func (l *logBuffer) lines() []string {
	var out []string
	for _, line := range strings.Split(l.String(), "\n") {
		if line != "" {
			out = append(out, line)
		}
	}
	return out
}

// find returns the log lines that contain every one of subs.
func (l *logBuffer) find(subs ...string) []string {
	var out []string
	for _, line := range l.lines() {
		if contains(line, subs...) {
			out = append(out, line)
		}
	}
	return out
}

func contains(s string, subs ...string) bool {
	for _, sub := range subs {
		if !strings.Contains(s, sub) {
			return false
		}
	}
	return true
}

// renderings are the ways a secret could show up in a log: as text, as the
// hex or base64 of its bytes (slog's JSON handler renders []byte as base64),
// or as fmt's rendering of a byte slice ("[57 49 56 ...").
func renderings(secret string) []string {
	b := []byte(secret)
	dec := fmt.Sprint(b)
	return []string{
		secret,
		hex.EncodeToString(b),
		strings.ToUpper(hex.EncodeToString(b)),
		base64.StdEncoding.EncodeToString(b),
		dec,
		dec[:len(dec)-1], // "[57 49 56 50 55 51"
		strings.Join(strings.Fields(dec[1:9]), " "), // "57 49 56"
		fmt.Sprintf("% x", b),
		fmt.Sprintf("%#v", b)[len("[]byte{"):][:20], // "0x39, 0x31, 0x38, 0x"
	}
}

// PINs and secret attribute values never reach the call log, in any
// rendering; the calls themselves, their results and durations do.
func TestCallLogRedactsSecrets(t *testing.T) {
	const (
		wrongPIN   = "375910"
		wrongSOPIN = "809162"
		secretVal  = "topsecretkeymaterial"
	)
	for _, json := range []bool{false, true} {
		t.Run(map[bool]string{false: "text", true: "json"}[json], func(t *testing.T) {
			log := newLogBufferWith(json)
			m := openSoftHSM(t, Options{Name: "softhsm", CallLog: log.logger})
			slot := slotOf(t, m, alphaLabel)
			s, err := m.OpenSession(":1.42", slot, 1, false)
			if err != nil {
				t.Fatal(err)
			}
			if err := m.Login(s.ID, pkcs11.CKU_USER, []byte(wrongPIN)); err == nil {
				t.Fatal("wrong PIN accepted")
			}
			if err := m.Login(s.ID, pkcs11.CKU_USER, []byte(alphaUserPIN)); err != nil {
				t.Fatal(err)
			}
			// A template carrying a secret value (as a caller might search
			// for a secret key by value) and a public one.
			if _, err := m.FindObjects(s.ID, []*pkcs11.Attribute{
				pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
				pkcs11.NewAttribute(pkcs11.CKA_LABEL, "findme"),
				pkcs11.NewAttribute(pkcs11.CKA_VALUE, []byte(secretVal)),
			}, 0); err != nil {
				t.Fatal(err)
			}
			if err := m.Logout(s.ID); err != nil {
				t.Fatal(err)
			}
			if err := m.CloseSession(s.ID); err != nil {
				t.Fatal(err)
			}
			initSlot := slotOf(t, m, initLabel)
			if err := m.InitToken(initSlot, []byte(wrongSOPIN), initLabel); !errorsIsPinIncorrect(err) {
				t.Fatalf("InitToken(wrong SO PIN) = %v", err)
			}
			if err := m.InitToken(initSlot, []byte(initSOPIN), initLabel); err != nil {
				t.Fatal(err)
			}

			out := log.String()
			for _, secret := range []string{alphaUserPIN, wrongPIN, initSOPIN, wrongSOPIN, secretVal} {
				for _, r := range renderings(secret) {
					if strings.Contains(out, r) {
						t.Errorf("secret %q appears in the call log as %q", secret, r)
					}
				}
			}
			if t.Failed() {
				t.Logf("call log:\n%s", out)
				return
			}

			q := func(k, v string) string { // key=value in either format
				if json {
					return fmt.Sprintf("%q:%q", k, v)
				}
				if strings.ContainsAny(v, " <>\"=") {
					return fmt.Sprintf("%s=%q", k, v)
				}
				return k + "=" + v
			}
			dur := "duration="
			if json {
				dur = `"duration":`
			}
			for _, want := range [][]string{
				{q("msg", "C_Login"), q("rv", "CKR_PIN_INCORRECT"), q("pin", "<redacted 6 bytes>"), q("user_type", "CKU_USER"), q("module", "softhsm"), dur},
				{q("msg", "C_Login"), q("rv", "CKR_OK"), q("pin", "<redacted 6 bytes>"), dur},
				{q("msg", "C_InitToken"), q("rv", "CKR_PIN_INCORRECT"), q("so_pin", "<redacted 6 bytes>"), dur},
				{q("msg", "C_InitToken"), q("rv", "CKR_OK"), q("so_pin", "<redacted 6 bytes>"), q("label", initLabel), dur},
				{q("msg", "C_FindObjectsInit"), "CKA_VALUE=<redacted 20 bytes>", `CKA_LABEL=\"findme\"`, "CKA_CLASS=CKO_SECRET_KEY"},
				{q("msg", "C_OpenSession"), q("owner", ":1.42"), q("rv", "CKR_OK")},
				{q("msg", "C_Logout"), q("rv", "CKR_OK")},
			} {
				if len(log.find(want...)) != 1 {
					t.Errorf("want exactly one log line with %q", want)
				}
			}
			if t.Failed() {
				t.Logf("call log:\n%s", out)
			}
		})
	}
}

func errorsIsPinIncorrect(err error) bool {
	c, ok := errCode(err)
	return ok && c == pkcs11.CKR_PIN_INCORRECT
}

// attrList renders the values that identify objects and hides the ones that
// can be key material.
func TestAttrListRendering(t *testing.T) {
	got := attrList{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_EC),
		pkcs11.NewAttribute(pkcs11.CKA_ID, []byte{0xab, 0x01}),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, "my key"),
		pkcs11.NewAttribute(pkcs11.CKA_SIGN, true),
		pkcs11.NewAttribute(pkcs11.CKA_MODULUS_BITS, 2048),
		pkcs11.NewAttribute(pkcs11.CKA_SUBJECT, []byte("0123")),
		pkcs11.NewAttribute(pkcs11.CKA_VALUE, []byte("secret")),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE_EXPONENT, []byte("exp")),
		pkcs11.NewAttribute(0x80001234, []byte("vendor")),
		pkcs11.NewAttribute(pkcs11.CKA_VALUE, nil),
	}.LogValue().String()
	want := `[CKA_CLASS=CKO_PRIVATE_KEY CKA_KEY_TYPE=CKK_EC CKA_ID=ab01 CKA_LABEL="my key" CKA_SIGN=true ` +
		`CKA_MODULUS_BITS=2048 CKA_SUBJECT=<4 bytes> CKA_VALUE=<redacted 6 bytes> CKA_PRIVATE_EXPONENT=<redacted 3 bytes> ` +
		`CKA_0x80001234=<redacted 6 bytes> CKA_VALUE=<empty>]`
	if got != want {
		t.Errorf("attrList =\n%s\nwant\n%s", got, want)
	}
}
