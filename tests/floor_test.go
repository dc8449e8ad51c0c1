package tests

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	godbus "github.com/godbus/dbus/v5"

	"github.com/slotwatch/slotwatch/module"
	"github.com/slotwatch/slotwatch/tests/stack"
	"github.com/slotwatch/slotwatch/tests/vcard"
)

// The bare-OpenSC floor: what a process that runs OpenSC alone needs to
// learn of an insertion (C_WaitForSlotEvent returns, then C_GetTokenInfo
// returns). slotwatch's insert→TokenInserted and insert→IsInserted are
// measured against it in the same run (issue 10: each within 3 ms median of
// the floor).

// Environment of TestHelperOpenSCFloorProcess, set by floorProcess.
const (
	floorPCSCEnv   = "SLOTWATCH_FLOOR_PCSC"   // the private pcscd's socket
	floorOpenSCEnv = "SLOTWATCH_FLOOR_OPENSC" // OPENSC_CONF, as the daemon gets it
)

// TestHelperOpenSCFloorProcess is not a test: it is the bare-OpenSC
// observer process of BenchmarkInsertFloor. It loads OpenSC's PKCS#11 module
// itself (package module, as the daemon does, without the monitor), blocks
// in C_WaitForSlotEvent, calls C_GetTokenInfo on the slot it returned, and
// prints one line per event:
//
//	event slot=N present=0|1 wait=UNIXNANO done=UNIXNANO
//
// (wait: C_WaitForSlotEvent returned; done: C_GetTokenInfo returned; present:
// it returned CKR_OK), until its stdin closes.
func TestHelperOpenSCFloorProcess(t *testing.T) {
	sock := os.Getenv(floorPCSCEnv)
	if sock == "" {
		t.Skip("only runs as the bare-OpenSC floor process of BenchmarkInsertFloor")
	}
	// TestMain pointed both at this process's own files; libpcsclite and
	// OpenSC read them when the module is initialized, below.
	os.Setenv(stack.SocketEnv, sock)
	if conf := os.Getenv(floorOpenSCEnv); conf != "" {
		os.Setenv(stack.OpenSCConfEnv, conf)
	}
	runtime.LockOSThread() // one thread for every call, as the daemon's waiter
	defer runtime.UnlockOSThread()
	mod := module.Open(stack.OpenSCModule, module.Options{Name: "opensc"})
	if err := mod.Initialize(); err != nil {
		fmt.Println("error", err)
		return
	}
	stopped := make(chan struct{})
	go func() {
		io.Copy(io.Discard, os.Stdin)
		close(stopped)
		mod.Finalize() // unblocks the wait (CKR_CRYPTOKI_NOT_INITIALIZED)
	}()
	fmt.Println("ready")
	for {
		slot, err := mod.WaitForSlotEvent(false)
		waited := time.Now()
		select {
		case <-stopped:
			return
		default:
		}
		if err != nil {
			fmt.Println("error", err)
			if errors.Is(err, module.ErrNotInitialized) {
				return
			}
			time.Sleep(50 * time.Millisecond)
			continue
		}
		_, err = mod.TokenInfo(slot)
		done := time.Now()
		present := 0
		if err == nil {
			present = 1
		}
		fmt.Printf("event slot=%d present=%d wait=%d done=%d\n", slot, present, waited.UnixNano(), done.UnixNano())
	}
}

// floorEvent is one line of TestHelperOpenSCFloorProcess.
type floorEvent struct {
	slot       uint
	present    bool
	wait, done time.Time
}

func parseFloorEvent(line string) (floorEvent, bool) {
	rest, ok := strings.CutPrefix(line, "event ")
	if !ok {
		return floorEvent{}, false
	}
	var ev floorEvent
	for _, f := range strings.Fields(rest) {
		k, v, _ := strings.Cut(f, "=")
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return floorEvent{}, false
		}
		switch k {
		case "slot":
			ev.slot = uint(n)
		case "present":
			ev.present = n == 1
		case "wait":
			ev.wait = time.Unix(0, n)
		case "done":
			ev.done = time.Unix(0, n)
		}
	}
	return ev, true
}

