package rpc

import (
	"encoding/binary"
	"errors"
	"math/bits"

	"github.com/miekg/pkcs11"
)

// errMalformed is a request that does not parse; it is answered with
// CKR_DEVICE_ERROR, the code p11-kit's server uses for the same.
var errMalformed = errors.New("malformed request")

// errSignature means a call's code read or wrote other arguments than
// its signature in the call table says: a bug here, not the client's.
var errSignature = errors.New("internal error: arguments do not match the call's signature")

const (
	// nullLen as a byte array length stands for a NULL pointer.
	nullLen = 0xffffffff
	// maxArrayLen: p11-kit refuses byte arrays this long or longer, on
	// both sides; we never send one either.
	maxArrayLen = 0x7fffffff
	// minAttrLen is the least an attribute takes on the wire (type and
	// validity byte); it bounds how many a count can honestly announce.
	minAttrLen = 5
	// wireUlongLen is a CK_ULONG's size on the wire.
	wireUlongLen = 8
)

// ulongSize is sizeof(CK_ULONG) in this process (Go's uint has the size
// of C's unsigned long on every Linux ABI). Attribute values hold
// CK_ULONGs in this size and native byte order, as miekg/pkcs11 and the
// module behind the Handler expect.
const ulongSize = bits.UintSize / 8

func putNativeUlong(b []byte, v uint64) {
	if ulongSize == 8 {
		binary.NativeEndian.PutUint64(b, v)
	} else {
		binary.NativeEndian.PutUint32(b, uint32(v))
	}
}

func nativeUlong(b []byte) uint64 {
	if ulongSize == 8 {
		return binary.NativeEndian.Uint64(b)
	}
	return uint64(binary.NativeEndian.Uint32(b))
}

// attrKind is how p11-kit marshals an attribute's value. It depends only
// on the attribute type, through a fixed list in p11-kit 0.24.1: a type
// the list does not know travels as a plain byte array even where
// PKCS#11 gives it another C type (CKA_DESTROYABLE, say, arrives as a
// one-byte array), so we must follow the list, not the standard.
type attrKind int

const (
	kindBytes     attrKind = iota // uint32 length + bytes
	kindBool                      // one byte
	kindUlong                     // uint64
	kindDate                      // byte array of 0 or 8 bytes
	kindMechanism                 // uint32 count + uint64 each
	kindTemplate                  // uint32 count + nested attributes
)

func kindOf(t uint) attrKind {
	switch t {
	case pkcs11.CKA_TOKEN, pkcs11.CKA_PRIVATE, pkcs11.CKA_TRUSTED,
		pkcs11.CKA_SENSITIVE, pkcs11.CKA_ENCRYPT, pkcs11.CKA_DECRYPT,
		pkcs11.CKA_WRAP, pkcs11.CKA_UNWRAP, pkcs11.CKA_SIGN,
		pkcs11.CKA_SIGN_RECOVER, pkcs11.CKA_VERIFY,
		pkcs11.CKA_VERIFY_RECOVER, pkcs11.CKA_DERIVE,
		pkcs11.CKA_EXTRACTABLE, pkcs11.CKA_LOCAL,
		pkcs11.CKA_NEVER_EXTRACTABLE, pkcs11.CKA_ALWAYS_SENSITIVE,
		pkcs11.CKA_MODIFIABLE, pkcs11.CKA_COPYABLE,
		pkcs11.CKA_SECONDARY_AUTH, pkcs11.CKA_ALWAYS_AUTHENTICATE,
		pkcs11.CKA_WRAP_WITH_TRUSTED, pkcs11.CKA_RESET_ON_INIT,
		pkcs11.CKA_HAS_RESET, pkcs11.CKA_COLOR:
		return kindBool
	case pkcs11.CKA_CLASS, pkcs11.CKA_CERTIFICATE_TYPE,
		pkcs11.CKA_CERTIFICATE_CATEGORY,
		pkcs11.CKA_JAVA_MIDP_SECURITY_DOMAIN, pkcs11.CKA_KEY_TYPE,
		pkcs11.CKA_MODULUS_BITS, pkcs11.CKA_PRIME_BITS,
		pkcs11.CKA_SUB_PRIME_BITS, pkcs11.CKA_VALUE_BITS,
		pkcs11.CKA_VALUE_LEN, pkcs11.CKA_KEY_GEN_MECHANISM,
		pkcs11.CKA_AUTH_PIN_FLAGS, pkcs11.CKA_HW_FEATURE_TYPE,
		pkcs11.CKA_PIXEL_X, pkcs11.CKA_PIXEL_Y, pkcs11.CKA_RESOLUTION,
		pkcs11.CKA_CHAR_ROWS, pkcs11.CKA_CHAR_COLUMNS,
		pkcs11.CKA_BITS_PER_PIXEL, pkcs11.CKA_MECHANISM_TYPE:
		return kindUlong
	case pkcs11.CKA_WRAP_TEMPLATE, pkcs11.CKA_UNWRAP_TEMPLATE:
		return kindTemplate
	case pkcs11.CKA_ALLOWED_MECHANISMS:
		return kindMechanism
	case pkcs11.CKA_START_DATE, pkcs11.CKA_END_DATE:
		return kindDate
	}
	return kindBytes
}

