package vcard

import (
	"bytes"
	"errors"
)

// Status words (ISO 7816-4 section 5.6) the card answers with.
const (
	swOK               = 0x9000
	swEndOfFile        = 0x6282 // fewer bytes than Le: end of file reached
	swWrongLength      = 0x6700
	swLogicalChannel   = 0x6881 // logical channels not supported
	swSecureMessaging  = 0x6882 // secure messaging not supported
	swChaining         = 0x6884 // command chaining not supported
	swConditions       = 0x6985 // e.g. GET RESPONSE with nothing pending
	swNoCurrentEF      = 0x6986
	swFuncNotSupported = 0x6A81
	swFileNotFound     = 0x6A82
	swIncorrectP1P2    = 0x6A86
	swWrongP1P2        = 0x6B00 // offset outside the EF
	swINSNotSupported  = 0x6D00
	swCLANotSupported  = 0x6E00
	swBytesRemaining   = 0x6100 // 61XX: XX more bytes for GET RESPONSE
)

// Instructions the card implements; every other INS gets 6D00 (except
// those of the OpenPGP application while it is selected, openpgp.go).
// VERIFY, MSE, PSO, GET CHALLENGE, GET DATA and LOGOUT are in
// security.go.
const (
	insSelect      = 0xA4
	insReadBinary  = 0xB0
	insGetResponse = 0xC0

	maxShortResponseData = 256 // GET RESPONSE without Le
)

// command is a parsed command APDU (ISO 7816-4 section 5.1).
type command struct {
	cla, ins, p1, p2 byte
	data             []byte
	ne               int // expected response length (Le decoded: 00 means 256, or 65536 extended); 0 if absent
	hasLe            bool
}

var errAPDULength = errors.New("malformed APDU length fields")

// parseCommand decodes the four cases of short and extended APDUs.
func parseCommand(b []byte) (command, error) {
	if len(b) < 4 {
		return command{}, errAPDULength
	}
	c := command{cla: b[0], ins: b[1], p1: b[2], p2: b[3]}
	body := b[4:]
	switch {
	case len(body) == 0: // case 1
		return c, nil
	case len(body) == 1: // case 2 short
		c.hasLe, c.ne = true, int(body[0])
		if c.ne == 0 {
			c.ne = 256
		}
		return c, nil
	case body[0] != 0: // case 3 or 4 short
		lc := int(body[0])
		switch len(body) {
		case 1 + lc:
			c.data = body[1:]
		case 2 + lc:
			c.data = body[1 : 1+lc]
			c.hasLe, c.ne = true, int(body[1+lc])
			if c.ne == 0 {
				c.ne = 256
			}
		default:
			return c, errAPDULength
		}
		return c, nil
	case len(body) == 3: // case 2 extended: 00 Le1 Le2
		c.hasLe, c.ne = true, int(body[1])<<8|int(body[2])
		if c.ne == 0 {
			c.ne = 65536
		}
		return c, nil
	case len(body) > 3: // case 3 or 4 extended: 00 Lc1 Lc2 data [Le1 Le2]
		lc := int(body[1])<<8 | int(body[2])
		switch len(body) {
		case 3 + lc:
			c.data = body[3:]
		case 5 + lc:
			c.data = body[3 : 3+lc]
			c.hasLe, c.ne = true, int(body[3+lc])<<8|int(body[4+lc])
			if c.ne == 0 {
				c.ne = 65536
			}
		default:
			return c, errAPDULength
		}
		if lc == 0 {
			return c, errAPDULength
		}
		return c, nil
	}
	return c, errAPDULength
}

// chip is the card's operating system for one insertion: the card (file
// system and secrets) plus the selection state, the security state and
// the pending GET RESPONSE data. It is not safe for concurrent use; one
// connection's serve goroutine owns it.
type chip struct {
	img     *image
	mf      *file
	curDF   *file
	curEF   *file
	pending []byte
	// onTokenInfoRead, if set, is called after every successful READ
	// BINARY of TokenInfo: the host has read what it needs to show the
	// token.
	onTokenInfoRead func()
	// onCommand, if set, is called for every command APDU.
	onCommand func()
	// pgp is the OpenPGP application (openpgp.go).
	pgp openPGPState
	// sec is the PIN verification and security environment (security.go).
	sec secState
}

func newChip(img *image) *chip {
	c := &chip{img: img, mf: img.mf}
	c.reset()
	return c
}

