// Package faultmod drives faultmod, the fault-injection PKCS#11 module of
// slotwatch's hardening tests (C, csrc/faultmod.c, built by `make faultmod`
// into build/libfaultmod.so; Path finds it).
//
// faultmod stands in for a smart card stack only where no real module
// misbehaves on demand (DESIGN.md, "The real stack in tests"): session
// handle values reused right after a removal, a C_WaitForSlotEvent that
// spins, coalesces events or hangs through C_Finalize, any CK_RV from any
// function on cue, slow calls, abort() inside a call. Hotplug through
// pcscd, sessions, login and signing against real cards belong to OpenSC and
// SoftHSM2.
//
// # The module
//
// PKCS#11 v2.40. FAULTMOD_SLOTS slots (1..64, default 4), ids 0..N-1,
// CKF_REMOVABLE_DEVICE|CKF_HW_SLOT, described "faultmod slot N", empty at
// first except for the tokens FAULTMOD_TOKENS names (TokensEnv). A token has a label, a serial and a PIN ("1234" unless set; it
// is the user PIN, the SO PIN and C_InitToken's SO PIN alike) and two
// objects, both CKA_ID 01: a public X.509 certificate (CKA_CLASS, CKA_ID,
// CKA_LABEL, CKA_VALUE (DER), CKA_SUBJECT, CKA_ISSUER, CKA_SERIAL_NUMBER,
// CKA_CERTIFICATE_TYPE, CKA_TOKEN, CKA_PRIVATE false) and an EC private key
// (CKA_KEY_TYPE CKK_EC, CKA_PRIVATE true, CKA_SIGN, CKA_EC_PARAMS; CKA_VALUE
// is sensitive). Like a real token, the private key is found, read and used
// only while the user is logged in. C_Sign (any mechanism) returns 64 bytes
// that depend only on the mechanism, the token's serial and the data.
// C_InitToken refuses with CKR_SESSION_EXISTS while any session is open on
// the slot, checks the PIN and sets the label. Functions besides the ones
// slotwatch uses return CKR_FUNCTION_NOT_SUPPORTED.
//
// Removing or swapping a token ends its sessions (their handles then give
// CKR_SESSION_HANDLE_INVALID) and its login, and is an event for its slot.
// Session handles count up from 1 and are not reused, except with
// reuse-handles on; C_Initialize starts them at 1 again. Tokens, PINs,
// faults and the call record live as long as the process, across
// C_Finalize and dlclose (the library is linked -z nodelete): like cards in
// readers, they do not go away when the host reloads the module.
//
// C_WaitForSlotEvent reports each slot with an event not yet reported,
// lowest slot first; without one it blocks, or returns CKR_NO_EVENT with
// CKF_DONT_BLOCK. C_Finalize makes blocked waits return
// CKR_CRYPTOKI_NOT_INITIALIZED. Events pending at C_Initialize are dropped.
//
// # Control protocol
//
// The module listens on the Unix stream socket FAULTMOD_CONTROL (no control
// channel if unset), created by a thread it starts in the process that
// loads it, at the first call into the module (C_GetFunctionList in
// practice). A stale socket file is replaced; one another process still
// listens on is left alone (the module then has no control channel, and
// says so on stderr). Any number of connections; one command per line,
// words separated by blanks; every command gets one line back, "ok" or
// "err MESSAGE", except calls (below).
//
// LABEL, SERIAL and PIN are one word each: "%XX" stands for any byte (a
// blank is %20, "%" is %25) and "-" alone for the empty string. Labels are
// at most 32 bytes, serials 1..16, PINs 1..64. FUNC is a PKCS#11 function
// name with or without "C_", in any case (GetSlotList, C_Login). Numbers
// are decimal or 0x hex.
//
//	insert SLOT LABEL SERIAL    put a token into an empty slot; one event
//	remove SLOT                 take the token out; one event
//	swap SLOT LABEL SERIAL      remove and insert as one change: one event
//	pin SLOT PIN                set the PIN of the token in SLOT
//	wait block                  normal waits (the default)
//	wait return                 every C_WaitForSlotEvent, blocking or not,
//	                            returns CKR_OK with slot 0 at once
//	wait coalesce N             of the next N changes only the last raises
//	                            an event (for its slot); then back to block
//	wait hang                   every C_WaitForSlotEvent, new or blocked,
//	                            hangs, through C_Finalize too, until another
//	                            wait command or reset; then a wait whose
//	                            C_Finalize came meanwhile returns
//	                            CKR_CRYPTOKI_NOT_INITIALIZED
//	reuse-handles on|off        on: every C_OpenSession (on any slot) takes
//	                            the lowest handle value freed by a token
//	                            removal, if there is one
//	fail FUNC RV NTH [COUNT]    calls NTH .. NTH+COUNT-1 of FUNC, counted
//	                            from now, return RV (CKR_NAME or a number)
//	                            and do nothing else; COUNT defaults to 1,
//	                            0 means every call from the NTH on
//	sleep FUNC MS               every call of FUNC first sleeps MS ms
//	                            (0: off); no lock is held meanwhile
//	abort FUNC NTH              call NTH of FUNC, counted from now, calls
//	                            abort(): the process dies of SIGABRT
//	                            (the default action is restored first, so
//	                            a Go host dies of the signal as well)
//	calls                       the call record: "ok N", then N lines
//	clear-calls                 empty the call record
//	reset                       all faults off: fail, sleep, abort, wait
//	                            block, reuse-handles off (tokens stay)
//
// A new fail, sleep or abort for a function replaces the previous one of
// that kind; faults act before anything else, the abort first, then the
// sleep, then the failure.
//
// # The call record
//
// Every PKCS#11 call, supported or not, faulted or not, is recorded when it
// returns (the last 262144 are kept), as a line
//
//	SEQ FUNCTION RV HANDLE SLOT SERIAL
//
// SEQ counts calls from 1 in the order they returned, and clear-calls does
// not restart it; FUNCTION is the full name (C_OpenSession); RV is hex
// (0x0); HANDLE is the session handle the call took or C_OpenSession
// returned, or "-"; SLOT is the slot the call named, or the session's slot,
// or the slot C_WaitForSlotEvent returned, or "-"; SERIAL is, encoded as
// above, the serial of the token that handle or slot addressed when the
// call ran, or "-" if none (an empty slot, a dead or unknown handle). So a
// test can see that a call used a handle of a token that was gone (RV
// CKR_SESSION_HANDLE_INVALID and serial "-") or a reused value that now
// belongs to a different token (another serial).
//
// # Use from a test
//
// The module's control channel lives in the process that loaded it. A test
// that starts slotwatch passes Env(socket, slots) in the daemon's
// environment and DialTimeout(socket, ...) once slotwatch has loaded the
// module. A test that loads the module itself (with package module) sets
// FAULTMOD_CONTROL in its own environment before the first load (TestMain)
// and dials that socket; there is one faultmod instance per process, shared
// by all its tests.
package faultmod
