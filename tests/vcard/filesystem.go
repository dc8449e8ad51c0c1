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
	"time"
)

// PKCS15AID is the application identifier of a PKCS#15 application
// ("\xA0\x00\x00\x00\x63PKCS-15"). OpenSC looks it up in EF.DIR and selects
// the application DF by this name.
var PKCS15AID = []byte{0xA0, 0x00, 0x00, 0x00, 0x63, 0x50, 0x4B, 0x43, 0x53, 0x2D, 0x31, 0x35}

// File identifiers of the card's file system. The layout is the smallest
// one OpenSC's pkcs15 framework accepts as a token:
//
//	3F00 MF
//	├── 2F00 EF.DIR        application template: AID, label, path 3F00 5015
//	└── 5015 DF.PKCS15     DF name = PKCS15AID
//	    ├── 5031 EF.ODF    points at the CDF
//	    ├── 5032 EF.TokenInfo  serial, manufacturer, label, flags
//	    ├── 4401 EF.CDF    one certificate object pointing at 4301
//	    └── 4301 EF.CERT   the DER certificate
const (
	fidMF        = 0x3F00
	fidDir       = 0x2F00
	fidPKCS15    = 0x5015
	fidODF       = 0x5031
	fidTokenInfo = 0x5032
	fidCDF       = 0x4401
	fidCert      = 0x4301
)

// file is a node of the card's file system: a DF (dedicated file, a
// directory) or a transparent EF (elementary file, a byte string).
type file struct {
	fid      uint16
	df       bool
	name     []byte // DF name (AID); DFs only, may be nil
	data     []byte // EF contents; EFs only
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
	if f.df {
		b = append(b, tlv(0x82, []byte{0x38})...) // DF
	} else {
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

// buildFS builds the card's file system for p. cert is the DER certificate
// to expose (already generated if p had none).
func buildFS(p Profile, cert []byte) *file {
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
		seq(tlv(0x04, []byte{0x45})),
		tlv(0xA1, seq(pathObj(fidMF, fidPKCS15, fidCert))),
	)
	app.add(&file{fid: fidCDF, data: cdf})
	app.add(&file{fid: fidCert, data: cert})

	// ODF: certificates [4] -> path of the CDF.
	odf := tlv(0xA4, pathObj(fidMF, fidPKCS15, fidCDF))
	app.add(&file{fid: fidODF, data: odf})
	return mf
}

// GenerateCert returns a DER self-signed ECDSA P-256 certificate whose
// subject common name is label. The key is thrown away: the card only
// exposes the certificate, it cannot sign.
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
