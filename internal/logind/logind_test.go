package logind

import (
	"bytes"
	"log/slog"
	"net"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	godbus "github.com/godbus/dbus/v5"

	"github.com/slotwatch/slotwatch/tests/stack"
)

// A private bus stands in for the system bus (any client may own any name
// on it, as root may on the real one).
func startBus(t *testing.T) string {
	t.Helper()
	return stack.StartDBusForTest(t, "").Address
}

func connect(t *testing.T, addr string) *godbus.Conn {
	t.Helper()
	return stack.ConnectForTest(t, addr)
}

// startLogind is a stand-in logind: a connection owning BusName.
func startLogind(t *testing.T, addr string) *godbus.Conn {
	t.Helper()
	conn := connect(t, addr)
	if r, err := conn.RequestName(BusName, godbus.NameFlagDoNotQueue); err != nil || r != godbus.RequestNameReplyPrimaryOwner {
		t.Fatalf("the stand-in logind could not own %s: %v %v", BusName, r, err)
	}
	return conn
}

// emit sends PrepareForSleep(start) from conn as logind does (broadcast),
// or to dest alone.
func emit(t *testing.T, conn *godbus.Conn, dest string, start bool) {
	t.Helper()
	msg := &godbus.Message{
		Type: godbus.TypeSignal,
		Headers: map[godbus.HeaderField]godbus.Variant{
			godbus.FieldPath:      godbus.MakeVariant(ObjectPath),
			godbus.FieldInterface: godbus.MakeVariant(ManagerInterface),
			godbus.FieldMember:    godbus.MakeVariant(SignalMember),
			godbus.FieldSignature: godbus.MakeVariant(godbus.SignatureOf(start)),
		},
		Body: []any{start},
	}
	if dest != "" {
		msg.Headers[godbus.FieldDestination] = godbus.MakeVariant(dest)
	}
	if call := conn.Send(msg, nil); call.Err != nil {
		t.Fatalf("emit PrepareForSleep(%v): %v", start, call.Err)
	}
}

// barrier returns once the bus has routed everything conn sent before:
// dbus-daemon handles one connection's messages in order, so the answer
// to a call comes after the earlier signals were queued for their
// receivers.
func barrier(t *testing.T, conn *godbus.Conn) {
	t.Helper()
	var id string
	if err := conn.BusObject().Call("org.freedesktop.DBus.GetId", 0).Store(&id); err != nil {
		t.Fatalf("GetId: %v", err)
	}
}

// recorder records the callbacks.
type recorder struct {
	mu  sync.Mutex
	got []string
}

func (r *recorder) add(s string) {
	r.mu.Lock()
	r.got = append(r.got, s)
	r.mu.Unlock()
}

func (r *recorder) list() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.got)
}

