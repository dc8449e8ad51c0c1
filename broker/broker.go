package broker

import (
	"github.com/miekg/pkcs11"

	"context"
	"errors"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/slotwatch/slotwatch/internal/secret"
	"github.com/slotwatch/slotwatch/module"
	"github.com/slotwatch/slotwatch/monitor"
)

// Generations is what the broker needs of the monitor: the current view,
// and holding a token generation for the length of an operation (DESIGN.md
// rule 4). *monitor.Monitor implements it.
type Generations interface {
	Acquire(ctx context.Context, gen uint64) (release func(), err error)
	Snapshot() *monitor.Snapshot
}

// Modules finds a loaded module by the name the monitor's view uses.
// *module.Set implements it; it is the same set the monitor watches.
type Modules interface {
	Lookup(name string) (*module.Module, bool)
}

// Limits bound what one caller can take of the daemon. Past a limit a call
// fails with ErrBusy and other callers stay served.
type Limits struct {
	// SessionsPerToken is how many sessions one caller may hold on one
	// token (config key max-sessions-per-token).
	SessionsPerToken int
	// ConcurrentCalls is how many calls one caller may have running at once
	// (max-concurrent-calls).
	ConcurrentCalls int
	// FindResults is the most objects one FindObjects returns
	// (max-find-results).
	FindResults int
	// TokenWait is how long a call waits for its token — another caller's
	// login or InitToken in progress, the previous card's operations
	// draining — before it answers ErrBusy (token-wait).
	TokenWait time.Duration
}

// DefaultLimits are the limits when the config sets none.
func DefaultLimits() Limits {
	return Limits{SessionsPerToken: 16, ConcurrentCalls: 8, FindResults: 1000, TokenWait: 5 * time.Second}
}

func (l Limits) withDefaults() Limits {
	d := DefaultLimits()
	if l.SessionsPerToken <= 0 {
		l.SessionsPerToken = d.SessionsPerToken
	}
	if l.ConcurrentCalls <= 0 {
		l.ConcurrentCalls = d.ConcurrentCalls
	}
	if l.FindResults <= 0 {
		l.FindResults = d.FindResults
	}
	if l.TokenWait <= 0 {
		l.TokenWait = d.TokenWait
	}
	return l
}

// Observer is told of every change to the session table, in order per
// session, with the session's token lock held: a face puts session objects
// on its transport from here. It must not call back into the broker.
type Observer interface {
	SessionOpened(s SessionInfo)
	// SessionChanged: the session's State changed (a login or logout).
	SessionChanged(s SessionInfo)
	SessionClosed(s SessionInfo, why string)
}

// Options configures a Broker.
type Options struct {
	Limits   Limits
	Logger   *slog.Logger
	Observer Observer // nil: nobody is told
	// ResumeLogin keeps the PIN of every login, in locked memory
	// (internal/secret) until the login ends, so that the login can be
	// made again when its sessions resume after an outage (resume.go;
	// config key resume-login). Off: they resume logged out.
	ResumeLogin bool
}

// Broker owns callers, their sessions and logins. Create with New.
type Broker struct {
	gens   Generations
	mods   Modules
	limits Limits
	log    *slog.Logger
	obs    Observer

	resumeLogin atomic.Bool
	resuming    sync.WaitGroup // resume goroutines (TokenBack)

	mu       sync.Mutex // guards all following fields; a leaf (see doc.go)
	callers  map[string]*callerState
	sessions map[uint64]*session
	tokens   map[uint64]*tokenState
	away     map[uint64]*suspension // generations lost to an outage with suspended sessions
	nextID   uint64                 // last session id handed out; never reused
	// recent remembers the generation of the last len(recent) sessions
	// opened (a ring indexed by session id), so that a closed session's
	// id can tell "its token is gone" from "it was closed" in bounded
	// memory (SessionGeneration).
	recent [1 << 16]struct{ id, gen uint64 }
}

