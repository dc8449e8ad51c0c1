package tests

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	godbus "github.com/godbus/dbus/v5"

	"github.com/slotwatch/slotwatch/tests/stack"
	"github.com/slotwatch/slotwatch/tests/vcard"
)

// stressCount reads a stress size from the environment (make stress sets
// the full figures); the default is the short form make test runs.
func stressCount(name string, short int) int {
	if n, err := strconv.Atoi(os.Getenv(name)); err == nil && n > 0 {
		return n
	}
	return short
}

// TestStressReplugWithClients: tokens come and go across 4 slots of the
// fault module as fast as the control channel allows, with handle values
// reused by the module right after each removal, while clients open
// sessions, list objects and close them. No client may ever see another
// token's objects through its session (the use-after-free a stale handle
// would cause), generations strictly increase per slot, the daemon stays up,
// and no session is left at the end.
func TestStressReplugWithClients(t *testing.T) {
	cycles := stressCount("SLOTWATCH_STRESS_CYCLES", 400)
	const slots, clients = 4, 4
	bus, ctl, d := faultDaemonProc(t)
	if err := ctl.ReuseHandles(true); err != nil {
		t.Fatal(err)
	}
	sub := subscribe(t, bus)

	// The subscriber's check: per slot, insertions alternate with removals
	// and generations only grow.
	var inserted, removed atomic.Int64
	subDone := make(chan error, 1)
	stop := make(chan struct{})
	go func() {
		last := map[godbus.ObjectPath]uint64{}
		live := map[godbus.ObjectPath]uint64{}
		for {
			select {
			case sig := <-sub.ch:
				switch sig.Name {
				case sigInserted:
					slot, gen := sig.Body[1].(godbus.ObjectPath), sig.Body[2].(uint64)
					if gen <= last[slot] || live[slot] != 0 {
						subDone <- fmt.Errorf("slot %s: inserted generation %d after %d (live %d)", slot, gen, last[slot], live[slot])
						return
					}
					last[slot], live[slot] = gen, gen
					inserted.Add(1)
				case sigRemoved:
					slot, gen := sig.Body[1].(godbus.ObjectPath), sig.Body[2].(uint64)
					if live[slot] != gen {
						subDone <- fmt.Errorf("slot %s: removed generation %d, live is %d", slot, gen, live[slot])
						return
					}
					live[slot] = 0
					removed.Add(1)
				}
			case <-stop:
				subDone <- nil
				return
			}
		}
	}()

	// Clients: open a session on whatever token is there, look at its
	// certificate (labelled with its token's serial), close.
	var sessionsOpened, crossings atomic.Int64
	var wg sync.WaitGroup
	unexpected := make(chan error, clients)
	for range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			conn, err := godbus.Connect(bus.Address)
			if err != nil {
				unexpected <- err
				return
			}
			defer conn.Close()
			for {
				select {
				case <-stop:
					return
				default:
				}
				var objs map[godbus.ObjectPath]map[string]map[string]godbus.Variant
				if err := conn.Object(busName, rootPath).Call("org.freedesktop.DBus.ObjectManager.GetManagedObjects", 0).Store(&objs); err != nil {
					unexpected <- err
					return
				}
				for p, ifs := range objs {
					props, ok := ifs[tokIface]
					if !ok {
						continue
					}
					serial := props["Serial"].Value().(string)
					var s godbus.ObjectPath
					if err := conn.Object(busName, p).Call(tokIface+".OpenSession", 0, false).Store(&s); err != nil {
						if !raceError(err) {
							unexpected <- fmt.Errorf("OpenSession on %s: %v", p, err)
							return
						}
						continue
					}
					sessionsOpened.Add(1)
					var found []map[string]godbus.Variant
					err := conn.Object(busName, s).Call(sesIface+".FindObjects", 0, map[string]godbus.Variant{"class": godbus.MakeVariant(uint32(1))}).Store(&found)
					switch {
					case err == nil:
						for _, o := range found {
							if label, _ := o["label"].Value().(string); !strings.HasSuffix(label, " "+serial) {
								crossings.Add(1)
								t.Errorf("session %s of token %s (serial %s) sees %q", s, p, serial, label)
							}
						}
					case !raceError(err):
						unexpected <- fmt.Errorf("FindObjects on %s: %v", s, err)
						return
					}
					if err := conn.Object(busName, s).Call(sesIface+".Close", 0).Err; err != nil && !raceError(err) && errName(err) != "org.freedesktop.DBus.Error.UnknownObject" {
						unexpected <- fmt.Errorf("Close %s: %v", s, err)
						return
					}
				}
			}
		}()
	}

	start := time.Now()
	present := make([]bool, slots)
	var warmRSS, warmThreads int
	for i := range cycles {
		if i == cycles/10 {
			warmRSS, warmThreads = procStatus(t, d.cmd.Process.Pid)
		}
		slot := uint(i % slots)
		var err error
		if present[slot] {
			err = ctl.Remove(slot)
		} else {
			err = ctl.Insert(slot, fmt.Sprintf("Stress %d", i), fmt.Sprintf("%08x", i))
		}
		if err != nil {
			t.Fatal(err)
		}
		present[slot] = !present[slot]
		// A token lives a few milliseconds: long enough for clients to
		// race its removal, which is the point.
		time.Sleep(2 * time.Millisecond)
	}
	elapsed := time.Since(start)
	time.Sleep(500 * time.Millisecond) // the last changes reach the bus
	close(stop)
	wg.Wait()
	select {
	case err := <-unexpected:
		t.Fatal(err)
	default:
	}
	if err := <-subDone; err != nil {
		t.Fatal(err)
	}
	conn := dial(t, bus)
	objs := managedObjects(t, conn)
	tokens, sessions := 0, 0
	for p := range objs {
		switch {
		case isUnder(p, "tokens"):
			tokens++
		case isUnder(p, "sessions"):
			sessions++
		}
	}
	want := 0
	for _, p := range present {
		if p {
			want++
		}
	}
	if tokens != want || sessions != 0 {
		t.Fatalf("at the end: %d tokens (want %d), %d sessions left (want 0)", tokens, want, sessions)
	}
	calls, err := ctl.Calls()
	if err != nil {
		t.Fatal(err)
	}
	deadHandle := 0
	for _, c := range calls {
		if c.Handle != 0 && c.Serial == "" && c.Func != "C_OpenSession" {
			deadHandle++
		}
	}
	endRSS, endThreads := procStatus(t, d.cmd.Process.Pid)
	t.Logf("daemon after warm-up: %d kB RSS, %d threads; at the end: %d kB RSS, %d threads", warmRSS, warmThreads, endRSS, endThreads)
	if endThreads > warmThreads+8 {
		t.Errorf("daemon threads grew from %d to %d", warmThreads, endThreads)
	}
	// The fault module keeps its call record (a ring of 262,144 calls) in
	// the daemon's memory; it is full after a few thousand cycles, so only
	// a long run's RSS says anything about slotwatch's own.
	if cycles >= 20000 && endRSS > warmRSS*5/4+8192 {
		t.Errorf("daemon RSS grew from %d kB after warm-up to %d kB", warmRSS, endRSS)
	}
	t.Logf("%d token changes in %v (%d insertions, %d removals on the bus), %d sessions opened by %d clients, %d cross-token results, %d module calls with a handle of an already removed token (calls in flight when their token went)",
		cycles, elapsed.Round(time.Millisecond), inserted.Load(), removed.Load(), sessionsOpened.Load(), clients, crossings.Load(), deadHandle)
	if sessionsOpened.Load() == 0 {
		t.Fatal("no client got a session: the test did not test anything")
	}
}

