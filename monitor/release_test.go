package monitor_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/ebfe/scard"

	"github.com/slotwatch/slotwatch/monitor"
	"github.com/slotwatch/slotwatch/tests/vcard"
)

// Idle release against the real stack: OpenSC is finalized while nothing
// needs it, the view stays, and it comes back for operations and for cards
// it must read.

func quickRelease(string) monitor.IdleRelease {
	return monitor.IdleRelease{Enabled: true, Grace: 50 * time.Millisecond}
}

// waitReleased reads events until the snapshot shows the module released
// (or not), failing on any token event on the way: releasing and
// initializing again must not re-announce a card.
func (w *world) waitReleased(want bool) *monitor.Snapshot {
	w.t.Helper()
	if released(w.mon.Snapshot()) == want {
		return w.mon.Snapshot()
	}
	for {
		ev := w.next(eventTimeout, monitor.ModuleChanged, monitor.TokenInserted, monitor.TokenRemoved)
		if ev.Kind != monitor.ModuleChanged {
			w.t.Fatalf("%v while waiting for released=%v", ev, want)
		}
		if released(ev.Snapshot) == want {
			return ev.Snapshot
		}
	}
}

// startWithCard starts the monitor and inserts reader 0's card.
func (w *world) startWithCard(cfg monitor.Config) *monitor.Token {
	w.t.Helper()
	w.start(cfg)
	if err := w.cards[0].Insert(); err != nil {
		w.t.Fatal(err)
	}
	return w.expectToken(monitor.TokenInserted, eventTimeout)
}

func released(s *monitor.Snapshot) bool {
	for _, m := range s.Modules {
		if m.Name == "opensc" {
			return m.Released
		}
	}
	return false
}

func TestIdleReleaseKeepsTheView(t *testing.T) {
	w := newWorld(t)
	tok := w.startWithCard(monitor.Config{IdleRelease: quickRelease})
	snap := w.waitReleased(true)
	if w.mod.Initialized() {
		t.Fatal("the module is still initialized while the view says released")
	}
	if got, ok := snap.Token(tok.Generation); !ok || got.Label != tok.Label {
		t.Fatalf("released view lost the token: %v", snap.Tokens())
	}
	if m := snap.Modules[0]; m.State != monitor.ModuleRunning || m.WaitMode != monitor.WaitPCSC {
		t.Fatalf("released module: %+v, want running, pcsc", m)
	}

	// An operation brings it back, with the same generation.
	start := time.Now()
	release, err := w.mon.Acquire(context.Background(), tok.Generation)
	if err != nil {
		t.Fatalf("acquire on a released module: %v", err)
	}
	t.Logf("acquire on a released module took %v", time.Since(start).Round(time.Microsecond))
	if !w.mod.Initialized() {
		t.Fatal("acquire returned before the module was initialized")
	}
	if _, err := w.mod.TokenInfo(tok.Slot.ID); err != nil {
		t.Fatalf("C_GetTokenInfo after the wake-up: %v", err)
	}
	w.waitReleased(false)
	if r, ok := w.mon.Snapshot().Token(tok.Generation); !ok || r.Slot != tok.Slot {
		t.Fatalf("token after the wake-up: %v, want generation %d in %v", w.mon.Snapshot().Tokens(), tok.Generation, tok.Slot)
	}
	// Held: never released.
	time.Sleep(200 * time.Millisecond) // four graces
	if !w.mod.Initialized() {
		t.Fatal("the module was released while an operation held its token")
	}
	release()
	w.waitReleased(true)
}

func TestReplugWhileReleased(t *testing.T) {
	w := newWorld(t)
	card := w.cards[0]
	tok := w.startWithCard(monitor.Config{IdleRelease: quickRelease})
	w.waitReleased(true)

	if err := card.Remove(); err != nil {
		t.Fatal(err)
	}
	ev := w.next(eventTimeout, tokenEvents...)
	if ev.Kind != monitor.TokenRemoved || ev.Token.Generation != tok.Generation {
		t.Fatalf("%v, want the removal of generation %d", ev, tok.Generation)
	}
	if !released(ev.Snapshot) {
		t.Error("a removal initialized the released module: PC/SC alone tells it")
	}
	if err := card.Insert(); err != nil {
		t.Fatal(err)
	}
	t2 := w.expectToken(monitor.TokenInserted, eventTimeout)
	if t2.Generation <= tok.Generation || t2.Label != tok.Label {
		t.Fatalf("reinserted %+v, want label %q with a generation above %d", t2, tok.Label, tok.Generation)
	}
	w.waitReleased(true)

	// Swapped inside one event gap while released.
	hold := w.mon.Hold()
	if err := card.Remove(); err != nil {
		t.Fatal(err)
	}
	card.SetProfile(vcard.Profile{Label: "Swapped", Serial: "5a5a0001"})
	if err := card.Insert(); err != nil {
		t.Fatal(err)
	}
	waitReaderEvents(t, w, 2)
	hold()
	if r := w.expectToken(monitor.TokenRemoved, eventTimeout); r.Generation != t2.Generation {
		t.Fatalf("removed %+v, want generation %d", r, t2.Generation)
	}
	t3 := w.expectToken(monitor.TokenInserted, eventTimeout)
	if t3.Label != "Swapped" || t3.Serial != "5a5a0001" || t3.Generation <= t2.Generation {
		t.Fatalf("swapped in %+v", t3)
	}
}

