package monitor

import (
	"context"
	"errors"
	"fmt"
	"sync"
)

// EventKind says what changed.
type EventKind int

const (
	TokenInserted EventKind = iota + 1 // Token is new, with a new generation
	TokenRemoved                       // Token (its last state) is gone; its generation is dead
	TokenChanged                       // Token's flags changed in place (same card, same generation)
	SlotAdded
	SlotRemoved
	SlotChanged // description or reader binding changed
	ReaderAdded
	ReaderRemoved
	ReaderChanged // state, ATR or event count changed
	ModuleChanged // a module was added, or its wait mode, state or info changed
	ModuleRemoved // a module is no longer watched (reload)
	StateChanged  // the monitor's State or StateReason changed
	// TokenLost: Token, removed earlier by an outage (TokenRemoved with
	// Outage), will not be resumed: its card is gone or another is in its
	// place, its module was removed, or Config.ResumeWindow passed.
	TokenLost
)

var eventNames = map[EventKind]string{
	TokenInserted: "token-inserted", TokenRemoved: "token-removed", TokenChanged: "token-changed",
	SlotAdded: "slot-added", SlotRemoved: "slot-removed", SlotChanged: "slot-changed",
	ReaderAdded: "reader-added", ReaderRemoved: "reader-removed", ReaderChanged: "reader-changed",
	ModuleChanged: "module-changed", ModuleRemoved: "module-removed", StateChanged: "state-changed",
	TokenLost: "token-lost",
}

func (k EventKind) String() string {
	if n, ok := eventNames[k]; ok {
		return n
	}
	return fmt.Sprintf("event(%d)", int(k))
}

// Event is one change. Exactly one of Token, Slot, Reader, Module is set,
// according to Kind (none for StateChanged). Snapshot is the snapshot the
// change leads to: the whole view after every event of the same refresh.
type Event struct {
	Kind     EventKind
	Token    *Token
	Slot     *Slot
	Reader   *Reader
	Module   *ModuleView
	Snapshot *Snapshot
	// Outage (TokenRemoved only): the token went with an outage — pcscd
	// gone, its module failing — and PC/SC did not see its card leave. A
	// TokenInserted whose Token.Resumes is this generation may follow
	// within Config.ResumeWindow; otherwise TokenLost does.
	Outage bool
}

func (e Event) String() string {
	switch {
	case e.Token != nil:
		s := fmt.Sprintf("%s generation=%d slot=%s label=%q serial=%q", e.Kind, e.Token.Generation, e.Token.Slot, e.Token.Label, e.Token.Serial)
		if e.Outage {
			s += " outage"
		}
		if e.Kind == TokenInserted && e.Token.Resumes != 0 {
			s += fmt.Sprintf(" resumes=%d", e.Token.Resumes)
		}
		return s
	case e.Slot != nil:
		return fmt.Sprintf("%s slot=%s description=%q reader=%q", e.Kind, e.Slot.Key, e.Slot.Description, e.Slot.Reader)
	case e.Reader != nil:
		return fmt.Sprintf("%s reader=%q state=%s events=%d", e.Kind, e.Reader.Name, e.Reader.State, e.Reader.EventCount)
	case e.Module != nil:
		return fmt.Sprintf("%s module=%s state=%s wait=%s %s", e.Kind, e.Module.Name, e.Module.State, e.Module.WaitMode, e.Module.StateReason)
	}
	return fmt.Sprintf("%s state=%s reason=%q", e.Kind, e.Snapshot.State, e.Snapshot.StateReason)
}

// ErrClosed is returned by Subscription.Next once the subscription or the
// monitor is closed and every queued event was delivered.
var ErrClosed = errors.New("monitor: closed")

// Subscription is an ordered, lossless stream of events. The queue is
// unbounded so that a slow subscriber never blocks the monitor and never
// loses an event; a subscriber that stops reading should Close.
type Subscription struct {
	m      *Monitor
	mu     sync.Mutex // guards all following fields
	queue  []Event
	closed bool
	taken  uint64        // events Next has returned
	ready  chan struct{} // has a value while queue is non-empty or closed
}

func newSubscription(m *Monitor) *Subscription {
	return &Subscription{m: m, ready: make(chan struct{}, 1)}
}

func (s *Subscription) push(evs []Event) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return
	}
	s.queue = append(s.queue, evs...)
	s.signalLocked()
}

func (s *Subscription) signalLocked() {
	select {
	case s.ready <- struct{}{}:
	default:
	}
}

// Next returns the next event, waiting for one until ctx is done.
func (s *Subscription) Next(ctx context.Context) (Event, error) {
	for {
		s.mu.Lock()
		if len(s.queue) > 0 {
			ev := s.queue[0]
			s.queue[0] = Event{}
			s.queue = s.queue[1:]
			s.taken++
			if len(s.queue) > 0 {
				s.signalLocked()
			}
			s.mu.Unlock()
			return ev, nil
		}
		if s.closed {
			s.signalLocked()
			s.mu.Unlock()
			return Event{}, ErrClosed
		}
		s.mu.Unlock()
		select {
		case <-s.ready:
		case <-ctx.Done():
			return Event{}, ctx.Err()
		}
	}
}

// Taken returns how many events Next has returned, and how many are queued
// now. A subscriber that has handled that many events has handled every
// event of every snapshot published so far.
func (s *Subscription) Taken() (taken uint64, queued int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.taken, len(s.queue)
}

// Close ends the subscription. Events not yet read are dropped.
func (s *Subscription) Close() {
	s.m.unsubscribe(s)
	s.mu.Lock()
	s.closed = true
	s.queue = nil
	s.signalLocked()
	s.mu.Unlock()
}

// end marks the subscription closed after its queued events.
func (s *Subscription) end() {
	s.mu.Lock()
	s.closed = true
	s.signalLocked()
	s.mu.Unlock()
}
