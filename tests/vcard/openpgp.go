package vcard

import (
	"bytes"
	"crypto/sha256"
	"encoding/asn1"
)

// The card also carries a minimal OpenPGP card application (OpenPGP smart
// card specification 3.4), enough for GnuPG's scdaemon to bind it and for
// `gpg --card-status` to print it: an empty card with no keys, no PINs that
// can be verified, and an identity derived from the Profile.
//
// The application is reached only by SELECT by its AID. Until then the card
// answers exactly as the plain ISO 7816-4 / PKCS#15 card does (OpenSC's
// MyEID driver never selects it; GET DATA of its DOs is 6A88 there, and
// VERIFY is the PKCS#15 PIN's, security.go); any other SELECT, a reset or
// a power cycle leaves the application again. Its VERIFY never touches the
// PKCS#15 PIN (neither its status nor its retry counter), and the PKCS#15
// PIN's verification survives selecting and leaving the application.
//
// While the application is selected the card understands:
//   - GET DATA (CA) of the data objects scdaemon reads: 4F, 5E, 5F50, 5F52,
//     65, 6E, 7A, 7F66, C4 and, leniently, the simple DOs inside 65, 6E
//     and 7A (the specification reads those only through their template;
//     scdaemon tries the template first). Every other tag, including 7F74
//     (its presence would announce a confirmation button), is 6A88.
//   - VERIFY (20) without data: the PIN status, 63CX with X tries left (no
//     PIN is ever verified); P1 = FF (reset the status) is 9000; VERIFY
//     with a PIN is 6982: the card has no PIN to check.
//   - GENERATE ASYMMETRIC KEY PAIR (47) with P1 = 81 (read a public key):
//     6A88, there is no key; generating one (P1 = 80) is 6985.
//
// Every other instruction goes to the ISO card (6D00 for most, the
// security commands of security.go for some).

// openPGPRID is the registered application provider identifier (D2 76 00
// 01 24) and the application (01) of an OpenPGP card: the first six bytes
// of its AID, which is what scdaemon selects.
var openPGPRID = []byte{0xD2, 0x76, 0x00, 0x01, 0x24, 0x01}

// The rest of the AID: version 3.4, manufacturer FFFF (a test card, per the
// specification).
const (
	openPGPVersion      = 0x0304
	openPGPManufacturer = 0xFFFF
)

// Instructions and status words of the OpenPGP application.
const (
	insGetData         = 0xCA
	insVerify          = 0x20
	insGenerateKeyPair = 0x47

	swSecurityStatus   = 0x6982 // security status not satisfied
	swRefDataNotFound  = 0x6A88 // referenced data (DO, key) not found
	swVerifyTriesLeft  = 0x63C0 // 63CX: verification needed, X tries left
	openPGPPINTries    = 3
	openPGPMaxPINLen   = 127
	maxCardholderName  = 39 // DO 5B
	maxShortCommandLen = 255
)

// OpenPGPAID returns the 16-byte OpenPGP application identifier a card with
// profile p shows (DO 4F; gpg --card-status prints it as "Application
// ID"): D2 76 00 01 24 01, version 03 04, manufacturer FF FF, a 4-byte
// serial number, 00 00. The serial number is the profile's serial as the
// card stores it in TokenInfo (see serialBytes), left-padded with zeros if
// it is at most 4 bytes (serial "1234" gives 00 00 12 34, shown by gpg as
// "00001234"), otherwise the first 4 bytes of its SHA-256. Different
// serials thus give different AIDs, except serials that differ only in
// leading zero bytes ("1234" and "001234").
func OpenPGPAID(p Profile) []byte { return openPGPAID(serialBytes(p.Serial)) }

func openPGPAID(serial []byte) []byte {
	var sn [4]byte
	if len(serial) <= len(sn) {
		copy(sn[len(sn)-len(serial):], serial)
	} else {
		sum := sha256.Sum256(serial)
		copy(sn[:], sum[:])
	}
	aid := bytes.Clone(openPGPRID)
	aid = append(aid, openPGPVersion>>8, openPGPVersion&0xFF, openPGPManufacturer>>8, openPGPManufacturer&0xFF)
	aid = append(aid, sn[:]...)
	return append(aid, 0x00, 0x00)
}

// openPGPState is the OpenPGP application's part of a chip.
type openPGPState struct {
	selected bool
	dos      map[uint16][]byte // built on the first SELECT; nil before
}

// openPGP handles cmd if it belongs to the OpenPGP application: a SELECT
// of its AID, or GET DATA, VERIFY and GENERATE ASYMMETRIC KEY PAIR while
// it is selected. ok is false for every other command, which the ISO card
// then handles; an ISO SELECT also deselects the application.
func (c *chip) openPGP(cmd command) (resp []byte, ok bool) {
	if cmd.ins == insSelect {
		if cmd.p1 == 0x04 && cmd.p2&0x03 == 0 && len(cmd.data) >= len(openPGPRID) {
			dos := c.openPGPDOs()
			if bytes.HasPrefix(dos[0x4F], cmd.data) {
				c.pgp.selected = true
				return sw(nil, swOK), true // no FCI
			}
		}
		c.pgp.selected = false
		return nil, false
	}
	if !c.pgp.selected {
		return nil, false
	}
	switch cmd.ins {
	case insGetData:
		if len(cmd.data) != 0 {
			return sw(nil, swWrongLength), true
		}
		data, found := c.openPGPDOs()[uint16(cmd.p1)<<8|uint16(cmd.p2)]
		if !found {
			return sw(nil, swRefDataNotFound), true
		}
		return c.respond(cmd, data, swOK), true
	case insVerify:
		return sw(nil, openPGPVerify(cmd)), true
	case insGenerateKeyPair:
		switch cmd.p1 {
		case 0x81:
			return sw(nil, swRefDataNotFound), true
		case 0x80:
			return sw(nil, swConditions), true
		default:
			return sw(nil, swIncorrectP1P2), true
		}
	}
	return nil, false
}

