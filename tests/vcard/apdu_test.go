package vcard

import (
	"bytes"
	"crypto/x509"
	"encoding/asn1"
	"encoding/hex"
	"strings"
	"testing"
)

var testProfile = Profile{Label: "Test Token", Serial: "1234", Manufacturer: "slotwatch"}

func newTestChip(t *testing.T, p Profile) (*chip, []byte) {
	t.Helper()
	img, err := buildCard(p)
	if err != nil {
		t.Fatal(err)
	}
	return newChip(img), img.cert
}

// h decodes hex, ignoring spaces.
func h(s string) []byte {
	b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
	if err != nil {
		panic(err)
	}
	return b
}

// exchange sends an APDU given in hex and splits the response.
func exchange(t *testing.T, c *chip, apdu string) ([]byte, uint16) {
	t.Helper()
	r := c.process(h(apdu))
	if len(r) < 2 {
		t.Fatalf("%s: response %x too short", apdu, r)
	}
	return r[:len(r)-2], uint16(r[len(r)-2])<<8 | uint16(r[len(r)-1])
}

func expectSW(t *testing.T, c *chip, apdu string, want uint16) []byte {
	t.Helper()
	data, got := exchange(t, c, apdu)
	if got != want {
		t.Fatalf("%s: SW %04X, want %04X (data %x)", apdu, got, want, data)
	}
	return data
}

// readAll reads the current EF in chunks of n bytes, like OpenSC does.
func readAll(t *testing.T, c *chip, n int) []byte {
	t.Helper()
	var out []byte
	for {
		apdu := []byte{0x00, 0xB0, byte(len(out) >> 8), byte(len(out)), byte(n)}
		r := c.process(apdu)
		sw := uint16(r[len(r)-2])<<8 | uint16(r[len(r)-1])
		out = append(out, r[:len(r)-2]...)
		switch sw {
		case swOK:
			continue
		case swEndOfFile, swWrongP1P2:
			return out
		default:
			t.Fatalf("READ BINARY at %d: SW %04X", len(out), sw)
		}
	}
}

func TestATRChecksum(t *testing.T) {
	var x byte
	for _, b := range ATR[1:] { // TCK makes T0..TCK XOR to 0
		x ^= b
	}
	if x != 0 {
		t.Fatalf("ATR %X: TCK wrong (xor %02X)", ATR, x)
	}
}

func TestParseCommand(t *testing.T) {
	for _, tc := range []struct {
		apdu  string
		data  string
		ne    int
		hasLe bool
		bad   bool
	}{
		{apdu: "00A40000"},                                             // case 1
		{apdu: "00B0000000", ne: 256, hasLe: true},                     // case 2, Le 00 = 256
		{apdu: "00B0000010", ne: 16, hasLe: true},                      // case 2
		{apdu: "00A4000C023F00", data: "3F00"},                         // case 3
		{apdu: "00A4000C023F0000", data: "3F00", ne: 256, hasLe: true}, // case 4
		{apdu: "00B00000 000000", ne: 65536, hasLe: true},              // case 2 extended
		{apdu: "00B0000000 0100", ne: 256, hasLe: true},                // case 2 extended
		{apdu: "00A4000C0000023F00", data: "3F00"},                     // case 3 extended
		{apdu: "00A4000C0000023F000000", data: "3F00", ne: 65536, hasLe: true},
		{apdu: "00A4", bad: true},
		{apdu: "00A4000C033F00", bad: true},   // Lc says 3, 2 given
		{apdu: "00A4000C00000000", bad: true}, // extended Lc 0
	} {
		c, err := parseCommand(h(tc.apdu))
		if tc.bad {
			if err == nil {
				t.Errorf("%s: parsed, want error", tc.apdu)
			}
			continue
		}
		if err != nil {
			t.Errorf("%s: %v", tc.apdu, err)
			continue
		}
		if !bytes.Equal(c.data, h(tc.data)) || c.ne != tc.ne || c.hasLe != tc.hasLe {
			t.Errorf("%s: data %x ne %d hasLe %v, want %s %d %v", tc.apdu, c.data, c.ne, c.hasLe, tc.data, tc.ne, tc.hasLe)
		}
	}
}

