package vcard

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"fmt"
	"math/big"
	"sync/atomic"
	"time"
)

// PKCS15AID is the application identifier of a PKCS#15 application
// ("\xA0\x00\x00\x00\x63PKCS-15"). OpenSC looks it up in EF.DIR and selects
// the application DF by this name.
var PKCS15AID = []byte{0xA0, 0x00, 0x00, 0x00, 0x63, 0x50, 0x4B, 0x43, 0x53, 0x2D, 0x31, 0x35}

// File identifiers of the card's file system. The layout is the smallest
// one OpenSC's pkcs15 framework accepts as a token, plus a PIN and a key:
//
//	3F00 MF
//	├── 2F00 EF.DIR        application template: AID, label, path 3F00 5015
//	└── 5015 DF.PKCS15     DF name = PKCS15AID
//	    ├── 5031 EF.ODF    points at the PrKDF, the CDF and the AODF
//	    ├── 5032 EF.TokenInfo  serial, manufacturer, label, flags
//	    ├── 4401 EF.CDF    one certificate object pointing at 4301
//	    ├── 4301 EF.CERT   the DER certificate
//	    ├── 4402 EF.PrKDF  one EC private key object (iD 45, key file 4B01,
//	    │                  authId 01)
//	    ├── 4403 EF.AODF   one PIN object (authId 01, reference 01)
//	    └── 4B01 key file  internal EF: can be selected, never read
//
// A card with Profile.NoKey has neither the PrKDF, the AODF nor the key
// file, and its ODF lists only the CDF.
const (
	fidMF        = 0x3F00
	fidDir       = 0x2F00
	fidPKCS15    = 0x5015
	fidODF       = 0x5031
	fidTokenInfo = 0x5032
	fidCDF       = 0x4401
	fidCert      = 0x4301
	fidPrKDF     = 0x4402
	fidAODF      = 0x4403
	fidPrivKey   = 0x4B01
)

// file is a node of the card's file system: a DF (dedicated file, a
// directory) or a transparent EF (elementary file, a byte string).
type file struct {
	fid      uint16
	df       bool
	name     []byte // DF name (AID); DFs only, may be nil
	data     []byte // EF contents; EFs only
	internal bool   // an internal EF (a key): selectable, not readable
	parent   *file  // nil for the MF
	children []*file
}

func newDF(fid uint16, name []byte) *file { return &file{fid: fid, df: true, name: name} }

// add appends child to the DF f and returns child.
func (f *file) add(child *file) *file {
	child.parent = f
	f.children = append(f.children, child)
	return child
}

// child returns the child of f with identifier fid, or nil.
func (f *file) child(fid uint16) *file {
	if f == nil {
		return nil
	}
	for _, c := range f.children {
		if c.fid == fid {
			return c
		}
	}
	return nil
}

// fcp encodes the file control parameters (ISO 7816-4 table 12) OpenSC's
// iso7816_process_fci reads: size (80), descriptor (82), identifier (83),
// DF name (84) and life cycle status (8A, 05 = operational/activated).
func (f *file) fcp() []byte {
	var b []byte
	switch {
	case f.df:
		b = append(b, tlv(0x82, []byte{0x38})...) // DF
	case f.internal:
		b = append(b, tlv(0x82, []byte{0x11})...) // internal EF, as MyEID's key files
	default:
		b = append(b, tlv(0x80, []byte{byte(len(f.data) >> 8), byte(len(f.data))})...)
		b = append(b, tlv(0x82, []byte{0x01})...) // working EF, transparent
	}
	b = append(b, tlv(0x83, []byte{byte(f.fid >> 8), byte(f.fid)})...)
	if f.df && len(f.name) > 0 {
		b = append(b, tlv(0x84, f.name)...)
	}
	b = append(b, tlv(0x8A, []byte{0x05})...)
	return b
}

