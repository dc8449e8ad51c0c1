package rpc

import (
	"bytes"
	"context"
	"encoding/binary"
	"net"
	"runtime"
	"testing"
	"time"

	"github.com/miekg/pkcs11"
)

// memConn is a net.Conn whose peer has written everything up front and
// reads nothing back.
type memConn struct {
	r       *bytes.Reader
	written int
}

func (c *memConn) Read(p []byte) (int, error)       { return c.r.Read(p) }
func (c *memConn) Write(p []byte) (int, error)      { c.written += len(p); return len(p), nil }
func (c *memConn) Close() error                     { return nil }
func (c *memConn) LocalAddr() net.Addr              { return &net.UnixAddr{Name: "fuzz", Net: "unix"} }
func (c *memConn) RemoteAddr() net.Addr             { return &net.UnixAddr{Name: "fuzz", Net: "unix"} }
func (c *memConn) SetDeadline(time.Time) error      { return nil }
func (c *memConn) SetReadDeadline(time.Time) error  { return nil }
func (c *memConn) SetWriteDeadline(time.Time) error { return nil }

func fuzzFrame(code uint32, body []byte) []byte {
	f := binary.BigEndian.AppendUint32(nil, code)
	f = binary.BigEndian.AppendUint32(f, 6)
	f = binary.BigEndian.AppendUint32(f, uint32(len(body)))
	return append(append(f, "client"...), body...)
}

// FuzzServe feeds arbitrary bytes to Serve after the version byte and a
// valid C_Initialize, so that they reach every call's decoder and the
// Handler. Serve must not panic, must return at the end of input, and
// must not allocate much more than the input could justify.
func FuzzServe(f *testing.F) {
	for _, c := range callCases() {
		f.Add(fuzzFrame(17, c.req.b))
	}
	f.Add(append(fuzzFrame(17, signRequest(5, "msg", 0)), fuzzFrame(18, signRequest(5, "msg", 4))...))
	f.Add(fuzzFrame(17, request(callGetAttributeValue).u(5).u(9).u32(3).
		u32(pkcs11.CKA_LABEL).u32(0).u32(pkcs11.CKA_CLASS).u32(8).u32(pkcs11.CKA_ALLOWED_MECHANISMS).u32(100).b))
	f.Add(fuzzFrame(17, request(callCreateObject).u(5).u32(1).
		u32(pkcs11.CKA_WRAP_TEMPLATE).y(1).u32(8).u32(1).attrBool(pkcs11.CKA_SIGN, true).b))
	f.Add(fuzzFrame(17, request(callGetMechanismInfo).u(1).b))
	f.Add([]byte{0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff})

	prefix := append([]byte{0}, fuzzFrame(16, initializeRequest().b)...)
	opts := Options{MaxMessageSize: 64 << 10, Logger: quietLogger()}

	f.Fuzz(func(t *testing.T, data []byte) {
		h := &recorder{attrs: []AttributeResult{{Value: []byte("label")}}}
		conn := &memConn{r: bytes.NewReader(append(prefix[:len(prefix):len(prefix)], data...))}
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		done := make(chan error, 1)
		go func() { done <- Serve(context.Background(), conn, h, opts) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("Serve did not return at the end of its input")
		}
		runtime.ReadMemStats(&after)
		// Generous: every frame may ask the Handler for up to
		// MaxMessageSize of random bytes, but frames take 12 bytes.
		limit := uint64(8<<20) + uint64(len(data))*64 + uint64(len(data)/12+1)*uint64(opts.MaxMessageSize)
		if n := after.TotalAlloc - before.TotalAlloc; n > limit {
			t.Fatalf("%d bytes of input made Serve allocate %d bytes", len(data), n)
		}
	})
}
