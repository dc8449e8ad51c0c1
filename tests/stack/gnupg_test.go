package stack

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/ebfe/scard"

	"github.com/slotwatch/slotwatch/tests/vcard"
)

// insertForGnuPG inserts a card with profile prof into reader 0 and waits
// until o sees pcscd report it present: scdaemon looks once per command
// and fails if pcscd has not noticed the card yet.
func insertForGnuPG(t *testing.T, p *PCSCD, o *Observer, prof vcard.Profile) *vcard.Card {
	t.Helper()
	card := newCard(t, p, 0, prof)
	if err := card.Insert(); err != nil {
		t.Fatal(err)
	}
	if _, err := o.WaitFor(p.Readers()[0], func(c ObservedChange) bool { return c.Present }, 5*time.Second); err != nil {
		t.Fatalf("%v\n%v", err, o.Changes())
	}
	return card
}

// cardStatus runs gpg --card-status with a bound on its time.
func cardStatus(t *testing.T, g *GnuPG) (stdout, stderr string, took time.Duration, err error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	start := time.Now()
	stdout, stderr, err = g.CardStatus(ctx)
	if ctx.Err() != nil {
		t.Fatalf("gpg --card-status: %v\n%s%s\n--- scdaemon log ---\n%s", ctx.Err(), stdout, stderr, g.ScdaemonLog())
	}
	return stdout, stderr, time.Since(start), err
}

// wantCardOf checks that out is gpg's description of the card with
// profile prof.
func wantCardOf(t *testing.T, g *GnuPG, out string, prof vcard.Profile) {
	t.Helper()
	aid := vcard.OpenPGPAID(prof)
	for _, re := range []string{
		`(?m)^Reader \.+: ` + regexp.QuoteMeta(g.Reader()),
		fmt.Sprintf(`(?m)^Application ID \.+: %X$`, aid),
		`(?m)^Version \.+: 3\.4$`,
		fmt.Sprintf(`(?m)^Serial number \.+: %X$`, aid[10:14]),
		`(?m)^Name of cardholder: ` + regexp.QuoteMeta(prof.Label) + `$`,
		`(?m)^Signature key \.+: \[none\]$`,
	} {
		if !regexp.MustCompile(re).MatchString(out) {
			t.Errorf("gpg --card-status output does not match %s:\n%s", re, out)
		}
	}
}

// grepLines returns the lines of text that contain any of words.
func grepLines(text string, words ...string) string {
	var b strings.Builder
	for _, line := range strings.Split(text, "\n") {
		for _, w := range words {
			if strings.Contains(line, w) {
				b.WriteString(line + "\n")
				break
			}
		}
	}
	return b.String()
}

// TestGnuPGCardStatus: an unmodified scdaemon reads the vcard's OpenPGP
// application through the private pcscd, and sees another card after a
// removal (scdaemon lets go of a removed card by itself).
func TestGnuPGCardStatus(t *testing.T) {
	p := startPCSCD(t, 1)
	o := NewObserverForTest(t, p)
	prof := vcard.Profile{Label: "GnuPG Token", Serial: "c0ffee01", Manufacturer: "slotwatch"}
	card := insertForGnuPG(t, p, o, prof)
	g := StartGnuPGForTest(t, p)

	out, errOut, took, err := cardStatus(t, g)
	if err != nil {
		t.Fatalf("gpg --card-status: %v\n%s%s\n--- scdaemon log ---\n%s", err, out, errOut, g.ScdaemonLog())
	}
	t.Logf("gpg --card-status (agent running, scdaemon started on demand): %v\n%s", took, out)
	wantCardOf(t, g, out, prof)
	log := g.ScdaemonLog()
	if !strings.Contains(log, "detected reader '"+g.Reader()+"'") {
		t.Errorf("scdaemon log does not show the reader:\n%s", log)
	}
	scd := g.ScdaemonPIDs()
	if len(scd) != 1 {
		t.Fatalf("scdaemon children of gpg-agent: %v", scd)
	}

	// The second run talks to the same scdaemon.
	out, _, took, err = cardStatus(t, g)
	if err != nil {
		t.Fatalf("second gpg --card-status: %v", err)
	}
	t.Logf("second gpg --card-status: %v", took)
	wantCardOf(t, g, out, prof)

	// Another card, as a person would swap it.
	if err := card.Remove(); err != nil {
		t.Fatal(err)
	}
	if _, err := o.WaitFor(p.Readers()[0], func(c ObservedChange) bool { return !c.Present }, 5*time.Second); err != nil {
		t.Fatalf("%v\n%v", err, o.Changes())
	}
	other := vcard.Profile{Label: "Other GnuPG Token", Serial: "0badcafe"}
	insertForGnuPG(t, p, o, other)
	out, errOut, took, err = cardStatus(t, g)
	t.Logf("gpg --card-status after the swap: %v", took)
	if err != nil {
		t.Fatalf("gpg --card-status after the swap: %v\n%s%s\n--- gpg-agent log ---\n%s\n--- scdaemon log ---\n%s", err, out, errOut, g.AgentLog(), g.ScdaemonLog())
	}
	wantCardOf(t, g, out, other)

	// Stop ends gpg-agent and, with it, its scdaemon.
	kids, err := childProcs(g.AgentPID())
	if err != nil || len(kids) != 1 || kids[0].comm != "scdaemon" {
		t.Fatalf("children of gpg-agent: %v, %v", kids, err)
	}
	start := time.Now()
	if err := g.Stop(); err != nil {
		t.Fatal(err)
	}
	t.Logf("Stop: %v", time.Since(start))
	if kids[0].alive() || g.AgentPID() != 0 {
		t.Fatalf("after Stop: scdaemon %d alive %v, agent pid %d", kids[0].pid, kids[0].alive(), g.AgentPID())
	}
}

