package vcard

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"sync"
	"testing"
	"time"
)

// fakeVPCD is the reader side of the vpcd protocol: a TCP listener whose
// accepted connections are the inserted cards.
type fakeVPCD struct {
	t  *testing.T
	ln net.Listener
}

func newFakeVPCD(t *testing.T) *fakeVPCD {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return &fakeVPCD{t: t, ln: ln}
}

func (f *fakeVPCD) addr() string { return f.ln.Addr().String() }

// accept waits for the next insertion.
func (f *fakeVPCD) accept() *slot {
	f.t.Helper()
	f.ln.(*net.TCPListener).SetDeadline(time.Now().Add(5 * time.Second))
	c, err := f.ln.Accept()
	if err != nil {
		f.t.Fatalf("accept: %v", err)
	}
	f.t.Cleanup(func() { c.Close() })
	return &slot{t: f.t, c: c, r: bufio.NewReader(c)}
}

// slot is one accepted card connection.
type slot struct {
	t *testing.T
	c net.Conn
	r *bufio.Reader
}

func (s *slot) send(payload []byte) {
	s.t.Helper()
	msg := binary.BigEndian.AppendUint16(nil, uint16(len(payload)))
	if _, err := s.c.Write(append(msg, payload...)); err != nil {
		s.t.Fatalf("write: %v", err)
	}
}

func (s *slot) recv() []byte {
	s.t.Helper()
	s.c.SetReadDeadline(time.Now().Add(5 * time.Second))
	var hdr [2]byte
	if _, err := io.ReadFull(s.r, hdr[:]); err != nil {
		s.t.Fatalf("read: %v", err)
	}
	msg := make([]byte, binary.BigEndian.Uint16(hdr[:]))
	if _, err := io.ReadFull(s.r, msg); err != nil {
		s.t.Fatalf("read: %v", err)
	}
	return msg
}

// transmit sends an APDU (hex) and returns the response APDU.
func (s *slot) transmit(apdu string) []byte {
	s.t.Helper()
	s.send(h(apdu))
	return s.recv()
}

// powerUp does what vpcd does on insertion: power on, then ask the ATR.
func (s *slot) powerUp() {
	s.t.Helper()
	s.send([]byte{ctrlOn})
	s.send([]byte{ctrlGetATR})
	if atr := s.recv(); !bytes.Equal(atr, ATR) {
		s.t.Fatalf("ATR %X, want %X", atr, ATR)
	}
}

// waitClosed waits until the card closed the connection.
func (s *slot) waitClosed() {
	s.t.Helper()
	s.c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := s.r.ReadByte(); err != io.EOF {
		s.t.Fatalf("connection not closed by the card: %v", err)
	}
}

// label reads the TokenInfo through the wire and reports whether it
// contains label.
func (s *slot) hasLabel(label string) bool {
	s.t.Helper()
	if r := s.transmit("00A4080C0450155032"); !bytes.Equal(r, h("9000")) {
		s.t.Fatalf("SELECT TokenInfo: %X", r)
	}
	r := s.transmit("00B0000000")
	return bytes.Contains(r, []byte(label))
}

