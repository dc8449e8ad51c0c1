package vcard_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/slotwatch/slotwatch/tests/stack"
	"github.com/slotwatch/slotwatch/tests/vcard"
)

// openSC is a private pcscd with a vcard in reader 0, and the environment
// under which pkcs11-tool finds that pcscd and the tests' OpenSC
// configuration.
type openSC struct {
	t    *testing.T
	p    *stack.PCSCD
	card *vcard.Card
	env  []string
}

// startOpenSC starts a private pcscd (logging APDUs) and inserts a card
// with profile prof, without waiting for anyone to notice it. pcscd is
// stopped (by its PID) and the card removed in t's cleanup.
func startOpenSC(t *testing.T, prof vcard.Profile) *openSC {
	t.Helper()
	if _, err := exec.LookPath("pkcs11-tool"); err != nil {
		t.Skip("pkcs11-tool (Debian package opensc) is not installed")
	}
	dir := t.TempDir()
	conf, err := stack.WriteOpenSCConf(dir)
	if err != nil {
		t.Fatal(err)
	}
	p := stack.StartPCSCDForTest(t, stack.PCSCDConfig{Socket: filepath.Join(dir, "pcscd.comm"), Dir: dir, Debug: true})
	card := vcard.New(p.Addr(0), prof)
	t.Cleanup(func() { card.Close() })
	if err := card.Insert(); err != nil {
		t.Fatal(err)
	}
	env := append(os.Environ(), p.Env()...)
	env = append(env, stack.OpenSCConfEnv+"="+conf)
	return &openSC{t: t, p: p, card: card, env: env}
}

// pkcs11Tool runs pkcs11-tool on OpenSC's module with args, to its end
// (killed after 30 s), and returns its combined output and exit error.
func (o *openSC) pkcs11Tool(args ...string) (string, error) {
	o.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "pkcs11-tool", append([]string{"--module", stack.OpenSCModule}, args...)...)
	cmd.Env = o.env
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		o.t.Fatalf("pkcs11-tool %s: %v\n%s", strings.Join(args, " "), ctx.Err(), out)
	}
	return string(out), err
}