// floorProcess starts TestHelperOpenSCFloorProcess on pcscd and returns its
// events and a stop function (which waits until the process, and so its
// OpenSC, is gone).
func floorProcess(b *testing.B, pcscd *stack.PCSCD) (<-chan floorEvent, func()) {
	b.Helper()
	r, stop := helperProcess(b, "TestHelperOpenSCFloorProcess",
		floorPCSCEnv+"="+pcscd.Socket(), floorOpenSCEnv+"="+os.Getenv(stack.OpenSCConfEnv))
	line, err := r.ReadString('\n')
	if err != nil || strings.TrimSpace(line) != "ready" {
		b.Fatalf("floor process: %q %v", line, err)
	}
	evs := make(chan floorEvent, 100)
	go func() {
		defer close(evs)
		for {
			line, err := r.ReadString('\n')
			if ev, ok := parseFloorEvent(strings.TrimSpace(line)); ok {
				evs <- ev
			} else if strings.HasPrefix(line, "error") {
				fmt.Fprintf(os.Stderr, "floor process: %s", line)
			}
			if err != nil {
				return
			}
		}
	}()
	return evs, stop
}

// nextFloorInsert returns the floor process's first insertion (a token
// read) that ended after start, waiting at most 5 s.
func nextFloorInsert(evs <-chan floorEvent, start time.Time) (floorEvent, error) {
	timeout := time.After(5 * time.Second)
	for {
		select {
		case ev, ok := <-evs:
			if !ok {
				return floorEvent{}, errors.New("the floor process ended")
			}
			if ev.present && ev.done.After(start) {
				return ev, nil
			}
		case <-timeout:
			return floorEvent{}, errors.New("the floor process saw no insertion within 5 s")
		}
	}
}

// cycleCosts are the parts of one init-read-finalize cycle of OpenSC.
type cycleCosts struct {
	init, slotList, tokenInfo, finalize, total []time.Duration
}

// openSCCycles runs n init-read-finalize cycles of OpenSC in this process
// (C_Initialize, C_GetSlotList(token present), C_GetTokenInfo, C_Finalize,
// through package module as the daemon would, which also loads and unloads
// the library) with a token present, and returns their costs.
func openSCCycles(b *testing.B, n int) cycleCosts {
	b.Helper()
	mod := module.Open(stack.OpenSCModule, module.Options{Name: "opensc"})
	var c cycleCosts
	for range n {
		t0 := time.Now()
		if err := mod.Initialize(); err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		slots, err := mod.SlotList(true)
		if err != nil || len(slots) == 0 {
			mod.Finalize()
			b.Fatalf("C_GetSlotList: %v %v (want the inserted token)", slots, err)
		}
		t2 := time.Now()
		if _, err := mod.TokenInfo(slots[0]); err != nil {
			mod.Finalize()
			b.Fatal(err)
		}
		t3 := time.Now()
		if err := mod.Finalize(); err != nil {
			b.Fatal(err)
		}
		t4 := time.Now()
		c.init = append(c.init, t1.Sub(t0))
		c.slotList = append(c.slotList, t2.Sub(t1))
		c.tokenInfo = append(c.tokenInfo, t3.Sub(t2))
		c.finalize = append(c.finalize, t4.Sub(t3))
		c.total = append(c.total, t4.Sub(t0))
	}
	return c
}

