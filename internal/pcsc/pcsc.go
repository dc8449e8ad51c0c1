// Package pcsc is the small PC/SC binding slotwatch watches readers with:
// establish, cancel and release a context, list readers, and
// SCardGetStatusChange. Result codes and state flags are
// github.com/ebfe/scard's types, so callers compare against scard.ErrNoService,
// scard.StatePresent and friends.
//
// Why not scard.Context.GetStatusChange: it keeps the C copy of each reader
// name alive only through a process-wide map keyed by the name. A second
// concurrent wait on the same reader (the monitor's watcher and a test's
// observer, or two contexts in the daemon) replaces the map entry, and the
// garbage collector may free the name that the first, still blocked, call
// reads on every wake-up inside libpcsclite. Here each call allocates its
// names in C and frees them when it returns.
package pcsc

/*
#cgo pkg-config: libpcsclite
#include <stdlib.h>
#include <string.h>
#include <winscard.h>
*/
import "C"

import (
	"time"
	"unsafe"

	"github.com/ebfe/scard"
)

// PnPNotification is the pseudo reader whose state changes when a reader is
// added or removed.
const PnPNotification = `\\?PnP?\Notification`

// Context is one PC/SC context (one connection to pcscd). Wait on it from one
// goroutine at a time; Cancel may be called from any goroutine.
type Context struct {
	h C.SCARDCONTEXT
}

// EstablishContext connects to pcscd (the socket named by
// PCSCLITE_CSOCK_NAME, read once per process by libpcsclite).
func EstablishContext() (*Context, error) {
	var h C.SCARDCONTEXT
	if rv := C.SCardEstablishContext(C.SCARD_SCOPE_SYSTEM, nil, nil, &h); rv != C.SCARD_S_SUCCESS {
		return nil, scard.Error(uint32(rv))
	}
	return &Context{h: h}, nil
}

func result(rv C.LONG) error {
	if rv == C.SCARD_S_SUCCESS {
		return nil
	}
	return scard.Error(uint32(rv))
}

// Cancel makes a blocked GetStatusChange on this context return
// scard.ErrCancelled.
func (c *Context) Cancel() error { return result(C.SCardCancel(c.h)) }

// Release closes the context.
func (c *Context) Release() error { return result(C.SCardReleaseContext(c.h)) }

// ListReaders returns the names of the readers pcscd knows, or an empty list
// (not an error) when there are none.
func (c *Context) ListReaders() ([]string, error) {
	var n C.DWORD
	rv := C.SCardListReaders(c.h, nil, nil, &n)
	if rv == C.SCARD_E_NO_READERS_AVAILABLE {
		return nil, nil
	}
	if err := result(rv); err != nil {
		return nil, err
	}
	buf := (*C.char)(C.malloc(C.size_t(n)))
	defer C.free(unsafe.Pointer(buf))
	rv = C.SCardListReaders(c.h, nil, buf, &n)
	if rv == C.SCARD_E_NO_READERS_AVAILABLE {
		return nil, nil
	}
	if err := result(rv); err != nil {
		return nil, err
	}
	return splitMultiString(C.GoBytes(unsafe.Pointer(buf), C.int(n))), nil
}

// splitMultiString splits PC/SC's "a\0b\0\0" list.
func splitMultiString(b []byte) []string {
	var out []string
	start := 0
	for i, c := range b {
		if c != 0 {
			continue
		}
		if i == start {
			break
		}
		out = append(out, string(b[start:i]))
		start = i + 1
	}
	return out
}

// ReaderState is one entry of a GetStatusChange call: the caller sets Reader
// and CurrentState; the call fills EventState and Atr.
type ReaderState struct {
	Reader       string
	CurrentState scard.StateFlag
	EventState   scard.StateFlag
	Atr          []byte
}

// EventCount is PC/SC's per-reader event counter: the high 16 bits of the
// event state. pcsc-lite counts card insertions and removals in it and
// resets it when the reader goes away.
func (s ReaderState) EventCount() uint16 { return uint16(uint32(s.EventState) >> 16) }

// GetStatusChange blocks until the state of one of the readers differs from
// its CurrentState, the timeout passes (scard.ErrTimeout), or Cancel is
// called (scard.ErrCancelled). A negative timeout waits forever.
func (c *Context) GetStatusChange(states []ReaderState, timeout time.Duration) error {
	if len(states) == 0 {
		return nil
	}
	n := len(states)
	cs := (*[1 << 16]C.SCARD_READERSTATE)(C.calloc(C.size_t(n), C.size_t(unsafe.Sizeof(C.SCARD_READERSTATE{}))))[:n:n]
	defer C.free(unsafe.Pointer(&cs[0]))
	for i := range states {
		cs[i].szReader = C.CString(states[i].Reader)
		defer C.free(unsafe.Pointer(cs[i].szReader))
		cs[i].dwCurrentState = C.DWORD(states[i].CurrentState)
	}
	ms := C.DWORD(C.INFINITE)
	if timeout >= 0 {
		ms = C.DWORD(timeout / time.Millisecond)
	}
	if err := result(C.SCardGetStatusChange(c.h, ms, &cs[0], C.DWORD(n))); err != nil {
		return err
	}
	for i := range states {
		states[i].EventState = scard.StateFlag(cs[i].dwEventState)
		states[i].Atr = C.GoBytes(unsafe.Pointer(&cs[i].rgbAtr[0]), C.int(cs[i].cbAtr))
	}
	return nil
}