// waitReaderEvents waits until PC/SC has counted n more events on reader 0
// than the monitor's view shows (the loop is held).
func waitReaderEvents(t *testing.T, w *world, n uint16) {
	t.Helper()
	r, _ := w.mon.Snapshot().Reader(w.pcscd.Readers()[0])
	want := r.EventCount + n
	ctx, err := scard.EstablishContext()
	if err != nil {
		t.Fatal(err)
	}
	defer ctx.Release()
	deadline := time.Now().Add(eventTimeout)
	for {
		st := []scard.ReaderState{{Reader: r.Name, CurrentState: scard.StateUnaware}}
		if err := ctx.GetStatusChange(st, 0); err != nil && !errors.Is(err, scard.ErrTimeout) {
			t.Fatal(err)
		}
		if uint16(uint32(st[0].EventState)>>16) >= want && st[0].EventState&scard.StatePresent != 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("PC/SC did not count %d events on %s", n, r.Name)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// waitReaderState reads events until reader 0 is in state want, failing on
// any token event on the way (when is what is going on, for messages).
func (w *world) waitReaderState(want monitor.ReaderState, when string) {
	w.t.Helper()
	for {
		ev := w.next(eventTimeout, monitor.ReaderChanged, monitor.TokenRemoved, monitor.TokenInserted)
		if ev.Kind != monitor.ReaderChanged {
			w.t.Fatalf("%v %s", ev, when)
		}
		if ev.Reader.Name == w.pcscd.Readers()[0] && ev.Reader.State == want {
			return
		}
	}
}

// holdExclusive connects to reader 0's card exclusively, as scdaemon does.
func holdExclusive(t *testing.T, w *world) (let func()) {
	t.Helper()
	ctx, err := scard.EstablishContext()
	if err != nil {
		t.Fatal(err)
	}
	card, err := ctx.Connect(w.pcscd.Readers()[0], scard.ShareExclusive, scard.ProtocolAny)
	if err != nil {
		ctx.Release()
		t.Fatalf("exclusive connect: %v", err)
	}
	done := false
	let = func() {
		if !done {
			done = true
			card.Disconnect(scard.LeaveCard)
			ctx.Release()
		}
	}
	t.Cleanup(let)
	return let
}

func TestExclusiveUserWhileReleased(t *testing.T) {
	w := newWorld(t)
	tok := w.startWithCard(monitor.Config{IdleRelease: quickRelease})
	w.waitReleased(true)

	let := holdExclusive(t, w)
	// pcscd tells no one of an exclusive connect: the call that needs the
	// card finds out.
	start := time.Now()
	if _, err := w.mon.Acquire(context.Background(), tok.Generation); !errors.Is(err, monitor.ErrCardInUse) {
		t.Fatalf("acquire while held exclusively: %v, want ErrCardInUse", err)
	}
	t.Logf("acquire said the card is in use after %v", time.Since(start).Round(time.Microsecond))
	if d := time.Since(start); d > time.Second {
		t.Errorf("acquire took %v to say the card is in use", d)
	}
	w.waitReaderState(monitor.ReaderExclusive, "while another process holds the card")
	// Known now: the next call is refused at once.
	start = time.Now()
	if _, err := w.mon.Acquire(context.Background(), tok.Generation); !errors.Is(err, monitor.ErrCardInUse) {
		t.Fatalf("second acquire while held exclusively: %v, want ErrCardInUse", err)
	}
	if d := time.Since(start); d > 10*time.Millisecond {
		t.Errorf("second acquire took %v to say the card is in use", d)
	}
	let()
	w.waitReaderState(monitor.ReaderPresent, "after the other process let go")
	release, err := w.mon.Acquire(context.Background(), tok.Generation)
	if err != nil {
		t.Fatalf("acquire once the reader is free: %v", err)
	}
	defer release()
	if _, err := w.mod.TokenInfo(tok.Slot.ID); err != nil {
		t.Fatalf("C_GetTokenInfo once the reader is free: %v", err)
	}
}

// TestExclusiveUserBlockedWithoutRelease documents the trade-off: with the
// idle release off, OpenSC's shared handle keeps an exclusive user out.
func TestExclusiveUserBlockedWithoutRelease(t *testing.T) {
	w := newWorld(t)
	w.startWithCard(monitor.Config{IdleRelease: func(string) monitor.IdleRelease { return monitor.IdleRelease{} }})
	ctx, err := scard.EstablishContext()
	if err != nil {
		t.Fatal(err)
	}
	defer ctx.Release()
	card, err := ctx.Connect(w.pcscd.Readers()[0], scard.ShareExclusive, scard.ProtocolAny)
	if err == nil {
		card.Disconnect(scard.LeaveCard)
		t.Fatal("an exclusive connect succeeded while OpenSC, not released, holds the card")
	}
	if !errors.Is(err, scard.ErrSharingViolation) {
		t.Fatalf("exclusive connect: %v, want a sharing violation", err)
	}
}
