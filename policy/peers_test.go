package policy

// Test doubles of the desktop's services on a private bus, and of the
// monitor's event stream.

import (
	"bytes"
	"context"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	godbus "github.com/godbus/dbus/v5"

	"github.com/slotwatch/slotwatch/monitor"
	"github.com/slotwatch/slotwatch/tests/stack"
)

// startBus starts a private bus and returns its address.
func startBus(t *testing.T) string {
	t.Helper()
	return stack.StartDBusForTest(t, "").Address
}

func connect(t *testing.T, addr string) *godbus.Conn {
	t.Helper()
	return stack.ConnectForTest(t, addr)
}

// call is one method call a peer received.
type call struct {
	Method string
	Args   []any
}

// peer is one desktop service on the test bus: it owns its well-known
// name and records every call.
type peer struct {
	name string
	conn *godbus.Conn

	mu      sync.Mutex
	calls   []call
	nextID  uint32        // Notify's last returned id
	block   chan struct{} // if not nil, methods wait for it to close
	active  bool          // what GetActive answers (screensavers)
	actives int           // GetActive calls (not in calls)
}

// startPeer connects a service to the bus at addr: name is one of
// gnomeScreenSaver, fdoScreenSaver, sessionManager and notifications, and
// the peer owns it once startPeer returns. With block, every method waits until
// the test ends.
func startPeer(t *testing.T, addr, name string, block bool) *peer {
	t.Helper()
	p := &peer{name: name, conn: connect(t, addr)}
	if block {
		p.block = make(chan struct{})
		t.Cleanup(func() { close(p.block) })
	}
	var err error
	switch name {
	case gnomeScreenSaver:
		err = p.conn.Export(screenSaver{p}, gnomeScreenPath, gnomeScreenSaver)
	case fdoScreenSaver:
		err = p.conn.Export(screenSaver{p}, fdoScreenPath, fdoScreenSaver)
	case sessionManager:
		err = p.conn.Export(session{p}, sessionPath, sessionManager)
	case notifications:
		err = p.conn.Export(notifier{p}, notifyPath, notifications)
	default:
		t.Fatalf("unknown service %s", name)
	}
	if err != nil {
		t.Fatalf("export %s: %v", name, err)
	}
	reply, err := p.conn.RequestName(name, godbus.NameFlagDoNotQueue)
	if err != nil || reply != godbus.RequestNameReplyPrimaryOwner {
		t.Fatalf("request name %s: %v, %v", name, reply, err)
	}
	return p
}

func (p *peer) record(method string, args ...any) {
	p.mu.Lock()
	p.calls = append(p.calls, call{method, args})
	block := p.block
	p.mu.Unlock()
	if block != nil {
		<-block
	}
}

// Calls returns the calls so far.
func (p *peer) Calls() []call {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]call(nil), p.calls...)
}

func (p *peer) reset() {
	p.mu.Lock()
	p.calls = nil
	p.mu.Unlock()
}

// count returns how many calls of method the peer got.
func (p *peer) count(method string) int {
	n := 0
	for _, c := range p.Calls() {
		if c.Method == method {
			n++
		}
	}
	return n
}

type screenSaver struct{ p *peer }

func (s screenSaver) Lock() *godbus.Error {
	s.p.record("Lock")
	return nil
}

// GetActive answers the peer's active flag. It is counted apart from the
// calls, which the tests count per method.
func (s screenSaver) GetActive() (bool, *godbus.Error) {
	s.p.mu.Lock()
	s.p.actives++
	active, block := s.p.active, s.p.block
	s.p.mu.Unlock()
	if block != nil {
		<-block
	}
	return active, nil
}

// setActive sets what GetActive answers.
func (p *peer) setActive(active bool) {
	p.mu.Lock()
	p.active = active
	p.mu.Unlock()
}

// activeCalls returns how many GetActive calls the peer got.
func (p *peer) activeCalls() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.actives
}

type session struct{ p *peer }

func (s session) Logout(mode uint32) *godbus.Error {
	s.p.record("Logout", mode)
	return nil
}

