package module

import (
	"context"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/miekg/pkcs11"
)

// Call logging. Every PKCS#11 call ends in result(), which maps the error and,
// if Options.CallLog is set and enabled at Debug, logs one record:
//
//	msg=C_Login module=softhsm session=3 handle=1 user_type=CKU_USER pin="<redacted 6 bytes>" rv=CKR_PIN_INCORRECT duration=1.2ms
//
// Secrets never reach the logger, not even as an attribute a handler might
// drop: the call sites pass redactedAttr (length only) for PINs, and
// attribute templates go through attrList, which prints values only for
// attribute types that cannot hold key material. miekg calls that make two C
// calls (length, then data: C_GetSlotList, C_Sign, C_GetAttributeValue) are
// logged as one.

// result turns err into this package's error for fn and logs the call.
func (m *Module) result(fn string, start time.Time, err error, attrs ...slog.Attr) error {
	elapsed := time.Since(start)
	err = wrap(fn, err)
	if m.log == nil || !m.log.Enabled(context.Background(), slog.LevelDebug) {
		return err
	}
	rv := "CKR_OK"
	if err != nil {
		if c, ok := errCode(err); ok {
			rv = CodeName(c)
		} else {
			rv = err.Error()
		}
	}
	all := make([]slog.Attr, 0, len(attrs)+3)
	all = append(all, slog.String("module", m.name))
	all = append(all, attrs...)
	all = append(all, slog.String("rv", rv), slog.Duration("duration", elapsed))
	m.log.LogAttrs(context.Background(), slog.LevelDebug, fn, all...)
	return err
}

// redactedAttr logs that a secret was passed and how long it was, nothing
// else. An empty secret is a protected authentication path (PIN pad).
func redactedAttr(key string, secret []byte) slog.Attr {
	if len(secret) == 0 {
		return slog.String(key, "<none>")
	}
	return slog.String(key, fmt.Sprintf("<redacted %d bytes>", len(secret)))
}

// sessionAttrs identifies the session of a call: registry id and handle.
func sessionAttrs(s *session) slog.Attr {
	return slog.Group("session", slog.Uint64("id", s.ID), slog.Uint64("handle", uint64(s.Handle)))
}

// attrList renders an attribute template or result for the log. Values are
// shown only for the types in shownAttrs; key material and anything unknown
// (vendor attributes included) is "<redacted N bytes>", other public but
// bulky values (certificates' subject, moduli) "<N bytes>".
type attrList []*pkcs11.Attribute

func (l attrList) LogValue() slog.Value {
	var b strings.Builder
	b.WriteByte('[')
	for i, a := range l {
		if i > 0 {
			b.WriteByte(' ')
		}
		if a == nil {
			b.WriteString("<nil>")
			continue
		}
		b.WriteString(attrName(a.Type))
		b.WriteByte('=')
		b.WriteString(attrValue(a))
	}
	b.WriteByte(']')
	return slog.StringValue(b.String())
}

type attrKind int

const (
	kindSecret attrKind = iota // may hold key material: never shown
	kindBulky                  // public, shown as a length
	kindBool
	kindUlong
	kindClass
	kindKeyType
	kindText
	kindHex
)

type attrDesc struct {
	name string
	kind attrKind
}

