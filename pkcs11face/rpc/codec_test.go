package rpc

import (
	"bytes"
	"errors"
	"strings"
	"testing"

	"github.com/miekg/pkcs11"
)

func TestDecoderPrimitives(t *testing.T) {
	d := &decoder{b: (&wire{}).y(7).u32(0x01020304).u(0x1122334455667788).arr([]byte("ab")).arr(nil).b}
	if v := d.u8(); v != 7 {
		t.Errorf("u8 = %d", v)
	}
	if v := d.u32(); v != 0x01020304 {
		t.Errorf("u32 = %#x", v)
	}
	if v := d.u64(); v != 0x1122334455667788 {
		t.Errorf("u64 = %#x", v)
	}
	if b, null := d.bytes(); string(b) != "ab" || null {
		t.Errorf("bytes = %q, %v", b, null)
	}
	if b, null := d.bytes(); b != nil || !null {
		t.Errorf("NULL array = %q, %v", b, null)
	}
	if d.err != nil || d.remaining() != 0 {
		t.Fatalf("err %v, %d left", d.err, d.remaining())
	}
	// Reading past the end fails, and stays failed.
	if d.u32(); d.err == nil {
		t.Fatal("read past the end did not fail")
	}
	d.b = append(d.b, 1, 2, 3, 4)
	if d.u32(); !errors.Is(d.err, errMalformed) {
		t.Fatal("error did not stick")
	}
}

func TestDecoderBytesLimits(t *testing.T) {
	for _, tc := range []struct {
		name string
		in   []byte
	}{
		{"length past the end", (&wire{}).u32(5).raw(1, 2).b},
		{"length 0x7fffffff", (&wire{}).u32(0x7fffffff).b},
		{"length 0xfffffffe", (&wire{}).u32(0xfffffffe).b},
		{"no length", []byte{0, 0}},
	} {
		d := &decoder{b: tc.in}
		if b, _ := d.bytes(); b != nil || d.err == nil {
			t.Errorf("%s: got %q, err %v", tc.name, b, d.err)
		}
	}
	// The returned slice cannot grow over what follows it.
	d := &decoder{b: (&wire{}).arr([]byte("ab")).raw('z').b}
	b, _ := d.bytes()
	_ = append(b, 'X')
	if d.b[len(d.b)-1] != 'z' {
		t.Error("appending to a decoded slice overwrote the request")
	}
}

