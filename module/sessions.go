package module

import (
	"cmp"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/miekg/pkcs11"
)

// Session is the registry's record of one PKCS#11 session slotwatch opened
// for a caller. Values returned by Sessions and friends are copies.
type Session struct {
	ID         uint64               // registry id; never reused within a process
	Handle     pkcs11.SessionHandle // the module's handle; module values can be reused, ID cannot
	Owner      string               // who it was opened for, as given to OpenSession: a label for logs
	Slot       uint
	Generation uint64 // token generation the caller opened it on
	ReadWrite  bool
	Opened     time.Time
}

// session is a registry entry. The embedded Session never changes after
// OpenSession. The right to use Handle needs mu, closed false, and (checked
// under regMu, by enter, right before each C call) stale false and a live
// generation.
type session struct {
	Session
	mu     sync.Mutex // lock order 4: held across every C call on Handle
	closed bool       // guarded by mu: Handle was closed or forgotten; must not reach the module again
	// stale is guarded by Module.regMu, not mu: OpenSession sets it while a
	// call may be holding mu. The module gave Handle to a newer session.
	stale bool
}

// slotLock returns the lock for slot (lock order 3).
func (m *Module) slotLock(slot uint) *sync.Mutex {
	m.regMu.Lock()
	defer m.regMu.Unlock()
	l, ok := m.slotLocks[slot]
	if !ok {
		l = new(sync.Mutex)
		m.slotLocks[slot] = l
	}
	return l
}

// OpenSession opens a session on slot, tagged with the token generation the
// caller believes is in the slot. Sessions are always serial
// (CKF_SERIAL_SESSION), read-write on request. owner is only a label: it
// goes into the call log and the Session record.
//
// A generation already retired on this slot (RetireGeneration, ReclaimSlot)
// is refused with ErrStaleGeneration: the token now in the slot is a
// different one.
//
// Handle reuse: when a token is pulled, the module frees its sessions'
// handles at once, before slotwatch learns of the removal, and may hand the
// same value to the next session opened — on any slot. A record still
// holding that value must then never pass it to the module again. So from
// just before C_OpenSession until the check after it returns, the open gate
// is shut: no new C call on a session handle starts (enter waits; not for
// long, C_OpenSession does no card I/O). Once C_OpenSession has returned,
// any live record holding the value it handed out is stale: it is marked
// stale (under regMu: a call running on it may hold its lock) and
// forgotten. Every C call passes the gate and checks that mark right before
// it is made, not only the first of an operation, so an operation under way
// on a stale record (C_FindObjects then C_FindObjectsFinal, C_SignInit then
// C_Sign) fails with ErrNoSuchSession before its next call.
//
// Calls already inside the module when C_OpenSession begins are not waited
// for, so that a slow call (a PIN pad C_Login) on one slot does not hold up
// sessions on every other. That is safe on one assumption about the module:
// it resolves a session handle when a call enters it, so a call that entered
// before C_OpenSession began acts on (or fails on) the session its handle
// named then, and cannot reach the session C_OpenSession creates. PKCS#11
// does not promise it; OpenSC and SoftHSM2 look the handle up first thing
// (OpenSC under its global lock, which it then keeps for the whole call).
// faultmod, told to sleep in a function, sleeps before it looks the handle
// up, so a call sleeping there is not covered. The window left on our side
// is between a call passing the gate and entering the module: a few
// instructions, harmful only if the goroutine stalls right there for a whole
// C_OpenSession that hands out the value of a handle whose token was pulled
// meanwhile.
func (m *Module) OpenSession(owner string, slot uint, generation uint64, readWrite bool) (*Session, error) {
	const fn = "C_OpenSession"
	m.life.RLock()
	defer m.life.RUnlock()
	if m.ctx == nil {
		return nil, notInitialized(fn)
	}
	sl := m.slotLock(slot)
	sl.Lock()
	defer sl.Unlock()

	if m.isRetired(slot, generation) {
		return nil, fmt.Errorf("%s: slot %d generation %d: %w", fn, slot, generation, ErrStaleGeneration)
	}

	flags := uint(pkcs11.CKF_SERIAL_SESSION)
	if readWrite {
		flags |= pkcs11.CKF_RW_SESSION
	}
	// Shut the gate; it opens again once the stale records are marked
	// below. From here on take nothing but regMu (see the lock order).
	m.regMu.Lock()
	m.opening++
	m.regMu.Unlock()
	defer func() {
		m.regMu.Lock()
		m.opening--
		if m.opening == 0 {
			m.gate.Broadcast()
		}
		m.regMu.Unlock()
	}()
	start := time.Now()
	h, err := m.ctx.OpenSession(slot, flags)
	err = m.result(fn, start, err, slog.Uint64("slot", uint64(slot)), slog.Bool("read_write", readWrite),
		slog.String("owner", owner), slog.Uint64("generation", generation), slog.Uint64("handle", uint64(h)))
	if err != nil {
		return nil, err
	}

	m.regMu.Lock()
	defer m.regMu.Unlock()
	for id, old := range m.sessions {
		if old.Handle == h {
			// A call running on it entered the module before
			// C_OpenSession began; its next one stops in enter.
			old.stale = true
			delete(m.sessions, id)
			if m.log != nil {
				m.log.Debug("session handle reused by the module: the older session's token is gone",
					"handle", uint64(h), "stale_session", id, "stale_slot", old.Slot, "stale_generation", old.Generation)
			}
		}
	}
	m.nextID++
	s := &session{Session: Session{
		ID:         m.nextID,
		Handle:     h,
		Owner:      owner,
		Slot:       slot,
		Generation: generation,
		ReadWrite:  readWrite,
		Opened:     time.Now(),
	}}
	m.sessions[s.ID] = s
	out := s.Session
	return &out, nil
}