// waitToken runs pkcs11-tool -L until it lists the token labelled label
// (pcscd notices an insertion at its next poll of the reader, every
// 400 ms) and returns that output.
func (o *openSC) waitToken(label string) string {
	o.t.Helper()
	re := regexp.MustCompile(`(?m)^\s*token label\s*:\s*` + regexp.QuoteMeta(label) + `\s*$`)
	deadline := time.Now().Add(10 * time.Second)
	for {
		out, _ := o.pkcs11Tool("-L")
		if re.MatchString(out) {
			return out
		}
		if time.Now().After(deadline) {
			o.t.Fatalf("pkcs11-tool -L: no token %q within 10 s:\n%s\n--- pcscd log ---\n%s", label, out, o.p.Log())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// sign signs input (a file's contents) with the card's key through
// pkcs11-tool with the PIN and mechanism given and returns the signature
// file's contents, the output, and the exit error.
func (o *openSC) sign(pin, mechanism string, input []byte) (sig []byte, out string, err error) {
	o.t.Helper()
	dir := o.t.TempDir()
	in, sigFile := filepath.Join(dir, "in"), filepath.Join(dir, "sig")
	if err := os.WriteFile(in, input, 0o600); err != nil {
		o.t.Fatal(err)
	}
	out, err = o.pkcs11Tool("--login", "--pin", pin, "--sign", "--mechanism", mechanism, "--id", vcard.KeyIDHex,
		"--input-file", in, "--output-file", sigFile)
	if err != nil {
		return nil, out, err
	}
	sig, rerr := os.ReadFile(sigFile)
	if rerr != nil {
		o.t.Fatalf("pkcs11-tool --sign succeeded without a signature: %v\n%s", rerr, out)
	}
	return sig, out, nil
}

// verifyRS checks a PKCS#11 ECDSA signature (r || s, 32 bytes each) of
// hash against pub.
func verifyRS(t *testing.T, pub *ecdsa.PublicKey, hash, sig []byte) {
	t.Helper()
	if len(sig) != 64 {
		t.Fatalf("signature of %d bytes, want 64 (r || s): %x", len(sig), sig)
	}
	r, s := new(big.Int).SetBytes(sig[:32]), new(big.Int).SetBytes(sig[32:])
	if !ecdsa.Verify(pub, hash, r, s) {
		t.Fatalf("signature %x does not verify with the card's public key", sig)
	}
}

// apdus returns the command APDUs in a piece of pcscd's log (pcscd
// --apdu), as upper-case hex without spaces.
func apdus(log string) []string {
	var out []string
	for _, m := range regexp.MustCompile(`(?m)APDU: ([0-9A-F ]+)$`).FindAllStringSubmatch(log, -1) {
		out = append(out, strings.ReplaceAll(strings.TrimSpace(m[1]), " ", ""))
	}
	return out
}

func hasAPDU(list []string, prefix string) bool {
	for _, a := range list {
		if strings.HasPrefix(a, prefix) {
			return true
		}
	}
	return false
}

// TestOpenSCLoginAndSign: through pcscd and OpenSC's PKCS#11 module, the
// card is a token that needs a login, C_Login verifies the PIN on the card,
// C_Sign with CKM_ECDSA and CKM_ECDSA_SHA256 has the card sign, and the
// signatures verify with the certificate's public key; a wrong PIN is
// CKR_PIN_INCORRECT, three are CKR_PIN_LOCKED.
func TestOpenSCLoginAndSign(t *testing.T) {
	prof := vcard.Profile{Label: "Signing Token", Serial: "5169", Manufacturer: "slotwatch"}
	o := startOpenSC(t, prof)

	start := time.Now()
	list := o.waitToken(prof.Label)
	t.Logf("token seen after %v:\n%s", time.Since(start), list)
	for _, want := range []string{"login required", "PIN initialized"} {
		if !strings.Contains(list, want) {
			t.Errorf("token flags lack %q:\n%s", want, list)
		}
	}
	if !regexp.MustCompile(`(?m)^\s*serial num\s*:\s*5169\s*$`).MatchString(list) {
		t.Errorf("serial 5169 not listed:\n%s", list)
	}

	// The certificate on the token is Certificate(prof), and its key is
	// PublicKey(prof).
	certDER, err := vcard.Certificate(prof)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(certDER)
	if err != nil {
		t.Fatal(err)
	}
	pub := vcard.PublicKey(prof)
	if !pub.Equal(cert.PublicKey) {
		t.Fatal("Certificate(prof) is not of PublicKey(prof)")
	}
	objs, err := o.pkcs11Tool("--login", "--pin", vcard.DefaultPIN, "--list-objects")
	if err != nil {
		t.Fatalf("pkcs11-tool --list-objects: %v\n%s", err, objs)
	}
	t.Logf("objects after login:\n%s", objs)
	for _, re := range []string{`(?m)^Private Key Object; EC`, `(?m)^Certificate Object; type = X\.509 cert`, `(?m)^\s*ID:\s*45\s*$`, `(?m)^\s*label:\s*Signing Token key\s*$`} {
		if !regexp.MustCompile(re).MatchString(objs) {
			t.Errorf("objects do not match %s", re)
		}
	}

	// CKM_ECDSA: the input is the hash.
	msg := []byte("signed by a virtual card")
	hash := sha256.Sum256(msg)
	before := len(o.p.Log())
	start = time.Now()
	sig, out, err := o.sign(vcard.DefaultPIN, "ECDSA", hash[:])
	if err != nil {
		t.Fatalf("pkcs11-tool --sign --mechanism ECDSA: %v\n%s\n--- pcscd log ---\n%s", err, out, o.p.Log())
	}
	t.Logf("login + sign (ECDSA) took %v", time.Since(start))
	verifyRS(t, pub, hash[:], sig)
	cmds := apdus(o.p.Log()[before:])
	t.Logf("APDUs of pkcs11-tool --login --sign:\n%s", strings.Join(cmds, "\n"))
	for _, want := range []string{"0020000106" + "313233343536", "002241B6078001048102" + "4B01", "002A9E9A20" + strings.ToUpper(hex.EncodeToString(hash[:]))} {
		if !hasAPDU(cmds, want) {
			t.Errorf("pcscd did not pass %s... to the card; APDUs:\n%s", want, strings.Join(cmds, "\n"))
		}
	}

	// CKM_ECDSA_SHA256: OpenSC hashes, the card signs the hash.
	sig, out, err = o.sign(vcard.DefaultPIN, "ECDSA-SHA256", msg)
	if err != nil {
		t.Fatalf("pkcs11-tool --sign --mechanism ECDSA-SHA256: %v\n%s", err, out)
	}
	verifyRS(t, pub, hash[:], sig)

	// A wrong PIN, then the right one (which resets the counter).
	if _, out, err = o.sign("000000", "ECDSA", hash[:]); err == nil || !strings.Contains(out, "CKR_PIN_INCORRECT") {
		t.Fatalf("sign with a wrong PIN: %v, want CKR_PIN_INCORRECT:\n%s", err, out)
	}
	if sig, out, err = o.sign(vcard.DefaultPIN, "ECDSA", hash[:]); err != nil {
		t.Fatalf("sign after a wrong PIN: %v\n%s", err, out)
	}
	verifyRS(t, pub, hash[:], sig)

	// Three wrong PINs block it, even for the right one, until the card
	// is built anew.
	for i := range vcard.PINTries {
		want := "CKR_PIN_INCORRECT"
		if i == vcard.PINTries-1 {
			want = "CKR_PIN_LOCKED"
		}
		if _, out, err = o.sign("000000", "ECDSA", hash[:]); err == nil || !strings.Contains(out, want) {
			t.Fatalf("wrong PIN %d: %v, want %s:\n%s", i+1, err, want, out)
		}
	}
	if _, out, err = o.sign(vcard.DefaultPIN, "ECDSA", hash[:]); err == nil || !strings.Contains(out, "CKR_PIN_LOCKED") {
		t.Fatalf("right PIN on a blocked card: %v, want CKR_PIN_LOCKED:\n%s", err, out)
	}
	if list := o.waitToken(prof.Label); !strings.Contains(list, "PIN locked") {
		t.Errorf("blocked PIN not in the token flags:\n%s", list)
	}
}

// TestOpenSCNoKey: a card with Profile.NoKey is a token that needs no
// login, and listing it asks the card for no PIN status.
func TestOpenSCNoKey(t *testing.T) {
	prof := vcard.Profile{Label: "Plain Token", Serial: "00ab", NoKey: true}
	o := startOpenSC(t, prof)
	list := o.waitToken(prof.Label)
	t.Logf("token:\n%s", list)
	if strings.Contains(list, "login required") || strings.Contains(list, "PIN initialized") {
		t.Errorf("a card without PIN needs a login:\n%s", list)
	}
	before := len(o.p.Log())
	if out, err := o.pkcs11Tool("-L"); err != nil {
		t.Fatalf("pkcs11-tool -L: %v\n%s", err, out)
	}
	if cmds := apdus(o.p.Log()[before:]); hasAPDU(cmds, "0020") {
		t.Errorf("OpenSC asked a card without PIN for a PIN status:\n%s", strings.Join(cmds, "\n"))
	}
	objs, err := o.pkcs11Tool("--list-objects")
	if err != nil {
		t.Fatalf("pkcs11-tool --list-objects: %v\n%s", err, objs)
	}
	if !strings.Contains(objs, "Certificate Object") || strings.Contains(objs, "Private Key Object") {
		t.Errorf("objects of a card without key:\n%s", objs)
	}
}
