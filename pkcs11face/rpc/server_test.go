package rpc

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/miekg/pkcs11"
)

func signRequest(sh uint64, data string, room uint32) []byte {
	return request(callSign).u(sh).ay([]byte(data)).u32(room).b
}

var (
	signLength = response(callSign).ayNull(4).b
	signResult = response(callSign).ay([]byte("sign")).b
)

func expect(t *testing.T, what string, got, want []byte) {
	t.Helper()
	if !bytes.Equal(got, want) {
		t.Errorf("%s: answer\n got %x\nwant %x", what, got, want)
	}
}

// The Handler computes a signature once; the length query, a too small
// buffer and the final fetch all see that one result.
func TestLengthQueryKeepsResult(t *testing.T) {
	r := &recorder{}
	cl := startServer(t, r, Options{}, true)
	expect(t, "query", cl.call(signRequest(5, "msg", 0)), signLength)
	expect(t, "too small", cl.call(signRequest(5, "msg", 2)), signLength)
	expect(t, "query again", cl.call(signRequest(5, "msg", 0)), signLength)
	expect(t, "fetch", cl.call(signRequest(5, "msg", 4)), signResult)
	if n := r.n("Sign"); n != 1 {
		t.Fatalf("Sign reached the Handler %d times, want 1", n)
	}
	// Taken: the same request again is a new call.
	expect(t, "new call", cl.call(signRequest(5, "msg", 100)), signResult)
	if n := r.n("Sign"); n != 2 {
		t.Fatalf("Sign reached the Handler %d times, want 2", n)
	}
	// Other data than the query's is a new call too.
	cl.call(signRequest(5, "msg", 0))
	expect(t, "other data", cl.call(signRequest(5, "other", 100)), signResult)
	if n := r.n("Sign"); n != 4 {
		t.Fatalf("Sign reached the Handler %d times, want 4", n)
	}
}

func TestLengthQueryFinal(t *testing.T) {
	r := &recorder{}
	cl := startServer(t, r, Options{}, true)
	req := func(room uint32) []byte { return request(callSignFinal).u(5).u32(room).b }
	expect(t, "query", cl.call(req(0)), response(callSignFinal).ayNull(9).b)
	expect(t, "fetch", cl.call(req(9)), response(callSignFinal).ay([]byte("signfinal")).b)
	if n := r.n("SignFinal"); n != 1 {
		t.Fatalf("SignFinal reached the Handler %d times, want 1", n)
	}
}

// A kept result never outlives its operation or session.
func TestLengthQueryForgotten(t *testing.T) {
	for _, tc := range []struct {
		name    string
		between [][]byte
	}{
		{"SignInit", [][]byte{request(callSignInit).u(5).mech(pkcs11.CKM_RSA_PKCS, nil).u(9).b}},
		{"CloseSession", [][]byte{request(callCloseSession).u(5).b}},
		{"CloseAllSessions", [][]byte{request(callCloseAllSessions).u(1).b}},
		{"Finalize", [][]byte{request(callFinalize).b, initializeRequest().b}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := &recorder{}
			cl := startServer(t, r, Options{}, true)
			cl.call(signRequest(5, "msg", 0))
			for _, b := range tc.between {
				if got := cl.call(b); binary.BigEndian.Uint32(got) == uint32(callError) {
					t.Fatalf("in between: error answer %x", got)
				}
			}
			expect(t, "fetch", cl.call(signRequest(5, "msg", 4)), signResult)
			if n := r.n("Sign"); n != 2 {
				t.Errorf("Sign reached the Handler %d times, want 2", n)
			}
		})
	}
	t.Run("other session untouched", func(t *testing.T) {
		r := &recorder{}
		cl := startServer(t, r, Options{}, true)
		cl.call(signRequest(5, "msg", 0))
		cl.call(request(callSignInit).u(6).mech(pkcs11.CKM_RSA_PKCS, nil).u(9).b)
		cl.call(request(callCloseSession).u(7).b)
		cl.call(request(callEncryptInit).u(5).mech(pkcs11.CKM_RSA_PKCS, nil).u(9).b)
		expect(t, "fetch", cl.call(signRequest(5, "msg", 4)), signResult)
		if n := r.n("Sign"); n != 1 {
			t.Errorf("Sign reached the Handler %d times, want 1", n)
		}
	})
}