// enter is what every C call on s.Handle does right before the call, with
// life held for reading and s.mu held: it waits while the open gate is shut
// (OpenSession), then refuses if the record went stale (its handle value now
// belongs to a newer session: ErrNoSuchSession) or its generation was
// retired (ErrStaleGeneration). fn names the C function about to be called.
func (m *Module) enter(fn string, s *session) error {
	m.regMu.Lock()
	defer m.regMu.Unlock()
	for m.opening > 0 {
		m.gate.Wait()
	}
	if s.stale {
		return fmt.Errorf("%s: session %d: the module gave its handle %d to a newer session: %w",
			fn, s.ID, s.Handle, ErrNoSuchSession)
	}
	if floor, ok := m.retired[s.Slot]; ok && s.Generation <= floor {
		return fmt.Errorf("%s: session %d (slot %d, generation %d): %w", fn, s.ID, s.Slot, s.Generation, ErrStaleGeneration)
	}
	return nil
}

// CloseSession closes one session (C_CloseSession) and forgets it. It waits
// for a call still running on the session. The record is forgotten even if
// the module reports an error (a removed token's sessions are already gone
// on its side). A session of a retired generation, or whose handle value the
// module has given to a newer session, is only forgotten: its handle never
// reaches the module again.
func (m *Module) CloseSession(id uint64) error {
	m.life.RLock()
	defer m.life.RUnlock()
	if m.ctx == nil {
		return notInitialized("C_CloseSession")
	}
	m.regMu.Lock()
	s, ok := m.sessions[id]
	delete(m.sessions, id)
	m.regMu.Unlock()
	if !ok {
		return fmt.Errorf("session %d: %w", id, ErrNoSuchSession)
	}
	return m.closeOne(s)
}

// closeOne closes a session already removed from the registry. Called with
// life held for reading.
func (m *Module) closeOne(s *session) error {
	const fn = "C_CloseSession"
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil // reclaimed or closed meanwhile: its handle must not be used
	}
	s.closed = true
	if err := m.enter(fn, s); err != nil {
		// Stale, or a dead generation: the module may already have given
		// this handle value to a newer session. Forget it; the module freed
		// a stale one's session with its token, and ReclaimSlot's
		// C_CloseAllSessions frees a dead generation's.
		return nil
	}
	start := time.Now()
	return m.result(fn, start, m.ctx.CloseSession(s.Handle), sessionAttrs(s))
}

// RetireGeneration marks every generation <= gen on slot dead, at once and
// without a C call: what the monitor does the moment it sees the token
// removed (DESIGN rule 4). From then on, operations on those sessions fail
// with ErrStaleGeneration before reaching the module; closing one only
// forgets its record (no C_CloseSession with a handle the module may have
// reused); OpenSession refuses those generations. Calls already running
// finish. The records of sessions nobody closed stay listed (so "who held
// what" still has an answer) until ReclaimSlot.
func (m *Module) RetireGeneration(slot uint, gen uint64) {
	m.regMu.Lock()
	defer m.regMu.Unlock()
	m.retireLocked(slot, gen)
}

func (m *Module) retireLocked(slot uint, gen uint64) {
	if cur, ok := m.retired[slot]; !ok || gen > cur {
		m.retired[slot] = gen
	}
}

// isRetired reports whether generation gen on slot is dead.
func (m *Module) isRetired(slot uint, gen uint64) bool {
	m.regMu.Lock()
	defer m.regMu.Unlock()
	floor, ok := m.retired[slot]
	return ok && gen <= floor
}

