package vcard

import (
	"bytes"
	"encoding/hex"
	"fmt"
	"testing"
)

const selectOpenPGP = "00A4040006D2760001240100" // what scdaemon sends (P2 00, Le 256)

// findDO returns the value of the first DO tagged tag in a BER-TLV list,
// descending into constructed DOs; ok is false if there is none or the
// encoding is broken.
func findDO(b []byte, tag uint16) (value []byte, ok bool) {
	for len(b) > 0 {
		t := uint16(b[0])
		constructed := b[0]&0x20 != 0
		b = b[1:]
		if t&0x1F == 0x1F {
			if len(b) == 0 {
				return nil, false
			}
			t = t<<8 | uint16(b[0])
			b = b[1:]
		}
		if len(b) == 0 {
			return nil, false
		}
		n := int(b[0])
		b = b[1:]
		switch n {
		case 0x81:
			if len(b) < 1 {
				return nil, false
			}
			n, b = int(b[0]), b[1:]
		case 0x82:
			if len(b) < 2 {
				return nil, false
			}
			n, b = int(b[0])<<8|int(b[1]), b[2:]
		}
		if n > len(b) {
			return nil, false
		}
		v := b[:n]
		if t == tag {
			return v, true
		}
		if constructed {
			if inner, ok := findDO(v, tag); ok {
				return inner, true
			}
		}
		b = b[n:]
	}
	return nil, false
}

func getData(tag uint16) string { return fmt.Sprintf("00CA%04X00", tag) }

// TestOpenPGPApplication walks through what scdaemon reads for `gpg
// --card-status`.
func TestOpenPGPApplication(t *testing.T) {
	c, _ := newTestChip(t, testProfile)

	// Not selected: the ISO card has no such DO.
	expectSW(t, c, getData(0x4F), swRefDataNotFound)

	// scdaemon's probing before it selects the application.
	expectSW(t, c, "00A4000C023F00", swOK)
	expectSW(t, c, "00A4020C022F02", swFileNotFound) // no EF.GDO

	if d := expectSW(t, c, selectOpenPGP, swOK); len(d) != 0 {
		t.Fatalf("SELECT OpenPGP answered data %x", d)
	}

	aid := expectSW(t, c, getData(0x4F), swOK)
	want := h("D2760001240103 04FFFF 00001234 0000")
	if !bytes.Equal(aid, want) || !bytes.Equal(OpenPGPAID(testProfile), want) {
		t.Fatalf("AID %X, OpenPGPAID %X, want %X", aid, OpenPGPAID(testProfile), want)
	}

	hist := expectSW(t, c, getData(0x5F52), swOK)
	if len(hist) < 4 || hist[0] != 0x00 || !bytes.HasSuffix(hist, h("9000")) {
		t.Fatalf("historical bytes %X", hist)
	}

	c4 := expectSW(t, c, getData(0xC4), swOK)
	if len(c4) != 7 || c4[4] != 3 || c4[6] != 3 {
		t.Fatalf("PW status %X", c4)
	}

	ard := expectSW(t, c, getData(0x6E), swOK)
	if ard[0] != 0x6E {
		t.Fatalf("application related data %X lacks its tag", ard)
	}
	for tag, size := range map[uint16]int{0x4F: 16, 0x5F52: len(hist), 0xC0: 10, 0xC1: 6, 0xC2: 6, 0xC3: 6, 0xC4: 7, 0xC5: 60, 0xC6: 60, 0xCD: 12} {
		v, ok := findDO(ard, tag)
		if !ok || len(v) != size {
			t.Errorf("6E: DO %X = %X (found %v), want %d bytes", tag, v, ok, size)
		}
		if direct := expectSW(t, c, getData(tag), swOK); ok && !bytes.Equal(direct, v) {
			t.Errorf("DO %X directly %X, in 6E %X", tag, direct, v)
		}
	}
	if v, _ := findDO(ard, 0xC1); v[0] != 0x01 || int(v[1])<<8|int(v[2]) != 2048 {
		t.Errorf("signature key attributes %X, want RSA 2048", v)
	}
	if v, _ := findDO(ard, 0xC5); !bytes.Equal(v, make([]byte, 60)) {
		t.Errorf("fingerprints %X, want none", v)
	}

	holder := expectSW(t, c, getData(0x65), swOK)
	if name, ok := findDO(holder, 0x5B); holder[0] != 0x65 || !ok || string(name) != testProfile.Label {
		t.Fatalf("cardholder data %X: name %q", holder, name)
	}
	if lang, _ := findDO(holder, 0x5F2D); string(lang) != "en" {
		t.Fatalf("language %q", lang)
	}
	if d := expectSW(t, c, getData(0x5F50), swOK); len(d) != 0 {
		t.Fatalf("URL %X, want empty", d)
	}
	if d := expectSW(t, c, getData(0x5E), swOK); len(d) != 0 {
		t.Fatalf("login data %X, want empty", d)
	}
	if d := expectSW(t, c, getData(0x7A), swOK); !bytes.Equal(d, h("7A05 9303000000")) {
		t.Fatalf("security support template %X", d)
	}
	if d := expectSW(t, c, getData(0x7F66), swOK); !bytes.Equal(d, h("7F6608 020200FF 02020100")) {
		t.Fatalf("extended length information %X", d)
	}
	expectSW(t, c, getData(0x7F74), swRefDataNotFound) // no button
	expectSW(t, c, getData(0x0101), swRefDataNotFound) // no private DOs
	expectSW(t, c, getData(0x00F9), swRefDataNotFound) // no KDF DO
	expectSW(t, c, "00CA004F0100", swWrongLength)      // GET DATA with data

	// Short Le: the rest comes with GET RESPONSE.
	part, status := exchange(t, c, "00CA006E10")
	if len(part) != 0x10 || status != swBytesRemaining|uint16(len(ard)-0x10) {
		t.Fatalf("GET DATA 6E, Le 16: %d bytes, SW %04X", len(part), status)
	}
	rest := expectSW(t, c, "00C0000000", swOK)
	if !bytes.Equal(append(part, rest...), ard) {
		t.Fatal("6E via GET RESPONSE differs")
	}

	// VERIFY: status only; no PIN ever verifies.
	expectSW(t, c, "00200081", swVerifyTriesLeft|3)
	expectSW(t, c, "00200082", swVerifyTriesLeft|3)
	expectSW(t, c, "00200083", swVerifyTriesLeft|3)
	expectSW(t, c, "002000810631323334353600", swSecurityStatus)
	expectSW(t, c, "0020FF81", swOK)
	expectSW(t, c, "00200084", swIncorrectP1P2)
	expectSW(t, c, "00200181", swIncorrectP1P2)

	// No keys to read, none to generate.
	expectSW(t, c, "00478100 02B600 00", swRefDataNotFound)
	expectSW(t, c, "00478000 02B600 00", swConditions)
	expectSW(t, c, "00F20000 00", swINSNotSupported) // not an instruction of either

	// The PKCS#15 application is unaffected, and an ISO SELECT leaves
	// the OpenPGP application.
	expectSW(t, c, "00A4080C0450155032", swOK)
	if toki := readAll(t, c, 256); !bytes.Contains(toki, []byte(testProfile.Label)) {
		t.Fatalf("TokenInfo %X after OpenPGP", toki)
	}
	expectSW(t, c, getData(0x4F), swRefDataNotFound)
	expectSW(t, c, "00200081", swRefDataNotFound) // the ISO card's PIN is 01

	// So does a reset; and a full AID selects the application too.
	expectSW(t, c, "00A4040010"+hex.EncodeToString(aid)+"00", swOK)
	expectSW(t, c, getData(0x4F), swOK)
	c.reset()
	expectSW(t, c, getData(0x4F), swRefDataNotFound)

	// Not the OpenPGP application: an AID of another card, a shorter
	// prefix, the next occurrence, and a failing SELECT deselects.
	expectSW(t, c, "00A4040010D276000124010304FFFF999999990000", swFileNotFound)
	expectSW(t, c, "00A4040005D276000124", swFileNotFound)
	expectSW(t, c, "00A4040206D27600012401", swFileNotFound)
	expectSW(t, c, selectOpenPGP, swOK)
	expectSW(t, c, "00A4000C024F00", swFileNotFound)
	expectSW(t, c, getData(0x4F), swRefDataNotFound)
}