func TestLengthQueryEviction(t *testing.T) {
	r := &recorder{}
	cl := startServer(t, r, Options{}, true)
	for sh := uint64(1); sh <= maxPending+1; sh++ {
		cl.call(signRequest(sh, "msg", 0))
	}
	cl.call(signRequest(maxPending+1, "msg", 4))
	if n := r.n("Sign"); n != maxPending+1 {
		t.Fatalf("newest kept result not used: %d Handler calls", n)
	}
	cl.call(signRequest(1, "msg", 4))
	if n := r.n("Sign"); n != maxPending+2 {
		t.Fatalf("oldest kept result not evicted: %d Handler calls", n)
	}
}

func TestGetAttributeValueRules(t *testing.T) {
	const (
		label = pkcs11.CKA_LABEL
		value = pkcs11.CKA_VALUE
		id    = pkcs11.CKA_ID
	)
	sensitive := pkcs11.Error(pkcs11.CKR_ATTRIBUTE_SENSITIVE)
	invalid := pkcs11.Error(pkcs11.CKR_ATTRIBUTE_TYPE_INVALID)
	mechs := append(ulongBytes(pkcs11.CKM_RSA_PKCS), ulongBytes(pkcs11.CKM_ECDSA)...)
	type want struct {
		attrs *wire
		rv    uint
	}
	for _, tc := range []struct {
		name  string
		reqs  []attrRequest
		attrs []AttributeResult
		want  want
	}{
		{"length only", []attrRequest{{label, 0}}, []AttributeResult{{Value: []byte("label")}},
			want{(&wire{}).u32(label).y(1).u32(5).u32(0xffffffff), pkcs11.CKR_OK}},
		{"fits", []attrRequest{{label, 5}}, []AttributeResult{{Value: []byte("label")}},
			want{(&wire{}).u32(label).y(1).u32(5).arr([]byte("label")), pkcs11.CKR_OK}},
		{"too small", []attrRequest{{label, 4}}, []AttributeResult{{Value: []byte("label")}},
			want{(&wire{}).u32(label).y(0), pkcs11.CKR_BUFFER_TOO_SMALL}},
		{"empty", []attrRequest{{label, 0}}, []AttributeResult{{Value: []byte{}}},
			want{(&wire{}).u32(label).y(1).u32(0).arr([]byte{}), pkcs11.CKR_OK}},
		{"sensitive", []attrRequest{{value, 0}}, []AttributeResult{{Err: sensitive}},
			want{(&wire{}).u32(value).y(0), pkcs11.CKR_ATTRIBUTE_SENSITIVE}},
		{"type invalid", []attrRequest{{id, 0}}, []AttributeResult{{Err: fmt.Errorf("no id: %w", invalid)}},
			want{(&wire{}).u32(id).y(0), pkcs11.CKR_ATTRIBUTE_TYPE_INVALID}},
		{"mixed", []attrRequest{{label, 1}, {value, 100}, {id, 100}, {pkcs11.CKA_SIGN, 1}},
			[]AttributeResult{{Value: []byte("label")}, {Err: sensitive}, {Err: invalid}, {Value: []byte{1}}},
			want{(&wire{}).u32(label).y(0).u32(value).y(0).u32(id).y(0).u32(pkcs11.CKA_SIGN).y(1).u32(1).y(1),
				pkcs11.CKR_ATTRIBUTE_SENSITIVE}},
		{"bool", []attrRequest{{pkcs11.CKA_SIGN, 0}}, []AttributeResult{{Value: []byte{1}}},
			want{(&wire{}).u32(pkcs11.CKA_SIGN).y(1).u32(1).y(1), pkcs11.CKR_OK}},
		{"ulong", []attrRequest{{pkcs11.CKA_CLASS, 0}}, []AttributeResult{{Value: ulongBytes(3)}},
			want{(&wire{}).u32(pkcs11.CKA_CLASS).y(1).u32(8).u(3), pkcs11.CKR_OK}},
		{"ulong too small", []attrRequest{{pkcs11.CKA_CLASS, 4}}, []AttributeResult{{Value: ulongBytes(3)}},
			want{(&wire{}).u32(pkcs11.CKA_CLASS).y(0), pkcs11.CKR_BUFFER_TOO_SMALL}},
		{"date", []attrRequest{{pkcs11.CKA_START_DATE, 8}}, []AttributeResult{{Value: []byte("20240131")}},
			want{(&wire{}).u32(pkcs11.CKA_START_DATE).y(1).u32(8).arr([]byte("20240131")), pkcs11.CKR_OK}},
		{"date length", []attrRequest{{pkcs11.CKA_START_DATE, 0}}, []AttributeResult{{Value: []byte("20240131")}},
			want{(&wire{}).u32(pkcs11.CKA_START_DATE).y(1).u32(8).u32(0xffffffff), pkcs11.CKR_OK}},
		// The client reads the elements even when it asks for the length.
		{"mechanisms length", []attrRequest{{pkcs11.CKA_ALLOWED_MECHANISMS, 0}}, []AttributeResult{{Value: mechs}},
			want{(&wire{}).u32(pkcs11.CKA_ALLOWED_MECHANISMS).y(1).u32(16).u32(2).u(pkcs11.CKM_RSA_PKCS).u(pkcs11.CKM_ECDSA),
				pkcs11.CKR_OK}},
		{"value of the wrong size", []attrRequest{{pkcs11.CKA_SIGN, 8}}, []AttributeResult{{Value: []byte{1, 0}}},
			want{(&wire{}).u32(pkcs11.CKA_SIGN).y(0), pkcs11.CKR_ATTRIBUTE_TYPE_INVALID}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := &recorder{attrs: tc.attrs}
			cl := startServer(t, r, Options{}, true)
			req := request(callGetAttributeValue).u(5).u(9).u32(uint32(len(tc.reqs)))
			for _, q := range tc.reqs {
				req.u32(uint32(q.typ)).u32(q.size)
			}
			want := response(callGetAttributeValue).u32(uint32(len(tc.reqs))).raw(tc.want.attrs.b...).u(uint64(tc.want.rv)).b
			expect(t, tc.name, cl.call(req.b), want)
		})
	}

	for _, tc := range []struct {
		name    string
		typ     uint32
		attrs   []AttributeResult
		err     error
		rv      uint
		handler bool // whether the Handler is reached
	}{
		{"template attribute", pkcs11.CKA_WRAP_TEMPLATE, nil, nil, pkcs11.CKR_ATTRIBUTE_TYPE_INVALID, false},
		{"Handler error", label, nil, pkcs11.Error(pkcs11.CKR_OBJECT_HANDLE_INVALID), pkcs11.CKR_OBJECT_HANDLE_INVALID, true},
		{"result count", label, []AttributeResult{{}, {}}, nil, pkcs11.CKR_GENERAL_ERROR, true},
		{"other attribute error", label, []AttributeResult{{Err: pkcs11.Error(pkcs11.CKR_DEVICE_REMOVED)}}, nil,
			pkcs11.CKR_DEVICE_REMOVED, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := &recorder{attrs: tc.attrs, err: tc.err}
			cl := startServer(t, r, Options{}, true)
			req := request(callGetAttributeValue).u(5).u(9).u32(1).u32(tc.typ).u32(0)
			expect(t, tc.name, cl.call(req.b), errorBody(tc.rv))
			if got := r.n("GetAttributeValue") == 1; got != tc.handler {
				t.Errorf("Handler reached: %v, want %v", got, tc.handler)
			}
		})
	}
}

