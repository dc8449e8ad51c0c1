package rpc

// Test helpers: a byte-level client written independently of the server's
// codec (so that a bug in one is not mirrored by the other), a
// socketpair harness, and a Handler that records every call.

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/miekg/pkcs11"
)

// wire builds message bodies the way p11-kit-client 0.24.1 lays them out.
type wire struct{ b []byte }

// msg starts a body: call id and signature.
func msg(id callID, sig string) *wire {
	w := &wire{}
	w.u32(uint32(id))
	return w.arr([]byte(sig))
}

func request(id callID) *wire  { return msg(id, calls[id].request) }
func response(id callID) *wire { return msg(id, calls[id].response) }
func errorBody(rv uint) []byte { return msg(callError, "u").u(uint64(rv)).b }

func (w *wire) u32(v uint32) *wire { w.b = binary.BigEndian.AppendUint32(w.b, v); return w }
func (w *wire) u(v uint64) *wire   { w.b = binary.BigEndian.AppendUint64(w.b, v); return w }
func (w *wire) y(v byte) *wire     { w.b = append(w.b, v); return w }
func (w *wire) raw(p ...byte) *wire {
	w.b = append(w.b, p...)
	return w
}

// arr is a length-prefixed byte array; nil is the NULL marker.
func (w *wire) arr(p []byte) *wire {
	if p == nil {
		return w.u32(0xffffffff)
	}
	w.u32(uint32(len(p)))
	return w.raw(p...)
}

// ay is a present byte array; ayNull a NULL one with a length.
func (w *wire) ay(p []byte) *wire         { return w.y(1).arr(nonNil(p)) }
func (w *wire) ayNull(n uint32) *wire     { return w.y(0).u32(n) }
func (w *wire) v(major, minor byte) *wire { return w.y(major).y(minor) }

func (w *wire) s(str string, n int) *wire {
	return w.arr([]byte(str + strings.Repeat(" ", n-len(str))))
}

func (w *wire) au(vals ...uint64) *wire {
	w.y(1).u32(uint32(len(vals)))
	for _, v := range vals {
		w.u(v)
	}
	return w
}
func (w *wire) auNull(n uint32) *wire { return w.y(0).u32(n) }

// mech writes a mechanism with a raw byte-array parameter.
func (w *wire) mech(t uint32, param []byte) *wire { return w.u32(t).arr(param) }

// attr writes a template attribute as the client encodes it: type,
// validity, declared length, then the value in its kind's encoding.
func (w *wire) attrBytes(t uint32, v []byte) *wire {
	return w.u32(t).y(1).u32(uint32(len(v))).arr(v)
}
func (w *wire) attrBool(t uint32, v bool) *wire {
	b := byte(0)
	if v {
		b = 1
	}
	return w.u32(t).y(1).u32(1).y(b)
}
func (w *wire) attrUlong(t uint32, v uint64) *wire { return w.u32(t).y(1).u32(8).u(v) }

func nonNil(p []byte) []byte {
	if p == nil {
		return []byte{}
	}
	return p
}

func ulongBytes(v uint) []byte {
	b := make([]byte, ulongSize)
	putNativeUlong(b, uint64(v))
	return b
}

// socketPair returns the two ends of a connected unix stream socket;
// unlike net.Pipe it buffers, as the real thing does.
func socketPair(t testing.TB) (net.Conn, net.Conn) {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int) net.Conn {
		f := os.NewFile(uintptr(fd), "socketpair")
		defer f.Close()
		c, err := net.FileConn(f)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	return conn(fds[0]), conn(fds[1])
}

func quietLogger() *slog.Logger { return slog.New(slog.DiscardHandler) }

// client is the test's side of a connection to Serve.
type client struct {
	t      testing.TB
	c      net.Conn
	next   uint32
	served chan error
	cancel context.CancelFunc

	once   sync.Once
	result error
}

// serveResult waits for Serve to return and gives its result.
func (cl *client) serveResult() error {
	cl.once.Do(func() {
		select {
		case cl.result = <-cl.served:
		case <-time.After(5 * time.Second):
			cl.result = fmt.Errorf("Serve did not return within 5 s")
			cl.t.Error(cl.result)
		}
	})
	return cl.result
}

