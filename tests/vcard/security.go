package vcard

import (
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/subtle"
)

// The security part of the PKCS#15 card: a user PIN and one private key,
// used the way OpenSC's "myeid" driver (which binds the card by its ATR,
// see ATR) drives a MyEID/OsEID card:
//
//   - VERIFY (00 20 00 01 [PIN]) checks the user PIN (reference 01). With
//     the PIN: 9000, or 63CX with X tries left, or 6983 once blocked (also
//     for the right PIN). Without data: the PIN status (9000 verified, 63CX
//     not verified, 6983 blocked); OpenSC asks it at every
//     C_GetTokenInfo. P1 = FF without data forgets a verification. The
//     verification lasts until a reset, a power cycle or the removal of
//     the card (or LOGOUT); the retry counter lasts as long as the card's
//     profile (see Card.SetProfile).
//   - LOGOUT (00 2E 00 00, MyEID's proprietary "forget verified PINs",
//     which OpenSC sends for C_Logout and when the last session of a
//     logged-in slot is closed): 9000.
//   - MANAGE SECURITY ENVIRONMENT, SET for digital signature (00 22 41 B6)
//     with 80 01 04 (MyEID's algorithm reference for ECDSA on a hash), 81 02
//     4B 01 (the key file) and optionally 84 01 XX (a key reference):
//     9000. Without 81 the selected EF must be the key file.
//   - PERFORM SECURITY OPERATION: COMPUTE DIGITAL SIGNATURE (00 2A 9E 9A)
//     with the hash (OpenSC sends it cut or left-padded with zeros to 32
//     bytes): the ECDSA signature as a DER SEQUENCE { r, s } (the driver
//     turns it into PKCS#11's r || s). 6982 unless the PIN is verified,
//     6985 without a signing environment.
//   - GET CHALLENGE (00 84 00 00 Le): Le random bytes (OpenSC's MyEID
//     driver announces a random number generator, CKF_RNG).
//   - GET DATA 01 A0 (MyEID applet information, which the driver reads when
//     it binds the card): version 3.5.0 and a serial number; any other
//     GET DATA outside the OpenPGP application is 6A88.
//
// A card with Profile.NoKey has no PIN and no key: VERIFY and MSE are 6A88,
// PSO is 6985.

// Instructions of the security part.
const (
	insMSE          = 0x22
	insPSO          = 0x2A
	insGetChallenge = 0x84
	insLogout       = 0x2E // MyEID proprietary (ISO has no such INS)
)

// Status words of the security part (more in apdu.go and openpgp.go).
const (
	swIncompatibleFile = 0x6981 // command incompatible with file structure
	swAuthBlocked      = 0x6983 // authentication method blocked
	swWrongData        = 0x6A80 // incorrect parameters in the data field
)

// Fixed values of the card's PKCS#15 security objects.
const (
	pinRef      = 0x01 // PIN reference (VERIFY P2, AODF pinReference)
	pinAuthID   = 0x01 // PKCS#15 authId of the PIN object
	algRefECDSA = 0x04 // MyEID algorithm reference: ECDSA on a given hash
	maxHashLen  = 64   // the longest input PSO:CDS takes (SHA-512)
)

// appletInfo is the answer to GET DATA 01 A0 (MyEID applet information):
// five bytes the driver does not read, the applet version (major, minor,
// build: 3.5.0, which OpenSC shows as firmware version 35.0 and which is
// the first with EC keys and the last without GET DATA 01 AA, the
// capabilities), ten bytes of serial number and a two-byte change counter.
func appletInfo(serial []byte) []byte {
	info := make([]byte, 20)
	info[5], info[6], info[7] = 3, 5, 0
	sn := info[8:18]
	if len(serial) > len(sn) {
		serial = serial[len(serial)-len(sn):]
	}
	copy(sn[len(sn)-len(serial):], serial)
	return info
}

// secState is the security state of one insertion, cleared by a reset.
type secState struct {
	verified bool // the user PIN was verified in this session
	signEnv  bool // an MSE SET for signing with the key is in force
}

