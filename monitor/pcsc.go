package monitor

import (
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"time"

	"github.com/ebfe/scard"

	"github.com/slotwatch/slotwatch/internal/pcsc"
)

// pcscWatcher is the PC/SC event source: one goroutine blocked in
// SCardGetStatusChange on every reader plus the PnP pseudo reader. It only
// wakes the monitor; the monitor reads reader states itself (readReaders) on
// a context of its own, so a blocked wait never delays a read.
type pcscWatcher struct {
	wake    func(connected bool) // tells the monitor: something changed, or the connection state
	backoff backoff

	stop chan struct{}
	done chan struct{}

	mu  sync.Mutex // guards ctx
	ctx *pcsc.Context
}

func startPCSCWatcher(b backoff, wake func(connected bool)) *pcscWatcher {
	w := &pcscWatcher{wake: wake, backoff: b, stop: make(chan struct{}), done: make(chan struct{})}
	go w.run()
	return w
}

// close cancels a blocked wait and waits for the goroutine to end.
func (w *pcscWatcher) close() {
	select {
	case <-w.stop:
	default:
		close(w.stop)
	}
	w.mu.Lock()
	if w.ctx != nil {
		w.ctx.Cancel()
	}
	w.mu.Unlock()
	<-w.done
}

func (w *pcscWatcher) stopping() bool {
	select {
	case <-w.stop:
		return true
	default:
		return false
	}
}

func (w *pcscWatcher) run() {
	defer close(w.done)
	for !w.stopping() {
		ctx, err := pcsc.EstablishContext()
		if err != nil { // pcscd gone (or refusing us): retry with backoff
			w.wake(false)
			sleep(w.backoff.Next(), w.stop)
			continue
		}
		w.mu.Lock()
		w.ctx = ctx
		w.mu.Unlock()
		if w.stopping() { // close ran before ctx was visible to it
			ctx.Release()
			return
		}
		w.wake(true)
		// Why the wait ended does not matter here: the loop's own read
		// finds out (and says why) when it re-reads.
		w.watch(ctx)
		w.mu.Lock()
		w.ctx = nil
		w.mu.Unlock()
		ctx.Release()
		if w.stopping() {
			return
		}
		w.wake(false)
		sleep(w.backoff.Next(), w.stop)
	}
}

// watch blocks on reader changes until the connection fails or the watcher
// is closed; it returns the error that ended it.
func (w *pcscWatcher) watch(ctx *pcsc.Context) error {
	states, err := watchList(ctx, nil)
	if err != nil {
		return err
	}
	for {
		err := ctx.GetStatusChange(states, -1)
		switch {
		case err == nil:
		case errors.Is(err, scard.ErrCancelled):
			return err
		case errors.Is(err, scard.ErrUnknownReader), errors.Is(err, scard.ErrReaderUnavailable):
			// A reader went away between listing and waiting: list again.
			if states, err = watchList(ctx, nil); err != nil {
				return err
			}
			w.wake(true)
			continue
		case errors.Is(err, scard.ErrTimeout):
			continue
		default:
			return err
		}
		w.backoff.Reset()
		readersChanged := false
		for i := range states {
			if states[i].EventState&scard.StateChanged != 0 && states[i].Reader == pcsc.PnPNotification {
				readersChanged = true
			}
			states[i].CurrentState = states[i].EventState &^ scard.StateChanged
		}
		if readersChanged {
			if states, err = watchList(ctx, states); err != nil {
				return err
			}
		}
		w.wake(true)
	}
}

// watchList builds the wait list: the PnP pseudo reader and every reader,
// keeping the known state of readers that were already watched.
func watchList(ctx *pcsc.Context, old []pcsc.ReaderState) ([]pcsc.ReaderState, error) {
	names, err := ctx.ListReaders()
	if err != nil {
		return nil, err
	}
	known := map[string]scard.StateFlag{}
	for _, s := range old {
		known[s.Reader] = s.CurrentState
	}
	states := []pcsc.ReaderState{{Reader: pcsc.PnPNotification, CurrentState: known[pcsc.PnPNotification]}}
	for _, n := range names {
		states = append(states, pcsc.ReaderState{Reader: n, CurrentState: known[n]})
	}
	return states, nil
}