// callerState is a caller that joined and has not left.
type callerState struct {
	Caller
	calls int // calls running now (enter/exit)
}

// tokenState is the broker's state of one token generation.
type tokenState struct {
	lock *tokenLock
	// Guarded by Broker.mu; changed only with lock held exclusively, so
	// that a shared holder reads values that do not change under it.
	login        string // ID of the caller logged in, "" if none
	initializing bool   // an InitToken runs: a second one is Busy at once
	dead         bool   // TokenGone ran
	// pin is the login's PIN, kept for a resumption after an outage
	// (Options.ResumeLogin); wiped when the login ends.
	pin     *secret.Secret
	pinUser uint
	// objects are, per caller ID, the object handles that caller was given
	// on this token (PKCS#11 face: FindObjectHandles, SessionCall).
	objects map[string]map[pkcs11.ObjectHandle]bool
}

// New returns a broker over the monitor's generations and the daemon's
// modules.
func New(gens Generations, mods Modules, opts Options) *Broker {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	b := &Broker{
		gens:     gens,
		mods:     mods,
		limits:   opts.Limits.withDefaults(),
		log:      opts.Logger,
		obs:      opts.Observer,
		away:     map[uint64]*suspension{},
		callers:  map[string]*callerState{},
		sessions: map[uint64]*session{},
		tokens:   map[uint64]*tokenState{},
	}
	b.resumeLogin.Store(opts.ResumeLogin)
	return b
}

// SetObserver sets who is told of session changes, before the first
// session opens (a face that needs the broker to be built first).
func (b *Broker) SetObserver(o Observer) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.obs = o
}

// Limits returns the limits in force.
func (b *Broker) Limits() Limits { return b.limits }

// Join registers a caller before its first call; joining again is a no-op
// (the first identity stays). A face must call Leave when the caller goes,
// and must check that the caller is still there after Join: a caller that
// left before it joined is seen by nobody else.
func (b *Broker) Join(c Caller) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if _, ok := b.callers[c.ID]; !ok {
		b.callers[c.ID] = &callerState{Caller: c}
	}
}

// Joined reports whether a caller with this id joined and has not left.
func (b *Broker) Joined(id string) (Caller, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	cs, ok := b.callers[id]
	if !ok {
		return Caller{}, false
	}
	return cs.Caller, true
}

// Leave forgets a caller: its sessions are closed (its login logged out
// first), its calls still running finish, and calls it makes from now on
// fail with ErrCallerGone. It returns once the sessions are closed; it
// waits as long as that takes (a token lock held by a slow call).
func (b *Broker) Leave(id string) {
	b.mu.Lock()
	cs, ok := b.callers[id]
	delete(b.callers, id)
	for _, ts := range b.tokens {
		delete(ts.objects, id)
	}
	b.mu.Unlock()
	if !ok {
		return
	}
	b.closeWhere(context.Background(), cs.Caller, func(s *session) bool { return true }, "owner left")
}

// Close closes every session (slotwatch is stopping) and forgets every
// caller and every kept PIN.
func (b *Broker) Close() {
	b.resuming.Wait()
	defer func() {
		b.mu.Lock()
		defer b.mu.Unlock()
		for gen, sus := range b.away {
			sus.pin.Wipe()
			delete(b.away, gen)
		}
		for _, ts := range b.tokens {
			ts.pin.Wipe()
			ts.pin = nil
		}
	}()
	b.mu.Lock()
	var ids []string
	for id := range b.callers {
		ids = append(ids, id)
	}
	b.mu.Unlock()
	for _, id := range ids {
		b.Leave(id)
	}
}

// enter takes one of the caller's call slots for a call; exit gives it back.
func (b *Broker) enter(c Caller) (exit func(), err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	cs, ok := b.callers[c.ID]
	if !ok {
		return nil, errorf(ErrCallerGone, "caller %s is not known (left, or never joined)", c.ID)
	}
	if cs.calls >= b.limits.ConcurrentCalls {
		return nil, errorf(ErrBusy, "%s has %d calls running, the most one caller may (max-concurrent-calls)", c.ID, cs.calls)
	}
	cs.calls++
	return func() {
		b.mu.Lock()
		defer b.mu.Unlock()
		cs.calls--
	}, nil
}