// raceError tells the errors a client can get when its token goes while it
// works: the contract's answer to a removal.
func raceError(err error) bool {
	switch errName(err) {
	case errPfx + "TokenRemoved", errPfx + "Busy":
		return true
	}
	return false
}

// procStatus reads a process's resident memory (kB) and thread count.
func procStatus(t *testing.T, pid int) (rssKB, threads int) {
	t.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		switch f[0] {
		case "VmRSS:":
			rssKB, _ = strconv.Atoi(f[1])
		case "Threads:":
			threads, _ = strconv.Atoi(f[1])
		}
	}
	return rssKB, threads
}

// TestStressClientChurn: client processes open sessions and are killed
// without closing them. Every session is closed in the module (its call
// record), none is left on the bus, and a client that stays keeps its
// session. make stress runs 1,000.
func TestStressClientChurn(t *testing.T) {
	clients := stressCount("SLOTWATCH_STRESS_CLIENTS", 30)
	bus, ctl := faultDaemon(t)
	if err := ctl.Insert(0, "Churn", "c0000001"); err != nil {
		t.Fatal(err)
	}
	conn := dial(t, bus)
	tok := findToken(t, conn, "Churn")
	mine := openSession(t, conn, tok)
	if err := ctl.ClearCalls(); err != nil {
		t.Fatal(err)
	}
	for i := range clients {
		client, _ := startClient(t, bus, tok)
		if i%2 == 0 {
			client.Process.Signal(syscall.SIGKILL)
		} else {
			client.Process.Signal(syscall.SIGTERM)
		}
		client.Wait()
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		left := 0
		for p := range managedObjects(t, conn) {
			if isUnder(p, "sessions") && p != mine {
				left++
			}
		}
		if left == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d sessions of dead clients still on the bus", left)
		}
		time.Sleep(20 * time.Millisecond)
	}
	calls, err := ctl.Calls()
	if err != nil {
		t.Fatal(err)
	}
	opened, closed := map[uint]bool{}, 0
	for _, c := range calls {
		switch {
		case c.Func == "C_OpenSession" && c.RV == 0:
			opened[c.Handle] = true
		case c.Func == "C_CloseSession" && c.RV == 0 && opened[c.Handle]:
			delete(opened, c.Handle)
			closed++
		}
	}
	if len(opened) != 0 || closed != clients {
		t.Fatalf("module: %d sessions of dead clients closed, %d still open; want %d and 0", closed, len(opened), clients)
	}
	if err := conn.Object(busName, mine).Call(sesIface+".FindObjects", 0, map[string]godbus.Variant{}).Err; err != nil {
		t.Fatalf("the staying client's session: %v", err)
	}
	t.Logf("%d clients opened a session and died (half SIGKILL, half SIGTERM): all %d sessions closed in the module, the staying client's session works", clients, closed)
}

