package stack

import (
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/ebfe/scard"

	"github.com/slotwatch/slotwatch/internal/pcsc"
)

// ObservedChange is one reader state change reported by pcscd's
// SCardGetStatusChange, as the Observer saw it.
type ObservedChange struct {
	Time    time.Time
	Reader  string
	Present bool // SCARD_STATE_PRESENT
	// EventCount is pcscd's per-reader event counter (the high 16 bits
	// of dwEventState): it counts insertions and removals, so it reveals
	// a replug that happened between two observations. It restarts when
	// the reader disappears (pcscd restart).
	EventCount uint16
	State      scard.StateFlag // dwEventState, counter and CHANGED bit included
}

func (c ObservedChange) String() string {
	return fmt.Sprintf("%s %q present=%v count=%d state=%#x",
		c.Time.Format("15:04:05.000"), c.Reader, c.Present, c.EventCount, uint32(c.State))
}

// Observer records every state change of some readers, straight from
// libpcsclite in this process (through internal/pcsc, which is safe to use
// beside the monitor's own waits on the same readers) (so PCSCLITE_CSOCK_NAME must point at the
// private pcscd before the first PC/SC call of the process). It is the
// tests' independent witness of what pcscd reported.
//
// If pcscd goes away (Kill) the observer keeps trying to reconnect every
// 50 ms and observes the restarted pcscd from scratch: the first
// observation of each reader after a reconnect is recorded as a change.
type Observer struct {
	readers []string

	mu      sync.Mutex
	changes []ObservedChange
	current map[string]ObservedChange
	wake    chan struct{} // closed and replaced on every recorded change
	ctx     *pcsc.Context
	errs    []error

	closing chan struct{}
	done    chan struct{}
}

// reconnectDelay is how often the observer retries while pcscd is away.
const reconnectDelay = 50 * time.Millisecond

// NewObserver starts observing readers. It returns once the first
// observation of every reader is recorded (Current works at once); the
// first PC/SC context is made synchronously so that a missing pcscd is
// an error here.
func NewObserver(readers []string) (*Observer, error) {
	if len(readers) == 0 {
		return nil, errors.New("observer: no readers")
	}
	ctx, err := pcsc.EstablishContext()
	if err != nil {
		return nil, fmt.Errorf("observer: SCardEstablishContext: %w", err)
	}
	o := &Observer{
		readers: append([]string(nil), readers...),
		current: make(map[string]ObservedChange),
		wake:    make(chan struct{}),
		ctx:     ctx,
		closing: make(chan struct{}),
		done:    make(chan struct{}),
	}
	states := o.unaware()
	// The first call with every reader UNAWARE returns at once with the
	// current states.
	if err := ctx.GetStatusChange(states, 0); err != nil && !errors.Is(err, scard.ErrTimeout) {
		ctx.Release()
		return nil, fmt.Errorf("observer: SCardGetStatusChange: %w", err)
	}
	o.record(states)
	go o.run(ctx, states)
	return o, nil
}

func (o *Observer) unaware() []pcsc.ReaderState {
	states := make([]pcsc.ReaderState, len(o.readers))
	for i, r := range o.readers {
		states[i] = pcsc.ReaderState{Reader: r, CurrentState: scard.StateUnaware}
	}
	return states
}

// run loops on SCardGetStatusChange(INFINITE) until Close.
func (o *Observer) run(ctx *pcsc.Context, states []pcsc.ReaderState) {
	defer close(o.done)
	for {
		err := ctx.GetStatusChange(states, -1)
		switch {
		case err == nil:
			o.record(states)
			continue
		case o.isClosing():
			o.setCtx(nil) // under o.mu: Close never cancels a released context
			ctx.Release()
			return
		case errors.Is(err, scard.ErrCancelled) || errors.Is(err, scard.ErrTimeout):
			continue
		}
		// pcscd went away (SCARD_F_COMM_ERROR) or another failure:
		// start over with a new context once pcscd is back.
		o.noteErr(err)
		o.setCtx(nil)
		ctx.Release()
		if ctx = o.reconnect(); ctx == nil {
			return // closing
		}
		states = o.unaware()
	}
}