func TestDecoderArguments(t *testing.T) {
	t.Run("ay", func(t *testing.T) {
		d := &decoder{b: (&wire{}).ay([]byte("pin")).ayNull(6).ay(nil).y(1).arr(nil).b}
		got := [][]byte{d.byteArray(), d.byteArray(), d.byteArray(), d.byteArray()}
		if string(got[0]) != "pin" || got[1] != nil || got[2] == nil || len(got[2]) != 0 || got[3] != nil {
			t.Errorf("got %q", got)
		}
		if d.err != nil || d.sig != "ayayayay" {
			t.Errorf("err %v sig %q", d.err, d.sig)
		}
	})
	t.Run("fy", func(t *testing.T) {
		d := &decoder{b: (&wire{}).u32(0).u32(0xffffffff).u32(256).b}
		want := []outBuffer{{query: true}, {size: 0}, {size: 256}}
		for i, w := range want {
			if got := d.byteBuffer(); got != w {
				t.Errorf("fy #%d = %+v, want %+v", i, got, w)
			}
		}
	})
	t.Run("fu", func(t *testing.T) {
		d := &decoder{b: (&wire{}).u32(0).u32(3).b}
		if got := d.ulongBuffer(); got != (outBuffer{query: true}) {
			t.Errorf("fu 0 = %+v", got)
		}
		if got := d.ulongBuffer(); got != (outBuffer{size: 3}) {
			t.Errorf("fu 3 = %+v", got)
		}
	})
	t.Run("fA", func(t *testing.T) {
		d := &decoder{b: (&wire{}).u32(2).u32(3).u32(0).u32(0x11).u32(256).b}
		got := d.attrBuffer()
		if d.err != nil || len(got) != 2 || got[0] != (attrRequest{3, 0}) || got[1] != (attrRequest{0x11, 256}) {
			t.Errorf("got %+v, err %v", got, d.err)
		}
		// A count the bytes cannot hold fails before allocating.
		d = &decoder{b: (&wire{}).u32(0xffffffff).u32(1).b}
		if got := d.attrBuffer(); got != nil || d.err == nil {
			t.Errorf("huge count: %d entries, err %v", len(got), d.err)
		}
	})
	t.Run("z", func(t *testing.T) {
		for in, want := range map[string]string{
			"label":                                  "label",
			"label" + strings.Repeat(" ", 27):        "label",
			"label" + strings.Repeat(" ", 27) + "xx": "label",
			strings.Repeat("L", 40):                  strings.Repeat("L", 32),
			"nul\x00\x00":                            "nul",
		} {
			d := &decoder{b: (&wire{}).arr([]byte(in)).b}
			if got := d.label(); got != want || d.err != nil {
				t.Errorf("label(%q) = %q, %v; want %q", in, got, d.err, want)
			}
		}
	})
	t.Run("done", func(t *testing.T) {
		d := &decoder{b: (&wire{}).u(1).b, want: "u"}
		d.ulong()
		if err := d.done(); err != nil {
			t.Errorf("done: %v", err)
		}
		d = &decoder{b: (&wire{}).u(1).y(0).b, want: "u"}
		d.ulong()
		if err := d.done(); !errors.Is(err, errMalformed) {
			t.Errorf("trailing byte: %v", err)
		}
		d = &decoder{b: (&wire{}).u(1).b, want: "y"}
		d.ulong()
		if err := d.done(); !errors.Is(err, errSignature) {
			t.Errorf("wrong signature: %v", err)
		}
	})
}

