package stack

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ebfe/scard"
	"github.com/godbus/dbus/v5"

	"github.com/slotwatch/slotwatch/tests/vcard"
)

// TestMain points libpcsclite (in this process and in every pkcs11-tool
// child) at one fixed socket path, used by every pcscd these tests start,
// and OpenSC at a private configuration. Tests therefore never run in
// parallel: one pcscd at a time.
func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "slotwatch-stack-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	conf, err := WriteOpenSCConf(dir)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Setenv(SocketEnv, filepath.Join(dir, "pcscd.comm"))
	os.Setenv(OpenSCConfEnv, conf)
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func startPCSCD(t *testing.T, entries int) *PCSCD {
	t.Helper()
	return StartPCSCDForTest(t, PCSCDConfig{Socket: os.Getenv(SocketEnv), Entries: entries})
}

func newCard(t *testing.T, p *PCSCD, reader int, prof vcard.Profile) *vcard.Card {
	t.Helper()
	c := vcard.New(p.Addr(reader), prof)
	t.Cleanup(func() { c.Close() })
	return c
}

// pkcs11List runs `pkcs11-tool -L` on OpenSC's module, as a separate
// process with this process's environment, and returns its output.
func pkcs11List(t *testing.T) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "pkcs11-tool", "--module", OpenSCModule, "-L").CombinedOutput()
	if ctx.Err() != nil {
		t.Fatalf("pkcs11-tool -L: %v\n%s", ctx.Err(), out)
	}
	_ = err // exits non-zero when there is no slot at all; the output says why
	return string(out)
}