// isTemplateType reports the attributes whose value is an array of
// attributes. The client cannot read them back (it refuses any answer
// naming one), and a value holding C pointers cannot reach the Handler
// as bytes, so calls involving them are answered
// CKR_ATTRIBUTE_TYPE_INVALID. CKA_DERIVE_TEMPLATE is not in p11-kit's
// list, so the client sends its raw C array as bytes: pointers again.
func isTemplateType(t uint) bool {
	return t == pkcs11.CKA_WRAP_TEMPLATE || t == pkcs11.CKA_UNWRAP_TEMPLATE ||
		t == pkcs11.CKA_DERIVE_TEMPLATE
}

// decoder reads one request body. Errors are sticky: after the first one
// every read returns zero values, and done reports it, so call code can
// read all arguments and check once.
type decoder struct {
	b   []byte
	off int
	err error
	// sig collects the signature letters of the arguments read, and want
	// is the request signature they must add up to (see done).
	sig, want string
	// reject, when set, is the CK_RV to answer for a request that parsed
	// but carries something the Handler cannot be given.
	reject pkcs11.Error
}

func (d *decoder) fail() {
	if d.err == nil {
		d.err = errMalformed
	}
}

func (d *decoder) remaining() int { return len(d.b) - d.off }

// take returns the next n bytes, capped so that appending to them cannot
// overwrite what follows in the request.
func (d *decoder) take(n int) []byte {
	if d.err != nil || n < 0 || n > d.remaining() {
		d.fail()
		return nil
	}
	p := d.b[d.off : d.off+n : d.off+n]
	d.off += n
	return p
}

func (d *decoder) u8() byte {
	if p := d.take(1); p != nil {
		return p[0]
	}
	return 0
}

func (d *decoder) u32() uint32 {
	if p := d.take(4); p != nil {
		return binary.BigEndian.Uint32(p)
	}
	return 0
}

func (d *decoder) u64() uint64 {
	if p := d.take(8); p != nil {
		return binary.BigEndian.Uint64(p)
	}
	return 0
}

// bytes reads a length-prefixed byte array; null reports the NULL
// marker (then b is nil).
func (d *decoder) bytes() (b []byte, null bool) {
	n := d.u32()
	switch {
	case d.err != nil:
		return nil, false
	case n == nullLen:
		return nil, true
	case n >= maxArrayLen:
		d.fail()
		return nil, false
	}
	return d.take(int(n)), false
}

// ulong reads 'u'.
func (d *decoder) ulong() uint {
	d.sig += "u"
	return uint(d.u64())
}

// byteArg reads 'y'.
func (d *decoder) byteArg() byte {
	d.sig += "y"
	return d.u8()
}

// byteArray reads "ay": a presence byte, then the bytes, or for a NULL
// pointer only the length the caller passed with it (nil is returned).
func (d *decoder) byteArray() []byte {
	d.sig += "ay"
	if d.u8() == 0 {
		d.u32()
		return nil
	}
	b, _ := d.bytes()
	return b
}

