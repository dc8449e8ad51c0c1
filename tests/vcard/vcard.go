// Package vcard is a virtual smart card for tests: it plugs into the
// vsmartcard "vpcd" reader driver of a pcscd over TCP and serves a minimal
// ISO 7816-4 card carrying a PKCS#15 file system, which OpenSC (its
// "myeid" card driver, bound by the ATR, and its pkcs15 framework) exposes
// as a PKCS#11 token with a label, a serial number, one certificate and,
// behind a user PIN, the matching EC P-256 private key, which signs on the
// card (security.go, key.go).
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
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// ATR is the answer to reset the card sends: T=0 and T=1, and 13
// historical bytes (category 80, then COMPACT-TLV: card service data
// 31 C1, card capabilities 73 C8 40 00, and card issuer's data 55 "OsEID")
// ending in "OsEID", which is how OpenSC's "myeid" driver recognizes
// OsEID, the software implementation of the MyEID card: that driver reads
// the card's own PKCS#15 structure like the generic one does, and it also
// knows the card's EC algorithms, so that OpenSC can sign with the key (the
// generic "default" driver registers no algorithm). stack.WriteOpenSCConf
// enables it.
var ATR = []byte{
	0x3B, 0x8D, 0x80, 0x01,
	0x80, 0x31, 0xC1, 0x73, 0xC8, 0x40, 0x00, 0x55, 'O', 's', 'E', 'I', 'D',
	0xA6, // TCK
}

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
	Cert         []byte // DER certificate in EF 4301; nil = Certificate(p), a self-signed one of the card's key (CN = Label)
	PIN          string // user PIN, MinPINLen to MaxPINLen bytes, not ending in 0xFF; "" = DefaultPIN
	// NoKey leaves out the private key and the PIN: the card has no
	// PrKDF, AODF or key file, and OpenSC shows a token that needs no
	// login and that it never asks for a PIN status (the card before it
	// had a key).
	NoKey bool
}

// Card is a virtual card for one vpcd reader. It is safe for concurrent
// use; Insert, Remove, Swap and Close are serialized.
type Card struct {
	addr string

	op sync.Mutex // serializes Insert/Remove/Swap/Close (they block on I/O)

	mu       sync.Mutex // guards the fields below; never held during I/O
	profile  Profile
	img      *image        // card built for profile; nil until needed
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
// showing its current profile until it is removed. The next Insert serves
// a card built anew, with a PIN retry counter at PINTries, even if p is
// the profile the card already had.
func (c *Card) SetProfile(p Profile) {
	c.mu.Lock()
	c.profile, c.img = p, nil
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
	img, err := c.prepare()
	if err != nil {
		return err
	}
	return c.insert(img)
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
//
// Like SetProfile, Swap always serves a card built anew (PIN retry
// counter at PINTries).
func (c *Card) Swap(p Profile) error {
	c.op.Lock()
	defer c.op.Unlock()
	if c.isClosed() {
		return ErrClosed
	}
	img, err := buildCard(p)
	if err != nil {
		return err
	}
	c.mu.Lock()
	c.profile, c.img = p, img
	c.gen++
	c.mu.Unlock()
	if err := c.remove(); err != nil && !errors.Is(err, ErrNotInserted) {
		return err
	}
	return c.insert(img)
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

// prepare returns the card built for the current profile, building it
// (and its certificate and key) once per profile. Called with c.op held.
func (c *Card) prepare() (*image, error) {
	c.mu.Lock()
	p, img, gen, closed := c.profile, c.img, c.gen, c.closed
	c.mu.Unlock()
	if closed {
		return nil, ErrClosed
	}
	if img != nil {
		return img, nil
	}
	img, err := buildCard(p)
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	if c.gen == gen { // keep it (and its PIN counter) for later inserts
		c.img = img
	}
	c.mu.Unlock()
	return img, nil
}

// buildCard builds the card for p: its certificate (Certificate), its key
// and PIN unless p.NoKey, and its file system.
func buildCard(p Profile) (*image, error) {
	cert, err := Certificate(p)
	if err != nil {
		return nil, err
	}
	img := &image{cert: cert, serial: serialBytes(p.Serial)}
	if !p.NoKey {
		pin := ProfilePIN(p)
		if len(pin) < MinPINLen || len(pin) > MaxPINLen || pin[len(pin)-1] == 0xFF {
			return nil, fmt.Errorf("vcard: PIN of %d bytes: want %d to %d, not ending in 0xFF", len(pin), MinPINLen, MaxPINLen)
		}
		img.key, img.pin = ProfileKey(p), []byte(pin)
		img.tries.Store(PINTries)
	}
	img.mf = buildFS(p, cert, !p.NoKey)
	return img, nil
}

func (c *Card) isClosed() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closed
}

// insert connects and starts serving img. Called with c.op held.
func (c *Card) insert(img *image) error {
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
	ch := newChip(img)
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