func TestMalformedRequests(t *testing.T) {
	r := &recorder{}
	cl := startServer(t, r, Options{}, true)
	deviceError := errorBody(pkcs11.CKR_DEVICE_ERROR)
	for name, body := range map[string][]byte{
		"empty":               {},
		"call 0":              msg(callError, "u").u(0).b,
		"call past the table": msg(callMax, "").b,
		"call 0xffffffff":     (&wire{}).u32(0xffffffff).arr(nil).b,
		"wrong signature":     msg(callGetSlotInfo, "y").y(1).b,
		"NULL signature":      (&wire{}).u32(uint32(callGetInfo)).arr(nil).b,
		"signature too long":  (&wire{}).u32(uint32(callGetInfo)).u32(1000).b,
		"wrong types":         request(callGetSlotInfo).y(1).b,
	} {
		expect(t, name, cl.call(body), deviceError)
	}
	if log := r.calls(); len(log) != 0 {
		t.Errorf("malformed requests reached the Handler: %q", log)
	}
	expect(t, "then a good call", cl.call(request(callGetSlotList).y(0).u32(0).b), response(callGetSlotList).auNull(2).b)
}

func TestInitializeFinalize(t *testing.T) {
	r := &recorder{}
	cl := startServer(t, r, Options{}, false)
	notInit := errorBody(pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED)
	expect(t, "call before C_Initialize", cl.call(request(callGetInfo).b), notInit)
	expect(t, "C_Finalize before C_Initialize", cl.call(request(callFinalize).b), notInit)
	expect(t, "wrong handshake",
		cl.call(request(callInitialize).ay([]byte("PRIVATE-GNOME-KEYRING-PKCS11-PROTOCOL-V-2")).y(0).ay([]byte{0}).b),
		errorBody(pkcs11.CKR_GENERAL_ERROR))
	expect(t, "C_Initialize with a reserved string",
		cl.call(request(callInitialize).ay([]byte(handshake)).y(1).ay([]byte("conf\x00")).b), response(callInitialize).b)
	expect(t, "C_Initialize again", cl.call(initializeRequest().b), errorBody(pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED))
	expect(t, "call", cl.call(request(callGetSlotList).y(0).u32(0).b), response(callGetSlotList).auNull(2).b)
	expect(t, "C_Finalize", cl.call(request(callFinalize).b), response(callFinalize).b)
	expect(t, "call after C_Finalize", cl.call(request(callGetInfo).b), notInit)
	if log := r.calls(); len(log) != 1 {
		t.Errorf("Handler calls %q, want only the GetSlotList", log)
	}
}

