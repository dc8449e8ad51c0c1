package vcard

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
	"fmt"
	"io"
	"math/big"
	"time"
)

// The card's private key: an EC P-256 key in the PKCS#15 application,
// usable for signing (ECDSA) once the user PIN has been verified. OpenSC
// shows it as a private key object with CKA_ID KeyID, next to the
// certificate with the same CKA_ID, in a token that needs a login.
//
// The key is derived from the profile (see ProfileKey), so a profile always
// gives the same key and, unless Profile.Cert is set, the same certificate
// (see Certificate).
const (
	// DefaultPIN is the user PIN of a profile that sets none.
	DefaultPIN = "123456"
	// PINTries is the number of wrong PINs after which the PIN is blocked.
	PINTries = 3
	// MinPINLen and MaxPINLen bound Profile.PIN (MaxPINLen is the most
	// OpenSC's MyEID driver sends).
	MinPINLen = 4
	MaxPINLen = 8
	// KeyIDHex is the PKCS#15 iD (the PKCS#11 CKA_ID, in hex) of the
	// private key and of the certificate: pkcs11-tool --id 45.
	KeyIDHex = "45"
	// KeyLabel is appended to the profile's label for the private key's
	// label (CKA_LABEL "<Label> key"); the certificate's is "<Label> cert".
	KeyLabel = " key"
)

// KeyID returns the PKCS#15 iD of the private key and the certificate
// (CKA_ID), the bytes of KeyIDHex.
func KeyID() []byte { return []byte{keyID} }

const keyID = 0x45

// ProfilePIN returns the user PIN of a card with profile p: p.PIN, or
// DefaultPIN if that is empty.
func ProfilePIN(p Profile) string {
	if p.PIN == "" {
		return DefaultPIN
	}
	return p.PIN
}

// ProfileKey returns the private key of a card with profile p: an EC
// P-256 key derived from the profile's label, serial and manufacturer (a
// SHA-256 of them is the scalar), so that tests can compute what the card
// holds. It returns the key even for a profile with NoKey (whose card does
// not carry it).
func ProfileKey(p Profile) *ecdsa.PrivateKey {
	seed := profileSeed(p)
	for i := uint32(0); ; i++ {
		d := sha256.Sum256(binary.BigEndian.AppendUint32(seed[:], i))
		// Fails only for 0 or a value not below the group order
		// (probability about 2^-32); then try the next counter.
		if k, err := ecdsa.ParseRawPrivateKey(elliptic.P256(), d[:]); err == nil {
			return k
		}
	}
}

// PublicKey returns the public key matching the card's private key for
// profile p (the key of ProfileKey): what a signature made by the card
// verifies with.
func PublicKey(p Profile) *ecdsa.PublicKey { return &ProfileKey(p).PublicKey }

// Certificate returns the DER certificate a card with profile p serves in
// EF 4301: p.Cert if set, otherwise a self-signed certificate of the
// card's key (ProfileKey) with subject CN = Label, made deterministically,
// so that the same profile always gives the same bytes.
func Certificate(p Profile) ([]byte, error) {
	if p.Cert != nil {
		return append([]byte(nil), p.Cert...), nil
	}
	return profileCert(p, ProfileKey(p))
}

// profileSeed is the hash every derived value of a profile starts from.
func profileSeed(p Profile) [sha256.Size]byte {
	h := sha256.New()
	io.WriteString(h, "slotwatch vcard key v1")
	for _, s := range []string{p.Label, p.Serial, p.Manufacturer} {
		var n [4]byte
		binary.BigEndian.PutUint32(n[:], uint32(len(s)))
		h.Write(n[:])
		io.WriteString(h, s)
	}
	var seed [sha256.Size]byte
	h.Sum(seed[:0])
	return seed
}

// Fixed validity of generated certificates (they must not depend on when
// they are made).
var (
	certNotBefore = time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC)
	certNotAfter  = time.Date(2049, 12, 31, 23, 59, 59, 0, time.UTC)
)

// profileCert makes the self-signed certificate of key for p, signed with
// RFC 6979 deterministic ECDSA, with a serial number derived from p.
func profileCert(p Profile, key *ecdsa.PrivateKey) ([]byte, error) {
	seed := profileSeed(p)
	serial := new(big.Int).SetBytes(seed[:8])
	serial.SetBit(serial, 63, 0)
	serial.SetBit(serial, 62, 1) // positive, never 0, always 8 bytes
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: p.Label},
		NotBefore:    certNotBefore,
		NotAfter:     certNotAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, deterministicSigner{key})
	if err != nil {
		return nil, fmt.Errorf("vcard: generate certificate: %w", err)
	}
	return der, nil
}

// deterministicSigner signs with RFC 6979 (no randomness), whatever
// random source it is handed.
type deterministicSigner struct{ key *ecdsa.PrivateKey }

func (s deterministicSigner) Public() crypto.PublicKey { return &s.key.PublicKey }

func (s deterministicSigner) Sign(_ io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	return s.key.Sign(nil, digest, opts)
}