// BenchmarkInsertFloor: insert → token known, against pcscd's own detection
// (raw SCardGetStatusChange), for the bare-OpenSC floor (a process of its
// own running only OpenSC: C_WaitForSlotEvent, then C_GetTokenInfo), for
// insert → TokenInserted at a subscriber (serve) and for insert →
// IsInserted=true at a GNOME-style subscriber (serve --gnome-compat), and
// how much each face adds over the floor. Two OpenSC instances serialize on
// the card, so each runs in a phase of its own, with nothing else holding
// OpenSC; the phases take turns in rounds (floor, TokenInserted,
// IsInserted) so that the machine's slow drifts hit them alike, and every
// phase gets b.N jittered insertions in all. Also: the cost of one
// init-read-finalize cycle of OpenSC in process, with a card present (what
// releasing the module while idle costs per read).
func BenchmarkInsertFloor(b *testing.B) {
	pcscd, bus, obs := latencyStack(b)
	reader := pcscd.Readers()[0]
	card := vcard.New(pcscd.Addr(0), vcard.Profile{Label: "Bench Card", Serial: "be0c0001"})
	b.Cleanup(func() { card.Close() })
	slotwatchFastBin(b) // built before the clock runs

	b.ResetTimer()
	// Phase 0: the init-read-finalize cycle, the card present, nothing else
	// running OpenSC.
	if err := card.Insert(); err != nil {
		b.Fatal(err)
	}
	if _, err := obs.WaitFor(reader, func(c stack.ObservedChange) bool { return c.Present }, 5*time.Second); err != nil {
		b.Fatal(err)
	}
	cyc := openSCCycles(b, max(b.N, 5))
	card.Remove()
	if _, err := obs.WaitFor(reader, func(c stack.ObservedChange) bool { return !c.Present }, 5*time.Second); err != nil {
		b.Fatal(err)
	}

	tokenMatch := []godbus.MatchOption{godbus.WithMatchSender(busName), godbus.WithMatchMember("TokenInserted")}
	gnomeMatch := []godbus.MatchOption{godbus.WithMatchSender(gnomeName), godbus.WithMatchMember("PropertiesChanged"), godbus.WithMatchPathNamespace(gnomeTokens)}
	isInserted := func(sig *godbus.Signal) bool {
		changed, _ := sig.Body[1].(map[string]godbus.Variant)
		v, ok := changed["IsInserted"]
		return ok && v.Value() == true
	}
	// One daemon phase: start the daemon, measure, stop it (and so its
	// OpenSC) before the next phase.
	daemonPhase := func(n int, args []string, match []godbus.MatchOption, accept func(*godbus.Signal) bool) latencies {
		cmd := benchDaemon(b, bus, nil, append([]string{"--module", stack.OpenSCModule}, args...)...)
		stamps := subscribeStamped(b, bus, match, accept)
		l := insertCycles(b, n, card, obs, reader, func(start time.Time) (time.Time, error) { return nextStamp(stamps, start) })
		cmd.Process.Signal(os.Interrupt)
		cmd.Wait()
		return l
	}

	var floor, signal, gnome latencies
	var floorRead []time.Duration // C_WaitForSlotEvent returned → C_GetTokenInfo returned
	rounds := max(1, min(4, b.N/5))
	for r := range rounds {
		n := b.N / rounds
		if r < b.N%rounds {
			n++
		}
		evs, stop := floorProcess(b, pcscd)
		l := insertCycles(b, n, card, obs, reader, func(start time.Time) (time.Time, error) {
			ev, err := nextFloorInsert(evs, start)
			floorRead = append(floorRead, ev.done.Sub(ev.wait))
			return ev.done, err
		})
		stop()
		floor = floor.append(l)
		signal = signal.append(daemonPhase(n, nil, tokenMatch, func(*godbus.Signal) bool { return true }))
		gnome = gnome.append(daemonPhase(n, []string{"--gnome-compat"}, gnomeMatch, isInserted))
	}
	b.StopTimer()

	all := floor.append(signal).append(gnome)
	b.ReportMetric(quantile(all.raw, 0.5), "pcsc-median-ms")
	b.ReportMetric(quantile(all.raw, 0.9), "pcsc-p90-ms")
	for _, f := range []struct {
		name string
		l    latencies
	}{{"floor", floor}, {"signal", signal}, {"isinserted", gnome}} {
		b.ReportMetric(quantile(f.l.added, 0.5), f.name+"-added-median-ms")
		b.ReportMetric(quantile(f.l.added, 0.9), f.name+"-added-p90-ms")
		if f.name != "floor" {
			b.ReportMetric(quantile(f.l.added, 0.5)-quantile(floor.added, 0.5), f.name+"-over-floor-median-ms")
			b.ReportMetric(quantile(f.l.added, 0.9)-quantile(floor.added, 0.9), f.name+"-over-floor-p90-ms")
		}
	}
	b.ReportMetric(quantile(floorRead, 0.5), "floor-tokeninfo-median-ms")
	b.ReportMetric(quantile(cyc.total, 0.5), "cycle-median-ms")
	b.ReportMetric(quantile(cyc.total, 0.9), "cycle-p90-ms")
	b.ReportMetric(quantile(cyc.init, 0.5), "cycle-init-median-ms")
	b.ReportMetric(quantile(cyc.slotList, 0.5), "cycle-slotlist-median-ms")
	b.ReportMetric(quantile(cyc.tokenInfo, 0.5), "cycle-tokeninfo-median-ms")
	b.ReportMetric(quantile(cyc.finalize, 0.5), "cycle-finalize-median-ms")
}

