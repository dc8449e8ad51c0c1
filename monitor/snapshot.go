package monitor

import (
	"fmt"
	"time"
)

// State is the health of the monitor (the Manager's State on D-Bus).
type State uint32

const (
	StateUnknown    State = 0
	StateRunning    State = 1 // every source is working
	StateDegraded   State = 2 // a source failed; the monitor retries with backoff
	StateRecovering State = 3 // a source came back; the monitor is re-reading it
)

func (s State) String() string {
	switch s {
	case StateRunning:
		return "running"
	case StateDegraded:
		return "degraded"
	case StateRecovering:
		return "recovering"
	}
	return "unknown"
}

// ReaderState is what PC/SC says of a reader (the Reader's State on D-Bus).
type ReaderState uint32

const (
	ReaderUnknown     ReaderState = 0
	ReaderEmpty       ReaderState = 1
	ReaderPresent     ReaderState = 2
	ReaderMute        ReaderState = 3
	ReaderUnavailable ReaderState = 4
	// ReaderExclusive: a card is present and another process holds it
	// exclusively (SCARD_STATE_EXCLUSIVE). Its token stays in the view with
	// its generation; calls that need the card fail with ErrCardInUse.
	ReaderExclusive ReaderState = 5
)

func (s ReaderState) String() string {
	switch s {
	case ReaderEmpty:
		return "empty"
	case ReaderPresent:
		return "present"
	case ReaderMute:
		return "mute"
	case ReaderUnavailable:
		return "unavailable"
	case ReaderExclusive:
		return "exclusive"
	}
	return "unknown"
}

// WaitMode is how the monitor learns of a module's slot events.
type WaitMode uint32

const (
	WaitUnknown  WaitMode = 0
	WaitBlocking WaitMode = 1 // a C_WaitForSlotEvent waiter
	WaitPolling  WaitMode = 2 // the module cannot wait; the monitor re-reads it on a timer
	// WaitPCSC: the module's slots stand for PC/SC readers; the monitor
	// reads it when PC/SC reports a reader change (no waiter thread, so
	// the module can be finalized while idle: see IdleRelease).
	WaitPCSC WaitMode = 3
)

func (w WaitMode) String() string {
	switch w {
	case WaitBlocking:
		return "blocking"
	case WaitPolling:
		return "polling"
	case WaitPCSC:
		return "pcsc"
	}
	return "unknown"
}

// ModuleState is the health of one module.
type ModuleState uint32

const (
	ModuleUnknown ModuleState = 0
	ModuleRunning ModuleState = 1
	ModuleFailed  ModuleState = 2 // failing; it will be finalized and initialized again
)

func (s ModuleState) String() string {
	switch s {
	case ModuleRunning:
		return "running"
	case ModuleFailed:
		return "failed"
	}
	return "unknown"
}

// Reader is one PC/SC reader.
type Reader struct {
	Name  string
	State ReaderState
	Atr   []byte
	// EventCount is PC/SC's counter of insertions and removals on this
	// reader; it restarts when the reader goes away.
	EventCount uint16
	// Attachment counts how often this reader name appeared; the event
	// counter is comparable only within one attachment.
	Attachment uint64
}

// SlotKey names a slot: the module's name and the PKCS#11 slot id.
type SlotKey struct {
	Module string
	ID     uint
}

func (k SlotKey) String() string { return fmt.Sprintf("%s/%d", k.Module, k.ID) }

// Token is one inserted token, identified by its generation.
type Token struct {
	Generation   uint64
	Slot         SlotKey
	Label        string
	Manufacturer string
	Model        string
	Serial       string
	Flags        uint      // CKF_* token flags
	Reader       string    // the PC/SC reader the card sits in, "" if none
	Inserted     time.Time // when the monitor saw it
	// Resumes is the generation of the same card this token continues
	// after an outage removed it (pcscd gone, the module failing) without
	// PC/SC seeing the card leave; 0 if none (resume.go).
	Resumes uint64
}

// sameCard tells whether two token infos describe the same card. Flags are
// left out: they change in place (a wrong PIN sets CKF_USER_PIN_COUNT_LOW).
func (t *Token) sameCard(o *Token) bool {
	return t.Label == o.Label && t.Manufacturer == o.Manufacturer && t.Model == o.Model && t.Serial == o.Serial
}

// Slot is one PKCS#11 slot.
type Slot struct {
	Key          SlotKey
	Description  string
	Manufacturer string
	Removable    bool
	Reader       string // the PC/SC reader this slot stands for, "" if none
	Token        *Token // nil when empty
}

// ModuleView is the view of one module.
type ModuleView struct {
	Name           string
	Path           string
	Description    string
	Manufacturer   string
	LibraryVersion string
	WaitMode       WaitMode
	State          ModuleState
	StateReason    string
	// Released: the module is finalized because nothing needed it (see
	// IdleRelease); its slots and tokens stay in the view, and it is
	// initialized again when a call or a reader change needs it.
	Released bool
}

// Snapshot is an immutable view of everything the monitor knows. Never
// modify one: readers share it.
type Snapshot struct {
	Seq            uint64 // increases with every published snapshot
	State          State
	StateReason    string
	PCSC           bool // PC/SC is watched and reachable
	LastGeneration uint64
	Modules        []ModuleView // sorted by name
	Readers        []Reader     // sorted by name
	Slots          []Slot       // sorted by module, then slot id
}

// Token returns the token of generation gen, if present in this snapshot.
func (s *Snapshot) Token(gen uint64) (*Token, bool) {
	for i := range s.Slots {
		if t := s.Slots[i].Token; t != nil && t.Generation == gen {
			return t, true
		}
	}
	return nil, false
}

// Slot returns the slot with key k.
func (s *Snapshot) Slot(k SlotKey) (*Slot, bool) {
	for i := range s.Slots {
		if s.Slots[i].Key == k {
			return &s.Slots[i], true
		}
	}
	return nil, false
}

// Reader returns the reader named name.
func (s *Snapshot) Reader(name string) (*Reader, bool) {
	for i := range s.Readers {
		if s.Readers[i].Name == name {
			return &s.Readers[i], true
		}
	}
	return nil, false
}

// Tokens returns every present token, in slot order.
func (s *Snapshot) Tokens() []*Token {
	var out []*Token
	for i := range s.Slots {
		if t := s.Slots[i].Token; t != nil {
			out = append(out, t)
		}
	}
	return out
}
