package vcard

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/asn1"
	"encoding/hex"
	"strings"
	"testing"
)

// APDUs as OpenSC's MyEID driver sends them (pcscd's log of pkcs11-tool
// --login --sign --mechanism ECDSA, see opensc_test.go).
const (
	verifyStatus  = "00200001"
	verifyDefault = "0020000106313233343536" // "123456"
	verifyWrong   = "0020000106303030303030" // "000000"
	selectKeyFile = "00A4080C0450154B01"
	mseSign       = "002241B60780010481024B01"
	logout        = "002E0000"
)

// psoCDS is COMPUTE DIGITAL SIGNATURE of hash with Le 256.
func psoCDS(hash []byte) string {
	return "002A9E9A" + hexByte(len(hash)) + hex.EncodeToString(hash) + "00"
}

// TestVerifyPIN: the PIN status, a wrong PIN counting down, the right PIN
// resetting the counter, blocking, and what clears a verification.
func TestVerifyPIN(t *testing.T) {
	c, _ := newTestChip(t, testProfile)
	expectSW(t, c, verifyStatus, swVerifyTriesLeft|3)
	expectSW(t, c, verifyWrong, swVerifyTriesLeft|2)
	expectSW(t, c, verifyStatus, swVerifyTriesLeft|2)
	expectSW(t, c, verifyDefault, swOK)
	expectSW(t, c, verifyStatus, swOK)
	expectSW(t, c, verifyWrong, swVerifyTriesLeft|2) // counter was reset; a wrong PIN also unverifies
	expectSW(t, c, verifyStatus, swVerifyTriesLeft|2)

	// Padding with FF (how MyEID pads) is ignored; other bytes are not.
	expectSW(t, c, "0020000108313233343536FFFF", swOK)
	expectSW(t, c, "00200001083132333435360000", swVerifyTriesLeft|2)
	expectSW(t, c, verifyDefault, swOK)

	// What clears a verification: P1 = FF, LOGOUT, a reset.
	expectSW(t, c, "0020FF01", swOK)
	expectSW(t, c, verifyStatus, swVerifyTriesLeft|3)
	expectSW(t, c, verifyDefault, swOK)
	expectSW(t, c, logout, swOK)
	expectSW(t, c, verifyStatus, swVerifyTriesLeft|3)
	expectSW(t, c, verifyDefault, swOK)
	c.reset()
	expectSW(t, c, verifyStatus, swVerifyTriesLeft|3)

	// The OpenPGP application neither sees nor clears it.
	expectSW(t, c, verifyDefault, swOK)
	expectSW(t, c, selectOpenPGP, swOK)
	expectSW(t, c, "00200081", swVerifyTriesLeft|3)
	expectSW(t, c, "00200082"+"06313233343536", swSecurityStatus)
	expectSW(t, c, "00A4000C023F00", swOK)
	expectSW(t, c, verifyStatus, swOK)

	// Other references and parameters.
	expectSW(t, c, "00200002", swRefDataNotFound)
	expectSW(t, c, "00200081", swRefDataNotFound)
	expectSW(t, c, "00200101", swIncorrectP1P2)
	expectSW(t, c, "002E0100", swIncorrectP1P2)

	// Blocking: the third wrong PIN in a row blocks; then even the right
	// PIN is refused, and the status says blocked.
	expectSW(t, c, verifyWrong, swVerifyTriesLeft|2)
	expectSW(t, c, verifyWrong, swVerifyTriesLeft|1)
	expectSW(t, c, verifyWrong, swAuthBlocked)
	expectSW(t, c, verifyDefault, swAuthBlocked)
	expectSW(t, c, verifyStatus, swAuthBlocked)
	expectSW(t, c, verifyWrong, swAuthBlocked)

	// The counter belongs to the card, not the session: a new session
	// (reinsertion) of the same card is still blocked; a card built anew
	// is not.
	c2 := newChip(c.img)
	expectSW(t, c2, verifyStatus, swAuthBlocked)
	c3, _ := newTestChip(t, testProfile)
	expectSW(t, c3, verifyStatus, swVerifyTriesLeft|3)
}