type notifier struct{ p *peer }

// notification is the arguments of one Notify call.
type notification struct {
	App      string
	Replaces uint32
	Icon     string
	Summary  string
	Body     string
	Actions  []string
	Hints    map[string]godbus.Variant
	Timeout  int32
	ID       uint32 // what the call returned
}

func (n notifier) Notify(app string, replaces uint32, icon, summary, body string, actions []string, hints map[string]godbus.Variant, timeout int32) (uint32, *godbus.Error) {
	n.p.mu.Lock()
	n.p.nextID++
	id := n.p.nextID
	n.p.mu.Unlock()
	n.p.record("Notify", notification{app, replaces, icon, summary, body, actions, hints, timeout, id})
	return id, nil
}

// notifications returns the Notify calls so far.
func (p *peer) notifications() []notification {
	var out []notification
	for _, c := range p.Calls() {
		if c.Method == "Notify" {
			out = append(out, c.Args[0].(notification))
		}
	}
	return out
}

// reportLog records what the policy reported.
type reportLog struct {
	mu   sync.Mutex
	list []string
}

func (r *reportLog) add(problem string) {
	r.mu.Lock()
	r.list = append(r.list, problem)
	r.mu.Unlock()
}

func (r *reportLog) get() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.list...)
}

// logBuffer is a slog handler's output, safe for concurrent use.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func (b *logBuffer) count(s string) int { return strings.Count(b.String(), s) }

// testPolicy makes a policy on conn (not started: tests call startup and
// handle directly, or start) that records its reports and logs.
func testPolicy(t *testing.T, conn *godbus.Conn, cfg Config) (*Policy, *reportLog, *logBuffer) {
	t.Helper()
	reports := &reportLog{}
	logs := &logBuffer{}
	cfg.Report = reports.add
	cfg.Logger = slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	p := newPolicy(conn, cfg)
	p.timeout = 2 * time.Second
	t.Cleanup(p.Close)
	return p, reports, logs
}

// fakeSource is a monitor subscription fed by the test.
type fakeSource struct {
	ch     chan monitor.Event
	closed chan struct{}
	once   sync.Once
}

func newFakeSource() *fakeSource {
	return &fakeSource{ch: make(chan monitor.Event, 16), closed: make(chan struct{})}
}

func (f *fakeSource) Next(ctx context.Context) (monitor.Event, error) {
	select {
	case ev := <-f.ch:
		return ev, nil
	case <-f.closed:
		return monitor.Event{}, monitor.ErrClosed
	case <-ctx.Done():
		return monitor.Event{}, ctx.Err()
	}
}

func (f *fakeSource) Close() { f.once.Do(func() { close(f.closed) }) }

// Tokens and events.

func token(gen uint64, label, serial, reader string) *monitor.Token {
	return &monitor.Token{
		Generation: gen,
		Slot:       monitor.SlotKey{Module: "opensc", ID: uint(gen)},
		Label:      label,
		Serial:     serial,
		Reader:     reader,
		Inserted:   time.Now(),
	}
}

// snapshotWith is a snapshot holding toks, one per slot.
func snapshotWith(toks ...*monitor.Token) *monitor.Snapshot {
	s := &monitor.Snapshot{State: monitor.StateRunning}
	for _, t := range toks {
		s.Slots = append(s.Slots, monitor.Slot{Key: t.Slot, Reader: t.Reader, Token: t})
		s.LastGeneration = max(s.LastGeneration, t.Generation)
	}
	return s
}

func removed(t *monitor.Token) monitor.Event {
	return monitor.Event{Kind: monitor.TokenRemoved, Token: t, Snapshot: snapshotWith()}
}

func inserted(t *monitor.Token) monitor.Event {
	return monitor.Event{Kind: monitor.TokenInserted, Token: t, Snapshot: snapshotWith(t)}
}

func changed(t *monitor.Token) monitor.Event {
	return monitor.Event{Kind: monitor.TokenChanged, Token: t, Snapshot: snapshotWith(t)}
}

// waitFor polls cond until it holds or 5 s passed.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