// reconnect establishes a new context, retrying until it works or Close.
func (o *Observer) reconnect() *pcsc.Context {
	t := time.NewTicker(reconnectDelay)
	defer t.Stop()
	for {
		select {
		case <-o.closing:
			return nil
		case <-t.C:
		}
		ctx, err := pcsc.EstablishContext()
		if err != nil {
			continue // SCARD_E_NO_SERVICE while pcscd is down
		}
		if !o.setCtx(ctx) { // Close started meanwhile
			ctx.Release()
			return nil
		}
		return ctx
	}
}

// setCtx publishes the context Close must cancel; it refuses (false) once
// Close has begun.
func (o *Observer) setCtx(ctx *pcsc.Context) bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	if ctx != nil && o.isClosing() {
		return false
	}
	o.ctx = ctx
	return true
}

func (o *Observer) isClosing() bool {
	select {
	case <-o.closing:
		return true
	default:
		return false
	}
}

func (o *Observer) noteErr(err error) {
	o.mu.Lock()
	o.errs = append(o.errs, err)
	o.mu.Unlock()
}

// record appends the readers whose state changed and prepares states for
// the next call: the new state (without the CHANGED bit, with the event
// counter) becomes the "current state" we tell pcscd we know.
func (o *Observer) record(states []pcsc.ReaderState) {
	now := time.Now()
	o.mu.Lock()
	defer o.mu.Unlock()
	changed := false
	for i := range states {
		s := &states[i]
		if s.EventState&scard.StateChanged == 0 {
			continue
		}
		c := ObservedChange{
			Time:       now,
			Reader:     s.Reader,
			Present:    s.EventState&scard.StatePresent != 0,
			EventCount: uint16(uint32(s.EventState) >> 16),
			State:      s.EventState,
		}
		o.changes = append(o.changes, c)
		o.current[s.Reader] = c
		s.CurrentState = s.EventState &^ scard.StateChanged
		changed = true
	}
	if changed {
		close(o.wake)
		o.wake = make(chan struct{})
	}
}

// Changes returns every change recorded so far, oldest first.
func (o *Observer) Changes() []ObservedChange {
	o.mu.Lock()
	defer o.mu.Unlock()
	return append([]ObservedChange(nil), o.changes...)
}

// Current returns the latest observation of reader (zero if none).
func (o *Observer) Current(reader string) ObservedChange {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.current[reader]
}

// Errors returns the PC/SC errors that made the observer reconnect.
func (o *Observer) Errors() []error {
	o.mu.Lock()
	defer o.mu.Unlock()
	return append([]error(nil), o.errs...)
}

// WaitFor returns the reader's latest observation if it satisfies pred,
// or else waits up to timeout for the next one that does. To wait for a
// new event rather than a state, compare EventCount in pred.
func (o *Observer) WaitFor(reader string, pred func(ObservedChange) bool, timeout time.Duration) (ObservedChange, error) {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	o.mu.Lock()
	c, ok := o.current[reader]
	if ok && pred(c) {
		o.mu.Unlock()
		return c, nil
	}
	seen := len(o.changes) // changes already checked
	for {
		wake := o.wake
		o.mu.Unlock()
		select {
		case <-wake:
		case <-deadline.C:
			return ObservedChange{}, fmt.Errorf("observer: no matching change of %q within %v; latest: %v", reader, timeout, o.Current(reader))
		}
		o.mu.Lock()
		for _, c := range o.changes[seen:] {
			if c.Reader == reader && pred(c) {
				o.mu.Unlock()
				return c, nil
			}
		}
		seen = len(o.changes)
	}
}

// Close stops observing and waits for the goroutine. It interrupts the
// blocked SCardGetStatusChange with SCardCancel; a cancel that lands just
// before the goroutine blocks again would be lost, so it is repeated until
// the goroutine is gone. Close is idempotent.
func (o *Observer) Close() error {
	o.mu.Lock()
	select {
	case <-o.closing:
	default:
		close(o.closing)
	}
	o.mu.Unlock()
	t := time.NewTicker(reconnectDelay)
	defer t.Stop()
	for {
		o.mu.Lock()
		ctx := o.ctx
		if ctx != nil {
			ctx.Cancel()
		}
		o.mu.Unlock()
		select {
		case <-o.done:
			return nil
		case <-t.C:
		}
	}
}