func TestDecoderTemplates(t *testing.T) {
	mechs := make([]byte, 0, 2*ulongSize)
	mechs = append(append(mechs, ulongBytes(pkcs11.CKM_RSA_PKCS)...), ulongBytes(pkcs11.CKM_ECDSA)...)
	tests := []struct {
		name   string
		in     *wire
		want   []*pkcs11.Attribute
		reject uint // CK_RV the call is answered with; 0 if accepted
		bad    bool // malformed
	}{
		{name: "kinds", in: (&wire{}).u32(6).
			attrBool(pkcs11.CKA_SIGN, true).
			attrUlong(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_EC).
			attrBytes(pkcs11.CKA_ID, []byte{1, 2}).
			u32(pkcs11.CKA_START_DATE).y(1).u32(8).arr([]byte("20240131")).
			u32(pkcs11.CKA_ALLOWED_MECHANISMS).y(1).u32(16).u32(2).u(pkcs11.CKM_RSA_PKCS).u(pkcs11.CKM_ECDSA).
			attrBytes(pkcs11.CKA_DESTROYABLE, []byte{0}), // not in p11-kit's list: a byte array
			want: []*pkcs11.Attribute{
				{Type: pkcs11.CKA_SIGN, Value: []byte{1}},
				{Type: pkcs11.CKA_KEY_TYPE, Value: ulongBytes(pkcs11.CKK_EC)},
				{Type: pkcs11.CKA_ID, Value: []byte{1, 2}},
				{Type: pkcs11.CKA_START_DATE, Value: []byte("20240131")},
				{Type: pkcs11.CKA_ALLOWED_MECHANISMS, Value: mechs},
				{Type: pkcs11.CKA_DESTROYABLE, Value: []byte{0}},
			}},
		{name: "empty and NULL values", in: (&wire{}).u32(4).
			u32(pkcs11.CKA_TOKEN).y(1).u32(0).y(0).
			u32(pkcs11.CKA_CLASS).y(1).u32(0).u(0).
			u32(pkcs11.CKA_LABEL).y(1).u32(0).arr([]byte{}).
			u32(pkcs11.CKA_VALUE).y(1).u32(5).arr(nil),
			want: []*pkcs11.Attribute{
				{Type: pkcs11.CKA_TOKEN, Value: []byte{}},
				{Type: pkcs11.CKA_CLASS, Value: []byte{}},
				{Type: pkcs11.CKA_LABEL, Value: []byte{}},
				{Type: pkcs11.CKA_VALUE},
			}},
		{name: "unavailable value", in: (&wire{}).u32(1).u32(pkcs11.CKA_LABEL).y(0),
			reject: pkcs11.CKR_ATTRIBUTE_VALUE_INVALID},
		{name: "wrap template", in: (&wire{}).u32(2).
			u32(pkcs11.CKA_WRAP_TEMPLATE).y(1).u32(48).u32(1).attrBool(pkcs11.CKA_SIGN, true).
			attrBytes(pkcs11.CKA_ID, []byte{1}),
			reject: pkcs11.CKR_ATTRIBUTE_TYPE_INVALID},
		{name: "derive template", in: (&wire{}).u32(1).attrBytes(pkcs11.CKA_DERIVE_TEMPLATE, []byte("pointers")),
			reject: pkcs11.CKR_ATTRIBUTE_TYPE_INVALID},
		{name: "nested template", in: (&wire{}).u32(1).
			u32(pkcs11.CKA_WRAP_TEMPLATE).y(1).u32(48).u32(1).
			u32(pkcs11.CKA_UNWRAP_TEMPLATE).y(1).u32(0).u32(0),
			bad: true},
		{name: "bad date", in: (&wire{}).u32(1).u32(pkcs11.CKA_END_DATE).y(1).u32(3).arr([]byte("202")), bad: true},
		{name: "huge count", in: (&wire{}).u32(0xffffffff).attrBool(pkcs11.CKA_SIGN, true), bad: true},
		{name: "huge mechanism count", in: (&wire{}).u32(1).u32(pkcs11.CKA_ALLOWED_MECHANISMS).y(1).u32(8).u32(0x20000000).u(1), bad: true},
		{name: "cut short", in: (&wire{}).u32(1).u32(pkcs11.CKA_CLASS).y(1).u32(8).raw(0, 0), bad: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			d := &decoder{b: tc.in.b, want: "aA"}
			got := d.attrArray()
			err := d.done()
			switch {
			case tc.bad:
				if !errors.Is(err, errMalformed) {
					t.Errorf("err %v, want malformed", err)
				}
			case tc.reject != 0:
				if err != pkcs11.Error(tc.reject) {
					t.Errorf("err %v, want %v", err, pkcs11.Error(tc.reject))
				}
			default:
				if err != nil {
					t.Fatalf("err %v", err)
				}
				if len(got) != len(tc.want) {
					t.Fatalf("%d attributes, want %d", len(got), len(tc.want))
				}
				for i := range got {
					if got[i].Type != tc.want[i].Type || !bytes.Equal(got[i].Value, tc.want[i].Value) ||
						(got[i].Value == nil) != (tc.want[i].Value == nil) {
						t.Errorf("#%d = %#x %x, want %#x %x", i, got[i].Type, got[i].Value, tc.want[i].Type, tc.want[i].Value)
					}
				}
			}
		})
	}
}

