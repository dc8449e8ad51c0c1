package monitor

import (
	"context"
	"errors"
	"testing"
	"time"
)

func TestLeasesDeadGenerationFailsAtOnce(t *testing.T) {
	var drained []uint64
	l := newLeases(func(g uint64) { drained = append(drained, g) }, func(string) {}, func(string) {})
	slot := SlotKey{"m", 0}
	l.add(1, slot)
	release, err := l.acquire(context.Background(), 1)
	if err != nil {
		t.Fatal(err)
	}
	if l.kill(1) {
		t.Fatal("kill reported drained while a holder remains")
	}
	if _, err := l.acquire(context.Background(), 1); !errors.Is(err, ErrTokenRemoved) {
		t.Fatalf("acquire on a dead generation: got %v, want ErrTokenRemoved", err)
	}
	if len(drained) != 0 {
		t.Fatal("drained before the holder released")
	}
	release()
	release() // a second release is harmless
	if len(drained) != 1 || drained[0] != 1 {
		t.Fatalf("drained = %v, want [1]", drained)
	}
}

func TestLeasesUnknownGeneration(t *testing.T) {
	l := newLeases(func(uint64) {}, func(string) {}, func(string) {})
	if _, err := l.acquire(context.Background(), 42); !errors.Is(err, ErrTokenRemoved) {
		t.Fatalf("got %v, want ErrTokenRemoved", err)
	}
}

func TestLeasesNextGenerationWaitsForReclamation(t *testing.T) {
	l := newLeases(func(uint64) {}, func(string) {}, func(string) {})
	slot := SlotKey{"m", 0}
	l.add(1, slot)
	hold1, _ := l.acquire(context.Background(), 1)
	l.kill(1)
	l.add(2, slot)
	l.add(3, SlotKey{"m", 1}) // another slot is not held up

	if r, err := l.acquire(context.Background(), 3); err != nil {
		t.Fatalf("other slot: %v", err)
	} else {
		r()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if _, err := l.acquire(ctx, 2); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("generation 2 while 1 drains: got %v, want to wait", err)
	}

	got := make(chan error, 1)
	go func() {
		r, err := l.acquire(context.Background(), 2)
		if err == nil {
			r()
		}
		got <- err
	}()
	hold1()
	select {
	case err := <-got:
		t.Fatalf("acquire returned (%v) before generation 1 was reclaimed", err)
	case <-time.After(20 * time.Millisecond):
	}
	l.reclaimed(1)
	if err := <-got; err != nil {
		t.Fatalf("after reclamation: %v", err)
	}
}

func TestBackoffCaps(t *testing.T) {
	b := backoff{Min: 10 * time.Millisecond, Max: 50 * time.Millisecond}
	var got []time.Duration
	for range 5 {
		got = append(got, b.Next())
	}
	want := []time.Duration{10, 20, 40, 50, 50}
	for i := range want {
		if got[i] != want[i]*time.Millisecond {
			t.Fatalf("delays %v, want %v ms", got, want)
		}
	}
	b.Reset()
	if d := b.Next(); d != 10*time.Millisecond {
		t.Fatalf("after reset: %v", d)
	}
}

func TestMatchReader(t *testing.T) {
	long := "Some Vendor Very Long Reader Name With Interface And Serial Number 0123456789 00 00"
	readers := map[string]*Reader{"Virtual PCD 00 00": {}, long: {}}
	for _, tc := range []struct{ desc, want string }{
		{"Virtual PCD 00 00", "Virtual PCD 00 00"},
		{"Virtual PCD 00 01", ""},
		{"SoftHSM slot ID 0x1", ""},
		{"", ""},
		{long[:64], long}, // OpenSC cuts descriptions to 64 characters
	} {
		if got := matchReader(tc.desc, readers); got != tc.want {
			t.Errorf("matchReader(%q) = %q, want %q", tc.desc, got, tc.want)
		}
	}
}

func TestSubscriptionKeepsOrderAndEnds(t *testing.T) {
	m := &Monitor{subs: map[*Subscription]struct{}{}, done: make(chan struct{})}
	s := newSubscription(m)
	var evs []Event
	for i := range 1000 {
		evs = append(evs, Event{Kind: TokenInserted, Token: &Token{Generation: uint64(i + 1)}})
	}
	s.push(evs[:500])
	s.push(evs[500:])
	s.end()
	for i := range 1000 {
		ev, err := s.Next(context.Background())
		if err != nil || ev.Token.Generation != uint64(i+1) {
			t.Fatalf("event %d: %v %v", i, ev, err)
		}
	}
	if _, err := s.Next(context.Background()); !errors.Is(err, ErrClosed) {
		t.Fatalf("after the last event: %v, want ErrClosed", err)
	}
}
