package monitor

import (
	"errors"
	"sync"
	"time"

	"github.com/ebfe/scard"
	"github.com/slotwatch/slotwatch/internal/pcsc"
)

// The PC/SC source: SCardGetStatusChange on every reader and the PnP pseudo
// reader. Like every source it only wakes the loop.

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
	// A cancel that lands between two waits (the watcher just woke and
	// has not called SCardGetStatusChange again) cancels nothing, and
	// the next wait blocks for good: cancel until the goroutine is gone.
	for {
		w.mu.Lock()
		if w.ctx != nil {
			w.ctx.Cancel()
		}
		w.mu.Unlock()
		select {
		case <-w.done:
			return
		case <-time.After(50 * time.Millisecond):
		}
	}
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
