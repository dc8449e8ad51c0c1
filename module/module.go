// Package module is slotwatch's handle on one loaded PKCS#11 module.
//
// It owns, for its library:
//
//   - the library's lifetime in this process: a refcounted, goroutine-safe
//     Initialize/Finalize, so one holder's Finalize never pulls the module out
//     from under another (the p11-kit "managed module" problem);
//   - every session slotwatch opens on it, in a registry that records on
//     which slot and token generation it was opened (and, as a label for
//     logs, for whom), so that "which sessions are open on this slot" has an
//     answer, a dead generation's handles are retired and reclaimed without
//     ever reaching the module again, and a handle value the module reuses
//     never reaches it through a stale record. Which caller holds which
//     session, and closing a caller's sessions, is the broker's business;
//   - the mapping of CKR_* return values to Go errors (errors.go);
//   - logging of every PKCS#11 call with secrets redacted (calllog.go).
//
// It owns nothing about events, generations or policy: the monitor decides
// when a token changed, assigns generations, and calls ReclaimSlot once a dead
// generation has drained.
//
// Calls go through github.com/miekg/pkcs11, except C_WaitForSlotEvent,
// C_Login and C_InitToken (funclist.go says why).
//
// # Locks
//
// Taken in this order, never the other way round:
//
//  1. Module.refMu: Initialize/Finalize only; serializes load and unload.
//  2. Module.life: an RWMutex over the loaded state. Every call into the
//     module holds it for reading for the duration of the call; only the
//     first Initialize and the last Finalize take it for writing, so
//     unloading waits for calls in flight and no call ever runs on an
//     unloaded library. WaitForSlotEvent alone does not hold it while
//     blocked (it holds its own reference to the library instead), because
//     C_Finalize is how a blocked wait is cancelled.
//  3. The slot lock, one per slot id: OpenSession, InitToken and
//     ReclaimSlot's C_CloseAllSessions, so no session of ours can appear on
//     a slot between the check and the call.
//  4. session.mu, one per session: held across that session's C calls,
//     because a PKCS#11 session runs one operation at a time
//     (FindObjectsInit/FindObjects/FindObjectsFinal must not interleave),
//     and so that closing a session waits for a call still using its handle.
//  5. Module.regMu: the registry maps, each record's stale flag, and the
//     open gate (Module.opening, with Module.gate, a sync.Cond on regMu). A
//     leaf: never held across a C call or while acquiring another lock.
//     Waiting at the gate releases it.
//
// The open gate (see OpenSession, "Handle reuse") is shut while any
// C_OpenSession is in progress. Every C call on a session handle passes it
// right before the call (session.enter), holding life and session.mu, and
// waits while it is shut; calls already inside the module are not waited
// for. That wait cannot deadlock: an OpenSession shuts the gate only once it
// holds life and its slot lock, and until it reopens the gate it takes
// nothing but regMu.
//
// So a slow C call (a PIN pad login) holds up only its own session and the
// last Finalize, which waits for it (and while that Finalize waits, new calls
// queue behind it: sync.RWMutex lets a waiting writer go first). Calls on
// other sessions wait at most for C_OpenSession calls to return.
package module

import (
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/miekg/pkcs11"
)

// Options configures a Module.
type Options struct {
	// Name is the short name used in logs and object paths, e.g. "opensc".
	Name string
	// CallLog, if not nil, gets every PKCS#11 call at Debug level: function,
	// arguments, result (CKR name) and duration. PINs and secret attribute
	// values never appear; they are logged as "<redacted N bytes>".
	CallLog *slog.Logger
	// Isolate runs the module in a helper process through p11-kit's
	// remoting (isolate.go): a crash in the module takes down only the
	// helper. An isolated module is polled, not waited on.
	Isolate bool
}

// Module is one PKCS#11 library. Its zero value is not usable; call Open.
type Module struct {
	name, path string
	log        *slog.Logger
	isolate    bool // Options.Isolate

	refMu sync.Mutex // order 1
	refs  int        // Initialize calls without their Finalize

	life sync.RWMutex // order 2; guards ctx and lib
	ctx  *pkcs11.Ctx  // nil while not loaded and initialized
	lib  libRef       // our own reference and function list, while loaded

	regMu     sync.Mutex           // order 5 (leaf); guards everything below
	sessions  map[uint64]*session  // by registry id
	nextID    uint64               // last registry id handed out; never reset
	slotLocks map[uint]*sync.Mutex // order 3; created on first use, never removed
	retired   map[uint]uint64      // per slot: highest dead generation (RetireGeneration, ReclaimSlot)
	opening   int                  // C_OpenSession calls in progress: the open gate is shut while > 0
	gate      sync.Cond            // L is &regMu; broadcast when opening drops to 0
}

