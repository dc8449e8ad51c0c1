package module

import (
	"log/slog"
	"time"

	"github.com/miekg/pkcs11"
)

// WaitForSlotEvent is C_WaitForSlotEvent, called through the module's own
// function list so that its return code survives (funclist.go). With
// dontBlock it polls (CKF_DONT_BLOCK); otherwise it blocks until a slot event.
//
// It returns the slot id with a nil error, or:
//   - ErrNoEvent: nothing happened (polling only);
//   - ErrFunctionNotSupported: the module cannot wait (SoftHSM); poll instead;
//   - ErrNotInitialized: the module is not initialized, or the last Finalize
//     ran while the wait was blocked (how shutdown cancels a wait);
//   - any other mapped CKR (OpenSC returns CKR_GENERAL_ERROR while pcscd is
//     gone). The slot id is meaningless whenever the error is not nil.
//
// It holds no lock of the Module while blocked — Finalize must be able to run
// meanwhile, it is what unblocks the wait. Instead it holds its own dlopen
// reference to the library, so the code it is blocked in stays mapped even
// after the last Finalize unloaded the module for everyone else.
func (m *Module) WaitForSlotEvent(dontBlock bool) (uint, error) {
	const fn = "C_WaitForSlotEvent"
	if m.isolate {
		// One RPC pipe per instance: a blocked wait would hold up every
		// other call (isolate.go). The monitor polls isolated modules.
		return 0, &Error{Func: fn, Code: pkcs11.CKR_FUNCTION_NOT_SUPPORTED}
	}
	m.life.RLock()
	if m.ctx == nil {
		m.life.RUnlock()
		return 0, notInitialized(fn)
	}
	lib, ok := refLoaded(m.path)
	m.life.RUnlock()
	if !ok { // cannot happen while ctx is set: miekg holds the library
		return 0, notInitialized(fn)
	}
	defer lib.release()

	var flags uint
	if dontBlock {
		flags = pkcs11.CKF_DONT_BLOCK
	}
	start := time.Now()
	slot, rv := lib.waitForSlotEvent(flags)
	if rv != pkcs11.CKR_OK {
		// The slot id is whatever the module left there (OpenSC: garbage
		// when pcscd is gone); neither log nor return it.
		return 0, m.result(fn, start, rvError(fn, rv), slog.Bool("dont_block", dontBlock))
	}
	return slot, m.result(fn, start, nil, slog.Bool("dont_block", dontBlock), slog.Uint64("slot", uint64(slot)))
}