// tlv encodes one BER-TLV with a one-byte tag (all tags used here are).
func tlv(tag byte, value []byte) []byte {
	n := len(value)
	var out []byte
	switch {
	case n < 0x80:
		out = []byte{tag, byte(n)}
	case n < 0x100:
		out = []byte{tag, 0x81, byte(n)}
	default: // files here stay far below 64 KiB
		out = []byte{tag, 0x82, byte(n >> 8), byte(n)}
	}
	return append(out, value...)
}

func seq(parts ...[]byte) []byte { return tlv(0x30, bytes.Join(parts, nil)) }

// pathObj encodes a PKCS#15 Path: SEQUENCE { path OCTET STRING }.
func pathObj(fids ...uint16) []byte {
	var p []byte
	for _, fid := range fids {
		p = append(p, byte(fid>>8), byte(fid))
	}
	return seq(tlv(0x04, p))
}

// serialBytes is the content of TokenInfo's serialNumber OCTET STRING.
// OpenSC shows a token's serial as the lower-case hex of those bytes, so a
// serial made of an even number of hex digits is stored hex-decoded: the
// token then shows the profile's serial ("1234" shows as "1234", "00AB"
// as "00ab"). Any other serial is stored as its bytes and shows as their
// hex ("abc" shows as "616263").
func serialBytes(serial string) []byte {
	if len(serial)%2 == 0 {
		if b, err := hex.DecodeString(serial); err == nil {
			return b
		}
	}
	return []byte(serial)
}

// image is a card built for one profile: its file system and its
// secrets. Every insertion of a Card serves the same image until the
// profile changes (SetProfile, Swap), so the PIN retry counter lasts
// across insertions, as on a real card.
type image struct {
	mf     *file
	cert   []byte            // the DER certificate in EF 4301
	serial []byte            // TokenInfo's serialNumber
	key    *ecdsa.PrivateKey // nil: no key and no PIN (Profile.NoKey)
	pin    []byte
	tries  atomic.Int32 // PIN tries left; 0 = blocked
}

// buildFS builds the card's file system for p. cert is the DER certificate
// to expose; withKey adds the PIN and private key objects.
func buildFS(p Profile, cert []byte, withKey bool) *file {
	mf := newDF(fidMF, nil)

	// EF.DIR: one application template (61) with the PKCS#15 AID (4F),
	// a label (50) and the path of the application DF (51).
	efdir := tlv(0x61, bytes.Join([][]byte{
		tlv(0x4F, PKCS15AID),
		tlv(0x50, []byte("slotwatch vcard")),
		tlv(0x51, []byte{0x3F, 0x00, 0x50, 0x15}),
	}, nil))
	mf.add(&file{fid: fidDir, data: efdir})

	app := mf.add(newDF(fidPKCS15, PKCS15AID))

	// TokenInfo: SEQUENCE { version INTEGER 0, serialNumber OCTET STRING,
	// manufacturerID UTF8String, label [0] UTF8String, tokenflags BIT STRING
	// (readOnly) }.
	tokenInfo := seq(
		tlv(0x02, []byte{0x00}),
		tlv(0x04, serialBytes(p.Serial)),
		tlv(0x0C, []byte(p.Manufacturer)),
		tlv(0x80, []byte(p.Label)),
		tlv(0x03, []byte{0x07, 0x80}),
	)
	app.add(&file{fid: fidTokenInfo, data: tokenInfo})

	// CDF: one X.509 certificate object: CommonObjectAttributes { label },
	// CommonCertificateAttributes { iD 45 }, [1] X509CertificateAttributes
	// { value Path }. A CDF is always listed: with an empty ODF OpenSC
	// skips TokenInfo and the token has an empty label.
	cdf := seq(
		seq(tlv(0x0C, []byte(p.Label+" cert"))),
		seq(tlv(0x04, []byte{keyID})),
		tlv(0xA1, seq(pathObj(fidMF, fidPKCS15, fidCert))),
	)
	app.add(&file{fid: fidCDF, data: cdf})
	app.add(&file{fid: fidCert, data: cert})

	// ODF: privateKeys [0] -> PrKDF, certificates [4] -> CDF,
	// authObjects [8] -> AODF.
	var odf []byte
	if withKey {
		odf = append(odf, tlv(0xA0, pathObj(fidMF, fidPKCS15, fidPrKDF))...)
	}
	odf = append(odf, tlv(0xA4, pathObj(fidMF, fidPKCS15, fidCDF))...)
	if withKey {
		odf = append(odf, tlv(0xA8, pathObj(fidMF, fidPKCS15, fidAODF))...)
		app.add(&file{fid: fidPrKDF, data: prkdf(p)})
		app.add(&file{fid: fidAODF, data: aodf()})
		app.add(&file{fid: fidPrivKey, internal: true})
	}
	app.add(&file{fid: fidODF, data: odf})
	return mf
}