// TestStressRealStackReplug: a virtual card cycled through the real stack
// (vpcd, pcscd, OpenSC) as fast as it allows, each insertion pulled once
// OpenSC has read the card, with a D-Bus subscriber counting signals: every
// insertion pcscd counted is exactly one TokenInserted with a new
// generation, each followed by its TokenRemoved, and the final state is
// right. make stress runs 1,000 cycles.
func TestStressRealStackReplug(t *testing.T) {
	cycles := stressCount("SLOTWATCH_STRESS_REAL_CYCLES", 20)
	pcscd := stack.StartPCSCDForTest(t, stack.PCSCDConfig{Socket: pcscSocket, Dir: t.TempDir()})
	bus := stack.StartDBusForTest(t, "")
	d := startDaemon(t, bus, nil, "--module", stack.OpenSCModule, "--log-level", "info")
	sub := subscribe(t, bus)
	reader := pcscd.Readers()[0]
	obs := stack.NewObserverForTest(t, pcscd)
	card := vcard.New(pcscd.Addr(0), vcard.Profile{Label: "Replug", Serial: "4e000001"})
	t.Cleanup(func() { card.Close() })

	start := time.Now()
	for i := range cycles {
		if err := card.Insert(); err != nil {
			t.Fatal(err)
		}
		if _, err := obs.WaitFor(reader, func(c stack.ObservedChange) bool { return c.Present }, 5*time.Second); err != nil {
			t.Fatalf("cycle %d: %v", i, err)
		}
		if err := card.WaitRecognized(30*time.Millisecond, 5*time.Second); err != nil {
			t.Fatalf("cycle %d: %v", i, err)
		}
		if err := card.Remove(); err != nil {
			t.Fatal(err)
		}
		if _, err := obs.WaitFor(reader, func(c stack.ObservedChange) bool { return !c.Present }, 5*time.Second); err != nil {
			t.Fatalf("cycle %d: %v", i, err)
		}
	}
	elapsed := time.Since(start)

	pcscdInsertions, present := 0, false
	for _, c := range obs.Changes() {
		if c.Reader == reader && c.Present != present {
			present = c.Present
			if present {
				pcscdInsertions++
			}
		}
	}
	var inserted, removed int
	var last, live uint64
	for inserted < pcscdInsertions || live != 0 {
		sig := sub.nextOf(5*time.Second, sigInserted, sigRemoved)
		gen := sig.Body[2].(uint64)
		switch sig.Name {
		case sigInserted:
			if live != 0 || gen <= last {
				t.Fatalf("TokenInserted %d while %d live (last %d)", gen, live, last)
			}
			last, live = gen, gen
			inserted++
		case sigRemoved:
			if gen != live {
				t.Fatalf("TokenRemoved %d, live %d", gen, live)
			}
			live = 0
			removed++
		}
	}
	if inserted != pcscdInsertions || removed != inserted {
		t.Fatalf("pcscd counted %d insertions; the bus showed %d insertions and %d removals", pcscdInsertions, inserted, removed)
	}
	for p := range managedObjects(t, dial(t, bus)) {
		if isUnder(p, "tokens") {
			t.Fatalf("token %s on the bus with the card out", p)
		}
	}
	select {
	case <-d.exited:
		t.Fatal("the daemon exited")
	default:
	}
	t.Logf("%d cycles in %v: pcscd counted %d insertions, the bus showed %d TokenInserted and %d TokenRemoved, generations strictly increasing",
		cycles, elapsed.Round(time.Millisecond), pcscdInsertions, inserted, removed)
}
