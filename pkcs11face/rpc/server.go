package rpc

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"runtime/debug"
	"sync"
	"syscall"
	"time"

	"github.com/miekg/pkcs11"
)

// DefaultMaxMessageSize bounds a request frame when Options leave it 0.
// The client itself has no limit. Real requests are small except those
// carrying data (C_Sign/C_Encrypt/C_Digest... of a whole message,
// C_CreateObject of a data object); smart cards hold kilobytes, and a
// process hashing a big file goes through the Update calls in pieces.
// 16 MiB leaves room for any of that while keeping the memory one
// connection can pin at MaxInFlight × 16 MiB.
const DefaultMaxMessageSize = 16 << 20

// DefaultMaxInFlight is the number of calls of one connection that run at
// the same time when Options leave it 0. The client only has as many
// calls outstanding as it has threads in the module; four covers a
// blocked C_WaitForSlotEvent and a few busy threads.
const DefaultMaxInFlight = 4

// Options tune Serve. The zero value is ready to use.
type Options struct {
	// MaxMessageSize bounds the options and body of one request frame,
	// in bytes (0: DefaultMaxMessageSize). A bigger request is read and
	// thrown away as it arrives, never buffered, and answered
	// CKR_DEVICE_MEMORY; the connection stays usable.
	MaxMessageSize int
	// MaxInFlight bounds the calls of one connection that run at the
	// same time (0: DefaultMaxInFlight; at least 2). When all are busy
	// Serve stops reading until one returns. Blocked C_WaitForSlotEvent
	// calls may take all but one, so that other calls always get
	// through; one more wait is answered CKR_FUNCTION_FAILED.
	MaxInFlight int
	// Logger gets protocol errors, Handler failures and panics (never
	// PINs or data); nil means slog.Default().
	Logger *slog.Logger
}

// readBuffer is the size of a connection's read buffer: most requests fit
// whole, so reading one costs one system call.
const readBuffer = 32 << 10

// ErrBrokenStream is returned by Serve when the byte stream cannot be
// followed any more: a frame cut short, or a read or write error.
var ErrBrokenStream = errors.New("p11-kit rpc: broken stream")

// Serve speaks p11-kit's RPC protocol on conn until the client
// disconnects, ctx is done or the stream breaks, passing every call to h.
// It closes conn before returning and waits for the calls it started.
//
// It returns nil when the client disconnected between frames (what
// p11-kit-client.so does after C_Finalize), ctx.Err() when ctx ended it,
// and an error wrapping ErrBrokenStream otherwise.
//
// C_Initialize and C_Finalize are answered here and never reach h:
// C_Initialize checks p11-kit's handshake string (its reserved string is
// ignored), calls before it or after C_Finalize are answered
// CKR_CRYPTOKI_NOT_INITIALIZED, and C_Finalize cancels the context of
// calls still running. The end of the connection, not C_Finalize, is
// the end of the client: release its sessions when Serve returns.
//
// Malformed requests in an intact frame are answered CKR_DEVICE_ERROR,
// as p11-kit's own server does for arguments it cannot parse (it drops
// the connection for an unknown call or signature; we answer those the
// same way and go on).
func Serve(ctx context.Context, conn net.Conn, h Handler, opts Options) error {
	s := &server{
		conn:    conn,
		r:       bufio.NewReaderSize(conn, readBuffer),
		h:       h,
		maxSize: opts.MaxMessageSize,
		log:     opts.Logger,
		pending: make(map[pendingKey]*pendingResult),
	}
	if s.maxSize <= 0 {
		s.maxSize = DefaultMaxMessageSize
	}
	inFlight := opts.MaxInFlight
	if inFlight <= 0 {
		inFlight = DefaultMaxInFlight
	}
	inFlight = max(inFlight, 2)
	s.waitsIdle = sync.NewCond(&s.mu)
	s.slots = make(chan struct{}, inFlight)
	s.maxWaits = inFlight - 1
	if s.log == nil {
		s.log = slog.Default()
	}

	connCtx, cancel := context.WithCancel(ctx)
	s.ctx = connCtx
	// Once ctx is done, a past deadline unblocks a read waiting for the
	// next frame and any write stuck on a client that does not read.
	stop := context.AfterFunc(connCtx, func() { conn.SetDeadline(time.Unix(1, 0)) })

	ok, err := s.handshake()
	if ok {
		err = s.readLoop()
	}
	cancel()
	s.calls.Wait()
	stop()
	conn.Close()

	if ctx.Err() != nil {
		return ctx.Err()
	}
	if werr := s.writeErr(); werr != nil && err == nil {
		err = werr
	}
	return err
}

