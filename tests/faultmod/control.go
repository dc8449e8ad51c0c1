package faultmod

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"
)

// NoSlot is Call.Slot for a call that addressed no slot.
const NoSlot = ^uint(0)

// commandTimeout bounds one command's round trip.
const commandTimeout = 30 * time.Second

// Call is one entry of the module's call record.
type Call struct {
	Seq    int    // 1, 2, ... in the order calls returned; not restarted by ClearCalls
	Func   string // PKCS#11 name, e.g. "C_OpenSession"
	RV     uint   // the CK_RV returned
	Handle uint   // the session handle used or returned; 0 if none
	Slot   uint   // the slot named, the session's, or the one an event was for; NoSlot if none
	Serial string // serial of the token the handle or slot addressed at call time; "" if none
}

func (c Call) String() string {
	slot, serial := "-", c.Serial
	if c.Slot != NoSlot {
		slot = strconv.FormatUint(uint64(c.Slot), 10)
	}
	if serial == "" {
		serial = "-"
	}
	return fmt.Sprintf("%d %s rv=%#x handle=%d slot=%s serial=%s", c.Seq, c.Func, c.RV, c.Handle, slot, serial)
}

// WaitMode is how C_WaitForSlotEvent behaves (see the package doc).
type WaitMode string

const (
	WaitBlock    WaitMode = "block"    // normal
	WaitReturn   WaitMode = "return"   // every wait returns slot 0 at once
	WaitCoalesce WaitMode = "coalesce" // the next n changes raise one event
	WaitHang     WaitMode = "hang"     // waits never return, not even on C_Finalize, until another mode
)

// Error is an "err" reply of the module.
type Error struct {
	Command string // the command line sent
	Msg     string // the module's message
}

func (e *Error) Error() string { return fmt.Sprintf("faultmod: %s: %s", e.Command, e.Msg) }

// Control is a connection to a loaded module's control socket. Its methods
// may be called from several goroutines; commands go one at a time.
type Control struct {
	mu   sync.Mutex
	conn net.Conn
	r    *bufio.Reader
}

// Dial connects to the control socket at path.
func Dial(socket string) (*Control, error) {
	conn, err := net.Dial("unix", socket)
	if err != nil {
		return nil, fmt.Errorf("faultmod: %w", err)
	}
	return &Control{conn: conn, r: bufio.NewReader(conn)}, nil
}