// TestProfilePIN: a profile's own PIN, and PINs the card refuses to carry.
func TestProfilePIN(t *testing.T) {
	p := testProfile
	p.PIN = "24680"
	c, _ := newTestChip(t, p)
	expectSW(t, c, verifyDefault, swVerifyTriesLeft|2)
	expectSW(t, c, "00200001053234363830", swOK)
	if ProfilePIN(p) != "24680" || ProfilePIN(testProfile) != DefaultPIN {
		t.Fatalf("ProfilePIN: %q, %q", ProfilePIN(p), ProfilePIN(testProfile))
	}
	for _, pin := range []string{"123", "123456789", "1234\xff"} {
		p.PIN = pin
		if _, err := buildCard(p); err == nil {
			t.Errorf("PIN %q accepted", pin)
		}
	}
	p.PIN, p.NoKey = "1", true // no PIN on the card: not checked
	if _, err := buildCard(p); err != nil {
		t.Errorf("NoKey with a bad PIN: %v", err)
	}
}

// TestSignature walks through OpenSC's signing sequence: select the key
// file, MSE SET, PSO: COMPUTE DIGITAL SIGNATURE, with and without the PIN.
func TestSignature(t *testing.T) {
	c, certDER := newTestChip(t, testProfile)
	cert, err := x509.ParseCertificate(certDER)
	if err != nil {
		t.Fatal(err)
	}
	pub := PublicKey(testProfile)
	if !pub.Equal(cert.PublicKey) {
		t.Fatal("the card's certificate is not of PublicKey(profile)")
	}
	hash := sha256.Sum256([]byte("message"))

	// Without an environment, then without the PIN.
	expectSW(t, c, psoCDS(hash[:]), swConditions)
	expectSW(t, c, selectKeyFile, swOK)
	expectSW(t, c, "00B0000000", swIncompatibleFile) // a key is not read
	expectSW(t, c, mseSign, swOK)
	expectSW(t, c, psoCDS(hash[:]), swSecurityStatus)

	// With the PIN: a DER ECDSA signature of the hash.
	expectSW(t, c, verifyDefault, swOK)
	sig := expectSW(t, c, psoCDS(hash[:]), swOK)
	if !ecdsa.VerifyASN1(pub, hash[:], sig) {
		t.Fatalf("signature %x does not verify", sig)
	}
	var rs struct{ R, S asn1.RawValue }
	if rest, err := asn1.Unmarshal(sig, &rs); err != nil || len(rest) != 0 {
		t.Fatalf("signature %x is not a DER SEQUENCE { r, s }: %v", sig, err)
	}

	// Selecting other files keeps the environment; so does a second
	// signature. A hash shorter than the order (left-padded by OpenSC in
	// practice) and the longest one taken are signed as ECDSA says.
	expectSW(t, c, "00A4080C0450155032", swOK)
	for _, n := range []int{20, 32, maxHashLen} {
		in := bytes.Repeat([]byte{0xA5}, n)
		if sig := expectSW(t, c, psoCDS(in), swOK); !ecdsa.VerifyASN1(pub, in, sig) {
			t.Fatalf("signature of %d bytes does not verify", n)
		}
	}
	expectSW(t, c, psoCDS(bytes.Repeat([]byte{1}, maxHashLen+1)), swWrongLength)
	expectSW(t, c, "002A9E9A", swWrongLength)

	// Without Le (a T=0 reader): the signature comes with GET RESPONSE.
	data, status := exchange(t, c, strings.TrimSuffix(psoCDS(hash[:]), "00"))
	if len(data) != 0 || status&0xFF00 != swBytesRemaining {
		t.Fatalf("PSO without Le: %x %04X", data, status)
	}
	if sig := expectSW(t, c, "00C00000"+hexByte(int(status&0xFF)), swOK); !ecdsa.VerifyASN1(pub, hash[:], sig) {
		t.Fatal("signature via GET RESPONSE does not verify")
	}

	// LOGOUT: the environment stays, the PIN is needed again.
	expectSW(t, c, logout, swOK)
	expectSW(t, c, psoCDS(hash[:]), swSecurityStatus)
	expectSW(t, c, verifyDefault, swOK)

	// A reset clears the environment and the verification.
	c.reset()
	expectSW(t, c, psoCDS(hash[:]), swConditions)
	expectSW(t, c, mseSign, swOK) // by file reference, nothing selected
	expectSW(t, c, psoCDS(hash[:]), swSecurityStatus)
	expectSW(t, c, verifyDefault, swOK)
	expectSW(t, c, psoCDS(hash[:]), swOK)

	// Variants of MSE: the key file selected and no 81; a key
	// reference; a path ending in the key file.
	expectSW(t, c, selectKeyFile, swOK)
	expectSW(t, c, "002241B603800104", swOK)
	expectSW(t, c, psoCDS(hash[:]), swOK)
	expectSW(t, c, "002241B60A80010481024B01840100", swOK)
	expectSW(t, c, "002241B6098001048104"+"50154B01", swOK)

	// MSE errors: each one also drops the environment.
	for apdu, want := range map[string]uint16{
		"002241B60780010481024B02":   swRefDataNotFound,  // another file
		"002241B60780010281024B01":   swWrongData,        // another algorithm (RSA PKCS#1)
		"002241B6078A010481024B01":   swWrongData,        // unknown tag
		"002241B606800104810250":     swWrongData,        // truncated TLV
		"002241B60881024B0184020001": swWrongData,        // 2-byte key reference
		"002241B80780010481024B01":   swFuncNotSupported, // decipher
		"0022F3B6":                   swFuncNotSupported, // RESTORE
	} {
		expectSW(t, c, mseSign, swOK)
		expectSW(t, c, apdu, want)
		expectSW(t, c, psoCDS(hash[:]), swConditions)
	}
	expectSW(t, c, "00A4080C0450155032", swOK)
	expectSW(t, c, "002241B603800104", swRefDataNotFound) // no 81 and the key file not selected

	// Other operations: decipher, verify.
	expectSW(t, c, mseSign, swOK)
	expectSW(t, c, "002A808604"+"00010203", swFuncNotSupported)
	expectSW(t, c, "002A00A804"+"00010203", swFuncNotSupported)
}