func TestDecoderMechanism(t *testing.T) {
	t.Run("no parameter", func(t *testing.T) {
		d := &decoder{b: (&wire{}).mech(pkcs11.CKM_SHA256_RSA_PKCS, nil).b}
		typ, p := d.mechanismParts()
		if typ != pkcs11.CKM_SHA256_RSA_PKCS || p != nil || d.err != nil {
			t.Errorf("got %#x %v %v", typ, p, d.err)
		}
	})
	t.Run("raw parameter", func(t *testing.T) {
		d := &decoder{b: (&wire{}).mech(pkcs11.CKM_AES_CBC, []byte("0123456789abcdef")).b}
		m := d.mechanism()
		if m.Mechanism != pkcs11.CKM_AES_CBC || string(m.Parameter) != "0123456789abcdef" || d.sig != "M" {
			t.Errorf("got %#x %q", m.Mechanism, m.Parameter)
		}
	})
	t.Run("PSS", func(t *testing.T) {
		d := &decoder{b: (&wire{}).u32(pkcs11.CKM_RSA_PKCS_PSS).u(pkcs11.CKM_SHA384).u(pkcs11.CKG_MGF1_SHA384).u(48).b}
		m := d.mechanism()
		if want := pkcs11.NewPSSParams(pkcs11.CKM_SHA384, pkcs11.CKG_MGF1_SHA384, 48); !bytes.Equal(m.Parameter, want) {
			t.Errorf("PSS parameter %x, want %x", m.Parameter, want)
		}
	})
	t.Run("OAEP", func(t *testing.T) {
		d := &decoder{b: (&wire{}).u32(pkcs11.CKM_RSA_PKCS_OAEP).u(pkcs11.CKM_SHA256).u(pkcs11.CKG_MGF1_SHA256).
			u(pkcs11.CKZ_DATA_SPECIFIED).arr([]byte("label")).b}
		_, p := d.mechanismParts()
		want := pkcs11.NewOAEPParams(pkcs11.CKM_SHA256, pkcs11.CKG_MGF1_SHA256, pkcs11.CKZ_DATA_SPECIFIED, []byte("label"))
		got, ok := p.(*pkcs11.OAEPParams)
		if !ok || got.HashAlg != want.HashAlg || got.MGF != want.MGF || got.SourceType != want.SourceType ||
			!bytes.Equal(got.SourceData, want.SourceData) {
			t.Errorf("OAEP %+v, want %+v", p, want)
		}
	})
	t.Run("cut short", func(t *testing.T) {
		d := &decoder{b: (&wire{}).u32(pkcs11.CKM_RSA_PKCS_PSS).u(1).b}
		if m := d.mechanism(); m != nil || d.err == nil {
			t.Errorf("got %v, err %v", m, d.err)
		}
	})
}

func TestEncoder(t *testing.T) {
	t.Run("header", func(t *testing.T) {
		e := newEncoder(callGetInfo, "vsusv")
		want := append(make([]byte, frameHeaderLen), (&wire{}).u32(uint32(callGetInfo)).arr([]byte("vsusv")).b...)
		if !bytes.Equal(e.b, want) {
			t.Errorf("got %x", e.b)
		}
	})
	t.Run("space string", func(t *testing.T) {
		for _, tc := range []struct {
			in   string
			n    int
			want string
		}{
			{"abc", 5, "abc  "},
			{"", 3, "   "},
			{"abcdef", 4, "abcd"},
			{"ab€", 4, "ab  "}, // € is 3 bytes: cut before it, not inside
			{"a€", 4, "a€"},
		} {
			e := &encoder{}
			e.spaceString(tc.in, tc.n)
			if want := (&wire{}).arr([]byte(tc.want)).b; !bytes.Equal(e.b, want) {
				t.Errorf("spaceString(%q, %d) = %q, want %q", tc.in, tc.n, e.b[4:], tc.want)
			}
		}
	})
	t.Run("output bytes", func(t *testing.T) {
		for _, tc := range []struct {
			name      string
			result    []byte
			buf       outBuffer
			want      []byte
			delivered bool
		}{
			{"query", []byte("sig"), outBuffer{query: true}, (&wire{}).ayNull(3).b, false},
			{"fits", []byte("sig"), outBuffer{size: 3}, (&wire{}).ay([]byte("sig")).b, true},
			{"roomy", []byte("sig"), outBuffer{size: 300}, (&wire{}).ay([]byte("sig")).b, true},
			{"too small", []byte("sig"), outBuffer{size: 2}, (&wire{}).ayNull(3).b, false},
			{"zero room", []byte("sig"), outBuffer{}, (&wire{}).ayNull(3).b, false},
			{"empty, query", nil, outBuffer{query: true}, (&wire{}).ay(nil).b, false},
			{"empty, zero room", nil, outBuffer{}, (&wire{}).ay(nil).b, true},
		} {
			e := &encoder{}
			if got := e.outBytes(tc.result, tc.buf); got != tc.delivered || !bytes.Equal(e.b, tc.want) {
				t.Errorf("%s: %x delivered=%v; want %x %v", tc.name, e.b, got, tc.want, tc.delivered)
			}
		}
	})
	t.Run("output ulongs", func(t *testing.T) {
		for _, tc := range []struct {
			name string
			vals []uint
			buf  outBuffer
			want []byte
		}{
			{"query", []uint{1, 2}, outBuffer{query: true}, (&wire{}).auNull(2).b},
			{"fits", []uint{1, 2}, outBuffer{size: 2}, (&wire{}).au(1, 2).b},
			{"too small", []uint{1, 2}, outBuffer{size: 1}, (&wire{}).auNull(2).b},
			{"empty", nil, outBuffer{query: true}, (&wire{}).au().b},
		} {
			e := &encoder{}
			if e.outUlongs(tc.vals, tc.buf); !bytes.Equal(e.b, tc.want) {
				t.Errorf("%s: %x, want %x", tc.name, e.b, tc.want)
			}
		}
	})
}