// bitString encodes a PKCS#15 BIT STRING of named bits (bit 0 is the most
// significant bit of the first byte), with the unused bits of the last
// byte counted as DER wants.
func bitString(bits ...int) []byte {
	last := 0
	for _, b := range bits {
		last = max(last, b)
	}
	v := make([]byte, 1+last/8+1)
	for _, b := range bits {
		v[1+b/8] |= 0x80 >> (b % 8)
	}
	v[0] = byte(7 - last%8)
	return tlv(0x03, v)
}

// prkdf is the PrKDF: one EC private key object, privateECKey [0] {
// CommonObjectAttributes { label "<Label> key", flags (private), authId
// 01 }, CommonKeyAttributes { iD 45, usage (sign), accessFlags
// (sensitive, alwaysSensitive, neverExtractable, local) }, [1] {
// PrivateECKeyAttributes { value Path 3F00 5015 4B01, fieldSize 256
// (OpenSC's extension, which it needs to size the signature) } } }.
func prkdf(p Profile) []byte {
	return tlv(0xA0, bytes.Join([][]byte{
		seq(tlv(0x0C, []byte(p.Label+KeyLabel)), bitString(0), tlv(0x04, []byte{pinAuthID})),
		seq(tlv(0x04, []byte{keyID}), bitString(2), bitString(0, 2, 3, 4)),
		tlv(0xA1, seq(pathObj(fidMF, fidPKCS15, fidPrivKey), tlv(0x02, []byte{0x01, 0x00}))),
	}, nil))
}

// aodf is the AODF: one PIN object, pin SEQUENCE { CommonObjectAttributes
// { label "PIN" (OpenSC appends any other PIN label to the token label)
// }, CommonAuthenticationObjectAttributes { authId 01 },
// [1] { PinAttributes { pinFlags (case-sensitive, change-disabled,
// unblock-disabled, initialized), pinType utf8, minLength, storedLength,
// maxLength, pinReference [0] 01 } } }. No path: the PIN is global, and
// OpenSC selects nothing before VERIFY.
func aodf() []byte {
	return seq(
		seq(tlv(0x0C, []byte("PIN"))),
		seq(tlv(0x04, []byte{pinAuthID})),
		tlv(0xA1, seq(
			bitString(0, 2, 3, 4),
			tlv(0x0A, []byte{0x02}),
			tlv(0x02, []byte{MinPINLen}),
			tlv(0x02, []byte{MaxPINLen}),
			tlv(0x02, []byte{MaxPINLen}),
			tlv(0x80, []byte{pinRef}),
		)),
	)
}

// GenerateCert returns a DER self-signed ECDSA P-256 certificate whose
// subject common name is label, of a fresh random key that is thrown away:
// as Profile.Cert, a certificate that does not match the card's key. (A
// profile without Cert gets Certificate(p), which does.)
func GenerateCert(label string) ([]byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 63))
	if err != nil {
		return nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: label},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.AddDate(10, 0, 0),
		KeyUsage:     x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("vcard: generate certificate: %w", err)
	}
	return der, nil
}