// TestGnuPGSharingViolation documents the failure mode slotwatch must
// avoid: scdaemon connects exclusively, so while any other process holds
// a connection to the card, even a shared one (which is what OpenSC
// holds), gpg --card-status fails with a sharing violation; once the
// connection is released it works. And while scdaemon holds the card,
// nobody else can connect, not even shared.
func TestGnuPGSharingViolation(t *testing.T) {
	p := startPCSCD(t, 1)
	prof := vcard.Profile{Label: "Shared Token", Serial: "5a5a"}
	insertForGnuPG(t, p, NewObserverForTest(t, p), prof)
	g := StartGnuPGForTest(t, p)
	reader := g.Reader()

	sctx, err := scard.EstablishContext()
	if err != nil {
		t.Fatal(err)
	}
	defer sctx.Release()
	held, err := sctx.Connect(reader, scard.ShareShared, scard.ProtocolAny)
	if err != nil {
		t.Fatalf("SCardConnect(SHARED): %v\n%s", err, p.Log())
	}
	released := false
	defer func() {
		if !released {
			held.Disconnect(scard.LeaveCard)
		}
	}()

	out, errOut, took, err := cardStatus(t, g)
	if err == nil {
		t.Fatalf("gpg --card-status succeeded while a shared connection was held:\n%s", out)
	}
	log := g.ScdaemonLog()
	if !strings.Contains(log, "pcsc_connect failed: sharing violation (0x8010000b)") {
		t.Fatalf("scdaemon log does not report the sharing violation:\n%s", log)
	}
	t.Logf("gpg --card-status with a shared connection held: %v, %v\n%s%s--- scdaemon log, excerpt ---\n%s",
		took, err, out, errOut, grepLines(log, "pcsc_", "reader", "card"))

	if err := held.Disconnect(scard.LeaveCard); err != nil {
		t.Fatal(err)
	}
	released = true
	out, errOut, took, err = cardStatus(t, g)
	if err != nil {
		t.Fatalf("gpg --card-status after the release: %v\n%s%s\n--- scdaemon log ---\n%s", err, out, errOut, g.ScdaemonLog())
	}
	// scdaemon's "reader" debugging shows the reader state pcscd
	// reports to it, which includes SCARD_STATE_EXCLUSIVE ("excl").
	connected := g.ScdaemonLog()[len(log):]
	t.Logf("gpg --card-status after the release: %v\n--- scdaemon log, excerpt ---\n%s",
		took, grepLines(connected, "pcsc_", "reader slot"))
	if !regexp.MustCompile(`pcsc_get_status_change:.* present excl`).MatchString(connected) {
		t.Errorf("scdaemon log does not show the card in exclusive use:\n%s", connected)
	}
	wantCardOf(t, g, out, prof)

	// The other way round: scdaemon now holds the card exclusively.
	if c, err := sctx.Connect(reader, scard.ShareShared, scard.ProtocolAny); !errors.Is(err, scard.ErrSharingViolation) {
		if err == nil {
			c.Disconnect(scard.LeaveCard)
		}
		t.Fatalf("SCardConnect(SHARED) while scdaemon holds the card: %v, want SCARD_E_SHARING_VIOLATION", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	start := time.Now()
	if err := g.ReleaseCard(ctx); err != nil {
		t.Fatalf("%v\n--- gpg-agent log ---\n%s", err, g.AgentLog())
	}
	t.Logf("ReleaseCard (SCD KILLSCD, until gpg-agent reaped scdaemon): %v", time.Since(start))
	c, err := sctx.Connect(reader, scard.ShareShared, scard.ProtocolAny)
	if err != nil {
		t.Fatalf("SCardConnect(SHARED) after ReleaseCard: %v", err)
	}
	c.Disconnect(scard.LeaveCard)
}