// Open returns the Module for the library at path. It is cheap and loads
// nothing; Initialize does.
//
// Use one Module per library per process: PKCS#11 state is per library
// instance, so a second Module on the same library would share it and its
// Initialize would fail with CKR_CRYPTOKI_ALREADY_INITIALIZED.
func Open(path string, opts Options) *Module {
	name := opts.Name
	if name == "" {
		name = path
	}
	m := &Module{
		name:      name,
		isolate:   opts.Isolate,
		path:      path,
		log:       opts.CallLog,
		sessions:  make(map[uint64]*session),
		slotLocks: make(map[uint]*sync.Mutex),
		retired:   make(map[uint]uint64),
	}
	m.gate.L = &m.regMu
	return m
}

// Name is the short name from Options (the path if none was given).
func (m *Module) Name() string { return m.name }

// Path is the library's path as given to Open.
func (m *Module) Path() string { return m.path }

// Initialize takes a hold on the module. The first hold loads the library
// and calls C_Initialize (with CKF_OS_LOCKING_OK: the module may be called
// from any thread); further ones only count. Every successful Initialize
// needs one Finalize.
func (m *Module) Initialize() error {
	m.refMu.Lock()
	defer m.refMu.Unlock()
	if m.refs > 0 {
		m.refs++
		return nil
	}
	m.life.Lock()
	defer m.life.Unlock()
	if err := m.load(); err != nil {
		return err
	}
	m.refs = 1
	return nil
}

// load runs with refMu and life held for writing.
func (m *Module) load() error {
	var ctx *pkcs11.Ctx
	var lib libRef
	if m.isolate {
		var err error
		if ctx, lib, err = newIsolatedCtx(m.path); err != nil {
			return fmt.Errorf("module %s: %w", m.name, err)
		}
	} else {
		ctx = pkcs11.New(m.path)
		if ctx == nil {
			return fmt.Errorf("module %s: %w", m.name, loadError(m.path))
		}
		var ok bool
		if lib, ok = refLoaded(m.path); !ok {
			ctx.Destroy()
			return fmt.Errorf("module %s: %w %s: no function list", m.name, ErrLoad, m.path)
		}
	}
	start := time.Now()
	err := m.result("C_Initialize", start, ctx.Initialize(), slog.String("flags", "CKF_OS_LOCKING_OK"))
	if err != nil {
		// Not ours to finalize, not even on CKR_CRYPTOKI_ALREADY_INITIALIZED
		// (someone else in this process holds it); dropping our references
		// leaves their instance alone.
		lib.release()
		ctx.Destroy()
		return err
	}
	m.ctx, m.lib = ctx, lib
	return nil
}

// Finalize gives up one hold. The last one calls C_Finalize and unloads the
// library; before that it waits for calls in flight to return, and it drops
// every session record (C_Finalize closes them all, and the next
// C_Initialize may hand out the same handle values again); retired
// generations stay retired, generations being the daemon's. A blocked
// WaitForSlotEvent is not waited for: C_Finalize is what unblocks it.
//
// The hold is given up even if C_Finalize fails; its error is returned.
// Finalize without a matching Initialize is an error wrapping
// ErrNotInitialized and changes nothing.
func (m *Module) Finalize() error {
	m.refMu.Lock()
	defer m.refMu.Unlock()
	if m.refs == 0 {
		return fmt.Errorf("module %s: Finalize without a matching Initialize: %w", m.name, ErrNotInitialized)
	}
	m.refs--
	if m.refs > 0 {
		return nil
	}
	m.life.Lock()
	defer m.life.Unlock()
	start := time.Now()
	err := m.result("C_Finalize", start, m.ctx.Finalize())
	m.lib.release()
	m.ctx.Destroy()
	m.ctx, m.lib = nil, libRef{}
	m.dropAllSessions()
	return err
}

// Initialized reports whether anyone holds the module initialized.
func (m *Module) Initialized() bool {
	m.life.RLock()
	defer m.life.RUnlock()
	return m.ctx != nil
}

// notInitialized is what every call returns while the module is not loaded.
func notInitialized(fn string) error {
	return &Error{Func: fn, Code: pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED}
}

// Version is a PKCS#11 CK_VERSION.
type Version struct{ Major, Minor uint8 }

func (v Version) String() string { return fmt.Sprintf("%d.%d", v.Major, v.Minor) }

func version(v pkcs11.Version) Version { return Version{Major: v.Major, Minor: v.Minor} }

// Info describes the library (C_GetInfo).
type Info struct {
	Description     string
	Manufacturer    string
	LibraryVersion  Version
	CryptokiVersion Version
}

// SlotInfo describes a slot (C_GetSlotInfo). For OpenSC, Description is the
// PC/SC reader name.
type SlotInfo struct {
	Description     string
	Manufacturer    string
	Flags           uint // CKF_TOKEN_PRESENT, CKF_REMOVABLE_DEVICE, CKF_HW_SLOT
	HardwareVersion Version
	FirmwareVersion Version
}

// TokenPresent, Removable and Hardware read Flags.
func (s SlotInfo) TokenPresent() bool { return s.Flags&pkcs11.CKF_TOKEN_PRESENT != 0 }
func (s SlotInfo) Removable() bool    { return s.Flags&pkcs11.CKF_REMOVABLE_DEVICE != 0 }
func (s SlotInfo) Hardware() bool     { return s.Flags&pkcs11.CKF_HW_SLOT != 0 }