// pcscReader is the monitor's own context for reading reader states. It is
// used only by the monitor goroutine.
type pcscReader struct {
	ctx *pcsc.Context
}

// read returns the current state of every reader, connecting if needed.
func (r *pcscReader) read() ([]pcsc.ReaderState, error) {
	if r.ctx == nil {
		ctx, err := pcsc.EstablishContext()
		if err != nil {
			return nil, describePCSCError(err)
		}
		r.ctx = ctx
	}
	states, err := r.readOn(r.ctx)
	if err != nil {
		r.close()
		return nil, describePCSCError(err)
	}
	return states, nil
}

func (r *pcscReader) readOn(ctx *pcsc.Context) ([]pcsc.ReaderState, error) {
	for attempt := 0; ; attempt++ {
		names, err := ctx.ListReaders()
		if err != nil {
			return nil, err
		}
		states := make([]pcsc.ReaderState, len(names))
		for i, n := range names {
			states[i] = pcsc.ReaderState{Reader: n, CurrentState: scard.StateUnaware}
		}
		err = ctx.GetStatusChange(states, 0)
		if (errors.Is(err, scard.ErrUnknownReader) || errors.Is(err, scard.ErrReaderUnavailable)) && attempt < 3 {
			continue // a reader left between listing and reading
		}
		if errors.Is(err, scard.ErrTimeout) {
			err = nil // nothing differs from "unaware": cannot happen, but is not a failure
		}
		return states, err
	}
}

func (r *pcscReader) close() {
	if r.ctx != nil {
		r.ctx.Release()
		r.ctx = nil
	}
}

// PCSCError says why PC/SC is unavailable, telling "pcscd is not running"
// apart from "pcscd refuses this client" (polkit drops a client the same way
// a dead pcscd does).
type PCSCError struct {
	Code scard.Error
	// Reason is for people: what happened and what it probably means.
	Reason string
}

func (e *PCSCError) Error() string { return e.Reason }
func (e *PCSCError) Unwrap() error { return e.Code }

func describePCSCError(err error) error {
	var code scard.Error
	if !errors.As(err, &code) {
		return err
	}
	e := &PCSCError{Code: code}
	sock := pcscSocket()
	c, derr := net.DialTimeout("unix", sock, 200*time.Millisecond)
	switch {
	case derr != nil:
		// Whatever the code (a dead pcscd shows as SCARD_E_NO_SERVICE,
		// SCARD_F_COMM_ERROR or even SCARD_W_SECURITY_VIOLATION), nobody
		// listens on the socket.
		e.Reason = fmt.Sprintf("pcscd is not running (%v; %s: %v)", code, sock, errors.Unwrap(derr))
	case code == scard.ErrNoService || code == scard.ErrServiceStopped || code == scard.ErrSecurityViolation:
		c.Close()
		e.Reason = fmt.Sprintf("pcscd at %s accepts connections but refused this client (%v): access denied by polkit?", sock, code)
	default:
		c.Close()
		e.Reason = fmt.Sprintf("PC/SC: %v (0x%08x)", code, uint32(code))
	}
	return e
}

// pcscSocket is the socket libpcsclite connects to.
func pcscSocket() string {
	if s := os.Getenv("PCSCLITE_CSOCK_NAME"); s != "" {
		return s
	}
	return "/run/pcscd/pcscd.comm"
}

// readerState maps PC/SC state flags to the monitor's reader states.
func readerState(f scard.StateFlag) ReaderState {
	switch {
	case f&scard.StateUnavailable != 0, f&scard.StateUnknown != 0, f&scard.StateIgnore != 0:
		return ReaderUnavailable
	case f&scard.StateMute != 0:
		return ReaderMute
	case f&scard.StatePresent != 0:
		return ReaderPresent
	case f&scard.StateEmpty != 0:
		return ReaderEmpty
	}
	return ReaderUnknown
}