func TestOversizedFrame(t *testing.T) {
	r := &recorder{}
	cl := startServer(t, r, Options{MaxMessageSize: 1024}, true)
	big := request(callDigestUpdate).u(5).ay(make([]byte, 4096)).b
	expect(t, "oversized", cl.call(big), errorBody(pkcs11.CKR_DEVICE_MEMORY))
	expect(t, "after it", cl.call(request(callDigestUpdate).u(5).ay([]byte("x")).b), response(callDigestUpdate).b)
	if n := r.n("DigestUpdate"); n != 1 {
		t.Errorf("DigestUpdate reached the Handler %d times, want 1", n)
	}
}

// allocated returns the bytes allocated while f runs (by the whole
// process, so it is an upper bound).
func allocated(f func()) uint64 {
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	f()
	runtime.ReadMemStats(&after)
	return after.TotalAlloc - before.TotalAlloc
}

// Lengths and counts from the client are checked against the bytes that
// are really there before anything is allocated by them.
func TestHostileLengths(t *testing.T) {
	r := &recorder{}
	cl := startServer(t, r, Options{}, true)
	deviceError := errorBody(pkcs11.CKR_DEVICE_ERROR)
	cases := map[string][]byte{
		"template count":          request(callCreateObject).u(5).u32(0xffffffff).b,
		"attribute request count": request(callGetAttributeValue).u(5).u(9).u32(0xffffffff).u32(3).u32(0).b,
		"byte array length":       request(callDigestUpdate).u(5).y(1).u32(0x7ffffffe).b,
		"mechanism list count":    request(callCreateObject).u(5).u32(1).u32(pkcs11.CKA_ALLOWED_MECHANISMS).y(1).u32(8).u32(0xffffffff).b,
		"nested template count":   request(callCreateObject).u(5).u32(1).u32(pkcs11.CKA_WRAP_TEMPLATE).y(1).u32(8).u32(0xffffffff).b,
		"OAEP source length":      request(callDecryptInit).u(5).u32(pkcs11.CKM_RSA_PKCS_OAEP).u(1).u(1).u(1).u32(0x7000000).u(9).b,
	}
	n := allocated(func() {
		for name, body := range cases {
			expect(t, name, cl.call(body), deviceError)
		}
	})
	if n > 1<<20 {
		t.Errorf("hostile lengths made the server allocate %d bytes", n)
	}
	expect(t, "GenerateRandom beyond the limit", cl.call(request(callGenerateRandom).u(5).u32(0xfffffff0).b),
		errorBody(pkcs11.CKR_DEVICE_MEMORY))
	if log := r.calls(); len(log) != 0 {
		t.Errorf("hostile requests reached the Handler: %q", log)
	}
}