// TestNoKey: a card without key and PIN, as before they existed.
func TestNoKey(t *testing.T) {
	p := testProfile
	p.NoKey = true
	c, cert := newTestChip(t, p)
	if want, _ := Certificate(p); !bytes.Equal(cert, want) {
		t.Fatal("certificate differs from Certificate(p)")
	}
	expectSW(t, c, "00A4080C0450155031", swOK)
	if odf := readAll(t, c, 256); !bytes.Equal(odf, h("A40A 3008 0406 3F0050154401")) {
		t.Fatalf("ODF %x", odf)
	}
	for _, f := range []string{"4402", "4403", "4B01"} {
		expectSW(t, c, "00A4080C045015"+f, swFileNotFound)
	}
	expectSW(t, c, verifyStatus, swRefDataNotFound)
	expectSW(t, c, verifyDefault, swRefDataNotFound)
	expectSW(t, c, "002241B60780010481024B01", swRefDataNotFound)
	expectSW(t, c, psoCDS(make([]byte, 32)), swConditions)
	expectSW(t, c, logout, swOK)
}

// TestMyEIDCommands: what OpenSC's MyEID driver reads when it binds the
// card, and GET CHALLENGE.
func TestMyEIDCommands(t *testing.T) {
	c, _ := newTestChip(t, testProfile)
	info := expectSW(t, c, "00CA01A014", swOK)
	if len(info) != 20 || !bytes.Equal(info[5:8], []byte{3, 5, 0}) || !bytes.Equal(info[8:18], h("00000000000000001234")) {
		t.Fatalf("applet info %X", info)
	}
	expectSW(t, c, "00CA01AA0B", swRefDataNotFound) // capabilities: only from version 4
	expectSW(t, c, "00CA01A00100", swWrongLength)
	long, _ := newTestChip(t, Profile{Label: "L", Serial: "0102030405060708090a0b0c"})
	if info := expectSW(t, long, "00CA01A000", swOK); !bytes.Equal(info[8:18], h("030405060708090a0b0c")) {
		t.Fatalf("applet info of a 12-byte serial %X", info)
	}

	a := expectSW(t, c, "0084000008", swOK)
	b := expectSW(t, c, "0084000008", swOK)
	if len(a) != 8 || len(b) != 8 || bytes.Equal(a, b) {
		t.Fatalf("challenges %x, %x", a, b)
	}
	if r := expectSW(t, c, "0084000000", swOK); len(r) != 256 {
		t.Fatalf("challenge of Le 00: %d bytes", len(r))
	}
	expectSW(t, c, "00840000", swWrongLength)
	expectSW(t, c, "0084010008", swIncorrectP1P2)
}

