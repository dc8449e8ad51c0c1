package broker

import (
	"context"
	"sync"
)

// tokenLock is a readers-writer lock whose acquisition gives up when a
// context ends, so a caller waiting behind a slow login gets ErrBusy
// instead of hanging. A waiting writer keeps new readers out, so a stream
// of operations cannot starve a Login.
type tokenLock struct {
	mu             sync.Mutex // guards all following fields
	readers        int
	writer         bool
	waitingWriters int
	changed        chan struct{} // closed and replaced at every release
}

func newTokenLock() *tokenLock { return &tokenLock{changed: make(chan struct{})} }

// lock takes the lock, shared or exclusive, or returns ctx's error.
func (l *tokenLock) lock(ctx context.Context, exclusive bool) error {
	l.mu.Lock()
	if exclusive {
		l.waitingWriters++
	}
	for {
		free := !l.writer && (exclusive && l.readers == 0 || !exclusive && l.waitingWriters == 0)
		if free {
			if exclusive {
				l.waitingWriters--
				l.writer = true
			} else {
				l.readers++
			}
			l.mu.Unlock()
			return nil
		}
		ch := l.changed
		l.mu.Unlock()
		select {
		case <-ch:
			l.mu.Lock()
		case <-ctx.Done():
			l.mu.Lock()
			if exclusive {
				l.waitingWriters--
				l.wakeLocked() // readers held back by this writer may go
			}
			l.mu.Unlock()
			return ctx.Err()
		}
	}
}

func (l *tokenLock) unlock(exclusive bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if exclusive {
		l.writer = false
	} else {
		l.readers--
	}
	l.wakeLocked()
}

func (l *tokenLock) wakeLocked() {
	close(l.changed)
	l.changed = make(chan struct{})
}