// A frame header announcing 4 GiB is skipped as it streams in, not
// buffered.
func TestHugeFrameNotBuffered(t *testing.T) {
	cl := startServer(t, &recorder{}, Options{}, true)
	chunk := make([]byte, 64<<10)
	n := allocated(func() {
		hdr := binary.BigEndian.AppendUint32(nil, 99)
		hdr = binary.BigEndian.AppendUint32(hdr, 0)
		hdr = binary.BigEndian.AppendUint32(hdr, 0xffffffff)
		cl.c.Write(hdr)
		for range 64 { // 4 MiB of the announced 4 GiB
			if _, err := cl.c.Write(chunk); err != nil {
				t.Fatal(err)
			}
		}
		cl.c.Close()
		cl.serveResult()
	})
	if err := cl.serveResult(); !errors.Is(err, ErrBrokenStream) {
		t.Errorf("Serve returned %v, want ErrBrokenStream", err)
	}
	if n > 2<<20 {
		t.Errorf("a 4 GiB frame header made the server allocate %d bytes", n)
	}
}

func TestStreamEnd(t *testing.T) {
	frame := func(body []byte) []byte {
		f := binary.BigEndian.AppendUint32(nil, 16)
		f = binary.BigEndian.AppendUint32(f, 0)
		f = binary.BigEndian.AppendUint32(f, uint32(len(body)))
		return append(f, body...)
	}
	init := frame(initializeRequest().b)
	for _, tc := range []struct {
		name    string
		version bool   // send the version byte and read the answer
		stream  []byte // then send this
		answer  bool   // and read one answer frame
		broken  bool
	}{
		{name: "nothing"},
		{name: "version only", version: true},
		{name: "between frames", version: true, stream: init, answer: true},
		{name: "in a header", version: true, stream: init[:7], broken: true},
		{name: "in a body", version: true, stream: init[:len(init)-3], broken: true},
		{name: "in the options", version: true, stream: []byte{0, 0, 0, 16, 0, 0, 0, 6, 0, 0, 0, 0, 'c'}, broken: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, b := socketPair(t)
			done := make(chan error, 1)
			go func() { done <- Serve(context.Background(), b, &recorder{}, Options{Logger: quietLogger()}) }()
			a.SetDeadline(time.Now().Add(5 * time.Second))
			if tc.version {
				a.Write([]byte{0})
				io.ReadFull(a, make([]byte, 1))
			}
			a.Write(tc.stream)
			if tc.answer {
				var hdr [12]byte
				io.ReadFull(a, hdr[:])
				io.ReadFull(a, make([]byte, binary.BigEndian.Uint32(hdr[8:])))
			}
			a.Close()
			select {
			case err := <-done:
				if tc.broken != errors.Is(err, ErrBrokenStream) || (!tc.broken && err != nil) {
					t.Errorf("Serve returned %v", err)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("Serve did not return")
			}
		})
	}
}

