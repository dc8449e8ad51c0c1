package monitor

import (
	"context"
	"errors"
	"sync"
)

// ErrTokenRemoved is returned when an operation asks for a generation that is
// dead (its token was removed) or never existed.
var ErrTokenRemoved = errors.New("token removed")

// ErrCardInUse is returned when an operation needs a card that another
// process holds exclusively (the reader's state is ReaderExclusive). The
// token is still there; try again once the reader is free.
var ErrCardInUse = errors.New("the card is in exclusive use by another process")

// leases tracks, per live or draining generation, how many operations hold
// it (DESIGN.md rule 4). The monitor goroutine adds and kills generations;
// operation goroutines acquire and release them. The mutex is held only for
// map updates, never across a module call, so the monitor never waits on an
// operation.
type leases struct {
	mu   sync.Mutex // guards gens, held and gates
	gens map[uint64]*lease
	held map[string]int // holders per module
	// gates of modules the monitor releases while idle (release.go).
	gates map[string]*gate
	// drainedFn is called (outside mu) when a dead generation's last holder
	// releases it; the monitor then reclaims its sessions.
	drainedFn func(gen uint64)
	// demandFn (outside mu) asks the monitor to initialize a released
	// module again; idleFn tells it that the last holder of a gated
	// module's generations let go.
	demandFn, idleFn func(module string)
}

// gate is how holders and the monitor agree on a released module: the
// monitor shuts it only while nobody holds one of the module's generations
// (so no operation is inside the module when it is finalized), and an
// acquire on a shut gate asks for the module and waits until the monitor
// opens it again.
type gate struct {
	shut bool
	open chan struct{} // closed when the gate opens (or the wake-up failed: err)
	err  error
}

type lease struct {
	slot    SlotKey
	dead    bool
	holders int
	// reclaimed is closed once the dead generation's sessions were
	// reclaimed; operations on the slot's next generation wait for it.
	reclaimed chan struct{}
}

func newLeases(drained func(uint64), demand, idle func(string)) *leases {
	return &leases{
		gens: map[uint64]*lease{}, held: map[string]int{}, gates: map[string]*gate{},
		drainedFn: drained, demandFn: demand, idleFn: idle,
	}
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
	return l.held[name]
}

// acquire holds gen until release is called. It fails with ErrTokenRemoved
// if gen is dead or unknown, and waits (until ctx is done) while an older
// generation of the same slot is still being reclaimed, so that a session
// handle value the module reuses can never be reached through a stale
// session, and while the module is released, until it is initialized
// again.
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
			mod := ls.slot.Module
			ls.holders++
			l.held[mod]++
			var once sync.Once
			release = func() { once.Do(func() { l.release(gen) }) }
			g := l.gates[mod]
			if g == nil || !g.shut {
				l.mu.Unlock()
				return release, nil
			}
			// Released: ask for the module and wait, holding the
			// generation already, so the monitor cannot shut the gate
			// again between opening it and this holder getting through.
			open := g.open
			l.mu.Unlock()
			l.demandFn(mod)
			select {
			case <-open:
			case <-ctx.Done():
				release()
				return nil, ctx.Err()
			}
			l.mu.Lock()
			failed, dead := g.shut, ls.dead
			err := g.err
			l.mu.Unlock()
			switch {
			case failed:
				release()
				return nil, err
			case dead: // the card changed while the module was released
				release()
				return nil, ErrTokenRemoved
			}
			return release, nil
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
	l.held[ls.slot.Module]--
	idle := l.held[ls.slot.Module] == 0 && l.gates[ls.slot.Module] != nil
	drained := ls.dead && ls.holders == 0
	l.mu.Unlock()
	if drained {
		l.drainedFn(gen)
	}
	if idle {
		l.idleFn(ls.slot.Module)
	}
}

// manage gives a module a gate (open): from now on the monitor may release
// it, and is told when its last holder lets go.
func (l *leases) manage(module string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.gates[module] == nil {
		l.gates[module] = &gate{open: make(chan struct{})}
	}
}

// shut closes a module's gate if nobody holds one of its generations, and
// reports whether it did. Acquires then wait for open.
func (l *leases) shut(module string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	g := l.gates[module]
	if g == nil || l.held[module] > 0 {
		return false
	}
	if !g.shut {
		g.shut, g.err, g.open = true, nil, make(chan struct{})
	}
	return true
}

// reopen opens a module's gate after the monitor initialized it again (err
// nil), or wakes the waiters with err and leaves it shut: the
// initialization failed.
func (l *leases) reopen(module string, err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	g := l.gates[module]
	if g == nil || !g.shut {
		return
	}
	if err != nil {
		g.err = err
		close(g.open)
		g.open = make(chan struct{})
		return
	}
	g.shut = false
	close(g.open)
}

// unmanage removes a module's gate (the module left the set, or the monitor
// stops); waiters get err.
func (l *leases) unmanage(module string, err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	g := l.gates[module]
	if g == nil {
		return
	}
	delete(l.gates, module)
	if g.shut {
		g.err = err
		close(g.open)
	}
}