// outBuffer is the caller's output buffer as an "fy" or "fu" argument
// describes it.
type outBuffer struct {
	size  uint32 // room, in bytes ("fy") or CK_ULONGs ("fu")
	query bool   // no room at all: the caller asks for the length
}

// byteBuffer reads "fy". 0.24.1 sends 0 both for a NULL buffer and for
// a zero-length one, so 0 is a length query. Later clients send
// 0xffffffff for the zero-length non-NULL buffer; we take that as room
// for nothing, which is what it is.
func (d *decoder) byteBuffer() outBuffer {
	d.sig += "fy"
	switch n := d.u32(); n {
	case 0:
		return outBuffer{query: true}
	case nullLen:
		return outBuffer{}
	default:
		return outBuffer{size: n}
	}
}

// ulongBuffer reads "fu".
func (d *decoder) ulongBuffer() outBuffer {
	d.sig += "fu"
	n := d.u32()
	return outBuffer{size: n, query: n == 0}
}

// attrRequest is one entry of a C_GetAttributeValue template: the type
// and the room the caller has for its value (0 for a NULL pValue).
type attrRequest struct {
	typ  uint
	size uint32
}

// attrBuffer reads "fA".
func (d *decoder) attrBuffer() []attrRequest {
	d.sig += "fA"
	n := d.u32()
	if d.err != nil || uint64(n)*8 > uint64(d.remaining()) {
		d.fail()
		return nil
	}
	reqs := make([]attrRequest, n)
	for i := range reqs {
		reqs[i] = attrRequest{typ: uint(d.u32()), size: d.u32()}
	}
	return reqs
}

// attrArray reads "aA", a template with values.
func (d *decoder) attrArray() []*pkcs11.Attribute {
	d.sig += "aA"
	return d.attributes(false)
}

func (d *decoder) attributes(nested bool) []*pkcs11.Attribute {
	n := d.u32()
	if d.err != nil || uint64(n)*minAttrLen > uint64(d.remaining()) {
		d.fail()
		return nil
	}
	attrs := make([]*pkcs11.Attribute, 0, n)
	for i := uint32(0); i < n && d.err == nil; i++ {
		attrs = append(attrs, d.attribute(nested))
	}
	return attrs
}

func (d *decoder) attribute(nested bool) *pkcs11.Attribute {
	a := &pkcs11.Attribute{Type: uint(d.u32())}
	if d.u8() == 0 {
		// ulValueLen was CK_UNAVAILABLE_INFORMATION, which has no
		// meaning in a template and no form the Handler could get.
		d.rejectWith(pkcs11.CKR_ATTRIBUTE_VALUE_INVALID)
		return a
	}
	// The declared length is the caller's ulValueLen. For the kinds with
	// a fixed wire size it only tells an empty value from a full one;
	// otherwise the encoded value is what counts.
	declared := d.u32()
	switch kindOf(a.Type) {
	case kindBool:
		v := d.u8()
		a.Value = []byte{}
		if declared != 0 {
			a.Value = []byte{v}
		}
	case kindUlong:
		v := d.u64()
		a.Value = []byte{}
		if declared != 0 {
			a.Value = make([]byte, ulongSize)
			putNativeUlong(a.Value, v)
		}
	case kindDate:
		a.Value, _ = d.bytes()
		if len(a.Value) != 0 && len(a.Value) != 8 {
			d.fail()
		}
	case kindMechanism:
		n := d.u32()
		if d.err != nil || uint64(n)*wireUlongLen > uint64(d.remaining()) {
			d.fail()
			return a
		}
		a.Value = make([]byte, int(n)*ulongSize)
		for i := 0; i < int(n); i++ {
			putNativeUlong(a.Value[i*ulongSize:], d.u64())
		}
	case kindTemplate:
		// Parsed only to stay in step with the stream. p11-kit never
		// nests deeper than one level, and neither do we, so that a
		// hostile message cannot recurse.
		if nested {
			d.fail()
			return a
		}
		d.attributes(true)
		d.rejectWith(pkcs11.CKR_ATTRIBUTE_TYPE_INVALID)
	default:
		a.Value, _ = d.bytes()
		if isTemplateType(a.Type) {
			d.rejectWith(pkcs11.CKR_ATTRIBUTE_TYPE_INVALID)
		}
	}
	return a
}