// openPGPVerify answers VERIFY: P2 81/82 is PW1, 83 is PW3 (the admin PIN).
func openPGPVerify(cmd command) uint16 {
	if cmd.p2 < 0x81 || cmd.p2 > 0x83 {
		return swIncorrectP1P2
	}
	switch {
	case cmd.p1 == 0xFF && len(cmd.data) == 0: // reset the verification status
		return swOK
	case cmd.p1 != 0x00:
		return swIncorrectP1P2
	case len(cmd.data) == 0: // status: never verified
		return swVerifyTriesLeft | openPGPPINTries
	default:
		return swSecurityStatus
	}
}

// openPGPDOs returns the application's data objects, building them from
// the card's TokenInfo on first use: the serial number in the AID (see
// OpenPGPAID) and the cardholder name (the token label).
func (c *chip) openPGPDOs() map[uint16][]byte {
	if c.pgp.dos == nil {
		var ti struct {
			Version      int
			Serial       []byte
			Manufacturer string `asn1:"utf8"`
			Label        string `asn1:"utf8,optional,tag:0"`
		}
		if f := c.mf.child(fidPKCS15).child(fidTokenInfo); f != nil {
			// A TokenInfo buildFS wrote always parses; anything else
			// leaves the zero serial and no name.
			asn1.Unmarshal(f.data, &ti)
		}
		c.pgp.dos = buildOpenPGPDOs(ti.Serial, ti.Label)
	}
	return c.pgp.dos
}

// buildOpenPGPDOs returns the data objects of an empty OpenPGP card by tag.
// Constructed DOs (65, 6E, 7A, 7F66) are served with their tag, simple
// ones as their value only, as the specification wants.
func buildOpenPGPDOs(serial []byte, label string) map[uint16][]byte {
	name := []byte(label)
	if len(name) > maxCardholderName {
		name = name[:maxCardholderName]
	}
	rsa2048 := []byte{0x01, 0x08, 0x00, 0x00, 0x20, 0x00} // RSA, 2048-bit n, 32-bit e, standard format
	dos := map[uint16][]byte{
		0x004F: openPGPAID(serial),
		0x005E: {}, // login data: empty
		0x5F50: {}, // URL of the public key: empty
		// Historical bytes: category 00, card capabilities (73: no
		// command chaining, no extended Lc/Le), status 05 (operational),
		// 90 00.
		0x5F52: {0x00, 0x73, 0x00, 0x00, 0x00, 0x05, 0x90, 0x00},
		// Extended capabilities: none of secure messaging, GET
		// CHALLENGE, key import, PW status change, private DOs,
		// attribute change, AES, KDF (flags 00); SM algorithm 00, no
		// challenge length, no cardholder certificate, special DOs up
		// to 255 bytes, no PIN block 2, no MSE.
		0x00C0: {0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xFF, 0x00, 0x00},
		0x00C1: rsa2048, // signature key
		0x00C2: rsa2048, // decryption key
		0x00C3: rsa2048, // authentication key
		// PW status: PW1 valid for one signature only, maximum lengths of
		// PW1, RC and PW3, tries left for PW1, RC (none set) and PW3.
		0x00C4: {0x00, openPGPMaxPINLen, openPGPMaxPINLen, openPGPMaxPINLen, openPGPPINTries, 0x00, openPGPPINTries},
		0x00C5: make([]byte, 60),   // fingerprints: no keys
		0x00C6: make([]byte, 60),   // CA fingerprints
		0x00CD: make([]byte, 12),   // key generation times
		0x005B: name,               // cardholder name
		0x5F2D: []byte("en"),       // language preference
		0x5F35: []byte("9"),        // salutation: not announced
		0x0093: {0x00, 0x00, 0x00}, // digital signature counter
	}
	dos[0x0065] = tlvDO(0x65, tlvDO(0x5B, dos[0x005B]), tlvDO(0x5F2D, dos[0x5F2D]), tlvDO(0x5F35, dos[0x5F35]))
	var discretionary []byte
	for _, tag := range []uint16{0xC0, 0xC1, 0xC2, 0xC3, 0xC4, 0xC5, 0xC6, 0xCD} {
		discretionary = append(discretionary, tlvDO(tag, dos[tag])...)
	}
	dos[0x006E] = tlvDO(0x6E, tlvDO(0x4F, dos[0x004F]), tlvDO(0x5F52, dos[0x5F52]), tlvDO(0x73, discretionary))
	dos[0x007A] = tlvDO(0x7A, tlvDO(0x93, dos[0x0093]))
	// Extended length information: the largest command and response the
	// card takes (only short APDUs are announced in the historical bytes).
	dos[0x7F66] = tlvDO(0x7F66, tlvDO(0x02, []byte{0x00, maxShortCommandLen}), tlvDO(0x02, []byte{0x01, 0x00}))
	return dos
}

// tlvDO encodes a BER-TLV with a one- or two-byte tag (the OpenPGP DOs
// have both) around the concatenated values.
func tlvDO(tag uint16, values ...[]byte) []byte {
	v := bytes.Join(values, nil)
	if tag <= 0xFF {
		return tlv(byte(tag), v)
	}
	return append([]byte{byte(tag >> 8)}, tlv(byte(tag), v)...)
}