type panicking struct{ Unsupported }

func (panicking) GetInfo(context.Context) (pkcs11.Info, error) { panic("boom") }

type failing struct {
	Unsupported
	err error
}

func (f failing) GetSlotList(context.Context, bool) ([]uint, error) { return nil, f.err }

func TestHandlerFailures(t *testing.T) {
	cl := startServer(t, panicking{}, Options{}, true)
	expect(t, "panic", cl.call(request(callGetInfo).b), errorBody(pkcs11.CKR_GENERAL_ERROR))
	expect(t, "after a panic", cl.call(request(callGetSlotInfo).u(1).b), errorBody(pkcs11.CKR_FUNCTION_NOT_SUPPORTED))

	for _, tc := range []struct {
		err error
		rv  uint
	}{
		{pkcs11.Error(pkcs11.CKR_TOKEN_NOT_PRESENT), pkcs11.CKR_TOKEN_NOT_PRESENT},
		{fmt.Errorf("broker: %w", pkcs11.Error(pkcs11.CKR_DEVICE_REMOVED)), pkcs11.CKR_DEVICE_REMOVED},
		{errors.New("broker exploded"), pkcs11.CKR_GENERAL_ERROR},
		{pkcs11.Error(pkcs11.CKR_OK), pkcs11.CKR_GENERAL_ERROR}, // never answer an error with CKR_OK
	} {
		cl := startServer(t, failing{err: tc.err}, Options{}, true)
		expect(t, tc.err.Error(), cl.call(request(callGetSlotList).y(0).u32(0).b), errorBody(tc.rv))
	}
}

type contractBreaker struct{ Unsupported }

func (contractBreaker) FindObjects(context.Context, pkcs11.SessionHandle, int) ([]pkcs11.ObjectHandle, error) {
	return []pkcs11.ObjectHandle{1, 2, 3}, nil
}

func (contractBreaker) GenerateRandom(_ context.Context, _ pkcs11.SessionHandle, n int) ([]byte, error) {
	return make([]byte, n+1), nil
}

func TestHandlerContract(t *testing.T) {
	cl := startServer(t, contractBreaker{}, Options{}, true)
	expect(t, "FindObjects over max", cl.call(request(callFindObjects).u(5).u32(2).b), errorBody(pkcs11.CKR_GENERAL_ERROR))
	expect(t, "GenerateRandom length", cl.call(request(callGenerateRandom).u(5).u32(2).b), errorBody(pkcs11.CKR_GENERAL_ERROR))
}

type pinKeeper struct {
	Unsupported
	pin []byte
}

func (p *pinKeeper) Login(_ context.Context, _ pkcs11.SessionHandle, _ uint, pin []byte) error {
	p.pin = pin
	return nil
}

func TestPINWiped(t *testing.T) {
	p := &pinKeeper{}
	cl := startServer(t, p, Options{}, true)
	expect(t, "login", cl.call(request(callLogin).u(5).u(pkcs11.CKU_USER).ay([]byte("123456")).b), response(callLogin).b)
	if !bytes.Equal(p.pin, make([]byte, 6)) {
		t.Errorf("PIN left in memory after the call: %q", p.pin)
	}
}