// TestPKCS15Files selects every file the way OpenSC names it and checks
// its contents.
func TestPKCS15Files(t *testing.T) {
	c, cert := newTestChip(t, testProfile)

	// MF by FID, no response data.
	expectSW(t, c, "00A4000C023F00", swOK)

	// EF.DIR by FID with FCP: size and identifier.
	fcp := expectSW(t, c, "00A40004022F0000", swOK)
	if fcp[0] != 0x62 || !bytes.Contains(fcp, h("83022F00")) || !bytes.Contains(fcp, h("820101")) {
		t.Fatalf("EF.DIR FCP %x", fcp)
	}
	efdir := readAll(t, c, 256)
	if !bytes.Contains(efdir, append([]byte{0x4F, byte(len(PKCS15AID))}, PKCS15AID...)) || !bytes.Contains(efdir, h("51043F005015")) {
		t.Fatalf("EF.DIR %x lacks the PKCS#15 AID or path", efdir)
	}

	// The application DF by name, FCI requested.
	fci := expectSW(t, c, "00A40400"+"0C"+hex.EncodeToString(PKCS15AID)+"00", swOK)
	if fci[0] != 0x6F || !bytes.Contains(fci, PKCS15AID) || !bytes.Contains(fci, h("83025015")) {
		t.Fatalf("DF.PKCS15 FCI %x", fci)
	}

	// ODF as an EF of the current DF.
	expectSW(t, c, "00A4020C025031", swOK)
	if odf := readAll(t, c, 256); !bytes.Equal(odf, h("A00A 3008 0406 3F0050154402  A40A 3008 0406 3F0050154401  A80A 3008 0406 3F0050154403")) {
		t.Fatalf("ODF %x", odf)
	}

	// TokenInfo by path from the MF (with and without a leading 3F00).
	expectSW(t, c, "00A4080C0450155032", swOK)
	toki := readAll(t, c, 256)
	expectSW(t, c, "00A4080C063F0050155032", swOK)
	if again := readAll(t, c, 256); !bytes.Equal(again, toki) {
		t.Fatal("path with and without 3F00 differ")
	}
	var ti struct {
		Version      int
		Serial       []byte
		Manufacturer string `asn1:"utf8"`
		Label        string `asn1:"utf8,tag:0"`
		Flags        asn1.BitString
	}
	if rest, err := asn1.Unmarshal(toki, &ti); err != nil || len(rest) != 0 {
		t.Fatalf("TokenInfo %x: %v", toki, err)
	}
	if !bytes.Equal(ti.Serial, h("1234")) || ti.Label != "Test Token" || ti.Manufacturer != "slotwatch" {
		t.Fatalf("TokenInfo %+v", ti)
	}

	// CDF by FID (P1=00 finds children of the current DF), then the
	// certificate by path from the current DF, read in small chunks.
	expectSW(t, c, "00A4000C024401", swOK)
	if cdf := readAll(t, c, 256); !bytes.Contains(cdf, h("3F0050154301")) || !bytes.Contains(cdf, []byte("Test Token cert")) {
		t.Fatalf("CDF %x", cdf)
	}
	expectSW(t, c, "00A4090C024301", swOK) // P1=09: path from DF 5015
	got := readAll(t, c, 100)
	if !bytes.Equal(got, cert) {
		t.Fatalf("certificate: read %d bytes, want %d", len(got), len(cert))
	}
	x, err := x509.ParseCertificate(got)
	if err != nil || x.Subject.CommonName != "Test Token" {
		t.Fatalf("certificate: %v, CN %q", err, x.Subject.CommonName)
	}
}