// ReclaimSlot forgets every session record on slot whose generation is at
// most gen, then calls C_CloseAllSessions(slot) so the module frees whatever
// it still holds for them. It never passes one of those handles to the
// module: after a token removal the module may reuse handle values for the
// next token's sessions, so a stale handle could land on somebody else's
// session. It returns the number of records forgotten.
//
// The monitor calls it once the dead generation has drained (DESIGN rule 4).
// It waits for calls still running on the forgotten sessions (normally none,
// by that rule). It retires generations <= gen (RetireGeneration) if that
// was not done already.
//
// If sessions of a later generation are already open on the slot,
// C_CloseAllSessions is skipped: it would close them too. The dead records
// are forgotten anyway. A failing C_CloseAllSessions is only logged: the
// records are gone either way, and a removed token's sessions usually are too.
func (m *Module) ReclaimSlot(slot uint, gen uint64) int {
	m.life.RLock()
	defer m.life.RUnlock()
	sl := m.slotLock(slot)
	sl.Lock()
	defer sl.Unlock()

	var dead []*session
	later := false
	m.regMu.Lock()
	for id, s := range m.sessions {
		if s.Slot != slot {
			continue
		}
		if s.Generation <= gen {
			dead = append(dead, s)
			delete(m.sessions, id)
		} else {
			later = true
		}
	}
	m.retireLocked(slot, gen)
	m.regMu.Unlock()

	// Wait out calls in flight on the dead handles, and make sure none
	// starts after this: a caller that looked the record up before we
	// removed it sees closed once it gets the lock.
	for _, s := range dead {
		s.mu.Lock()
		s.closed = true
		s.mu.Unlock()
	}

	if m.ctx != nil && !later {
		start := time.Now()
		_ = m.result("C_CloseAllSessions", start, m.ctx.CloseAllSessions(slot),
			slog.Uint64("slot", uint64(slot)), slog.Uint64("generation", gen), slog.Int("forgotten", len(dead)))
	}
	return len(dead)
}

// dropAllSessions forgets every record; the last Finalize calls it with life
// held for writing, so no call is running on any handle.
func (m *Module) dropAllSessions() {
	m.regMu.Lock()
	defer m.regMu.Unlock()
	for id, s := range m.sessions {
		s.closed = true
		delete(m.sessions, id)
	}
}

// SessionCount is how many session records the module keeps: open
// sessions, and sessions of a removed token not reclaimed yet. The monitor
// releases an idle module only when it is 0 (C_Finalize would close them).
func (m *Module) SessionCount() int {
	m.regMu.Lock()
	defer m.regMu.Unlock()
	return len(m.sessions)
}

// Sessions returns a copy of every session record, by id: who holds what.
func (m *Module) Sessions() []Session {
	return m.sessionsWhere(func(*session) bool { return true })
}

// SessionsOnSlot returns a copy of the records of sessions on slot, by id.
func (m *Module) SessionsOnSlot(slot uint) []Session {
	return m.sessionsWhere(func(s *session) bool { return s.Slot == slot })
}

func (m *Module) sessionsWhere(match func(*session) bool) []Session {
	m.regMu.Lock()
	defer m.regMu.Unlock()
	var out []Session
	for _, s := range m.sessions {
		if match(s) {
			out = append(out, s.Session)
		}
	}
	slices.SortFunc(out, func(a, b Session) int { return cmp.Compare(a.ID, b.ID) })
	return out
}

// Session returns a copy of the record of session id.
func (m *Module) Session(id uint64) (Session, bool) {
	m.regMu.Lock()
	defer m.regMu.Unlock()
	s, ok := m.sessions[id]
	if !ok {
		return Session{}, false
	}
	return s.Session, true
}

// withSession runs f with session id's record, holding the module (life, for
// reading) and the session's lock, so that the session runs one operation at
// a time and a close waits for it. f calls enter right before each of its C
// calls. fn names the PKCS#11 function for errors.
func (m *Module) withSession(fn string, id uint64, f func(s *session) error) error {
	m.life.RLock()
	defer m.life.RUnlock()
	if m.ctx == nil {
		return notInitialized(fn)
	}
	m.regMu.Lock()
	s, ok := m.sessions[id]
	m.regMu.Unlock()
	if !ok {
		return fmt.Errorf("%s: session %d: %w", fn, id, ErrNoSuchSession)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return fmt.Errorf("%s: session %d: %w", fn, id, ErrNoSuchSession)
	}
	return f(s)
}