// A blocked C_WaitForSlotEvent does not hold up other calls on the same
// connection; its answer comes later with its own code.
func TestWaitDoesNotBlockOthers(t *testing.T) {
	r := &recorder{wait: make(chan uint)}
	cl := startServer(t, r, Options{}, true)
	cl.send(100, request(callWaitForSlotEvent).u(0).b)
	for i := range 10 {
		code := uint32(200 + i)
		cl.send(code, request(callGetSlotList).y(1).u32(0).b)
		if got, body := cl.recv(); got != code {
			t.Fatalf("answer %d (%x) while waiting for %d", got, body, code)
		}
	}
	r.wait <- 3
	code, body := cl.recv()
	if code != 100 {
		t.Fatalf("answer code %d, want 100", code)
	}
	expect(t, "wait", body, response(callWaitForSlotEvent).u(3).b)
}

func waitForCall(t *testing.T, r *recorder, name string, n int) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); r.n(name) < n; {
		if time.Now().After(deadline) {
			t.Fatalf("%s did not reach the Handler", name)
		}
		time.Sleep(time.Millisecond)
	}
}

func TestWaitLimit(t *testing.T) {
	r := &recorder{wait: make(chan uint)}
	cl := startServer(t, r, Options{MaxInFlight: 2}, true)
	cl.send(100, request(callWaitForSlotEvent).u(0).b)
	waitForCall(t, r, "WaitForSlotEvent", 1)
	// The second wait would take the last slot.
	cl.send(101, request(callWaitForSlotEvent).u(0).b)
	if code, body := cl.recv(); code != 101 || !bytes.Equal(body, errorBody(pkcs11.CKR_FUNCTION_FAILED)) {
		t.Fatalf("second wait: answer %d %x", code, body)
	}
	cl.send(102, request(callGetSlotList).y(1).u32(0).b)
	if code, _ := cl.recv(); code != 102 {
		t.Fatalf("answer %d, want 102", code)
	}
	r.wait <- 1
	if code, _ := cl.recv(); code != 100 {
		t.Fatalf("answer %d, want 100", code)
	}
}

func TestFinalizeEndsWait(t *testing.T) {
	r := &recorder{wait: make(chan uint)}
	cl := startServer(t, r, Options{}, true)
	cl.send(100, request(callWaitForSlotEvent).u(0).b)
	waitForCall(t, r, "WaitForSlotEvent", 1)
	cl.send(101, request(callFinalize).b)
	got := map[uint32][]byte{}
	for range 2 {
		code, body := cl.recv()
		got[code] = body
	}
	expect(t, "C_Finalize", got[101], response(callFinalize).b)
	expect(t, "wait", got[100], errorBody(pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED))
}

func TestServeContextCancel(t *testing.T) {
	r := &recorder{wait: make(chan uint)}
	cl := startServer(t, r, Options{}, true)
	cl.send(100, request(callWaitForSlotEvent).u(0).b)
	waitForCall(t, r, "WaitForSlotEvent", 1)
	cl.cancel()
	if err := cl.serveResult(); !errors.Is(err, context.Canceled) {
		t.Errorf("Serve returned %v, want context.Canceled", err)
	}
}

// Many calls in flight at once, answered each with its own code.
func TestPipelinedCalls(t *testing.T) {
	r := &recorder{}
	cl := startServer(t, r, Options{MaxInFlight: 8}, true)
	const n = 200
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := range n {
			cl.send(uint32(1000+i), request(callGetSlotInfo).u(uint64(i)).b)
		}
	}()
	seen := map[uint32]bool{}
	for range n {
		code, body := cl.recv()
		if seen[code] || code < 1000 || code >= 1000+n {
			t.Fatalf("unexpected answer code %d", code)
		}
		seen[code] = true
		if binary.BigEndian.Uint32(body) != uint32(callGetSlotInfo) {
			t.Fatalf("answer %x", body)
		}
	}
	wg.Wait()
}