// held is one token generation held for one operation: the generation (it
// cannot be reclaimed meanwhile), the token's lock (shared or exclusive),
// and the token's module. It is the only way the broker reaches a module.
type held struct {
	tok       monitor.Token
	removable bool // the slot's device can be removed (CKF_REMOVABLE_DEVICE)
	state     *tokenState
	mod       *module.Module
	exclusive bool
	release   func()
}

// done releases the token lock and the generation.
func (h *held) done() {
	h.state.lock.unlock(h.exclusive)
	h.release()
}

// waitCtx bounds a caller's wait for its token.
func (b *Broker) waitCtx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), b.limits.TokenWait)
}

// hold acquires generation gen, its module and its token lock, waiting at
// most until ctx ends (ErrBusy then).
func (b *Broker) hold(ctx context.Context, gen uint64, exclusive bool) (*held, error) {
	release, err := b.gens.Acquire(ctx, gen)
	if err != nil {
		if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
			return nil, errorf(ErrBusy, "token generation %d: the previous card's operations are still draining", gen)
		}
		return nil, err
	}
	snap := b.gens.Snapshot()
	tok, ok := snap.Token(gen)
	if !ok {
		release()
		return nil, errorf(ErrTokenRemoved, "token generation %d is gone", gen)
	}
	removable := true
	if sl, ok := snap.Slot(tok.Slot); ok {
		removable = sl.Removable
	}
	mod, ok := b.mods.Lookup(tok.Slot.Module)
	if !ok {
		release()
		return nil, errorf(ErrTokenRemoved, "module %q of token generation %d is no longer loaded", tok.Slot.Module, gen)
	}
	b.mu.Lock()
	ts := b.tokenLocked(gen)
	dead := ts.dead
	b.mu.Unlock()
	if dead {
		release()
		return nil, errorf(ErrTokenRemoved, "token generation %d was removed", gen)
	}
	if err := ts.lock.lock(ctx, exclusive); err != nil {
		release()
		return nil, errorf(ErrBusy, "token generation %d is busy (another caller's login or InitToken is in progress)", gen)
	}
	return &held{tok: *tok, removable: removable, state: ts, mod: mod, exclusive: exclusive, release: release}, nil
}

// tokenLocked returns gen's state, creating it; b.mu must be held.
func (b *Broker) tokenLocked(gen uint64) *tokenState {
	ts, ok := b.tokens[gen]
	if !ok {
		ts = &tokenState{lock: newTokenLock()}
		b.tokens[gen] = ts
	}
	return ts
}

// loginOf returns who is logged in to gen's token ("" if nobody).
func (b *Broker) loginOf(ts *tokenState) string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return ts.login
}

// stillInSlot tells whether the module shows h's token (same label,
// serial, manufacturer, model) in its slot now: a card swapped before the
// monitor noticed must not be used under the old generation. A slot whose
// device cannot be removed (a software token such as SoftHSM2's) cannot
// have had its card swapped, and is not asked: C_GetTokenInfo can cost as
// much as the rest of an OpenSession.
func (h *held) stillInSlot() bool {
	if !h.removable {
		return true
	}
	return h.sameTokenInSlot()
}

// sameTokenInSlot asks the module for the token in h's slot.
func (h *held) sameTokenInSlot() bool {
	ti, err := h.mod.TokenInfo(h.tok.Slot.ID)
	return err == nil && ti.Label == h.tok.Label && ti.Serial == h.tok.Serial &&
		ti.Manufacturer == h.tok.Manufacturer && ti.Model == h.tok.Model
}

func (h *held) swapped() error {
	return errorf(ErrTokenRemoved, "the token in slot %s is no longer generation %d", h.tok.Slot, h.tok.Generation)
}