var shownAttrs = map[uint]attrDesc{
	pkcs11.CKA_CLASS:               {"CKA_CLASS", kindClass},
	pkcs11.CKA_TOKEN:               {"CKA_TOKEN", kindBool},
	pkcs11.CKA_PRIVATE:             {"CKA_PRIVATE", kindBool},
	pkcs11.CKA_LABEL:               {"CKA_LABEL", kindText},
	pkcs11.CKA_APPLICATION:         {"CKA_APPLICATION", kindText},
	pkcs11.CKA_VALUE:               {"CKA_VALUE", kindSecret},
	pkcs11.CKA_OBJECT_ID:           {"CKA_OBJECT_ID", kindBulky},
	pkcs11.CKA_CERTIFICATE_TYPE:    {"CKA_CERTIFICATE_TYPE", kindUlong},
	pkcs11.CKA_ISSUER:              {"CKA_ISSUER", kindBulky},
	pkcs11.CKA_SERIAL_NUMBER:       {"CKA_SERIAL_NUMBER", kindBulky},
	pkcs11.CKA_TRUSTED:             {"CKA_TRUSTED", kindBool},
	pkcs11.CKA_CHECK_VALUE:         {"CKA_CHECK_VALUE", kindBulky},
	pkcs11.CKA_KEY_TYPE:            {"CKA_KEY_TYPE", kindKeyType},
	pkcs11.CKA_SUBJECT:             {"CKA_SUBJECT", kindBulky},
	pkcs11.CKA_ID:                  {"CKA_ID", kindHex},
	pkcs11.CKA_SENSITIVE:           {"CKA_SENSITIVE", kindBool},
	pkcs11.CKA_ENCRYPT:             {"CKA_ENCRYPT", kindBool},
	pkcs11.CKA_DECRYPT:             {"CKA_DECRYPT", kindBool},
	pkcs11.CKA_WRAP:                {"CKA_WRAP", kindBool},
	pkcs11.CKA_UNWRAP:              {"CKA_UNWRAP", kindBool},
	pkcs11.CKA_SIGN:                {"CKA_SIGN", kindBool},
	pkcs11.CKA_VERIFY:              {"CKA_VERIFY", kindBool},
	pkcs11.CKA_DERIVE:              {"CKA_DERIVE", kindBool},
	pkcs11.CKA_MODULUS:             {"CKA_MODULUS", kindBulky},
	pkcs11.CKA_MODULUS_BITS:        {"CKA_MODULUS_BITS", kindUlong},
	pkcs11.CKA_PUBLIC_EXPONENT:     {"CKA_PUBLIC_EXPONENT", kindBulky},
	pkcs11.CKA_PRIVATE_EXPONENT:    {"CKA_PRIVATE_EXPONENT", kindSecret},
	pkcs11.CKA_PRIME_1:             {"CKA_PRIME_1", kindSecret},
	pkcs11.CKA_PRIME_2:             {"CKA_PRIME_2", kindSecret},
	pkcs11.CKA_EXPONENT_1:          {"CKA_EXPONENT_1", kindSecret},
	pkcs11.CKA_EXPONENT_2:          {"CKA_EXPONENT_2", kindSecret},
	pkcs11.CKA_COEFFICIENT:         {"CKA_COEFFICIENT", kindSecret},
	pkcs11.CKA_PUBLIC_KEY_INFO:     {"CKA_PUBLIC_KEY_INFO", kindBulky},
	pkcs11.CKA_VALUE_LEN:           {"CKA_VALUE_LEN", kindUlong},
	pkcs11.CKA_EXTRACTABLE:         {"CKA_EXTRACTABLE", kindBool},
	pkcs11.CKA_LOCAL:               {"CKA_LOCAL", kindBool},
	pkcs11.CKA_NEVER_EXTRACTABLE:   {"CKA_NEVER_EXTRACTABLE", kindBool},
	pkcs11.CKA_ALWAYS_SENSITIVE:    {"CKA_ALWAYS_SENSITIVE", kindBool},
	pkcs11.CKA_MODIFIABLE:          {"CKA_MODIFIABLE", kindBool},
	pkcs11.CKA_EC_PARAMS:           {"CKA_EC_PARAMS", kindBulky},
	pkcs11.CKA_EC_POINT:            {"CKA_EC_POINT", kindBulky},
	pkcs11.CKA_ALWAYS_AUTHENTICATE: {"CKA_ALWAYS_AUTHENTICATE", kindBool},
}

func attrName(t uint) string {
	if d, ok := shownAttrs[t]; ok {
		return d.name
	}
	return fmt.Sprintf("CKA_%#x", t)
}

func attrValue(a *pkcs11.Attribute) string {
	if a.Value == nil {
		return "<empty>" // a request for the value, not a value
	}
	d, ok := shownAttrs[a.Type]
	if !ok {
		d.kind = kindSecret
	}
	v := a.Value
	switch d.kind {
	case kindBulky:
		return fmt.Sprintf("<%d bytes>", len(v))
	case kindBool:
		if len(v) == 1 {
			return fmt.Sprint(v[0] != 0)
		}
	case kindUlong, kindClass, kindKeyType:
		if len(v) == 8 {
			n := uint(binary.NativeEndian.Uint64(v))
			switch d.kind {
			case kindClass:
				return className(n)
			case kindKeyType:
				return keyTypeName(n)
			}
			return fmt.Sprint(n)
		}
	case kindText:
		return fmt.Sprintf("%q", v)
	case kindHex:
		return hex.EncodeToString(v)
	}
	return fmt.Sprintf("<redacted %d bytes>", len(v))
}