// wait waits until exactly want was recorded (5 s at most).
func (r *recorder) wait(t *testing.T, want ...string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		got := r.list()
		if slices.Equal(got, want) {
			return
		}
		if len(got) >= len(want) || time.Now().After(deadline) {
			t.Fatalf("callbacks %q, want %q", got, want)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

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

// startWatcher starts a Watcher on addr recording its callbacks and log.
func startWatcher(t *testing.T, addr string) (*Watcher, *recorder, *logBuffer) {
	t.Helper()
	rec := &recorder{}
	logs := &logBuffer{}
	w := Start(Config{
		Address:  addr,
		OnSleep:  func() { rec.add("sleep") },
		OnResume: func() { rec.add("resume") },
		Logger:   slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	})
	t.Cleanup(w.Close)
	return w, rec, logs
}

// uniqueName is the watcher's unique name on its bus.
func (w *Watcher) uniqueName() string { return w.conn.Names()[0] }

func TestSleepAndResume(t *testing.T) {
	addr := startBus(t)
	logind := startLogind(t, addr)
	w, rec, logs := startWatcher(t, addr)
	if !w.Following() {
		t.Fatalf("not following:\n%s", logs)
	}
	if !strings.Contains(logs.String(), "following suspend and resume") {
		t.Errorf("the start is not logged:\n%s", logs)
	}
	emit(t, logind, "", true)
	emit(t, logind, "", false)
	rec.wait(t, "sleep", "resume")
	// Sent to us alone by the owner: as good as a broadcast.
	emit(t, logind, w.uniqueName(), true)
	rec.wait(t, "sleep", "resume", "sleep")
}

// TestForged: signals that are not logind's change nothing. An attacker
// on the system bus broadcasts PrepareForSleep with logind's path and
// interface, sends it straight to the watcher's unique name (no match rule
// stands in the way of a unicast signal), and sends it a NameOwnerChanged
// claiming that it now owns org.freedesktop.login1, then the signal again.
// None of them may reach a callback; logind's own signal after them does.
func TestForged(t *testing.T) {
	addr := startBus(t)
	logind := startLogind(t, addr)
	attacker := connect(t, addr)
	w, rec, logs := startWatcher(t, addr)
	me := w.uniqueName()

	emit(t, attacker, "", false)
	emit(t, attacker, me, false)
	emit(t, attacker, me, true)
	noc := &godbus.Message{
		Type: godbus.TypeSignal,
		Headers: map[godbus.HeaderField]godbus.Variant{
			godbus.FieldPath:        godbus.MakeVariant(busDriverPath),
			godbus.FieldInterface:   godbus.MakeVariant(busDriver),
			godbus.FieldMember:      godbus.MakeVariant("NameOwnerChanged"),
			godbus.FieldDestination: godbus.MakeVariant(me),
			godbus.FieldSignature:   godbus.MakeVariant(godbus.SignatureOf("", "", "")),
		},
		Body: []any{BusName, logind.Names()[0], attacker.Names()[0]},
	}
	if call := attacker.Send(noc, nil); call.Err != nil {
		t.Fatal(call.Err)
	}
	emit(t, attacker, me, false)
	// A signal on another path from the real owner is not PrepareForSleep.
	other := &godbus.Message{
		Type: godbus.TypeSignal,
		Headers: map[godbus.HeaderField]godbus.Variant{
			godbus.FieldPath:        godbus.MakeVariant(godbus.ObjectPath("/org/freedesktop/login1/elsewhere")),
			godbus.FieldInterface:   godbus.MakeVariant(ManagerInterface),
			godbus.FieldMember:      godbus.MakeVariant(SignalMember),
			godbus.FieldDestination: godbus.MakeVariant(me),
			godbus.FieldSignature:   godbus.MakeVariant(godbus.SignatureOf(false)),
		},
		Body: []any{false},
	}
	if call := logind.Send(other, nil); call.Err != nil {
		t.Fatal(call.Err)
	}
	barrier(t, attacker)
	barrier(t, logind)

	// logind's own signal comes after all of them: once its callback ran,
	// every forged one was handled (or never delivered).
	emit(t, logind, "", true)
	rec.wait(t, "sleep")
	emit(t, logind, "", false)
	rec.wait(t, "sleep", "resume")
	if n := strings.Count(logs.String(), "level=WARN msg=\"ignored a signal"); n != 1 {
		t.Errorf("%d warnings about forged signals, want 1 (the rest at debug level):\n%s", n, logs)
	}
	if !strings.Contains(logs.String(), "NameOwnerChanged not from the bus driver") {
		t.Errorf("the forged NameOwnerChanged is not logged:\n%s", logs)
	}
}

// TestOwnerChange: after logind's name passes to another connection, the
// old owner's signals are dropped and the new owner's count.
func TestOwnerChange(t *testing.T) {
	addr := startBus(t)
	first := startLogind(t, addr)
	w, rec, logs := startWatcher(t, addr)
	emit(t, first, "", true)
	rec.wait(t, "sleep")

	if r, err := first.ReleaseName(BusName); err != nil || r != godbus.ReleaseNameReplyReleased {
		t.Fatalf("ReleaseName: %v %v", r, err)
	}
	// No longer logind: the bus does not pass its broadcast on, and the
	// watcher drops the copy sent to it alone.
	emit(t, first, "", false)
	emit(t, first, w.uniqueName(), false)
	second := startLogind(t, addr)
	emit(t, first, "", false)
	emit(t, first, w.uniqueName(), false)
	barrier(t, first)
	emit(t, second, "", true)
	rec.wait(t, "sleep", "sleep")
	emit(t, second, "", false)
	rec.wait(t, "sleep", "sleep", "resume")
	for _, want := range []string{"logind left the system bus", "logind is on the system bus"} {
		if !strings.Contains(logs.String(), want) {
			t.Errorf("the log does not say %q:\n%s", want, logs)
		}
	}
}

// TestLogindAbsent: with a system bus but no logind, the watcher says so
// once and follows logind when it appears.
func TestLogindAbsent(t *testing.T) {
	addr := startBus(t)
	w, rec, logs := startWatcher(t, addr)
	if !w.Following() {
		t.Fatalf("not following a bus without logind:\n%s", logs)
	}
	if n := strings.Count(logs.String(), "level=INFO msg=\"logind is not on the system bus"); n != 1 {
		t.Errorf("%d Info lines about the missing logind, want 1:\n%s", n, logs)
	}
	stranger := connect(t, addr)
	emit(t, stranger, "", true)
	emit(t, stranger, w.uniqueName(), true)
	barrier(t, stranger)
	logind := startLogind(t, addr)
	emit(t, logind, "", false)
	rec.wait(t, "resume")
}

// TestNoSystemBus: no bus at the address is one Info line, no callbacks
// and no goroutine; Close works (twice).
func TestNoSystemBus(t *testing.T) {
	before := runtime.NumGoroutine()
	for _, addr := range []string{
		"unix:path=" + filepath.Join(t.TempDir(), "no-such-socket"),
		"", // DBUS_SYSTEM_BUS_ADDRESS, below
	} {
		if addr == "" {
			t.Setenv("DBUS_SYSTEM_BUS_ADDRESS", "unix:path="+filepath.Join(t.TempDir(), "none"))
		}
		logs := &logBuffer{}
		start := time.Now()
		w := Start(Config{Address: addr, Logger: slog.New(slog.NewTextHandler(logs, nil))})
		if d := time.Since(start); d > time.Second {
			t.Errorf("Start without a bus took %v", d)
		}
		if w.Following() {
			t.Error("following without a bus")
		}
		out := logs.String()
		if strings.Count(out, "\n") != 1 || !strings.Contains(out, "level=INFO msg=\"no system bus; not following suspend and resume\"") {
			t.Errorf("log %q, want one Info line", out)
		}
		w.Close()
		w.Close()
	}
	waitGoroutines(t, before)
}

// TestHungBus: a socket that accepts and never answers holds Start up for
// Config.Timeout at most.
func TestHungBus(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "hung")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	var accepted []net.Conn
	var mu sync.Mutex
	acceptDone := make(chan struct{})
	go func() {
		defer close(acceptDone)
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			accepted = append(accepted, c)
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		l.Close()
		<-acceptDone
		mu.Lock()
		for _, c := range accepted {
			c.Close()
		}
		mu.Unlock()
	})
	logs := &logBuffer{}
	start := time.Now()
	w := Start(Config{Address: "unix:path=" + sock, Timeout: 200 * time.Millisecond, Logger: slog.New(slog.NewTextHandler(logs, nil))})
	defer w.Close()
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("Start on a hung bus took %v, want about the 200 ms timeout", d)
	}
	if w.Following() {
		t.Error("following a bus that never answered")
	}
	if !strings.Contains(logs.String(), "did not let us in within 200ms") {
		t.Errorf("log does not say why:\n%s", logs)
	}
}