func (d *decoder) rejectWith(rv uint) {
	if d.reject == 0 {
		d.reject = pkcs11.Error(rv)
	}
}

// mechanism reads 'M': a uint32 type, then parameters whose form depends
// on the type. 0.24.1's client sends only mechanisms without parameters
// (parameters as a NULL byte array), RSA-PSS and RSA-OAEP as three
// uint64s (plus the OAEP source data); it refuses every other mechanism
// with CKR_MECHANISM_INVALID before sending. Any other type is read as a
// raw parameter byte array, which is how that client would send one.
func (d *decoder) mechanism() *pkcs11.Mechanism {
	d.sig += "M"
	t, param := d.mechanismParts()
	if d.err != nil {
		return nil
	}
	return pkcs11.NewMechanism(t, param)
}

// mechanismParts returns the type and the parameter in the form
// pkcs11.NewMechanism takes: nil, raw bytes (including RSA-PSS's
// CK_RSA_PKCS_PSS_PARAMS) or *pkcs11.OAEPParams.
func (d *decoder) mechanismParts() (uint, any) {
	t := uint(d.u32())
	switch t {
	case pkcs11.CKM_RSA_PKCS_PSS:
		hash, mgf, salt := d.u64(), d.u64(), d.u64()
		if d.err != nil {
			return t, nil
		}
		return t, pkcs11.NewPSSParams(uint(hash), uint(mgf), uint(salt))
	case pkcs11.CKM_RSA_PKCS_OAEP:
		hash, mgf, source := d.u64(), d.u64(), d.u64()
		data, _ := d.bytes()
		if d.err != nil {
			return t, nil
		}
		return t, pkcs11.NewOAEPParams(uint(hash), uint(mgf), uint(source), data)
	}
	p, _ := d.bytes()
	if len(p) == 0 {
		return t, nil
	}
	return t, p
}

// label reads 'z', C_InitToken's label, and cuts it to the 32 bytes
// PKCS#11 defines: 0.24.1 sends the label up to its first NUL, which for
// a correct, unterminated 32-byte label is followed by whatever lay
// behind it in the client's memory.
func (d *decoder) label() string {
	d.sig += "z"
	b, _ := d.bytes()
	if len(b) > 32 {
		b = b[:32]
	}
	for len(b) > 0 && (b[len(b)-1] == ' ' || b[len(b)-1] == 0) {
		b = b[:len(b)-1]
	}
	return string(b)
}

// done reports whether the request parsed completely: no error, no
// trailing bytes, and the arguments read match the call's signature.
func (d *decoder) done() error {
	switch {
	case d.err != nil:
		return d.err
	case d.off != len(d.b):
		return errMalformed
	case d.sig != d.want:
		return errSignature
	case d.reject != 0:
		return d.reject
	}
	return nil
}

// encoder builds an answer frame. The first frameHeaderLen bytes are
// left for the header so that the frame goes out in one write.
type encoder struct {
	b   []byte
	sig string // signature letters written, checked against the table
}

func newEncoder(id callID, signature string) *encoder {
	e := &encoder{b: make([]byte, frameHeaderLen, 256)}
	e.u32(uint32(id))
	e.bytes([]byte(signature))
	return e
}

func (e *encoder) u8(v byte)    { e.b = append(e.b, v) }
func (e *encoder) u32(v uint32) { e.b = binary.BigEndian.AppendUint32(e.b, v) }
func (e *encoder) u64(v uint64) { e.b = binary.BigEndian.AppendUint64(e.b, v) }

func (e *encoder) bytes(p []byte) {
	e.u32(uint32(len(p)))
	e.b = append(e.b, p...)
}

// ulong writes 'u'.
func (e *encoder) ulong(v uint) {
	e.sig += "u"
	e.u64(uint64(v))
}