// Names of the constants the call log and errors show; a value not listed
// prints as PREFIX_0x….
var (
	classNames = map[uint]string{
		pkcs11.CKO_DATA: "CKO_DATA", pkcs11.CKO_CERTIFICATE: "CKO_CERTIFICATE",
		pkcs11.CKO_PUBLIC_KEY: "CKO_PUBLIC_KEY", pkcs11.CKO_PRIVATE_KEY: "CKO_PRIVATE_KEY",
		pkcs11.CKO_SECRET_KEY: "CKO_SECRET_KEY",
	}
	keyTypeNames  = map[uint]string{pkcs11.CKK_RSA: "CKK_RSA", pkcs11.CKK_EC: "CKK_EC", pkcs11.CKK_AES: "CKK_AES"}
	userTypeNames = map[uint]string{
		pkcs11.CKU_SO: "CKU_SO", pkcs11.CKU_USER: "CKU_USER", pkcs11.CKU_CONTEXT_SPECIFIC: "CKU_CONTEXT_SPECIFIC",
	}
	stateNames = map[uint]string{
		pkcs11.CKS_RO_PUBLIC_SESSION: "CKS_RO_PUBLIC_SESSION", pkcs11.CKS_RO_USER_FUNCTIONS: "CKS_RO_USER_FUNCTIONS",
		pkcs11.CKS_RW_PUBLIC_SESSION: "CKS_RW_PUBLIC_SESSION", pkcs11.CKS_RW_USER_FUNCTIONS: "CKS_RW_USER_FUNCTIONS",
		pkcs11.CKS_RW_SO_FUNCTIONS: "CKS_RW_SO_FUNCTIONS",
	}
)

// constName looks v up in names, or prints it as prefix_0x….
func constName(names map[uint]string, prefix string, v uint) string {
	if n, ok := names[v]; ok {
		return n
	}
	return fmt.Sprintf("%s_%#x", prefix, v)
}

func className(c uint) string    { return constName(classNames, "CKO", c) }
func keyTypeName(k uint) string  { return constName(keyTypeNames, "CKK", k) }
func userTypeName(u uint) string { return constName(userTypeNames, "CKU", u) }

// StateName is the CKS_* name of a session state.
func StateName(s uint) string { return constName(stateNames, "CKS", s) }

var mechNames = map[uint]string{
	pkcs11.CKM_RSA_PKCS:            "CKM_RSA_PKCS",
	pkcs11.CKM_RSA_PKCS_PSS:        "CKM_RSA_PKCS_PSS",
	pkcs11.CKM_SHA1_RSA_PKCS:       "CKM_SHA1_RSA_PKCS",
	pkcs11.CKM_SHA256_RSA_PKCS:     "CKM_SHA256_RSA_PKCS",
	pkcs11.CKM_SHA384_RSA_PKCS:     "CKM_SHA384_RSA_PKCS",
	pkcs11.CKM_SHA512_RSA_PKCS:     "CKM_SHA512_RSA_PKCS",
	pkcs11.CKM_SHA256_RSA_PKCS_PSS: "CKM_SHA256_RSA_PKCS_PSS",
	pkcs11.CKM_ECDSA:               "CKM_ECDSA",
	pkcs11.CKM_ECDSA_SHA256:        "CKM_ECDSA_SHA256",
	pkcs11.CKM_ECDSA_SHA384:        "CKM_ECDSA_SHA384",
}

// mechAttr logs a mechanism by name and its parameter by length only
// (parameters can carry IVs or derivation input).
func mechAttr(mech *pkcs11.Mechanism) slog.Attr {
	if mech == nil {
		return slog.String("mechanism", "<nil>")
	}
	name, ok := mechNames[mech.Mechanism]
	if !ok {
		name = fmt.Sprintf("CKM_%#x", mech.Mechanism)
	}
	if len(mech.Parameter) == 0 {
		return slog.String("mechanism", name)
	}
	return slog.String("mechanism", fmt.Sprintf("%s(<%d bytes>)", name, len(mech.Parameter)))
}