// reset is what a power cycle or warm reset does: the MF is selected again,
// nothing is pending, and no PIN is verified any more.
func (c *chip) reset() {
	c.curDF, c.curEF, c.pending = c.mf, nil, nil
	c.pgp.selected = false
	c.sec = secState{}
}

// process executes one command APDU and returns the response APDU
// (response data followed by SW1 SW2).
func (c *chip) process(apdu []byte) []byte {
	if c.onCommand != nil {
		c.onCommand()
	}
	cmd, err := parseCommand(apdu)
	if err != nil {
		return sw(nil, swWrongLength)
	}
	switch {
	case cmd.cla&0x80 != 0: // proprietary class (incl. PC/SC's FF pseudo-APDUs)
		return sw(nil, swCLANotSupported)
	case cmd.cla&0x60 != 0: // further interindustry classes (channels 4-19), RFU
		return sw(nil, swLogicalChannel)
	case cmd.cla&0x03 != 0:
		return sw(nil, swLogicalChannel)
	case cmd.cla&0x0C != 0:
		return sw(nil, swSecureMessaging)
	case cmd.cla&0x10 != 0:
		return sw(nil, swChaining)
	}

	if cmd.ins == insGetResponse {
		return c.getResponse(cmd)
	}
	c.pending = nil // GET RESPONSE only continues the command right before it

	if resp, ok := c.openPGP(cmd); ok {
		return resp
	}
	switch cmd.ins {
	case insSelect:
		data, status := c.selectFile(cmd)
		return c.respond(cmd, data, status)
	case insReadBinary:
		data, status := c.readBinary(cmd)
		if (status == swOK || status == swEndOfFile) && c.curEF.fid == fidTokenInfo && c.onTokenInfoRead != nil {
			c.onTokenInfoRead()
		}
		return sw(data, status) // readBinary already honoured Le
	case insVerify:
		return sw(nil, c.verify(cmd))
	case insLogout:
		return sw(nil, c.logout(cmd))
	case insMSE:
		return sw(nil, c.mse(cmd))
	case insPSO:
		data, status := c.pso(cmd)
		return c.respond(cmd, data, status)
	case insGetChallenge:
		data, status := getChallenge(cmd)
		return sw(data, status) // exactly Le bytes
	case insGetData:
		data, status := c.getData(cmd)
		return c.respond(cmd, data, status)
	default:
		return sw(nil, swINSNotSupported)
	}
}

// respond sends data the way ISO 7816-4 wants for commands whose answer
// does not depend on an offset: as much as Le allows, the rest announced
// with 61XX for GET RESPONSE. Without Le (a case 3 command, which is how a
// T=0 reader sends a case 4 command) everything waits for GET RESPONSE.
func (c *chip) respond(cmd command, data []byte, status uint16) []byte {
	if status != swOK || len(data) == 0 {
		return sw(nil, status)
	}
	n := 0
	if cmd.hasLe {
		n = min(cmd.ne, len(data))
	}
	if n == len(data) {
		return sw(data, swOK)
	}
	c.pending = data[n:]
	return sw(data[:n], swBytesRemaining|uint16(min(len(c.pending), 0xFF)))
}

func (c *chip) getResponse(cmd command) []byte {
	if cmd.p1 != 0 || cmd.p2 != 0 {
		return sw(nil, swIncorrectP1P2)
	}
	if len(c.pending) == 0 {
		return sw(nil, swConditions)
	}
	ne := maxShortResponseData
	if cmd.hasLe {
		ne = cmd.ne
	}
	n := min(ne, len(c.pending))
	out := c.pending[:n]
	c.pending = c.pending[n:]
	if len(c.pending) == 0 {
		c.pending = nil
		return sw(out, swOK)
	}
	return sw(out, swBytesRemaining|uint16(min(len(c.pending), 0xFF)))
}