type server struct {
	conn    net.Conn
	r       *bufio.Reader // conn's reads: a frame's header, options and body in one read(2)
	h       Handler
	log     *slog.Logger
	maxSize int
	ctx     context.Context // the connection's; done when Serve ends

	slots    chan struct{} // one token per call running
	calls    sync.WaitGroup
	wmu      sync.Mutex // one frame at a time on the wire
	maxWaits int

	mu          sync.Mutex
	initialized bool
	initCtx     context.Context // calls' context; done on C_Finalize
	initCancel  context.CancelFunc
	waits       int        // C_WaitForSlotEvent calls not yet answered
	waitsIdle   *sync.Cond // on mu; signalled when waits drops to 0
	pending     map[pendingKey]*pendingResult
	pendingSeq  uint64
	writeFailed error
}

// handshake answers the client's version byte with the version we
// speak. ok is false if the client left before sending it.
func (s *server) handshake() (ok bool, err error) {
	var v [1]byte
	if _, err := io.ReadFull(s.r, v[:]); err != nil {
		if peerGone(err) {
			return false, nil
		}
		return false, fmt.Errorf("%w: reading the version byte: %v", ErrBrokenStream, err)
	}
	// The client offers the highest version it speaks and goes on with
	// whatever lower one we answer.
	v[0] = min(v[0], protocolVersion)
	if _, err := s.conn.Write(v[:]); err != nil {
		return false, fmt.Errorf("%w: writing the version byte: %v", ErrBrokenStream, err)
	}
	return true, nil
}