// TokenInfo describes a token (C_GetTokenInfo).
type TokenInfo struct {
	Label        string
	Manufacturer string
	Model        string
	Serial       string
	Flags        uint // CKF_* token flags
	MinPinLen    uint
	MaxPinLen    uint
}

// trim removes the blank padding of PKCS#11's fixed-size text fields; some
// modules pad with NULs instead of the spaces the standard asks for.
func trim(s string) string { return strings.TrimRight(s, " \x00") }

// Info is C_GetInfo: library description, manufacturer, version.
func (m *Module) Info() (Info, error) {
	m.life.RLock()
	defer m.life.RUnlock()
	if m.ctx == nil {
		return Info{}, notInitialized("C_GetInfo")
	}
	start := time.Now()
	i, err := m.ctx.GetInfo()
	if err = m.result("C_GetInfo", start, err); err != nil {
		return Info{}, err
	}
	return Info{
		Description:     trim(i.LibraryDescription),
		Manufacturer:    trim(i.ManufacturerID),
		LibraryVersion:  version(i.LibraryVersion),
		CryptokiVersion: version(i.CryptokiVersion),
	}, nil
}

// SlotList is C_GetSlotList: all slots, or only those with a token present.
func (m *Module) SlotList(tokenPresent bool) ([]uint, error) {
	m.life.RLock()
	defer m.life.RUnlock()
	if m.ctx == nil {
		return nil, notInitialized("C_GetSlotList")
	}
	// miekg asks for the length, then the list: a reader that appears in
	// between (OpenSC adds slots as readers come) makes the second call
	// CKR_BUFFER_TOO_SMALL. Asking again is what PKCS#11 expects.
	for attempt := 1; ; attempt++ {
		start := time.Now()
		slots, err := m.ctx.GetSlotList(tokenPresent)
		err = m.result("C_GetSlotList", start, err, slog.Bool("token_present", tokenPresent), slog.Any("slots", slots))
		if !errors.Is(err, ErrBufferTooSmall) || attempt == 5 {
			return slots, err
		}
	}
}

// SlotInfo is C_GetSlotInfo.
func (m *Module) SlotInfo(slot uint) (SlotInfo, error) {
	m.life.RLock()
	defer m.life.RUnlock()
	if m.ctx == nil {
		return SlotInfo{}, notInitialized("C_GetSlotInfo")
	}
	start := time.Now()
	i, err := m.ctx.GetSlotInfo(slot)
	if err = m.result("C_GetSlotInfo", start, err, slog.Uint64("slot", uint64(slot))); err != nil {
		return SlotInfo{}, err
	}
	return SlotInfo{
		Description:     trim(i.SlotDescription),
		Manufacturer:    trim(i.ManufacturerID),
		Flags:           i.Flags,
		HardwareVersion: version(i.HardwareVersion),
		FirmwareVersion: version(i.FirmwareVersion),
	}, nil
}

// TokenInfo is C_GetTokenInfo.
func (m *Module) TokenInfo(slot uint) (TokenInfo, error) {
	m.life.RLock()
	defer m.life.RUnlock()
	if m.ctx == nil {
		return TokenInfo{}, notInitialized("C_GetTokenInfo")
	}
	start := time.Now()
	i, err := m.ctx.GetTokenInfo(slot)
	if err = m.result("C_GetTokenInfo", start, err, slog.Uint64("slot", uint64(slot))); err != nil {
		return TokenInfo{}, err
	}
	return TokenInfo{
		Label:        trim(i.Label),
		Manufacturer: trim(i.ManufacturerID),
		Model:        trim(i.Model),
		Serial:       trim(i.SerialNumber),
		Flags:        i.Flags,
		MinPinLen:    i.MinPinLen,
		MaxPinLen:    i.MaxPinLen,
	}, nil
}

// InitToken is C_InitToken on slot with the SO PIN and a label of at most
// 32 bytes. It holds the slot lock, so no session of ours can be opened on
// the slot meanwhile; a session already open makes the module answer
// CKR_SESSION_EXISTS (callers check Sessions first to name the holders).
// The SO PIN is read in place, never copied, never logged, and not wiped:
// it belongs to the caller.
func (m *Module) InitToken(slot uint, soPIN []byte, label string) error {
	const fn = "C_InitToken"
	if len(label) > 32 {
		return fmt.Errorf("%s: label %q is %d bytes, at most 32 fit", fn, label, len(label))
	}
	var padded [32]byte // blank-padded, not NUL-terminated, as PKCS#11 wants
	copy(padded[:], label)
	for i := len(label); i < len(padded); i++ {
		padded[i] = ' '
	}
	m.life.RLock()
	defer m.life.RUnlock()
	if m.ctx == nil {
		return notInitialized(fn)
	}
	sl := m.slotLock(slot)
	sl.Lock()
	defer sl.Unlock()
	start := time.Now()
	rv := m.lib.initToken(slot, soPIN, padded)
	return m.result(fn, start, rvError(fn, rv),
		slog.Uint64("slot", uint64(slot)), redactedAttr("so_pin", soPIN), slog.String("label", label))
}