// TestOpenPGPAID: the AID's serial follows the profile's serial, so that
// different profiles give different cards to GnuPG.
func TestOpenPGPAID(t *testing.T) {
	seen := map[string]string{}
	for serial, want := range map[string]string{
		"1234":             "00001234",
		"00ab":             "000000AB",
		"":                 "00000000",
		"deadbeef":         "DEADBEEF",
		"abc":              "00616263", // not hex: its bytes
		"tok-1":            "",         // longer than 4 bytes: hashed
		"tok-2":            "",
		"0102030405060708": "",
	} {
		aid := OpenPGPAID(Profile{Serial: serial})
		if len(aid) != 16 || !bytes.HasPrefix(aid, h("D2760001240103 04FFFF")) || !bytes.HasSuffix(aid, h("0000")) {
			t.Fatalf("serial %q: AID %X", serial, aid)
		}
		sn := fmt.Sprintf("%X", aid[10:14])
		if want != "" && sn != want {
			t.Errorf("serial %q: AID serial %s, want %s", serial, sn, want)
		}
		if other, dup := seen[sn]; dup {
			t.Errorf("serials %q and %q both give AID serial %s", serial, other, sn)
		}
		seen[sn] = serial

		// The card derives the same AID from its TokenInfo.
		c, _ := newTestChip(t, Profile{Label: "L", Serial: serial})
		expectSW(t, c, selectOpenPGP, swOK)
		if got := expectSW(t, c, getData(0x4F), swOK); !bytes.Equal(got, aid) {
			t.Errorf("serial %q: card AID %X, OpenPGPAID %X", serial, got, aid)
		}
	}

	// The cardholder name is the label, cut to 39 bytes.
	long := "A label that is longer than thirty-nine bytes"
	c, _ := newTestChip(t, Profile{Label: long})
	expectSW(t, c, selectOpenPGP, swOK)
	if name, _ := findDO(expectSW(t, c, getData(0x65), swOK), 0x5B); string(name) != long[:39] {
		t.Fatalf("name %q", name)
	}
}
