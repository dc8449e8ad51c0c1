// Package vcard is a virtual smart card for tests: it plugs into the
// vsmartcard "vpcd" reader driver of a pcscd over TCP and serves a minimal
// ISO 7816-4 card carrying a PKCS#15 file system, which OpenSC's generic
// "default" card driver and its pkcs15 framework expose as a PKCS#11 token
// with a label, a serial number and one certificate.
//
// Connecting to vpcd's port is inserting the card into that reader;
// closing the connection is removing it. A Card can be inserted and
// removed any number of times and swapped to another identity (Profile).
//
// The vpcd wire protocol: every message is a 2-byte big-endian length and
// a payload. A 1-byte payload is a control code (0 power off, 1 power on,
// 2 reset, 4 "send your ATR"); only the ATR request gets an answer, the
// ATR as a message. A longer payload is a command APDU, answered with the
// response APDU (data + SW1 SW2) as a message.
package vcard

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// ATR is the answer to reset the card sends. It is vicc's default ISO ATR
// (T=0 and T=1, historical bytes 00 31 C1 73 C8 40 00 00 90 00), which no
// specific OpenSC driver claims: with card_drivers = default OpenSC binds
// its generic ISO 7816 driver, which is what reads the PKCS#15 structure.
var ATR = []byte{0x3B, 0x8A, 0x80, 0x01, 0x00, 0x31, 0xC1, 0x73, 0xC8, 0x40, 0x00, 0x00, 0x90, 0x00, 0x90}

// vpcd control codes (a 1-byte message from vpcd).
const (
	ctrlOff    = 0
	ctrlOn     = 1
	ctrlReset  = 2
	ctrlGetATR = 4
)

// dialTimeout bounds Insert. A connect normally completes at once (the
// kernel finishes the handshake before vpcd accepts), but vpcd listens
// with a backlog of 0: a SYN that arrives while an earlier connection still
// waits to be accepted is dropped and retried by the kernel after 1 s,
// then 3 s later.
const dialTimeout = 10 * time.Second

// Errors returned by Card methods.
var (
	ErrInserted    = errors.New("vcard: card is already inserted")
	ErrNotInserted = errors.New("vcard: card is not inserted")
	ErrClosed      = errors.New("vcard: card is closed")
)

// Profile is the identity a card shows while inserted.
type Profile struct {
	Label        string // token label (PKCS#15 TokenInfo label)
	Serial       string // token serial; use an even number of lower-case hex digits to see it unchanged in OpenSC (see serialBytes)
	Manufacturer string // TokenInfo manufacturerID
	Cert         []byte // DER certificate in EF 4301; nil = a generated self-signed one (CN = Label)
}

// Card is a virtual card for one vpcd reader. It is safe for concurrent
// use; Insert, Remove, Swap and Close are serialized.
type Card struct {
	addr string

	op sync.Mutex // serializes Insert/Remove/Swap/Close (they block on I/O)

	mu       sync.Mutex // guards the fields below; never held during I/O
	profile  Profile
	fs       *file         // file system built for profile; nil until needed
	gen      int           // incremented by every profile change
	conn     *net.TCPConn  // current connection to vpcd, nil if removed
	done     chan struct{} // closed when conn's serve goroutine has returned
	read     chan struct{} // closed when the host read TokenInfo in this insertion
	lastAPDU atomic.Int64  // unix nanoseconds of the last command the host sent
	closed   bool
}

// New returns a removed card for the vpcd reader listening at addr
// ("127.0.0.1:PORT") that will show profile p once inserted.
func New(addr string, p Profile) *Card {
	return &Card{addr: addr, profile: p}
}

// SetProfile sets the profile for the next Insert; an inserted card keeps
// showing its current profile until it is removed.
func (c *Card) SetProfile(p Profile) {
	c.mu.Lock()
	c.profile, c.fs = p, nil
	c.gen++
	c.mu.Unlock()
}

// Inserted reports whether the card is connected to vpcd. It turns false
// on Remove, and also when vpcd drops the connection (pcscd exited).
func (c *Card) Inserted() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.aliveLocked()
}

func (c *Card) aliveLocked() bool {
	if c.conn == nil {
		return false
	}
	select {
	case <-c.done:
		return false
	default:
		return true
	}
}