func (l latencies) append(m latencies) latencies {
	return latencies{
		raw:   append(l.raw[:len(l.raw):len(l.raw)], m.raw...),
		sub:   append(l.sub[:len(l.sub):len(l.sub)], m.sub...),
		added: append(l.added[:len(l.added):len(l.added)], m.added...),
	}
}

// TestInsertTimeline is a diagnostic, not a check (issue 10: where the time
// between pcscd's detection and the signal goes). With SLOTWATCH_TIMELINE=N
// it runs the daemon (no race detector, --gnome-compat, --log-level debug
// --log-calls) on a private pcscd, inserts the virtual card N times at
// jittered moments, and logs per insertion every line the daemon wrote
// (stamped on arrival, which can lag the write by up to about a millisecond
// on a busy machine; PKCS#11 call lines carry their exact duration, so a
// call started at about arrival - duration) and the subscriber's
// TokenInserted and IsInserted, in ms after an independent PC/SC observer
// saw the card:
//
//	SLOTWATCH_TIMELINE=10 go test -run TestInsertTimeline -v ./tests/
func TestInsertTimeline(t *testing.T) {
	n, _ := strconv.Atoi(os.Getenv("SLOTWATCH_TIMELINE"))
	if n <= 0 {
		t.Skip("a diagnostic: set SLOTWATCH_TIMELINE=N to log N insertions' timelines")
	}
	pcscd := stack.StartPCSCDForTest(t, stack.PCSCDConfig{Socket: pcscSocket})
	bus := stack.StartDBusForTest(t, "")
	reader := pcscd.Readers()[0]
	obs := stack.NewObserverForTest(t, pcscd)

	type line struct {
		at   time.Time
		text string
	}
	var mu sync.Mutex
	var lines []line
	note := func(at time.Time, text string) {
		mu.Lock()
		lines = append(lines, line{at, text})
		mu.Unlock()
	}
	args := []string{"serve", "--address", bus.Address, "--module", stack.OpenSCModule, "--gnome-compat", "--log-level", "debug", "--log-calls"}
	cmd := exec.Command(buildBinary(t, "slotwatch-norace", false), args...)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Signal(os.Interrupt); cmd.Wait() })
	go func() {
		r := bufio.NewReader(stderr)
		for {
			s, err := r.ReadString('\n')
			if s != "" {
				// The time= attribute has ms resolution only: stamp on arrival.
				_, s, _ = strings.Cut(strings.TrimSpace(s), " level=DEBUG ")
				note(time.Now(), s)
			}
			if err != nil {
				return
			}
		}
	}()
	conn, err := godbus.Connect(bus.Address, godbus.WithSignalHandler(godbus.NewSequentialSignalHandler()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.AddMatchSignal(godbus.WithMatchSender(busName), godbus.WithMatchMember("TokenInserted"))
	conn.AddMatchSignal(godbus.WithMatchSender(gnomeName), godbus.WithMatchMember("PropertiesChanged"), godbus.WithMatchPathNamespace(gnomeTokens))
	sigs := make(chan *godbus.Signal, 100)
	conn.Signal(sigs)
	go func() {
		for sig := range sigs {
			now := time.Now()
			if sig.Name == mgrIface+".TokenInserted" {
				note(now, "SUBSCRIBER TokenInserted")
			} else if changed, ok := sig.Body[1].(map[string]godbus.Variant); ok && changed["IsInserted"].Value() == true {
				note(now, "SUBSCRIBER IsInserted=true")
			}
		}
	}()
	for start := time.Now(); daemonNames(conn, true) != ""; time.Sleep(20 * time.Millisecond) {
		if time.Since(start) > 15*time.Second {
			t.Fatal("daemon did not start")
		}
	}
	card := vcard.New(pcscd.Addr(0), vcard.Profile{Label: "Bench Card", Serial: "be0c0001"})
	defer card.Close()

	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	var wait, signal, gnome, calls []time.Duration
	for i := range n {
		time.Sleep(time.Duration(rand.IntN(400)) * time.Millisecond)
		mu.Lock()
		lines = nil
		mu.Unlock()
		start := time.Now()
		if err := card.Insert(); err != nil {
			t.Fatal(err)
		}
		seen, err := obs.WaitFor(reader, func(c stack.ObservedChange) bool { return c.Present }, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(150 * time.Millisecond) // the insertion's reads, the signals, the re-reads after them
		mu.Lock()
		got := slices.Clone(lines)
		mu.Unlock()
		slices.SortStableFunc(got, func(a, b line) int { return a.at.Compare(b.at) })
		var b strings.Builder
		fmt.Fprintf(&b, "insertion %d: pcscd reported it %.1f ms after the insert; ms after that:\n", i, ms(seen.Time.Sub(start)))
		var sum time.Duration
		var nw, ns, ng bool
		for _, l := range got {
			fn := strings.TrimPrefix(strings.Fields(l.text + " x")[0], "msg=")
			var d time.Duration
			if _, v, ok := strings.Cut(l.text, " duration="); ok && strings.HasPrefix(fn, "C_") {
				d, _ = time.ParseDuration(strings.Fields(v)[0])
			}
			if d > 0 && d < time.Second {
				fmt.Fprintf(&b, "  %+8.2f  (called at %+.2f) %s\n", ms(l.at.Sub(seen.Time)), ms(l.at.Add(-d).Sub(seen.Time)), l.text)
			} else {
				fmt.Fprintf(&b, "  %+8.2f  %s\n", ms(l.at.Sub(seen.Time)), l.text)
			}
			switch {
			case fn == "C_WaitForSlotEvent" && !nw:
				wait, nw = append(wait, l.at.Sub(seen.Time)), true
			case strings.HasPrefix(fn, "C_"):
				sum += d
			case l.text == "SUBSCRIBER TokenInserted" && !ns:
				signal, ns = append(signal, l.at.Sub(seen.Time)), true
			case l.text == "SUBSCRIBER IsInserted=true" && !ng:
				gnome, ng = append(gnome, l.at.Sub(seen.Time)), true
			}
		}
		calls = append(calls, sum)
		t.Log(b.String())
		time.Sleep(time.Duration(rand.IntN(400)) * time.Millisecond)
		card.Remove()
		if _, err := obs.WaitFor(reader, func(c stack.ObservedChange) bool { return !c.Present }, 5*time.Second); err != nil {
			t.Fatal(err)
		}
	}
	if len(wait) > 0 && len(signal) > 0 && len(gnome) > 0 {
		t.Logf("median ms after pcscd: C_WaitForSlotEvent returned %.2f, TokenInserted %.2f, IsInserted %.2f; PKCS#11 call time per insertion (the wait excluded, 150 ms window) %.2f",
			quantile(wait, 0.5), quantile(signal, 0.5), quantile(gnome, 0.5), quantile(calls, 0.5))
	}
}