// readLoop reads frames and starts a goroutine per call. It returns nil at
// EOF between frames.
func (s *server) readLoop() (err error) {
	defer func() {
		// Nothing below should panic; if it does, the stream position
		// is unknown, so end the connection rather than the process.
		if r := recover(); r != nil {
			s.log.Error("p11-kit rpc: panic reading a frame", "panic", r, "stack", string(debug.Stack()))
			err = fmt.Errorf("%w: internal error", ErrBrokenStream)
		}
	}()
	for {
		// Take a slot before reading so that no more than MaxInFlight
		// requests are ever held in memory.
		select {
		case s.slots <- struct{}{}:
		case <-s.ctx.Done():
			return s.ctx.Err()
		}
		code, body, err := s.readFrame()
		if err != nil {
			<-s.slots
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		if body == nil {
			s.writeFrame(code, errorAnswer(pkcs11.CKR_DEVICE_MEMORY))
			<-s.slots
			continue
		}
		s.calls.Add(1)
		if len(s.slots) == 1 && !mayBlock(body) {
			// Nothing else in flight: answer on this goroutine, which
			// saves a hand-over per call (most clients make one call
			// at a time). Calls that arrive meanwhile wait in the socket
			// as they would with p11-kit's own server; a call that may
			// block for good always gets a goroutine of its own.
			s.serveCall(code, body)
			continue
		}
		go s.serveCall(code, body)
	}
}

// readFrame reads one request frame. A frame over the size limit is
// consumed without being stored and comes back with a nil body.
func (s *server) readFrame() (code uint32, body []byte, err error) {
	var hdr [frameHeaderLen]byte
	if n, err := io.ReadFull(s.r, hdr[:]); err != nil {
		if n == 0 && peerGone(err) {
			return 0, nil, io.EOF
		}
		return 0, nil, fmt.Errorf("%w: reading a frame header: %v", ErrBrokenStream, err)
	}
	code = binary.BigEndian.Uint32(hdr[0:])
	optLen := int64(binary.BigEndian.Uint32(hdr[4:]))
	bodyLen := int64(binary.BigEndian.Uint32(hdr[8:]))

	if optLen+bodyLen > int64(s.maxSize) {
		s.log.Warn("p11-kit rpc: request over the size limit, discarded",
			"size", optLen+bodyLen, "limit", s.maxSize)
		if _, err := io.CopyN(io.Discard, s.r, optLen+bodyLen); err != nil {
			return 0, nil, fmt.Errorf("%w: skipping an oversized frame: %v", ErrBrokenStream, err)
		}
		return code, nil, nil
	}
	// The options carry the client's module name; nothing depends on it.
	if _, err := io.CopyN(io.Discard, s.r, optLen); err != nil {
		return 0, nil, fmt.Errorf("%w: reading frame options: %v", ErrBrokenStream, err)
	}
	body = make([]byte, bodyLen)
	if _, err := io.ReadFull(s.r, body); err != nil {
		return 0, nil, fmt.Errorf("%w: reading a frame body: %v", ErrBrokenStream, err)
	}
	return code, body, nil
}

// writeFrame sends an answer built by an encoder (header space included).
// A failed write breaks the stream: the client cannot be told, so the
// connection ends.
func (s *server) writeFrame(code uint32, frame []byte) {
	binary.BigEndian.PutUint32(frame[0:], code)
	binary.BigEndian.PutUint32(frame[4:], 0)
	binary.BigEndian.PutUint32(frame[8:], uint32(len(frame)-frameHeaderLen))
	s.wmu.Lock()
	_, err := s.conn.Write(frame)
	s.wmu.Unlock()
	if err != nil {
		s.mu.Lock()
		if s.writeFailed == nil && s.ctx.Err() == nil && !peerGone(err) {
			s.writeFailed = fmt.Errorf("%w: writing an answer: %v", ErrBrokenStream, err)
		}
		s.mu.Unlock()
		s.conn.SetDeadline(time.Unix(1, 0))
	}
}

// peerGone reports the errors that mean the client closed its end: the
// end of the conversation rather than a broken one when they come between
// frames. (A client that exits with answers unread makes our next read
// fail with ECONNRESET rather than see EOF.)
func peerGone(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}

func (s *server) writeErr() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.writeFailed
}

// serveCall answers one request; it runs on its own goroutine and holds a
// slot.
func (s *server) serveCall(code uint32, body []byte) {
	defer s.calls.Done()
	defer func() { <-s.slots }()
	var c call
	answer := s.process(body, &c)
	switch c.id {
	case callLogin, callInitPIN, callSetPIN, callInitToken:
		// Wipe PINs now rather than whenever the frame is collected.
		clear(body)
	}
	s.writeFrame(code, answer)
	if c.answered != nil {
		c.answered()
	}
}

// call is what serveCall needs to know about a call besides its answer.
type call struct {
	id callID
	// answered, if set, runs once the answer is on the wire.
	answered func()
}

// process decodes a request body, runs the call and returns the answer
// frame. It does not panic: a panic in a call (the Handler's included)
// is logged and answered CKR_GENERAL_ERROR.
func (s *server) process(body []byte, c *call) (answer []byte) {
	d := &decoder{b: body}
	id := callID(d.u32())
	sig, null := d.bytes()
	if d.err != nil || null || id == callError || id >= callMax || string(sig) != calls[id].request {
		s.log.Warn("p11-kit rpc: malformed request: unknown call or signature",
			"call", uint32(id), "size", len(body))
		return errorAnswer(pkcs11.CKR_DEVICE_ERROR)
	}
	c.id = id
	d.want = calls[id].request

	defer func() {
		if r := recover(); r != nil {
			s.log.Error("p11-kit rpc: panic in call", "call", id.String(),
				"panic", r, "stack", string(debug.Stack()))
			answer = errorAnswer(pkcs11.CKR_GENERAL_ERROR)
		}
	}()

	e := newEncoder(id, calls[id].response)
	ctx, err := s.callContext(id)
	if err == nil {
		err = s.dispatch(ctx, c, d, e)
	}
	if err == nil && e.sig != calls[id].response {
		err = errSignature
	}
	if err != nil {
		return errorAnswer(s.rvFor(ctx, id, err))
	}
	return e.b
}