// waitPKCS11 runs pkcs11-tool -L until its output satisfies ok, for up to
// timeout: pcscd notices an insertion or removal only at its next poll
// (every 400 ms). It returns the output and how long the last run took.
func waitPKCS11(t *testing.T, p *PCSCD, what string, ok func(string) bool, timeout time.Duration) (string, time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		start := time.Now()
		out := pkcs11List(t)
		took := time.Since(start)
		if ok(out) {
			return out, took
		}
		if time.Now().After(deadline) {
			t.Fatalf("pkcs11-tool -L: no %s within %v; last output:\n%s\n--- pcscd log ---\n%s", what, timeout, out, p.Log())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func hasToken(label, serial string) func(string) bool {
	l := regexp.MustCompile(`(?m)^\s*token label\s*:\s*` + regexp.QuoteMeta(label) + `\s*$`)
	s := regexp.MustCompile(`(?m)^\s*serial num\s*:\s*` + regexp.QuoteMeta(serial) + `\s*$`)
	return func(out string) bool { return l.MatchString(out) && (serial == "" || s.MatchString(out)) }
}

func noToken(out string) bool {
	return strings.Contains(out, "Virtual PCD") && !strings.Contains(out, "token label")
}

// TestOpenSCSeesCard: insert, remove and swap a vcard and watch OpenSC's
// PKCS#11 module (through pkcs11-tool) follow.
func TestOpenSCSeesCard(t *testing.T) {
	p := startPCSCD(t, 1)
	card := newCard(t, p, 0, vcard.Profile{Label: "Test Token", Serial: "1234", Manufacturer: "slotwatch"})

	if out, _ := waitPKCS11(t, p, "empty slots", noToken, 5*time.Second); !strings.Contains(out, p.Readers()[0]) {
		t.Fatalf("reader %q not listed:\n%s", p.Readers()[0], out)
	}

	if err := card.Insert(); err != nil {
		t.Fatal(err)
	}
	out, took := waitPKCS11(t, p, "token Test Token/1234", hasToken("Test Token", "1234"), 5*time.Second)
	t.Logf("pkcs11-tool -L with the token: %v\n%s", took, out)

	if err := card.Remove(); err != nil {
		t.Fatal(err)
	}
	waitPKCS11(t, p, "empty slot after removal", noToken, 5*time.Second)

	if err := card.Insert(); err != nil {
		t.Fatal(err)
	}
	waitPKCS11(t, p, "token after reinsertion", hasToken("Test Token", "1234"), 5*time.Second)
	start := time.Now()
	if err := card.Swap(vcard.Profile{Label: "Other Token", Serial: "00ab"}); err != nil {
		t.Fatal(err)
	}
	t.Logf("Swap took %v", time.Since(start))
	waitPKCS11(t, p, "token Other Token/00ab", hasToken("Other Token", "00ab"), 5*time.Second)
}

// TestObserver: the observer sees insertions and removals with a growing
// event counter, on the right reader only.
func TestObserver(t *testing.T) {
	p := startPCSCD(t, 1)
	o := NewObserverForTest(t, p)
	r0, r1 := p.Readers()[0], p.Readers()[1]
	card := newCard(t, p, 0, vcard.Profile{Label: "Observed", Serial: "01"})

	initial := o.Current(r0)
	if initial.Reader != r0 || initial.Present {
		t.Fatalf("initial state of %q: %v", r0, initial)
	}
	last := initial.EventCount
	for i := range 3 {
		start := time.Now()
		if err := card.Insert(); err != nil {
			t.Fatal(err)
		}
		in, err := o.WaitFor(r0, func(c ObservedChange) bool { return c.Present }, 5*time.Second)
		if err != nil {
			t.Fatalf("%v\n%v", err, o.Changes())
		}
		t.Logf("cycle %d: insertion seen after %v (count %d)", i, in.Time.Sub(start), in.EventCount)
		if in.EventCount <= last {
			t.Fatalf("insertion: event count %d, was %d", in.EventCount, last)
		}
		start = time.Now()
		if err := card.Remove(); err != nil {
			t.Fatal(err)
		}
		out, err := o.WaitFor(r0, func(c ObservedChange) bool { return !c.Present }, 5*time.Second)
		if err != nil {
			t.Fatalf("%v\n%v", err, o.Changes())
		}
		t.Logf("cycle %d: removal seen after %v (count %d)", i, out.Time.Sub(start), out.EventCount)
		if out.EventCount <= in.EventCount {
			t.Fatalf("removal: event count %d, was %d", out.EventCount, in.EventCount)
		}
		last = out.EventCount
	}
	for _, c := range o.Changes() {
		if c.Reader == r1 && c.Present {
			t.Fatalf("reader %q saw a card: %v", r1, c)
		}
	}

	// Swap right after pcscd saw the insertion, within its power-off
	// grace period: measured, not asserted (see vcard.Card.Swap).
	if err := card.Insert(); err != nil {
		t.Fatal(err)
	}
	in, err := o.WaitFor(r0, func(c ObservedChange) bool { return c.Present && c.EventCount > last }, 5*time.Second)
	if err != nil {
		t.Fatalf("%v\n%v", err, o.Changes())
	}
	if err := card.Swap(vcard.Profile{Label: "Swapped", Serial: "02"}); err != nil {
		t.Fatal(err)
	}
	_, err = o.WaitFor(r0, func(c ObservedChange) bool { return c.EventCount > in.EventCount }, time.Second)
	t.Logf("swap right after the insertion: seen by pcscd: %v", err == nil)

	// Once pcscd has powered the idle card off (0.4 s after the
	// insertion), a swap is a removal and an insertion: the counter
	// moves by 2.
	time.Sleep(time.Second)
	before := o.Current(r0)
	start := time.Now()
	if err := card.Swap(vcard.Profile{Label: "Swapped again", Serial: "03"}); err != nil {
		t.Fatal(err)
	}
	sw, err := o.WaitFor(r0, func(c ObservedChange) bool { return c.Present && c.EventCount >= before.EventCount+2 }, 5*time.Second)
	if err != nil {
		t.Fatalf("swap of an idle card: %v\n%v", err, o.Changes())
	}
	t.Logf("swap of an idle card: seen as removal + insertion after %v (count %d -> %d)", sw.Time.Sub(start), before.EventCount, sw.EventCount)

	if err := o.Close(); err != nil {
		t.Fatal(err)
	}
	if err := o.Close(); err != nil { // idempotent
		t.Fatal(err)
	}
}

// TestKillRestart: after SIGKILL and Restart, pcscd serves the same
// readers on the same ports; a re-inserted card is a token again.
func TestKillRestart(t *testing.T) {
	p := startPCSCD(t, 1)
	card := newCard(t, p, 0, vcard.Profile{Label: "Survivor", Serial: "5a"})
	if err := card.Insert(); err != nil {
		t.Fatal(err)
	}
	waitPKCS11(t, p, "token Survivor", hasToken("Survivor", "5a"), 5*time.Second)

	pid, port := p.PID(), p.Port(0)
	if err := p.Kill(); err != nil {
		t.Fatal(err)
	}
	if p.PID() != 0 {
		t.Fatalf("PID %d after Kill", p.PID())
	}
	if err := p.Kill(); err == nil {
		t.Fatal("Kill of a dead pcscd succeeded")
	}
	if _, err := scard.EstablishContext(); !errors.Is(err, scard.ErrNoService) {
		t.Fatalf("SCardEstablishContext with pcscd killed: %v, want SCARD_E_NO_SERVICE", err)
	}
	if out := pkcs11List(t); strings.Contains(out, "Survivor") {
		t.Fatalf("token listed with pcscd killed:\n%s", out)
	}

	start := time.Now()
	if err := p.Restart(); err != nil {
		t.Fatal(err)
	}
	t.Logf("Restart took %v", time.Since(start))
	if p.PID() == 0 || p.PID() == pid || p.Port(0) != port {
		t.Fatalf("after Restart: pid %d (was %d), port %d (was %d)", p.PID(), pid, p.Port(0), port)
	}
	// The killed pcscd closed the card's connection.
	if err := card.Remove(); err != nil && !errors.Is(err, vcard.ErrNotInserted) {
		t.Fatal(err)
	}
	if err := card.Insert(); err != nil {
		t.Fatal(err)
	}
	waitPKCS11(t, p, "token Survivor after restart", hasToken("Survivor", "5a"), 5*time.Second)
}

// TestTwoEntries: a second vpcd entry gives two more readers with names
// of their own, and a card in reader 2 shows up there.
func TestTwoEntries(t *testing.T) {
	p := startPCSCD(t, 2)
	want := []string{"Virtual PCD 00 00", "Virtual PCD 00 01", "Virtual PCD 1 00 00", "Virtual PCD 1 00 01"}
	if !slices.Equal(p.Readers(), want) {
		t.Fatalf("Readers() = %q, want %q", p.Readers(), want)
	}
	ctx, err := scard.EstablishContext()
	if err != nil {
		t.Fatal(err)
	}
	defer ctx.Release()
	got, err := ctx.ListReaders()
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(got, want) {
		t.Fatalf("pcscd lists %q, want %q\n%s", got, want, p.Log())
	}
	for i := range want {
		if p.Port(i) != p.Port(0)+i {
			t.Fatalf("Port(%d) = %d, Port(0) = %d", i, p.Port(i), p.Port(0))
		}
	}

	o := NewObserverForTest(t, p)
	card := newCard(t, p, 2, vcard.Profile{Label: "Second Entry", Serial: "22"})
	if err := card.Insert(); err != nil {
		t.Fatal(err)
	}
	if _, err := o.WaitFor(want[2], func(c ObservedChange) bool { return c.Present }, 5*time.Second); err != nil {
		t.Fatalf("%v\n%v", err, o.Changes())
	}
	out, _ := waitPKCS11(t, p, "token Second Entry", hasToken("Second Entry", "22"), 5*time.Second)
	if !regexp.MustCompile(`Virtual PCD 1 00 00\s+token label\s*:\s*Second Entry`).MatchString(out) {
		t.Fatalf("token not in reader %q:\n%s", want[2], out)
	}
	for _, c := range o.Changes() {
		if c.Reader != want[2] && c.Present {
			t.Fatalf("another reader saw the card: %v", c)
		}
	}
}

// TestDBus: the private bus answers org.freedesktop.DBus.ListNames.
func TestDBus(t *testing.T) {
	d := StartDBusForTest(t, "")
	if !strings.HasPrefix(d.Address, "unix:path=") || d.PID() == 0 {
		t.Fatalf("address %q pid %d", d.Address, d.PID())
	}
	conn, err := dbus.Connect(d.Address)
	if err != nil {
		t.Fatalf("connect %s: %v\n%s", d.Address, err, d.Log())
	}
	defer conn.Close()
	var names []string
	if err := conn.BusObject().Call("org.freedesktop.DBus.ListNames", 0).Store(&names); err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(names, "org.freedesktop.DBus") || !slices.Contains(names, conn.Names()[0]) {
		t.Fatalf("ListNames = %q", names)
	}
	// No service directory: nothing is activatable.
	var act []string
	if err := conn.BusObject().Call("org.freedesktop.DBus.ListActivatableNames", 0).Store(&act); err != nil {
		t.Fatal(err)
	}
	if slices.ContainsFunc(act, func(n string) bool { return n != "org.freedesktop.DBus" }) {
		t.Fatalf("activatable names on a bus without service dirs: %q", act)
	}
	conn.Close()
	if err := d.Stop(); err != nil {
		t.Fatal(err)
	}
	if d.PID() != 0 {
		t.Fatal("PID after Stop")
	}
	if err := d.Stop(); err != nil {
		t.Fatalf("second Stop: %v", err)
	}
}