// startServer runs Serve on one end of a socket pair and returns a client
// on the other that has done the version handshake and, if init, sent
// C_Initialize.
func startServer(t testing.TB, h Handler, opts Options, init bool) *client {
	t.Helper()
	a, b := socketPair(t)
	if opts.Logger == nil {
		opts.Logger = quietLogger()
	}
	ctx, cancel := context.WithCancel(context.Background())
	cl := &client{t: t, c: a, next: 0x10, served: make(chan error, 1), cancel: cancel}
	go func() { cl.served <- Serve(ctx, b, h, opts) }()
	t.Cleanup(func() {
		a.Close()
		cancel()
		cl.serveResult()
	})
	cl.deadline()
	if _, err := a.Write([]byte{0}); err != nil {
		t.Fatal(err)
	}
	var v [1]byte
	if _, err := io.ReadFull(a, v[:]); err != nil || v[0] != 0 {
		t.Fatalf("version answer %v, %v; want 0", v[0], err)
	}
	if init {
		got := cl.call(initializeRequest().b)
		if !bytes.Equal(got, response(callInitialize).b) {
			t.Fatalf("C_Initialize answer %x", got)
		}
	}
	return cl
}

func initializeRequest() *wire {
	return request(callInitialize).ay([]byte(handshake)).y(0).ay([]byte{0})
}

func (cl *client) deadline() { cl.c.SetDeadline(time.Now().Add(10 * time.Second)) }

// send writes one frame with the given code, options "client" like the
// real client.
func (cl *client) send(code uint32, body []byte) {
	cl.t.Helper()
	cl.deadline()
	opts := []byte("client")
	frame := binary.BigEndian.AppendUint32(nil, code)
	frame = binary.BigEndian.AppendUint32(frame, uint32(len(opts)))
	frame = binary.BigEndian.AppendUint32(frame, uint32(len(body)))
	frame = append(append(frame, opts...), body...)
	if _, err := cl.c.Write(frame); err != nil {
		cl.t.Fatalf("writing a frame: %v", err)
	}
}

// recv reads one frame.
func (cl *client) recv() (code uint32, body []byte) {
	cl.t.Helper()
	cl.deadline()
	var hdr [12]byte
	if _, err := io.ReadFull(cl.c, hdr[:]); err != nil {
		cl.t.Fatalf("reading an answer header: %v", err)
	}
	if olen := binary.BigEndian.Uint32(hdr[4:]); olen != 0 {
		cl.t.Fatalf("answer with %d bytes of options", olen)
	}
	body = make([]byte, binary.BigEndian.Uint32(hdr[8:]))
	if _, err := io.ReadFull(cl.c, body); err != nil {
		cl.t.Fatalf("reading an answer body: %v", err)
	}
	return binary.BigEndian.Uint32(hdr[0:]), body
}

// call sends body and returns the answer, checking that it carries the
// request's code.
func (cl *client) call(body []byte) []byte {
	cl.t.Helper()
	code := cl.next
	cl.next++
	cl.send(code, body)
	got, answer := cl.recv()
	if got != code {
		cl.t.Fatalf("answer code %d, want %d", got, code)
	}
	return answer
}

// recorder is a Handler that logs each call with its arguments and
// returns canned results.
type recorder struct {
	mu  sync.Mutex
	log []string
	// err, when set, is returned by every call.
	err error
	// attrs is GetAttributeValue's answer.
	attrs []AttributeResult
	// counts of Handler calls by name.
	count map[string]int
	// wait, if set, is what WaitForSlotEvent blocks on.
	wait chan uint
}

func (r *recorder) rec(name string, args ...any) {
	parts := make([]string, len(args))
	for i, a := range args {
		parts[i] = show(a)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.log = append(r.log, name+"("+strings.Join(parts, ", ")+")")
	if r.count == nil {
		r.count = map[string]int{}
	}
	r.count[name]++
}

func (r *recorder) calls() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.log...)
}

func (r *recorder) n(name string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.count[name]
}