// TestClose: idempotent, no callback after it, no goroutine left; the bus
// going away ends the watcher by itself with a warning.
func TestClose(t *testing.T) {
	t.Run("Close", func(t *testing.T) {
		addr := startBus(t)
		logind := startLogind(t, addr)
		before := runtime.NumGoroutine()
		w, rec, logs := startWatcher(t, addr)
		emit(t, logind, "", true)
		rec.wait(t, "sleep")
		w.Close()
		w.Close()
		if w.Following() {
			t.Error("following after Close")
		}
		emit(t, logind, "", false)
		barrier(t, logind)
		if got := rec.list(); !slices.Equal(got, []string{"sleep"}) {
			t.Errorf("callbacks after Close: %q", got)
		}
		waitGoroutines(t, before)
		if strings.Contains(logs.String(), "lost the system bus") {
			t.Errorf("Close logged a lost bus:\n%s", logs)
		}
	})

	t.Run("bus gone", func(t *testing.T) {
		bus := stack.StartDBusForTest(t, "")
		w, _, logs := startWatcher(t, bus.Address)
		if err := bus.Stop(); err != nil {
			t.Fatal(err)
		}
		select {
		case <-w.done:
		case <-time.After(5 * time.Second):
			t.Fatal("the watcher did not end with its bus")
		}
		if !strings.Contains(logs.String(), "lost the system bus") {
			t.Errorf("no warning about the lost bus:\n%s", logs)
		}
	})
}

// TestBadArguments: a PrepareForSleep from logind with other arguments is
// dropped with a warning.
func TestBadArguments(t *testing.T) {
	addr := startBus(t)
	logind := startLogind(t, addr)
	_, rec, logs := startWatcher(t, addr)
	if err := logind.Emit(ObjectPath, ManagerInterface+"."+SignalMember, "yes"); err != nil {
		t.Fatal(err)
	}
	if err := logind.Emit(ObjectPath, ManagerInterface+"."+SignalMember); err != nil {
		t.Fatal(err)
	}
	emit(t, logind, "", true)
	rec.wait(t, "sleep")
	if n := strings.Count(logs.String(), "unexpected arguments"); n != 2 {
		t.Errorf("%d warnings about bad arguments, want 2:\n%s", n, logs)
	}
}

// waitGoroutines waits until no more goroutines run than before (godbus's
// reader ends shortly after its connection is closed).
func waitGoroutines(t *testing.T, before int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > before {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			t.Fatalf("%d goroutines, %d before:\n%s", runtime.NumGoroutine(), before, buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(10 * time.Millisecond)
	}
}
