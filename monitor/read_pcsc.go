package monitor

import (
	"errors"
	"fmt"
	"net"
	"os"
	"time"

	"github.com/ebfe/scard"
	"github.com/slotwatch/slotwatch/internal/pcsc"
)

// Reading PC/SC: the loop's own context reads every reader's state; the
// result is compared within one attachment of a reader (rule 2).

// readPCSC re-reads every reader's state. It reports whether anything about
// the readers changed.
func (l *loop) readPCSC(now time.Time) bool {
	states, err := l.reader.read()
	if err != nil {
		return l.pcscDown(err, now)
	}
	if !l.pcscUp {
		l.log.Info("PC/SC available", "readers", len(states))
		if l.pcscErr != nil {
			// Back after an outage: say so before the re-read's results.
			l.publishState(StateRecovering, "pcscd is back; re-reading readers")
		}
	}
	l.pcscUp, l.pcscErr = true, nil
	l.pcscRetry.Reset()
	l.pcscRetryAt = time.Time{}
	readers := map[string]*Reader{}
	changed := false
	for _, st := range states {
		r := &Reader{Name: st.Reader, State: readerState(st.EventState), EventCount: st.EventCount()}
		if r.State == ReaderPresent || r.State == ReaderMute || r.State == ReaderExclusive {
			r.Atr = st.Atr
		}
		if old, ok := l.readers[st.Reader]; ok && old.Attachment != 0 {
			r.Attachment = old.Attachment
		} else {
			l.attachments++
			r.Attachment = l.attachments
		}
		if old, ok := l.readers[st.Reader]; !ok || !sameReader(old, r) {
			changed = true
			l.changedReaders[st.Reader] = true
		}
		readers[st.Reader] = r
	}
	for name := range l.readers {
		if _, ok := readers[name]; !ok {
			changed = true
			l.changedReaders[name] = true
		}
	}
	l.readers = readers
	return changed
}

// pcscDown records that PC/SC cannot be read (err) and reports whether
// that changed anything.
func (l *loop) pcscDown(err error, now time.Time) bool {
	changed := l.pcscUp || l.pcscErr == nil || l.pcscErr.Error() != err.Error()
	if l.pcscUp {
		l.log.Warn("PC/SC unavailable", "err", err)
	}
	l.pcscUp, l.pcscErr = false, err
	l.pcscRetryAt = now.Add(l.pcscRetry.Next())
	// Every reader is gone with pcscd: when it is back, each reader is
	// a new attachment whose event counter starts again.
	for _, r := range l.readers {
		if r.State != ReaderUnavailable {
			changed = true
		}
	}
	stale := map[string]*Reader{}
	for n, r := range l.readers {
		c := *r
		c.State, c.Atr, c.EventCount, c.Attachment = ReaderUnavailable, nil, 0, 0
		stale[n] = &c
	}
	l.readers = stale
	return changed
}

func sameReader(a, b *Reader) bool {
	return a.State == b.State && a.EventCount == b.EventCount && a.Attachment == b.Attachment && string(a.Atr) == string(b.Atr)
}

// readerState maps PC/SC state flags to the monitor's reader states.
func readerState(f scard.StateFlag) ReaderState {
	switch {
	case f&scard.StateUnavailable != 0, f&scard.StateUnknown != 0, f&scard.StateIgnore != 0:
		return ReaderUnavailable
	case f&scard.StateMute != 0:
		return ReaderMute
	case f&scard.StatePresent != 0 && f&scard.StateExclusive != 0:
		return ReaderExclusive
	case f&scard.StatePresent != 0:
		return ReaderPresent
	case f&scard.StateEmpty != 0:
		return ReaderEmpty
	}
	return ReaderUnknown
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