// version writes 'v'.
func (e *encoder) version(v pkcs11.Version) {
	e.sig += "v"
	e.u8(v.Major)
	e.u8(v.Minor)
}

// spaceString writes 's': exactly n bytes, blank padded. The client
// refuses any other length. A longer string is cut at a UTF-8 character
// boundary so that the client never gets half a character.
func (e *encoder) spaceString(s string, n int) {
	e.sig += "s"
	if len(s) > n {
		cut := n
		for cut > 0 && s[cut]&0xc0 == 0x80 {
			cut--
		}
		s = s[:cut]
	}
	e.u32(uint32(n))
	e.b = append(e.b, s...)
	for i := len(s); i < n; i++ {
		e.b = append(e.b, ' ')
	}
}

// outBytes writes "ay" as the answer to an "fy" buffer, following
// PKCS#11's rules for output buffers, and reports whether the caller now
// has the result (as opposed to only its length).
//
// The presence byte 0 with a length is how the client learns a length:
// it returns CKR_OK for a NULL buffer and CKR_BUFFER_TOO_SMALL for a
// non-NULL one. An empty result is always sent as present, because the
// client would call even an empty result "too small" for a non-NULL
// buffer otherwise.
func (e *encoder) outBytes(result []byte, buf outBuffer) (delivered bool) {
	e.sig += "ay"
	switch {
	case len(result) == 0:
		e.u8(1)
		e.u32(0)
		return !buf.query
	case buf.query || uint64(len(result)) > uint64(buf.size):
		e.u8(0)
		e.u32(uint32(len(result)))
		return false
	default:
		e.u8(1)
		e.bytes(result)
		return true
	}
}

// outUlongs writes "au" as the answer to an "fu" buffer, by the same
// rules as outBytes.
func (e *encoder) outUlongs(vals []uint, buf outBuffer) {
	e.sig += "au"
	switch {
	case len(vals) == 0:
		e.u8(1)
		e.u32(0)
	case buf.query || uint64(len(vals)) > uint64(buf.size):
		e.u8(0)
		e.u32(uint32(len(vals)))
	default:
		e.u8(1)
		e.u32(uint32(len(vals)))
		for _, v := range vals {
			e.u64(uint64(v))
		}
	}
}

// unavailableAttr writes an attribute with CK_UNAVAILABLE_INFORMATION.
func (e *encoder) unavailableAttr(t uint) {
	e.u32(uint32(t))
	e.u8(0)
}

// attrValue writes an available attribute. The declared length is what
// the caller's ulValueLen becomes, and the client checks its buffer
// against it before decoding, so it must be exactly what decoding
// stores: the value's size for every kind (validValue has checked the
// sizes). With lengthOnly the value itself is left out where the
// encoding allows a NULL in its place (byte arrays and dates); the fixed
// size kinds cost the same either way, and for CKA_ALLOWED_MECHANISMS
// the client reads the elements even when it only wants the length.
func (e *encoder) attrValue(t uint, v []byte, lengthOnly bool) {
	e.u32(uint32(t))
	e.u8(1)
	e.u32(uint32(len(v)))
	switch kindOf(t) {
	case kindBool:
		e.u8(v[0])
	case kindUlong:
		e.u64(nativeUlong(v))
	case kindMechanism:
		n := len(v) / ulongSize
		e.u32(uint32(n))
		for i := 0; i < n; i++ {
			e.u64(nativeUlong(v[i*ulongSize:]))
		}
	default: // bytes and dates
		if lengthOnly {
			e.u32(nullLen)
		} else {
			e.bytes(v)
		}
	}
}

// validValue reports whether v has a size p11-kit can marshal for an
// attribute of type t.
func validValue(t uint, v []byte) bool {
	switch kindOf(t) {
	case kindBool:
		return len(v) == 1
	case kindUlong:
		return len(v) == ulongSize
	case kindDate:
		return len(v) == 0 || len(v) == 8
	case kindMechanism:
		return len(v)%ulongSize == 0 && len(v) < maxArrayLen
	case kindTemplate:
		return false
	}
	return len(v) < maxArrayLen && !isTemplateType(t)
}
