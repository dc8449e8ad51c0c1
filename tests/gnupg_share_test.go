package tests

import (
	"context"
	"fmt"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/slotwatch/slotwatch/tests/stack"
	"github.com/slotwatch/slotwatch/tests/vcard"
)

// TestGnuPGWhileSlotwatchServes: an unmodified GnuPG (gpg-agent and its
// scdaemon, which connects to cards exclusively) reads the card while
// slotwatch serves it with its default configuration (idle release on,
// 1 s grace). While scdaemon keeps the card, the token stays with its
// generation, OpenSession answers Busy within 1 s and the Reader shows
// State 5; once scdaemon lets go, the same token works again. Before the
// idle release, scdaemon failed here with "sharing violation" (see
// tests/stack's TestGnuPGSharingViolation for that failure on its own).
func TestGnuPGWhileSlotwatchServes(t *testing.T) {
	s := newShareStack(t, "# defaults\n", time.Second)
	tok, gen := s.insert(shareCardProfile)
	from, last := s.sigs.mark(), s.lastGeneration()
	s.waitReleased(true, 10*time.Second, "card read, nothing needs the module (default grace)")

	g := stack.StartGnuPGForTest(t, s.pcscd)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	start := time.Now()
	out, errOut, err := g.CardStatus(ctx)
	if err != nil {
		t.Fatalf("gpg --card-status while slotwatch serves the card: %v\n%s%s\n--- scdaemon log ---\n%s", err, out, errOut, g.ScdaemonLog())
	}
	aid := fmt.Sprintf("%X", vcard.OpenPGPAID(shareCardProfile))
	if !regexp.MustCompile(`(?m)^Application ID \.+: ` + aid + `$`).MatchString(out) {
		t.Fatalf("gpg --card-status did not show the card (Application ID %s):\n%s", aid, out)
	}
	if log := g.ScdaemonLog(); strings.Contains(log, "sharing violation") {
		t.Errorf("scdaemon met a sharing violation:\n%s", log)
	}
	t.Logf("gpg --card-status read the card in %v while slotwatch serves it", time.Since(start).Round(time.Millisecond))

	// scdaemon keeps the card (exclusively) until it is told to let go.
	_, took, err := s.openSession(tok, 10*time.Second)
	if errName(err) != errBusy || took > time.Second {
		t.Errorf("OpenSession while scdaemon holds the card: %v after %v, want %s within 1 s", err, took.Round(time.Millisecond), errBusy)
	}
	s.waitReaderState(readerStateExclusive, 5*time.Second, "scdaemon holds the card")
	s.checkToken(tok, gen, shareCardProfile, "scdaemon holds the card")

	if err := g.ReleaseCard(ctx); err != nil {
		t.Fatal(err)
	}
	s.waitReaderState(readerStatePresent, 5*time.Second, "scdaemon let go of the card")
	s.sessionCycle(tok, "OpenSession after scdaemon let go")
	s.checkToken(tok, gen, shareCardProfile, "after scdaemon let go")
	s.noReannouncement(from, last, "card read by GnuPG")
}