func TestAttrKinds(t *testing.T) {
	for typ, want := range map[uint]attrKind{
		pkcs11.CKA_TOKEN:               kindBool,
		pkcs11.CKA_ALWAYS_AUTHENTICATE: kindBool,
		pkcs11.CKA_DESTROYABLE:         kindBytes, // PKCS#11 says CK_BBOOL; p11-kit 0.24.1 does not know it
		pkcs11.CKA_CLASS:               kindUlong,
		pkcs11.CKA_MODULUS_BITS:        kindUlong,
		pkcs11.CKA_VALUE:               kindBytes,
		pkcs11.CKA_LABEL:               kindBytes,
		pkcs11.CKA_START_DATE:          kindDate,
		pkcs11.CKA_ALLOWED_MECHANISMS:  kindMechanism,
		pkcs11.CKA_WRAP_TEMPLATE:       kindTemplate,
		pkcs11.CKA_DERIVE_TEMPLATE:     kindBytes,
		pkcs11.CKA_VENDOR_DEFINED | 1:  kindBytes,
	} {
		if got := kindOf(typ); got != want {
			t.Errorf("kindOf(%#x) = %d, want %d", typ, got, want)
		}
	}
	for _, tc := range []struct {
		typ  uint
		v    []byte
		want bool
	}{
		{pkcs11.CKA_SIGN, []byte{1}, true},
		{pkcs11.CKA_SIGN, nil, false},
		{pkcs11.CKA_SIGN, []byte{1, 0}, false},
		{pkcs11.CKA_CLASS, ulongBytes(1), true},
		{pkcs11.CKA_CLASS, []byte{1, 0, 0, 0}, ulongSize == 4},
		{pkcs11.CKA_END_DATE, nil, true},
		{pkcs11.CKA_END_DATE, []byte("20240101"), true},
		{pkcs11.CKA_END_DATE, []byte("2024"), false},
		{pkcs11.CKA_ALLOWED_MECHANISMS, make([]byte, 3*ulongSize), true},
		{pkcs11.CKA_ALLOWED_MECHANISMS, make([]byte, 3), false},
		{pkcs11.CKA_WRAP_TEMPLATE, nil, false},
		{pkcs11.CKA_DERIVE_TEMPLATE, nil, false},
		{pkcs11.CKA_VALUE, nil, true},
	} {
		if got := validValue(tc.typ, tc.v); got != tc.want {
			t.Errorf("validValue(%#x, %x) = %v", tc.typ, tc.v, got)
		}
	}
}