// TestProfileKey: the key and certificate follow the profile, and only
// its identity fields.
func TestProfileKey(t *testing.T) {
	a, b := ProfileKey(testProfile), ProfileKey(testProfile)
	if !a.Equal(b) {
		t.Fatal("ProfileKey differs for the same profile")
	}
	withPIN := testProfile
	withPIN.PIN, withPIN.NoKey = "9999", true
	if !ProfileKey(withPIN).Equal(a) {
		t.Fatal("PIN or NoKey changed the key")
	}
	for _, p := range []Profile{
		{Label: testProfile.Label + "x", Serial: testProfile.Serial, Manufacturer: testProfile.Manufacturer},
		{Label: testProfile.Label, Serial: "1235", Manufacturer: testProfile.Manufacturer},
		{Label: testProfile.Label, Serial: testProfile.Serial},
		{Label: "Test Token1", Serial: "234", Manufacturer: testProfile.Manufacturer}, // same bytes, other split
	} {
		if ProfileKey(p).Equal(a) {
			t.Errorf("profile %+v has the key of %+v", p, testProfile)
		}
	}
	if !PublicKey(testProfile).Equal(&a.PublicKey) {
		t.Fatal("PublicKey is not ProfileKey's")
	}

	c1, err := Certificate(testProfile)
	if err != nil {
		t.Fatal(err)
	}
	c2, _ := Certificate(testProfile)
	if !bytes.Equal(c1, c2) {
		t.Fatal("Certificate differs for the same profile")
	}
	cert, err := x509.ParseCertificate(c1)
	if err != nil {
		t.Fatal(err)
	}
	if err := cert.CheckSignature(cert.SignatureAlgorithm, cert.RawTBSCertificate, cert.Signature); err != nil {
		t.Fatalf("not self-signed: %v", err)
	}
	if cert.Subject.CommonName != testProfile.Label || !PublicKey(testProfile).Equal(cert.PublicKey) || cert.KeyUsage != x509.KeyUsageDigitalSignature {
		t.Fatalf("certificate: CN %q, key usage %v", cert.Subject.CommonName, cert.KeyUsage)
	}
	if !bytes.Equal(KeyID(), h(KeyIDHex)) {
		t.Fatalf("KeyID %x, KeyIDHex %s", KeyID(), KeyIDHex)
	}
}

// TestPKCS15KeyObjects: the PrKDF and AODF entries as bytes (OpenSC's
// reading of them is tested in opensc_test.go).
func TestPKCS15KeyObjects(t *testing.T) {
	c, _ := newTestChip(t, testProfile)
	expectSW(t, c, "00A4080C0450154402", swOK)
	want := h("A0 38" +
		"3017 0C0E" + hex.EncodeToString([]byte("Test Token key")) + "03020780 040101" +
		"300B 040145 03020520 030203B8" +
		"A110 300E 3008 0406 3F0050154B01 02020100")
	if got := readAll(t, c, 256); !bytes.Equal(got, want) {
		t.Fatalf("PrKDF\n%X\nwant\n%X", got, want)
	}
	expectSW(t, c, "00A4080C0450154403", swOK)
	want = h("3023" +
		"3005 0C03" + hex.EncodeToString([]byte("PIN")) +
		"3003 040101" +
		"A115 3013 030203B8 0A0102 020104 020108 020108 800101")
	if got := readAll(t, c, 256); !bytes.Equal(got, want) {
		t.Fatalf("AODF\n%X\nwant\n%X", got, want)
	}
	if !bytes.HasSuffix(ATR[:len(ATR)-1], []byte("OsEID")) {
		t.Fatalf("ATR %X does not end in OsEID (before TCK)", ATR)
	}
}
