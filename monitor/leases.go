package monitor

import (
	"context"
	"errors"
	"sync"
)

// ErrTokenRemoved is returned when an operation asks for a generation that is
// dead (its token was removed) or never existed.
var ErrTokenRemoved = errors.New("token removed")

// leases tracks, per live or draining generation, how many operations hold
// it (DESIGN.md rule 4). The monitor goroutine adds and kills generations;
// operation goroutines acquire and release them. The mutex is held only for
// map updates, never across a module call, so the monitor never waits on an
// operation.
type leases struct {
	mu   sync.Mutex // guards gens
	gens map[uint64]*lease
	// drainedFn is called (outside mu) when a dead generation's last holder
	// releases it; the monitor then reclaims its sessions.
	drainedFn func(gen uint64)
}

type lease struct {
	slot    SlotKey
	dead    bool
	holders int
	// reclaimed is closed once the dead generation's sessions were
	// reclaimed; operations on the slot's next generation wait for it.
	reclaimed chan struct{}
}

func newLeases(drained func(uint64)) *leases {
	return &leases{gens: map[uint64]*lease{}, drainedFn: drained}
}

// add registers a newly inserted generation.
func (l *leases) add(gen uint64, slot SlotKey) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.gens[gen] = &lease{slot: slot, reclaimed: make(chan struct{})}
}

// kill marks gen dead. It reports whether nobody holds it, in which case the
// caller reclaims at once and then calls reclaimed(gen).
func (l *leases) kill(gen uint64) (drained bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	ls, ok := l.gens[gen]
	if !ok || ls.dead {
		return false
	}
	ls.dead = true
	return ls.holders == 0
}

// reclaimed forgets a dead generation whose sessions were reclaimed and lets
// operations on the slot's later generations go ahead.
func (l *leases) reclaimed(gen uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if ls, ok := l.gens[gen]; ok && ls.dead {
		close(ls.reclaimed)
		delete(l.gens, gen)
	}
}

// holders returns how many operations hold gen (for tests and reports).
func (l *leases) holders(gen uint64) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	if ls, ok := l.gens[gen]; ok {
		return ls.holders
	}
	return 0
}

// heldOnModule counts the operations holding any generation of a module's
// tokens.
func (l *leases) heldOnModule(name string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, ls := range l.gens {
		if ls.slot.Module == name {
			n += ls.holders
		}
	}
	return n
}

// acquire holds gen until release is called. It fails with ErrTokenRemoved
// if gen is dead or unknown, and waits (until ctx is done) while an older
// generation of the same slot is still being reclaimed, so that a session
// handle value the module reuses can never be reached through a stale
// session.
func (l *leases) acquire(ctx context.Context, gen uint64) (release func(), err error) {
	for {
		l.mu.Lock()
		ls, ok := l.gens[gen]
		if !ok || ls.dead {
			l.mu.Unlock()
			return nil, ErrTokenRemoved
		}
		var pending chan struct{}
		for g, other := range l.gens {
			if g < gen && other.dead && other.slot == ls.slot {
				pending = other.reclaimed
				break
			}
		}
		if pending == nil {
			ls.holders++
			l.mu.Unlock()
			var once sync.Once
			return func() { once.Do(func() { l.release(gen) }) }, nil
		}
		l.mu.Unlock()
		select {
		case <-pending:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

func (l *leases) release(gen uint64) {
	l.mu.Lock()
	ls := l.gens[gen]
	ls.holders--
	drained := ls.dead && ls.holders == 0
	l.mu.Unlock()
	if drained {
		l.drainedFn(gen)
	}
}