func show(a any) string {
	switch v := a.(type) {
	case []byte:
		if v == nil {
			return "nil"
		}
		return fmt.Sprintf("%q", v)
	case *pkcs11.Mechanism:
		return fmt.Sprintf("M(0x%x,%x)", v.Mechanism, v.Parameter)
	case []*pkcs11.Attribute:
		parts := make([]string, len(v))
		for i, at := range v {
			parts[i] = fmt.Sprintf("0x%x=%x", at.Type, at.Value)
		}
		return "[" + strings.Join(parts, " ") + "]"
	case string:
		return fmt.Sprintf("%q", v)
	}
	return fmt.Sprint(a)
}

func (r *recorder) GetInfo(context.Context) (pkcs11.Info, error) {
	r.rec("GetInfo")
	return pkcs11.Info{CryptokiVersion: pkcs11.Version{Major: 2, Minor: 40}, ManufacturerID: "slotwatch",
		Flags: 0, LibraryDescription: "test library", LibraryVersion: pkcs11.Version{Major: 1, Minor: 2}}, r.err
}
func (r *recorder) GetSlotList(_ context.Context, present bool) ([]uint, error) {
	r.rec("GetSlotList", present)
	return []uint{1, 2}, r.err
}
func (r *recorder) GetSlotInfo(_ context.Context, slot uint) (pkcs11.SlotInfo, error) {
	r.rec("GetSlotInfo", slot)
	return pkcs11.SlotInfo{SlotDescription: "reader", ManufacturerID: "slotwatch", Flags: 7,
		HardwareVersion: pkcs11.Version{Major: 1}, FirmwareVersion: pkcs11.Version{Major: 2}}, r.err
}
func (r *recorder) GetTokenInfo(_ context.Context, slot uint) (pkcs11.TokenInfo, error) {
	r.rec("GetTokenInfo", slot)
	return pkcs11.TokenInfo{Label: "token", ManufacturerID: "m", Model: "model", SerialNumber: "42",
		Flags: 1, MaxSessionCount: 2, SessionCount: 3, MaxRwSessionCount: 4, RwSessionCount: 5,
		MaxPinLen: 6, MinPinLen: 7, TotalPublicMemory: 8, FreePublicMemory: 9,
		TotalPrivateMemory: 10, FreePrivateMemory: 11, HardwareVersion: pkcs11.Version{Major: 1, Minor: 1},
		FirmwareVersion: pkcs11.Version{Major: 2, Minor: 2}, UTCTime: "2024010100000000"}, r.err
}
func (r *recorder) GetMechanismList(_ context.Context, slot uint) ([]uint, error) {
	r.rec("GetMechanismList", slot)
	return []uint{pkcs11.CKM_RSA_PKCS, pkcs11.CKM_SHA256_RSA_PKCS}, r.err
}
func (r *recorder) GetMechanismInfo(_ context.Context, slot, mech uint) (pkcs11.MechanismInfo, error) {
	r.rec("GetMechanismInfo", slot, mech)
	return pkcs11.MechanismInfo{MinKeySize: 1024, MaxKeySize: 4096, Flags: pkcs11.CKF_SIGN}, r.err
}
func (r *recorder) InitToken(_ context.Context, slot uint, pin []byte, label string) error {
	r.rec("InitToken", slot, pin, label)
	return r.err
}
func (r *recorder) OpenSession(_ context.Context, slot, flags uint) (pkcs11.SessionHandle, error) {
	r.rec("OpenSession", slot, flags)
	return 0x1234, r.err
}
func (r *recorder) CloseSession(_ context.Context, sh pkcs11.SessionHandle) error {
	r.rec("CloseSession", sh)
	return r.err
}
func (r *recorder) CloseAllSessions(_ context.Context, slot uint) error {
	r.rec("CloseAllSessions", slot)
	return r.err
}
func (r *recorder) GetSessionInfo(_ context.Context, sh pkcs11.SessionHandle) (pkcs11.SessionInfo, error) {
	r.rec("GetSessionInfo", sh)
	return pkcs11.SessionInfo{SlotID: 1, State: 3, Flags: 6, DeviceError: 0}, r.err
}
func (r *recorder) InitPIN(_ context.Context, sh pkcs11.SessionHandle, pin []byte) error {
	r.rec("InitPIN", sh, pin)
	return r.err
}
func (r *recorder) SetPIN(_ context.Context, sh pkcs11.SessionHandle, o, n []byte) error {
	r.rec("SetPIN", sh, o, n)
	return r.err
}
func (r *recorder) GetOperationState(_ context.Context, sh pkcs11.SessionHandle) ([]byte, error) {
	r.rec("GetOperationState", sh)
	return []byte("state"), r.err
}
func (r *recorder) SetOperationState(_ context.Context, sh pkcs11.SessionHandle, st []byte, ek, ak pkcs11.ObjectHandle) error {
	r.rec("SetOperationState", sh, st, ek, ak)
	return r.err
}
func (r *recorder) Login(_ context.Context, sh pkcs11.SessionHandle, ut uint, pin []byte) error {
	r.rec("Login", sh, ut, pin)
	return r.err
}
func (r *recorder) Logout(_ context.Context, sh pkcs11.SessionHandle) error {
	r.rec("Logout", sh)
	return r.err
}
func (r *recorder) CreateObject(_ context.Context, sh pkcs11.SessionHandle, t []*pkcs11.Attribute) (pkcs11.ObjectHandle, error) {
	r.rec("CreateObject", sh, t)
	return 77, r.err
}
func (r *recorder) CopyObject(_ context.Context, sh pkcs11.SessionHandle, o pkcs11.ObjectHandle, t []*pkcs11.Attribute) (pkcs11.ObjectHandle, error) {
	r.rec("CopyObject", sh, o, t)
	return 78, r.err
}
func (r *recorder) DestroyObject(_ context.Context, sh pkcs11.SessionHandle, o pkcs11.ObjectHandle) error {
	r.rec("DestroyObject", sh, o)
	return r.err
}
func (r *recorder) GetObjectSize(_ context.Context, sh pkcs11.SessionHandle, o pkcs11.ObjectHandle) (uint, error) {
	r.rec("GetObjectSize", sh, o)
	return 99, r.err
}
func (r *recorder) GetAttributeValue(_ context.Context, sh pkcs11.SessionHandle, o pkcs11.ObjectHandle, types []uint) ([]AttributeResult, error) {
	r.rec("GetAttributeValue", sh, o, types)
	return r.attrs, r.err
}
func (r *recorder) SetAttributeValue(_ context.Context, sh pkcs11.SessionHandle, o pkcs11.ObjectHandle, t []*pkcs11.Attribute) error {
	r.rec("SetAttributeValue", sh, o, t)
	return r.err
}
func (r *recorder) FindObjectsInit(_ context.Context, sh pkcs11.SessionHandle, t []*pkcs11.Attribute) error {
	r.rec("FindObjectsInit", sh, t)
	return r.err
}
func (r *recorder) FindObjects(_ context.Context, sh pkcs11.SessionHandle, max int) ([]pkcs11.ObjectHandle, error) {
	r.rec("FindObjects", sh, max)
	objs := []pkcs11.ObjectHandle{10, 11}
	return objs[:min(max, len(objs))], r.err
}
func (r *recorder) FindObjectsFinal(_ context.Context, sh pkcs11.SessionHandle) error {
	r.rec("FindObjectsFinal", sh)
	return r.err
}
func (r *recorder) initCall(name string, sh pkcs11.SessionHandle, m *pkcs11.Mechanism, key pkcs11.ObjectHandle) error {
	r.rec(name, sh, m, key)
	return r.err
}
func (r *recorder) dataCall(name string, sh pkcs11.SessionHandle, data []byte) ([]byte, error) {
	r.rec(name, sh, data)
	return []byte(strings.ToLower(name)), r.err
}
func (r *recorder) finalCall(name string, sh pkcs11.SessionHandle) ([]byte, error) {
	r.rec(name, sh)
	return []byte(strings.ToLower(name)), r.err
}
func (r *recorder) inCall(name string, sh pkcs11.SessionHandle, data []byte) error {
	r.rec(name, sh, data)
	return r.err
}
func (r *recorder) EncryptInit(_ context.Context, sh pkcs11.SessionHandle, m *pkcs11.Mechanism, k pkcs11.ObjectHandle) error {
	return r.initCall("EncryptInit", sh, m, k)
}
func (r *recorder) Encrypt(_ context.Context, sh pkcs11.SessionHandle, d []byte) ([]byte, error) {
	return r.dataCall("Encrypt", sh, d)
}
func (r *recorder) EncryptUpdate(_ context.Context, sh pkcs11.SessionHandle, d []byte) ([]byte, error) {
	return r.dataCall("EncryptUpdate", sh, d)
}
func (r *recorder) EncryptFinal(_ context.Context, sh pkcs11.SessionHandle) ([]byte, error) {
	return r.finalCall("EncryptFinal", sh)
}
func (r *recorder) DecryptInit(_ context.Context, sh pkcs11.SessionHandle, m *pkcs11.Mechanism, k pkcs11.ObjectHandle) error {
	return r.initCall("DecryptInit", sh, m, k)
}
func (r *recorder) Decrypt(_ context.Context, sh pkcs11.SessionHandle, d []byte) ([]byte, error) {
	return r.dataCall("Decrypt", sh, d)
}
func (r *recorder) DecryptUpdate(_ context.Context, sh pkcs11.SessionHandle, d []byte) ([]byte, error) {
	return r.dataCall("DecryptUpdate", sh, d)
}
func (r *recorder) DecryptFinal(_ context.Context, sh pkcs11.SessionHandle) ([]byte, error) {
	return r.finalCall("DecryptFinal", sh)
}
func (r *recorder) DigestInit(_ context.Context, sh pkcs11.SessionHandle, m *pkcs11.Mechanism) error {
	r.rec("DigestInit", sh, m)
	return r.err
}
func (r *recorder) Digest(_ context.Context, sh pkcs11.SessionHandle, d []byte) ([]byte, error) {
	return r.dataCall("Digest", sh, d)
}
func (r *recorder) DigestUpdate(_ context.Context, sh pkcs11.SessionHandle, d []byte) error {
	return r.inCall("DigestUpdate", sh, d)
}
func (r *recorder) DigestKey(_ context.Context, sh pkcs11.SessionHandle, k pkcs11.ObjectHandle) error {
	r.rec("DigestKey", sh, k)
	return r.err
}
func (r *recorder) DigestFinal(_ context.Context, sh pkcs11.SessionHandle) ([]byte, error) {
	return r.finalCall("DigestFinal", sh)
}
func (r *recorder) SignInit(_ context.Context, sh pkcs11.SessionHandle, m *pkcs11.Mechanism, k pkcs11.ObjectHandle) error {
	return r.initCall("SignInit", sh, m, k)
}
func (r *recorder) Sign(_ context.Context, sh pkcs11.SessionHandle, d []byte) ([]byte, error) {
	return r.dataCall("Sign", sh, d)
}
func (r *recorder) SignUpdate(_ context.Context, sh pkcs11.SessionHandle, d []byte) error {
	return r.inCall("SignUpdate", sh, d)
}
func (r *recorder) SignFinal(_ context.Context, sh pkcs11.SessionHandle) ([]byte, error) {
	return r.finalCall("SignFinal", sh)
}
func (r *recorder) SignRecoverInit(_ context.Context, sh pkcs11.SessionHandle, m *pkcs11.Mechanism, k pkcs11.ObjectHandle) error {
	return r.initCall("SignRecoverInit", sh, m, k)
}
func (r *recorder) SignRecover(_ context.Context, sh pkcs11.SessionHandle, d []byte) ([]byte, error) {
	return r.dataCall("SignRecover", sh, d)
}
func (r *recorder) VerifyInit(_ context.Context, sh pkcs11.SessionHandle, m *pkcs11.Mechanism, k pkcs11.ObjectHandle) error {
	return r.initCall("VerifyInit", sh, m, k)
}
func (r *recorder) Verify(_ context.Context, sh pkcs11.SessionHandle, d, s []byte) error {
	r.rec("Verify", sh, d, s)
	return r.err
}
func (r *recorder) VerifyUpdate(_ context.Context, sh pkcs11.SessionHandle, d []byte) error {
	return r.inCall("VerifyUpdate", sh, d)
}
func (r *recorder) VerifyFinal(_ context.Context, sh pkcs11.SessionHandle, s []byte) error {
	return r.inCall("VerifyFinal", sh, s)
}
func (r *recorder) VerifyRecoverInit(_ context.Context, sh pkcs11.SessionHandle, m *pkcs11.Mechanism, k pkcs11.ObjectHandle) error {
	return r.initCall("VerifyRecoverInit", sh, m, k)
}
func (r *recorder) VerifyRecover(_ context.Context, sh pkcs11.SessionHandle, d []byte) ([]byte, error) {
	return r.dataCall("VerifyRecover", sh, d)
}
func (r *recorder) DigestEncryptUpdate(_ context.Context, sh pkcs11.SessionHandle, d []byte) ([]byte, error) {
	return r.dataCall("DigestEncryptUpdate", sh, d)
}
func (r *recorder) DecryptDigestUpdate(_ context.Context, sh pkcs11.SessionHandle, d []byte) ([]byte, error) {
	return r.dataCall("DecryptDigestUpdate", sh, d)
}
func (r *recorder) SignEncryptUpdate(_ context.Context, sh pkcs11.SessionHandle, d []byte) ([]byte, error) {
	return r.dataCall("SignEncryptUpdate", sh, d)
}
func (r *recorder) DecryptVerifyUpdate(_ context.Context, sh pkcs11.SessionHandle, d []byte) ([]byte, error) {
	return r.dataCall("DecryptVerifyUpdate", sh, d)
}
func (r *recorder) GenerateKey(_ context.Context, sh pkcs11.SessionHandle, m *pkcs11.Mechanism, t []*pkcs11.Attribute) (pkcs11.ObjectHandle, error) {
	r.rec("GenerateKey", sh, m, t)
	return 55, r.err
}
func (r *recorder) GenerateKeyPair(_ context.Context, sh pkcs11.SessionHandle, m *pkcs11.Mechanism, pub, priv []*pkcs11.Attribute) (pkcs11.ObjectHandle, pkcs11.ObjectHandle, error) {
	r.rec("GenerateKeyPair", sh, m, pub, priv)
	return 56, 57, r.err
}
func (r *recorder) WrapKey(_ context.Context, sh pkcs11.SessionHandle, m *pkcs11.Mechanism, wk, k pkcs11.ObjectHandle) ([]byte, error) {
	r.rec("WrapKey", sh, m, wk, k)
	return []byte("wrapped"), r.err
}
func (r *recorder) UnwrapKey(_ context.Context, sh pkcs11.SessionHandle, m *pkcs11.Mechanism, uk pkcs11.ObjectHandle, w []byte, t []*pkcs11.Attribute) (pkcs11.ObjectHandle, error) {
	r.rec("UnwrapKey", sh, m, uk, w, t)
	return 58, r.err
}
func (r *recorder) DeriveKey(_ context.Context, sh pkcs11.SessionHandle, m *pkcs11.Mechanism, bk pkcs11.ObjectHandle, t []*pkcs11.Attribute) (pkcs11.ObjectHandle, error) {
	r.rec("DeriveKey", sh, m, bk, t)
	return 59, r.err
}
func (r *recorder) SeedRandom(_ context.Context, sh pkcs11.SessionHandle, seed []byte) error {
	return r.inCall("SeedRandom", sh, seed)
}
func (r *recorder) GenerateRandom(_ context.Context, sh pkcs11.SessionHandle, n int) ([]byte, error) {
	r.rec("GenerateRandom", sh, n)
	return bytes.Repeat([]byte{0xab}, n), r.err
}
func (r *recorder) WaitForSlotEvent(ctx context.Context, flags uint) (uint, error) {
	r.rec("WaitForSlotEvent", flags)
	if r.wait == nil {
		return 1, r.err
	}
	select {
	case slot := <-r.wait:
		return slot, nil
	case <-ctx.Done():
		return 0, ctx.Err()
	}
}