func TestSelectAndReadErrors(t *testing.T) {
	c, _ := newTestChip(t, testProfile)
	expectSW(t, c, "00B0000000", swNoCurrentEF)      // MF selected, no EF
	expectSW(t, c, "00A4000C024F00", swFileNotFound) // no such FID
	expectSW(t, c, "00A4080C0450154F00", swFileNotFound)
	expectSW(t, c, "00A4040C05A000000001", swFileNotFound)               // unknown AID
	expectSW(t, c, "00A4020C025015", swFileNotFound)                     // P1=02 wants an EF; 5015 is a DF
	expectSW(t, c, "00A4010C025015", swOK)                               // P1=01 child DF
	expectSW(t, c, "00A4030C", swOK)                                     // P1=03 parent: back to the MF
	expectSW(t, c, "00A4000C033F0000", swWrongLength)                    // odd FID length
	expectSW(t, c, "00A40C0C023F00", swIncorrectP1P2)                    // P1=0C unknown
	expectSW(t, c, "00A40410023F00", swIncorrectP1P2)                    // P2 high bits
	expectSW(t, c, "00A4040E0CA000000063504B43532D3135", swFileNotFound) // "next occurrence"

	expectSW(t, c, "00A4080C0450155032", swOK)
	toki := readAll(t, c, 256)
	expectSW(t, c, "00B0"+hexOffset(len(toki))+"00", swWrongP1P2) // offset = size
	expectSW(t, c, "00B0"+hexOffset(len(toki)+1)+"00", swWrongP1P2)
	if d := expectSW(t, c, "00B0"+hexOffset(len(toki)-3)+"00", swEndOfFile); !bytes.Equal(d, toki[len(toki)-3:]) {
		t.Fatalf("tail %x", d)
	}
	if d := expectSW(t, c, "00B0000002", swOK); !bytes.Equal(d, toki[:2]) {
		t.Fatalf("head %x", d)
	}
	expectSW(t, c, "00B08100 00", swFuncNotSupported) // short EF identifier
	expectSW(t, c, "00B00000", swWrongLength)         // no Le

	expectSW(t, c, "00CA010000", swRefDataNotFound) // GET DATA of no DO
	expectSW(t, c, "00DA010000", swINSNotSupported) // PUT DATA
	expectSW(t, c, "80CA9F7F00", swCLANotSupported) // proprietary class
	expectSW(t, c, "FFCA000000", swCLANotSupported) // PC/SC pseudo-APDU
	expectSW(t, c, "01A4000C023F00", swLogicalChannel)
	expectSW(t, c, "0CA4000C023F00", swSecureMessaging)
	expectSW(t, c, "10A4000C023F00", swChaining)
	expectSW(t, c, "00A4", swWrongLength)
	expectSW(t, c, "00C0000000", swConditions) // nothing pending
}

// TestGetResponse covers how a T=0 reader sends SELECT: without Le, then
// GET RESPONSE for the announced 61XX bytes.
func TestGetResponse(t *testing.T) {
	c, _ := newTestChip(t, testProfile)
	data, sw := exchange(t, c, "00A40004022F00")
	if len(data) != 0 || sw&0xFF00 != swBytesRemaining {
		t.Fatalf("SELECT without Le: %x %04X, want 61XX", data, sw)
	}
	n := int(sw & 0xFF)
	part := expectSW(t, c, "00C0000004", swBytesRemaining|uint16(n-4))
	rest := expectSW(t, c, "00C00000"+hexByte(n-4), swOK)
	fcp := append(part, rest...)
	if fcp[0] != 0x62 || int(fcp[1]) != len(fcp)-2 {
		t.Fatalf("FCP via GET RESPONSE %x", fcp)
	}
	expectSW(t, c, "00C0000000", swConditions) // consumed

	// Any other command drops pending data.
	exchange(t, c, "00A40004022F00")
	expectSW(t, c, "00A4000C023F00", swOK)
	expectSW(t, c, "00C0000000", swConditions)

	// Reset does too, and selects the MF again.
	expectSW(t, c, "00A4080C0450155032", swOK)
	c.reset()
	expectSW(t, c, "00B0000000", swNoCurrentEF)
}

func TestSerialEncoding(t *testing.T) {
	for serial, want := range map[string]string{"1234": "1234", "00ab": "00AB", "abc": "616263", "tok-1": "746F6B2D31"} {
		if got := hex.EncodeToString(serialBytes(serial)); !bytes.EqualFold([]byte(got), []byte(want)) {
			t.Errorf("serial %q stored as %s, want %s", serial, got, want)
		}
	}
}

func hexOffset(n int) string { return hex.EncodeToString([]byte{byte(n >> 8), byte(n)}) }
func hexByte(n int) string   { return hex.EncodeToString([]byte{byte(n)}) }

// TestProfileCert: a profile's own certificate is served as is; without
// one, the card keeps its generated certificate across insertions.
func TestProfileCert(t *testing.T) {
	own := []byte{0x30, 0x03, 0x02, 0x01, 0x07}
	img, err := buildCard(Profile{Label: "Own", Cert: own})
	if err != nil {
		t.Fatal(err)
	}
	if got := img.mf.child(fidPKCS15).child(fidCert).data; !bytes.Equal(got, own) {
		t.Fatalf("EF 4301 = %x, want %x", got, own)
	}

	c := New("127.0.0.1:1", Profile{Label: "Generated"})
	a, err := c.prepare()
	if err != nil {
		t.Fatal(err)
	}
	b, _ := c.prepare()
	if a != b {
		t.Fatal("file system (and certificate) rebuilt for the same profile")
	}
	c.SetProfile(Profile{Label: "Generated"})
	if b, _ = c.prepare(); a == b {
		t.Fatal("SetProfile kept the old file system")
	}
}