// verify implements VERIFY for the user PIN.
func (c *chip) verify(cmd command) uint16 {
	s := c.img
	if s.key == nil || cmd.p2 != pinRef {
		return swRefDataNotFound
	}
	switch {
	case cmd.p1 == 0xFF && len(cmd.data) == 0: // reset the verification
		c.sec.verified = false
		return swOK
	case cmd.p1 != 0x00:
		return swIncorrectP1P2
	}
	tries := s.tries.Load()
	if len(cmd.data) == 0 { // status
		switch {
		case tries == 0:
			return swAuthBlocked
		case c.sec.verified:
			return swOK
		default:
			return swVerifyTriesLeft | uint16(tries)
		}
	}
	if tries == 0 {
		return swAuthBlocked
	}
	pin := cmd.data
	for len(pin) > 0 && pin[len(pin)-1] == 0xFF { // padding (MyEID pads with FF)
		pin = pin[:len(pin)-1]
	}
	if subtle.ConstantTimeCompare(pin, s.pin) == 1 {
		s.tries.Store(PINTries)
		c.sec.verified = true
		return swOK
	}
	c.sec.verified = false
	tries = s.tries.Add(-1)
	if tries <= 0 {
		s.tries.Store(0)
		return swAuthBlocked
	}
	return swVerifyTriesLeft | uint16(tries)
}

// logout implements MyEID's LOGOUT: every verification is forgotten.
func (c *chip) logout(cmd command) uint16 {
	if cmd.p1 != 0 {
		return swIncorrectP1P2
	}
	c.sec.verified = false
	return swOK
}

// mse implements MANAGE SECURITY ENVIRONMENT: only SET of the digital
// signature template (P1 41, P2 B6) for the card's key.
func (c *chip) mse(cmd command) uint16 {
	if cmd.p1 != 0x41 || cmd.p2 != 0xB6 {
		c.sec.signEnv = false
		return swFuncNotSupported
	}
	c.sec.signEnv = false
	if c.img.key == nil {
		return swRefDataNotFound
	}
	keyFile := false
	if c.curEF != nil && c.curEF.fid == fidPrivKey {
		keyFile = true
	}
	for d := cmd.data; len(d) > 0; {
		if len(d) < 2 || len(d) < 2+int(d[1]) {
			return swWrongData
		}
		tag, v := d[0], d[2:2+int(d[1])]
		d = d[2+len(v):]
		switch tag {
		case 0x80: // algorithm reference
			if len(v) != 1 || v[0] != algRefECDSA {
				return swWrongData
			}
		case 0x81: // file reference: the key file's identifier (or a path ending in it)
			if len(v) < 2 || len(v)%2 != 0 || fid(v[len(v)-2:]) != fidPrivKey {
				return swRefDataNotFound
			}
			keyFile = true
		case 0x84: // key reference: there is one key
			if len(v) != 1 {
				return swWrongData
			}
		default:
			return swWrongData
		}
	}
	if !keyFile {
		return swRefDataNotFound
	}
	c.sec.signEnv = true
	return swOK
}

// pso implements PERFORM SECURITY OPERATION: only COMPUTE DIGITAL
// SIGNATURE (P1 9E, P2 9A) with the key of the signing environment.
func (c *chip) pso(cmd command) ([]byte, uint16) {
	if cmd.p1 != 0x9E || cmd.p2 != 0x9A {
		return nil, swFuncNotSupported
	}
	if !c.sec.signEnv || c.img.key == nil {
		return nil, swConditions
	}
	if !c.sec.verified {
		return nil, swSecurityStatus
	}
	if len(cmd.data) == 0 || len(cmd.data) > maxHashLen {
		return nil, swWrongLength
	}
	sig, err := ecdsa.SignASN1(rand.Reader, c.img.key, cmd.data)
	if err != nil {
		return nil, swConditions
	}
	return sig, swOK
}

// getChallenge implements GET CHALLENGE: Le random bytes.
func getChallenge(cmd command) ([]byte, uint16) {
	if cmd.p1 != 0 || cmd.p2 != 0 {
		return nil, swIncorrectP1P2
	}
	if !cmd.hasLe || len(cmd.data) != 0 || cmd.ne > maxShortResponseData {
		return nil, swWrongLength
	}
	b := make([]byte, cmd.ne)
	rand.Read(b)
	return b, swOK
}

// getData implements GET DATA outside the OpenPGP application: only the
// MyEID applet information (01 A0).
func (c *chip) getData(cmd command) ([]byte, uint16) {
	if len(cmd.data) != 0 {
		return nil, swWrongLength
	}
	if cmd.p1 != 0x01 || cmd.p2 != 0xA0 {
		return nil, swRefDataNotFound
	}
	return appletInfo(c.img.serial), swOK
}