// callContext checks that the call may run now and returns the context
// it runs in.
func (s *server) callContext(id callID) (context.Context, error) {
	if id == callInitialize || id == callFinalize {
		return s.ctx, nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.initialized {
		return s.ctx, pkcs11.Error(pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED)
	}
	return s.initCtx, nil
}

// rvFor turns a call's error into the CK_RV to answer.
func (s *server) rvFor(ctx context.Context, id callID, err error) uint {
	var rv pkcs11.Error
	switch {
	case errors.As(err, &rv) && rv != pkcs11.CKR_OK:
		return uint(rv)
	case errors.Is(err, errMalformed):
		s.log.Warn("p11-kit rpc: malformed request", "call", id.String())
		return pkcs11.CKR_DEVICE_ERROR
	case ctx.Err() != nil:
		// Cut short by C_Finalize (or by the end of the connection,
		// where the answer goes nowhere): what PKCS#11 says a call
		// interrupted by C_Finalize returns.
		return pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED
	}
	s.log.Warn("p11-kit rpc: call failed", "call", id.String(), "err", err)
	return pkcs11.CKR_GENERAL_ERROR
}

// errorAnswer builds the frame of an error answer.
func errorAnswer(rv uint) []byte {
	e := newEncoder(callError, calls[callError].response)
	e.ulong(rv)
	return e.b
}

func (s *server) initialize(d *decoder) error {
	hs := d.byteArray()
	d.byteArg()   // whether C_Initialize had a reserved string
	d.byteArray() // the string; p11-kit passes its module config in it
	if err := d.done(); err != nil {
		return err
	}
	if string(hs) != handshake {
		s.log.Warn("p11-kit rpc: wrong handshake string in C_Initialize")
		return pkcs11.Error(pkcs11.CKR_GENERAL_ERROR)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.initialized {
		return pkcs11.Error(pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED)
	}
	s.initialized = true
	s.initCtx, s.initCancel = context.WithCancel(s.ctx)
	return nil
}

// finalizeGrace is how long the answer to C_Finalize is held back after
// the answers of the C_WaitForSlotEvent calls it cut short; see
// finalize.
const finalizeGrace = 100 * time.Millisecond

// finalize ends the client's PKCS#11 session: calls still running see
// their context done, and blocked waits answer
// CKR_CRYPTOKI_NOT_INITIALIZED, as PKCS#11 says they return on
// C_Finalize.
//
// The order of the answers matters to p11-kit 0.24.1. Its finalizing
// thread drops its reference to the connection as soon as it has the
// C_Finalize answer, and a thread still inside C_WaitForSlotEvent that
// drops its own afterwards trips an assertion in rpc-transport.c and
// aborts the client process. So the waits are answered first, and the
// C_Finalize answer follows a little later, giving the waiting threads
// time to leave the connection.
func (s *server) finalize(d *decoder) error {
	if err := d.done(); err != nil {
		return err
	}
	s.mu.Lock()
	if !s.initialized {
		s.mu.Unlock()
		return pkcs11.Error(pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED)
	}
	s.initialized = false
	s.initCancel()
	cutShort := s.waits > 0
	for s.waits > 0 {
		s.waitsIdle.Wait()
	}
	clear(s.pending)
	s.mu.Unlock()
	if cutShort {
		time.Sleep(finalizeGrace)
	}
	return nil
}

// enterWait admits one more blocked C_WaitForSlotEvent unless that would
// leave no slot for other calls. On success the caller must arrange for
// leaveWait to run once the wait's answer is written.
func (s *server) enterWait() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.waits >= s.maxWaits {
		return false
	}
	s.waits++
	return true
}

func (s *server) leaveWait() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.waits--; s.waits == 0 {
		s.waitsIdle.Broadcast()
	}
}

// mayBlock tells whether a request may block for good (C_WaitForSlotEvent
// without CKF_DONT_BLOCK blocks until an event).
func mayBlock(body []byte) bool {
	return len(body) < 4 || callID(binary.BigEndian.Uint32(body)) == callWaitForSlotEvent
}