// Insert connects the card to vpcd and returns once the TCP connection is
// established. pcscd notices the card at its next poll of the reader (vpcd
// is polled every 400 ms). Insert fails if the card is already inserted.
func (c *Card) Insert() error {
	c.op.Lock()
	defer c.op.Unlock()
	fs, err := c.prepare()
	if err != nil {
		return err
	}
	return c.insert(fs)
}

// Remove closes the connection to vpcd (pcscd sees the card gone at its
// next poll) and waits until the card stopped serving. It fails only if
// the card was not inserted; a connection vpcd already dropped is just
// cleaned up.
func (c *Card) Remove() error {
	c.op.Lock()
	defer c.op.Unlock()
	return c.remove()
}

// Swap replaces the card by one with profile p: it removes the card if it
// is inserted and inserts it again at once. The new file system is built
// before the removal so that the card is out as briefly as possible (but
// see dialTimeout about vpcd's backlog).
//
// pcscd does not always notice a swap (measured with pcscd 1.9.9 and
// Debian's vpcd):
//   - a swap of an idle card is reported as a removal and, one poll
//     (400 ms) later, an insertion: the event counter moves by 2;
//   - a swap within about 0.4 s after pcscd reported the insertion, or
//     while a client is talking to the card, is not reported at all: no
//     state change, the event counter stays, and clients talk to another
//     card without being told: pcscd logs no "Card Removed", and vpcd has
//     accepted the new connection (it dropped the dead one on a failed
//     write and accepted the waiting one at its next presence poll).
//
// To make sure a change is reported, Remove, wait until the removal is
// observed, then Insert.
func (c *Card) Swap(p Profile) error {
	c.op.Lock()
	defer c.op.Unlock()
	if c.isClosed() {
		return ErrClosed
	}
	fs, err := buildCard(p)
	if err != nil {
		return err
	}
	c.mu.Lock()
	c.profile, c.fs = p, fs
	c.gen++
	c.mu.Unlock()
	if err := c.remove(); err != nil && !errors.Is(err, ErrNotInserted) {
		return err
	}
	return c.insert(fs)
}

// Close removes the card if it is inserted; afterwards Insert and Swap
// fail. It is idempotent and leaves no goroutine behind.
func (c *Card) Close() error {
	c.op.Lock()
	defer c.op.Unlock()
	c.mu.Lock()
	c.closed = true
	c.mu.Unlock()
	if err := c.remove(); err != nil && !errors.Is(err, ErrNotInserted) {
		return err
	}
	return nil
}

// prepare returns the file system for the current profile, building it
// (and generating a certificate) once per profile. Called with c.op held.
func (c *Card) prepare() (*file, error) {
	c.mu.Lock()
	p, fs, gen, closed := c.profile, c.fs, c.gen, c.closed
	c.mu.Unlock()
	if closed {
		return nil, ErrClosed
	}
	if fs != nil {
		return fs, nil
	}
	fs, err := buildCard(p)
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	if c.gen == gen { // keep it (and its certificate) for later inserts
		c.fs = fs
	}
	c.mu.Unlock()
	return fs, nil
}

// buildCard builds the file system for p, generating the certificate if
// p has none.
func buildCard(p Profile) (*file, error) {
	cert := bytes.Clone(p.Cert)
	if cert == nil {
		var err error
		if cert, err = GenerateCert(p.Label); err != nil {
			return nil, err
		}
	}
	return buildFS(p, cert), nil
}

func (c *Card) isClosed() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closed
}

// insert connects and starts serving fs. Called with c.op held.
func (c *Card) insert(fs *file) error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return ErrClosed
	}
	if c.aliveLocked() {
		c.mu.Unlock()
		return ErrInserted
	}
	old := c.conn
	c.conn, c.done = nil, nil
	c.mu.Unlock()
	if old != nil { // vpcd dropped it; the serve goroutine has returned
		old.Close()
	}

	d := net.Dialer{Timeout: dialTimeout}
	nc, err := d.Dial("tcp", c.addr)
	if err != nil {
		return fmt.Errorf("vcard: insert into %s: %w", c.addr, err)
	}
	conn := nc.(*net.TCPConn)
	// Every response is one write; send it now rather than wait for
	// vpcd's ACK of the previous one (Nagle), which costs up to 40 ms an
	// APDU against delayed ACKs.
	if err := conn.SetNoDelay(true); err != nil {
		conn.Close()
		return fmt.Errorf("vcard: insert into %s: %w", c.addr, err)
	}
	done, read := make(chan struct{}), make(chan struct{})
	c.mu.Lock()
	c.conn, c.done, c.read = conn, done, read
	c.mu.Unlock()
	ch := newChip(fs)
	var once sync.Once
	ch.onTokenInfoRead = func() { once.Do(func() { close(read) }) }
	ch.onCommand = func() { c.lastAPDU.Store(time.Now().UnixNano()) }
	go serve(conn, ch, done)
	return nil
}