func TestCardOverTCP(t *testing.T) {
	vpcd := newFakeVPCD(t)
	card := New(vpcd.addr(), Profile{Label: "First", Serial: "01"})
	defer card.Close()

	if card.Inserted() {
		t.Fatal("new card is inserted")
	}
	if err := card.Remove(); !errors.Is(err, ErrNotInserted) {
		t.Fatalf("Remove of a removed card: %v", err)
	}
	if err := card.Insert(); err != nil {
		t.Fatal(err)
	}
	if err := card.Insert(); !errors.Is(err, ErrInserted) {
		t.Fatalf("second Insert: %v", err)
	}
	s := vpcd.accept()
	s.powerUp()
	if !s.hasLabel("First") {
		t.Fatal("label First not on the card")
	}
	if r := s.transmit("00A4000C024F00"); !bytes.Equal(r, h("6A82")) {
		t.Fatalf("SELECT missing file: %X", r)
	}
	// A reset re-selects the MF: READ BINARY has no current EF.
	s.send([]byte{ctrlReset})
	if r := s.transmit("00B0000000"); !bytes.Equal(r, h("6986")) {
		t.Fatalf("READ BINARY after reset: %X", r)
	}

	// SetProfile does not change the inserted card.
	card.SetProfile(Profile{Label: "Second", Serial: "02"})
	if !s.hasLabel("First") {
		t.Fatal("SetProfile changed the inserted card")
	}
	if err := card.Remove(); err != nil {
		t.Fatal(err)
	}
	s.waitClosed()
	if card.Inserted() {
		t.Fatal("removed card is inserted")
	}

	if err := card.Insert(); err != nil {
		t.Fatal(err)
	}
	s = vpcd.accept()
	s.powerUp()
	if !s.hasLabel("Second") {
		t.Fatal("label Second not on the card after SetProfile + Insert")
	}

	if err := card.Swap(Profile{Label: "Third", Serial: "03"}); err != nil {
		t.Fatal(err)
	}
	s.waitClosed()
	s = vpcd.accept()
	s.powerUp()
	if !s.hasLabel("Third") {
		t.Fatal("label Third not on the card after Swap")
	}

	if err := card.Close(); err != nil {
		t.Fatal(err)
	}
	s.waitClosed()
	if err := card.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if err := card.Insert(); !errors.Is(err, ErrClosed) {
		t.Fatalf("Insert after Close: %v", err)
	}
}

// TestReaderDropsCard: when vpcd closes the connection (pcscd exited) the
// card is no longer inserted and can be inserted again.
func TestReaderDropsCard(t *testing.T) {
	vpcd := newFakeVPCD(t)
	card := New(vpcd.addr(), Profile{Label: "Dropped"})
	defer card.Close()
	if err := card.Insert(); err != nil {
		t.Fatal(err)
	}
	s := vpcd.accept()
	s.powerUp()
	s.c.Close()
	deadline := time.Now().Add(5 * time.Second)
	for card.Inserted() {
		if time.Now().After(deadline) {
			t.Fatal("card still inserted after vpcd closed the connection")
		}
		time.Sleep(time.Millisecond)
	}
	if err := card.Insert(); err != nil {
		t.Fatalf("Insert after the reader dropped the card: %v", err)
	}
	s = vpcd.accept()
	s.powerUp()
	if !s.hasLabel("Dropped") {
		t.Fatal("label lost")
	}
}

func TestInsertWithoutReader(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	card := New(addr, Profile{Label: "Nowhere"})
	defer card.Close()
	if err := card.Insert(); err == nil {
		t.Fatal("Insert without a listening vpcd succeeded")
	}
	if card.Inserted() {
		t.Fatal("failed Insert left the card inserted")
	}
}

// TestConcurrentUse runs the whole API from several goroutines (for the
// race detector); every Insert must be matched by the fake reader.
func TestConcurrentUse(t *testing.T) {
	vpcd := newFakeVPCD(t)
	go func() { // a reader that accepts and answers ATR requests
		for {
			c, err := vpcd.ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				r := bufio.NewReader(c)
				c.Write([]byte{0, 1, ctrlGetATR})
				var hdr [2]byte
				io.ReadFull(r, hdr[:])
				io.Copy(io.Discard, r)
			}()
		}
	}()
	card := New(vpcd.addr(), Profile{Label: "Busy"})
	var wg sync.WaitGroup
	for i := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range 20 {
				switch (i + j) % 5 {
				case 0:
					card.Insert()
				case 1:
					card.Remove()
				case 2:
					card.Swap(Profile{Label: "Swapped"})
				case 3:
					card.SetProfile(Profile{Label: "Set"})
				case 4:
					card.Inserted()
				}
			}
		}()
	}
	wg.Wait()
	if err := card.Close(); err != nil {
		t.Fatal(err)
	}
	if card.Inserted() {
		t.Fatal("closed card is inserted")
	}
}