// selectFile implements SELECT (ISO 7816-4 section 11.1.1). P1 chooses how
// the file is named; P2 bits 4-3 what comes back (00 FCI, 04 FCP, 08 FMD,
// 0C nothing) and bits 2-1 which occurrence (only DF names can have more
// than one; here every name is unique).
func (c *chip) selectFile(cmd command) ([]byte, uint16) {
	if cmd.p2&0xF0 != 0 {
		return nil, swIncorrectP1P2
	}
	occurrence := cmd.p2 & 0x03
	if occurrence != 0 && cmd.p1 != 0x04 {
		return nil, swIncorrectP1P2
	}

	var f *file
	switch cmd.p1 {
	case 0x00: // MF, DF or EF by file identifier; no data = MF
		if len(cmd.data) == 0 {
			f = c.mf
			break
		}
		if len(cmd.data) != 2 {
			return nil, swWrongLength
		}
		f = c.byFID(fid(cmd.data))
	case 0x01: // child DF
		if len(cmd.data) != 2 {
			return nil, swWrongLength
		}
		if ch := c.curDF.child(fid(cmd.data)); ch != nil && ch.df {
			f = ch
		}
	case 0x02: // EF under the current DF
		if len(cmd.data) != 2 {
			return nil, swWrongLength
		}
		if ch := c.curDF.child(fid(cmd.data)); ch != nil && !ch.df {
			f = ch
		}
	case 0x03: // parent DF of the current DF
		if len(cmd.data) != 0 {
			return nil, swWrongLength
		}
		f = c.curDF.parent
	case 0x04: // DF name (AID), possibly truncated; no data = MF
		if occurrence == 0x02 { // "next occurrence": names are unique
			return nil, swFileNotFound
		}
		if len(cmd.data) == 0 {
			f = c.mf
			break
		}
		f = findDFName(c.mf, cmd.data)
	case 0x08, 0x09: // path from the MF / from the current DF
		if len(cmd.data) == 0 || len(cmd.data)%2 != 0 {
			return nil, swWrongLength
		}
		start := c.mf
		path := cmd.data
		if cmd.p1 == 0x09 {
			start = c.curDF
		} else if fid(path) == fidMF { // tolerate a leading 3F00
			path = path[2:]
		}
		f = walk(start, path)
	default:
		return nil, swIncorrectP1P2
	}
	if f == nil {
		return nil, swFileNotFound
	}

	if f.df {
		c.curDF, c.curEF = f, nil
	} else {
		c.curDF, c.curEF = f.parent, f
	}

	switch cmd.p2 & 0x0C {
	case 0x00:
		return tlv(0x6F, f.fcp()), swOK // FCI template
	case 0x04:
		return tlv(0x62, f.fcp()), swOK // FCP template
	case 0x08:
		return tlv(0x64, nil), swOK // FMD template: nothing to say
	default:
		return nil, swOK
	}
}

// byFID resolves a file identifier the way P1=00 does: the MF, children
// of the current DF, the current DF itself, its parent and the parent's
// children.
func (c *chip) byFID(id uint16) *file {
	if id == fidMF {
		return c.mf
	}
	if f := c.curDF.child(id); f != nil {
		return f
	}
	if c.curDF.fid == id {
		return c.curDF
	}
	if p := c.curDF.parent; p != nil {
		if p.fid == id {
			return p
		}
		return p.child(id)
	}
	return nil
}

func walk(start *file, path []byte) *file {
	f := start
	for ; len(path) > 0 && f != nil; path = path[2:] {
		f = f.child(fid(path))
	}
	return f
}

func findDFName(f *file, name []byte) *file {
	if f.df && len(f.name) > 0 && bytes.HasPrefix(f.name, name) {
		return f
	}
	for _, ch := range f.children {
		if found := findDFName(ch, name); found != nil {
			return found
		}
	}
	return nil
}

// readBinary implements READ BINARY (ISO 7816-4 section 11.2.3) on the
// current EF with a 15-bit offset in P1-P2. Short EF identifiers (P1 bit 8)
// are not supported.
func (c *chip) readBinary(cmd command) ([]byte, uint16) {
	if cmd.p1&0x80 != 0 {
		return nil, swFuncNotSupported
	}
	if !cmd.hasLe || len(cmd.data) != 0 {
		return nil, swWrongLength
	}
	if c.curEF == nil { // nothing or a DF selected
		return nil, swNoCurrentEF
	}
	if c.curEF.internal { // a key
		return nil, swIncompatibleFile
	}
	data := c.curEF.data
	off := int(cmd.p1)<<8 | int(cmd.p2)
	if off > len(data) || (off == len(data) && len(data) > 0) {
		return nil, swWrongP1P2
	}
	rest := data[off:]
	if cmd.ne > len(rest) {
		return rest, swEndOfFile
	}
	return rest[:cmd.ne], swOK
}

func fid(b []byte) uint16 { return uint16(b[0])<<8 | uint16(b[1]) }

// sw appends the status word to data (in a new slice).
func sw(data []byte, status uint16) []byte {
	out := make([]byte, 0, len(data)+2)
	out = append(out, data...)
	return append(out, byte(status>>8), byte(status))
}