// DialTimeout is Dial, retried until the socket accepts or timeout passes:
// for a socket a child process creates when it loads the module.
func DialTimeout(socket string, timeout time.Duration) (*Control, error) {
	deadline := time.Now().Add(timeout)
	for {
		c, err := Dial(socket)
		if err == nil || time.Now().After(deadline) {
			return c, err
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Close closes the connection. Faults stay as they are; see Reset.
func (c *Control) Close() error { return c.conn.Close() }

// Command sends one raw protocol line and returns the text after "ok" (an
// "err" reply is an *Error). For calls, use Calls.
func (c *Control) Command(line string) (string, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.roundTrip(line)
}

func (c *Control) roundTrip(line string) (string, error) {
	if strings.ContainsAny(line, "\r\n") {
		return "", fmt.Errorf("faultmod: command %q spans lines", line)
	}
	if err := c.conn.SetDeadline(time.Now().Add(commandTimeout)); err != nil {
		return "", fmt.Errorf("faultmod: %w", err)
	}
	if _, err := c.conn.Write([]byte(line + "\n")); err != nil {
		return "", fmt.Errorf("faultmod: %s: %w", line, err)
	}
	reply, err := c.readLine()
	if err != nil {
		return "", fmt.Errorf("faultmod: %s: %w", line, err)
	}
	switch {
	case reply == "ok":
		return "", nil
	case strings.HasPrefix(reply, "ok "):
		return reply[3:], nil
	case strings.HasPrefix(reply, "err "):
		return "", &Error{Command: line, Msg: reply[4:]}
	}
	return "", fmt.Errorf("faultmod: %s: unexpected reply %q", line, reply)
}

func (c *Control) readLine() (string, error) {
	s, err := c.r.ReadString('\n')
	if err != nil {
		return "", err
	}
	return strings.TrimSuffix(s, "\n"), nil
}

func (c *Control) do(format string, args ...any) error {
	_, err := c.Command(fmt.Sprintf(format, args...))
	return err
}

// Insert puts a token into an empty slot: one slot event. label is at most
// 32 bytes, serial 1..16; any bytes.
func (c *Control) Insert(slot uint, label, serial string) error {
	if serial == "" {
		return errors.New("faultmod: insert: empty serial")
	}
	return c.do("insert %d %s %s", slot, encodeWord(label), encodeWord(serial))
}

// Remove takes the token out of slot: its sessions end, one slot event.
func (c *Control) Remove(slot uint) error { return c.do("remove %d", slot) }

// Swap replaces the token in slot by another, as one change (one event).
func (c *Control) Swap(slot uint, label, serial string) error {
	if serial == "" {
		return errors.New("faultmod: swap: empty serial")
	}
	return c.do("swap %d %s %s", slot, encodeWord(label), encodeWord(serial))
}

// SetPIN sets the PIN (user, SO and C_InitToken alike) of the token in
// slot; a token starts with "1234".
func (c *Control) SetPIN(slot uint, pin string) error {
	if pin == "" {
		return errors.New("faultmod: pin: empty PIN")
	}
	return c.do("pin %d %s", slot, encodeWord(pin))
}

// SetWait sets how C_WaitForSlotEvent behaves; n is the number of changes
// for WaitCoalesce and ignored otherwise.
func (c *Control) SetWait(mode WaitMode, n int) error {
	if mode == WaitCoalesce {
		return c.do("wait coalesce %d", n)
	}
	return c.do("wait %s", mode)
}

// ReuseHandles switches handle reuse: on, C_OpenSession hands out the lowest
// handle value freed by a token removal first.
func (c *Control) ReuseHandles(on bool) error {
	if on {
		return c.do("reuse-handles on")
	}
	return c.do("reuse-handles off")
}

// Fail makes calls nth .. nth+count-1 of fn (e.g. "GetSlotList"), counted
// from now, return rv and do nothing else. count 0 means every call from the
// nth on (until Reset or another Fail for fn).
func (c *Control) Fail(fn string, rv uint, nth, count int) error {
	if nth < 1 || count < 0 {
		return fmt.Errorf("faultmod: fail %s: nth %d, count %d: want nth >= 1, count >= 0", fn, nth, count)
	}
	return c.do("fail %s %#x %d %d", fn, rv, nth, count)
}

// Sleep makes every call of fn sleep d first (0: no more sleeping).
func (c *Control) Sleep(fn string, d time.Duration) error {
	return c.do("sleep %s %d", fn, d.Milliseconds())
}

// Abort makes call nth of fn, counted from now, abort the process (SIGABRT).
func (c *Control) Abort(fn string, nth int) error {
	if nth < 1 {
		return fmt.Errorf("faultmod: abort %s: nth %d: want >= 1", fn, nth)
	}
	return c.do("abort %s %d", fn, nth)
}

// ClearCalls empties the call record.
func (c *Control) ClearCalls() error { return c.do("clear-calls") }

// Reset switches every fault off: fail, sleep, abort, wait mode (back to
// block, releasing hung waits), handle reuse. Tokens stay.
func (c *Control) Reset() error { return c.do("reset") }

// Calls returns the call record, oldest first.
func (c *Control) Calls() ([]Call, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	head, err := c.roundTrip("calls")
	if err != nil {
		return nil, err
	}
	n, err := strconv.Atoi(head)
	if err != nil || n < 0 {
		return nil, fmt.Errorf("faultmod: calls: bad reply %q", head)
	}
	calls := make([]Call, 0, n)
	var bad error
	for range n {
		line, err := c.readLine()
		if err != nil {
			return nil, fmt.Errorf("faultmod: calls: %w", err)
		}
		call, err := parseCall(line)
		if err != nil && bad == nil {
			bad = err // read on: the rest of the dump must leave the socket
		}
		calls = append(calls, call)
	}
	if bad != nil {
		return nil, bad
	}
	return calls, nil
}

func parseCall(line string) (Call, error) {
	f := strings.Fields(line)
	bad := func(what string) (Call, error) {
		return Call{}, fmt.Errorf("faultmod: calls: bad %s in %q", what, line)
	}
	if len(f) != 6 {
		return bad("line")
	}
	var c Call
	var err error
	if c.Seq, err = strconv.Atoi(f[0]); err != nil {
		return bad("seq")
	}
	c.Func = f[1]
	rv, err := strconv.ParseUint(f[2], 0, 64)
	if err != nil {
		return bad("rv")
	}
	c.RV = uint(rv)
	if f[3] != "-" {
		h, err := strconv.ParseUint(f[3], 10, 64)
		if err != nil {
			return bad("handle")
		}
		c.Handle = uint(h)
	}
	c.Slot = NoSlot
	if f[4] != "-" {
		s, err := strconv.ParseUint(f[4], 10, 64)
		if err != nil {
			return bad("slot")
		}
		c.Slot = uint(s)
	}
	if f[5] != "-" {
		if c.Serial, err = decodeWord(f[5]); err != nil {
			return bad("serial")
		}
	}
	return c, nil
}

// encodeWord makes s one protocol word: "-" for "", %XX for blanks,
// controls, non-ASCII bytes, "%" and ";" (FAULTMOD_TOKENS's separator), and
// for a lone "-".
func encodeWord(s string) string {
	switch s {
	case "":
		return "-"
	case "-":
		return "%2D"
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		ch := s[i]
		if ch <= ' ' || ch >= 0x7f || ch == '%' || ch == ';' {
			fmt.Fprintf(&b, "%%%02X", ch)
		} else {
			b.WriteByte(ch)
		}
	}
	return b.String()
}

// decodeWord is encodeWord's inverse.
func decodeWord(w string) (string, error) {
	if w == "-" {
		return "", nil
	}
	var b strings.Builder
	for i := 0; i < len(w); i++ {
		if w[i] != '%' {
			b.WriteByte(w[i])
			continue
		}
		if i+2 >= len(w) {
			return "", fmt.Errorf("bad escape in %q", w)
		}
		v, err := strconv.ParseUint(w[i+1:i+3], 16, 8)
		if err != nil {
			return "", fmt.Errorf("bad escape in %q", w)
		}
		b.WriteByte(byte(v))
		i += 2
	}
	return b.String(), nil
}