// WaitRecognized waits until the host has read the card's TokenInfo in the
// current insertion and then sent no command for idle: OpenSC has finished
// binding the card and shows it as a token. Tests that cycle a card as fast
// as the stack can recognize it call this before pulling the card; a card
// pulled in the middle of OpenSC's reading was never a token to anyone.
func (c *Card) WaitRecognized(idle, timeout time.Duration) error {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	select {
	case <-c.TokenInfoRead():
	case <-deadline.C:
		return fmt.Errorf("vcard: the host did not read TokenInfo within %v", timeout)
	}
	for {
		quiet := time.Since(time.Unix(0, c.lastAPDU.Load()))
		if quiet >= idle {
			return nil
		}
		select {
		case <-time.After(idle - quiet):
		case <-deadline.C:
			return fmt.Errorf("vcard: the host kept talking to the card for %v", timeout)
		}
	}
}

// TokenInfoRead returns a channel that is closed once the host (OpenSC,
// through pcscd) has read the card's TokenInfo during the current
// insertion: from then on the card is a token to the host. It returns nil
// (a channel that never fires) while the card is removed. Tests that cycle
// a card as fast as the stack can recognize it wait for this before
// removing the card; a card pulled earlier was never a token to anyone.
func (c *Card) TokenInfoRead() <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.conn == nil {
		return nil
	}
	return c.read
}

// remove closes the connection and waits for its serve goroutine. Called
// with c.op held.
func (c *Card) remove() error {
	c.mu.Lock()
	conn, done := c.conn, c.done
	c.conn, c.done = nil, nil
	c.mu.Unlock()
	if conn == nil {
		return ErrNotInserted
	}
	err := conn.Close()
	<-done
	if err != nil && !errors.Is(err, net.ErrClosed) {
		return fmt.Errorf("vcard: remove from %s: %w", c.addr, err)
	}
	return nil
}

// serve answers vpcd's messages on conn until the connection is closed
// (by Remove, or by vpcd when pcscd exits), then closes done.
func serve(conn *net.TCPConn, ch *chip, done chan<- struct{}) {
	defer close(done)
	r := bufio.NewReader(conn)
	for {
		msg, err := readMsg(conn, r)
		if err != nil {
			return // EOF, reset, or closed by Remove
		}
		var reply []byte
		switch {
		case len(msg) == 0:
			continue
		case len(msg) == 1:
			switch msg[0] {
			case ctrlOff, ctrlOn, ctrlReset:
				ch.reset()
				continue
			case ctrlGetATR:
				reply = ATR
			default:
				continue // unknown control code: vpcd expects no answer
			}
		default:
			reply = ch.process(msg)
		}
		if err := writeMsg(conn, reply); err != nil {
			return
		}
	}
}

// readMsg reads one length-prefixed vpcd message.
func readMsg(conn *net.TCPConn, r *bufio.Reader) ([]byte, error) {
	var hdr [2]byte
	quickAck(conn)
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, err
	}
	msg := make([]byte, binary.BigEndian.Uint16(hdr[:]))
	// vpcd writes the length and the payload separately, and holds the
	// payload back (Nagle) until the length is ACKed: ACK it now.
	quickAck(conn)
	if _, err := io.ReadFull(r, msg); err != nil {
		return nil, err
	}
	return msg, nil
}

// writeMsg writes one length-prefixed vpcd message in a single write.
func writeMsg(w io.Writer, payload []byte) error {
	buf := make([]byte, 2+len(payload))
	binary.BigEndian.PutUint16(buf, uint16(len(payload)))
	copy(buf[2:], payload)
	_, err := w.Write(buf)
	return err
}
