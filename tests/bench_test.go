package tests

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	godbus "github.com/godbus/dbus/v5"

	"github.com/slotwatch/slotwatch/tests/stack"
	"github.com/slotwatch/slotwatch/tests/vcard"
)

// Benchmarks run the daemon built without the race detector (what users
// run), and print every figure next to a baseline measured in the same run.
//
//	make bench    (or: go test -run '^$' -bench . -benchtime 20x ./tests/)

// slotwatchFastBin is the binary benchmarks run: without the race
// detector, as users run it.
func slotwatchFastBin(b *testing.B) string { return buildBinary(b, "slotwatch-norace", false) }

// benchDaemon runs the daemon for a benchmark and waits for its name.
func benchDaemon(b *testing.B, bus *stack.DBus, env []string, args ...string) *exec.Cmd {
	b.Helper()
	cmd := exec.Command(slotwatchFastBin(b), append([]string{"serve", "--address", bus.Address, "--log-level", "warn"}, args...)...)
	cmd.Env = append(os.Environ(), env...)
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { cmd.Process.Signal(os.Interrupt); cmd.Wait() })
	conn, err := godbus.Connect(bus.Address)
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	// Its own name and, with --gnome-compat, GNOME's (requested a moment
	// later).
	missing := ""
	for start := time.Now(); time.Since(start) < 15*time.Second; time.Sleep(20 * time.Millisecond) {
		if missing = daemonNames(conn, gnomeCompat(args)); missing == "" {
			return cmd
		}
	}
	b.Fatalf("daemon did not start: %s", missing)
	return nil
}

// echo is the baseline: the cheapest possible godbus method, on the same
// bus, so the ratio shows what slotwatch adds to a round trip.
type echo struct{}

func (echo) Echo(s string) (string, *godbus.Error) { return s, nil }

// TestHelperEchoProcess is not a test: it is the echo server process
// BenchmarkDBusCalls starts, a bare godbus method in a process of its own
// (as the daemon is), serving until its stdin closes.
func TestHelperEchoProcess(t *testing.T) {
	addr := os.Getenv("SLOTWATCH_ECHO_BUS")
	if addr == "" {
		t.Skip("only runs as the echo server process of BenchmarkDBusCalls")
	}
	conn, err := godbus.Connect(addr)
	if err != nil {
		fmt.Println("error", err)
		os.Exit(1)
	}
	conn.Export(echo{}, "/echo", "test.Echo")
	fmt.Println("ready", conn.Names()[0])
	io.Copy(io.Discard, os.Stdin)
	os.Exit(0)
}

// helperProcess starts this test binary as the helper process test (a
// TestHelper... that serves until its stdin closes), with env added, and
// returns its stdout and a stop function (idempotent, also run at cleanup)
// that closes its stdin and waits until it is gone.
func helperProcess(b *testing.B, test string, env ...string) (*bufio.Reader, func()) {
	b.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^"+test+"$")
	cmd.Env = append(os.Environ(), env...)
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		b.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	var once sync.Once
	stop := func() { once.Do(func() { stdin.Close(); cmd.Wait() }) }
	b.Cleanup(stop)
	return bufio.NewReader(out), stop
}

// echoProcess starts TestHelperEchoProcess on bus and returns its unique
// name.
func echoProcess(b *testing.B, bus *stack.DBus) string {
	out, _ := helperProcess(b, "TestHelperEchoProcess", "SLOTWATCH_ECHO_BUS="+bus.Address)
	line, err := out.ReadString('\n')
	name, ok := strings.CutPrefix(strings.TrimSpace(line), "ready ")
	if err != nil || !ok {
		b.Fatalf("echo process: %q %v", line, err)
	}
	return name
}

// BenchmarkDBusCalls: calls per second for Manager.Version (a property Get)
// and for OpenSession+Close on a SoftHSM2 token, against a bare godbus echo
// method on the same bus: served from the benchmark's own process (echo,
// the historical floor: its server shares the client's busy process) and
// from a process of its own, idle between calls as the daemon is
// (echo-proc).
func BenchmarkDBusCalls(b *testing.B) {
	hsm, err := stack.NewSoftHSM(b.TempDir())
	if err != nil {
		b.Fatal(err)
	}
	if err := hsm.InitToken(hsmLabel, hsmSO, hsmPIN); err != nil {
		b.Fatal(err)
	}
	bus, err := stack.StartDBus(b.TempDir(), "")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { bus.Stop() })
	benchDaemon(b, bus, hsm.Env(), "--module", stack.SoftHSMModule, "--no-pcsc")

	server, err := godbus.Connect(bus.Address)
	if err != nil {
		b.Fatal(err)
	}
	defer server.Close()
	server.Export(echo{}, "/echo", "test.Echo")
	client, err := godbus.Connect(bus.Address)
	if err != nil {
		b.Fatal(err)
	}
	defer client.Close()
	echoObj := client.Object(server.Names()[0], "/echo")
	echoProcObj := client.Object(echoProcess(b, bus), "/echo")
	root := client.Object(busName, rootPath)
	var tok godbus.ObjectPath
	for start := time.Now(); tok == "" && time.Since(start) < 10*time.Second; time.Sleep(50 * time.Millisecond) {
		var objs map[godbus.ObjectPath]map[string]map[string]godbus.Variant
		root.Call("org.freedesktop.DBus.ObjectManager.GetManagedObjects", 0).Store(&objs)
		for p, ifs := range objs {
			if ifs[tokIface]["Label"].Value() == hsmLabel {
				tok = p
			}
		}
	}
	if tok == "" {
		b.Fatal("no SoftHSM token on the bus")
	}
	tokObj := client.Object(busName, tok)

	const calls = 2000
	rate := func(f func() error) float64 { return callRate(b, calls, f) }
	// Each round measures the echo floor right before the two figures, and
	// the ratios are the medians over the rounds: on a noisy 2-core machine
	// one round's rates swing by a third.
	b.ResetTimer()
	var echoRates, getRatios, openRatios, getProcRatios, openProcRatios []float64
	for range b.N {
		echoRate := rate(func() error { return echoObj.Call("test.Echo.Echo", 0, "x").Err })
		echoProcRate := rate(func() error { return echoProcObj.Call("test.Echo.Echo", 0, "x").Err })
		getRate := rate(func() error {
			_, err := root.GetProperty(mgrIface + ".Version")
			return err
		})
		openRate := rate(func() error {
			var p godbus.ObjectPath
			if err := tokObj.Call(tokIface+".OpenSession", 0, false).Store(&p); err != nil {
				return err
			}
			return client.Object(busName, p).Call(sesIface+".Close", 0).Err
		})
		echoRates = append(echoRates, echoRate)
		getRatios = append(getRatios, getRate/echoRate)
		openRatios = append(openRatios, openRate/echoRate)
		getProcRatios = append(getProcRatios, getRate/echoProcRate)
		openProcRatios = append(openProcRatios, openRate/echoProcRate)
	}
	b.StopTimer()
	b.ReportMetric(median(echoRates), "echo-calls/s")
	b.ReportMetric(median(getRatios), "get/echo")
	b.ReportMetric(median(openRatios), "open+close/echo")
	b.ReportMetric(median(getProcRatios), "get/echo-proc")
	b.ReportMetric(median(openProcRatios), "open+close/echo-proc")
}

// BenchmarkInsertToSignal: insert → TokenInserted at a subscriber, against
// pcscd's own detection (raw SCardGetStatusChange) in the same run, plus
// the daemon's idle wake-ups with a card present.
func BenchmarkInsertToSignal(b *testing.B) {
	d := insertLatency(b, nil, []godbus.MatchOption{godbus.WithMatchSender(busName), godbus.WithMatchMember("TokenInserted")},
		func(*godbus.Signal) bool { return true })

	// Idle cost with a card present: context switches of the daemon's
	// process over a quiet period are its wake-ups.
	if err := d.card.Insert(); err != nil {
		b.Fatal(err)
	}
	<-d.sigs
	time.Sleep(500 * time.Millisecond)
	const quiet = 5 * time.Second
	before := ctxSwitches(b, d.cmd.Process.Pid)
	time.Sleep(quiet)
	after := ctxSwitches(b, d.cmd.Process.Pid)
	b.ReportMetric(float64(after-before)/quiet.Seconds(), "idle-wakeups/s")
}

// BenchmarkGnomeInsertToIsInserted: insert → IsInserted=true at a
// GNOME-Shell-style subscriber of org.gnome.SettingsDaemon.Smartcard
// (serve --gnome-compat), against pcscd's own detection in the same run.
func BenchmarkGnomeInsertToIsInserted(b *testing.B) {
	insertLatency(b, []string{"--gnome-compat"},
		[]godbus.MatchOption{godbus.WithMatchSender(gnomeName), godbus.WithMatchMember("PropertiesChanged"), godbus.WithMatchPathNamespace(gnomeTokens)},
		func(sig *godbus.Signal) bool {
			changed, _ := sig.Body[1].(map[string]godbus.Variant)
			v, ok := changed["IsInserted"]
			return ok && v.Value() == true
		})
}

// latencyRun is what insertLatency leaves running for more measurements.
type latencyRun struct {
	cmd  *exec.Cmd
	card *vcard.Card
	sigs <-chan time.Time // arrival of the signals insertLatency waited for
}

// latencyStack starts what the insert-latency benchmarks share: a private
// pcscd, a private bus, and an independent PC/SC observer of the first
// reader (the baseline); all stopped at cleanup.
func latencyStack(b *testing.B) (*stack.PCSCD, *stack.DBus, *stack.Observer) {
	b.Helper()
	pcscd, err := stack.StartPCSCD(stack.PCSCDConfig{Socket: pcscSocket, Dir: b.TempDir()})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { pcscd.Stop() })
	bus, err := stack.StartDBus(b.TempDir(), "")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { bus.Stop() })
	obs, err := stack.NewObserver([]string{pcscd.Readers()[0]})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { obs.Close() })
	return pcscd, bus, obs
}

// insertLatency inserts and removes a virtual card b.N times at jittered
// moments (0–400 ms, so that vpcd's 400 ms presence poll is sampled
// evenly) and reports, per insertion, when pcscd reported it (an
// independent PC/SC observer: the baseline), when the subscriber got the
// signal (matched by match, accepted by isInsert), and the difference: what
// slotwatch adds.
func insertLatency(b *testing.B, daemonArgs []string, match []godbus.MatchOption, isInsert func(*godbus.Signal) bool) latencyRun {
	pcscd, bus, obs := latencyStack(b)
	reader := pcscd.Readers()[0]
	daemonCmd := benchDaemon(b, bus, nil, append([]string{"--module", stack.OpenSCModule}, daemonArgs...)...)
	sigs := subscribeStamped(b, bus, match, isInsert)
	card := vcard.New(pcscd.Addr(0), vcard.Profile{Label: "Bench Card", Serial: "be0c0001"})
	b.Cleanup(func() { card.Close() })

	b.ResetTimer()
	l := insertCycles(b, b.N, card, obs, reader, func(start time.Time) (time.Time, error) {
		return nextStamp(sigs, start)
	})
	b.StopTimer()
	b.ReportMetric(quantile(l.raw, 0.5), "pcsc-median-ms")
	b.ReportMetric(quantile(l.raw, 0.9), "pcsc-p90-ms")
	b.ReportMetric(quantile(l.sub, 0.5), "signal-median-ms")
	b.ReportMetric(quantile(l.sub, 0.9), "signal-p90-ms")
	b.ReportMetric(quantile(l.added, 0.5), "added-median-ms")
	b.ReportMetric(quantile(l.added, 0.9), "added-p90-ms")
	return latencyRun{cmd: daemonCmd, card: card, sigs: sigs}
}

// subscribeStamped subscribes on a connection of its own (closed by b's
// cleanup) to the signals match selects and returns the arrival time of
// each one isInsert accepts, taken as the connection delivers it.
func subscribeStamped(b *testing.B, bus *stack.DBus, match []godbus.MatchOption, isInsert func(*godbus.Signal) bool) <-chan time.Time {
	b.Helper()
	conn, err := godbus.Connect(bus.Address, godbus.WithSignalHandler(godbus.NewSequentialSignalHandler()))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { conn.Close() })
	if err := conn.AddMatchSignal(match...); err != nil {
		b.Fatal(err)
	}
	all := make(chan *godbus.Signal, 100)
	conn.Signal(all)
	stamps := make(chan time.Time, 100)
	go func() {
		for sig := range all {
			if now := time.Now(); isInsert(sig) {
				select {
				case stamps <- now:
				default: // nobody reads any more (an earlier phase's subscriber)
				}
			}
		}
	}()
	return stamps
}

// nextStamp returns the first time from stamps that is after start (older
// ones belong to earlier cycles), waiting at most 5 s.
func nextStamp(stamps <-chan time.Time, start time.Time) (time.Time, error) {
	timeout := time.After(5 * time.Second)
	for {
		select {
		case t := <-stamps:
			if t.After(start) {
				return t, nil
			}
		case <-timeout:
			return time.Time{}, errors.New("no insertion seen within 5 s")
		}
	}
}

// latencies are insertCycles' measurements, one entry per insertion.
type latencies struct {
	raw   []time.Duration // insert → pcscd reported it (the observer): the baseline
	sub   []time.Duration // insert → the face under test saw it
	added []time.Duration // what the face adds over pcscd: sub - raw
}

// insertCycles inserts and removes card n times at jittered moments (0–400
// ms, so that vpcd's 400 ms presence poll is sampled evenly). For each
// insertion it waits for obs to report the card present in reader, then
// asks seenBy when the face under test saw that insertion (seenBy gets the
// moment of the insert and waits for the first sighting after it).
func insertCycles(b *testing.B, n int, card *vcard.Card, obs *stack.Observer, reader string, seenBy func(start time.Time) (time.Time, error)) latencies {
	b.Helper()
	var l latencies
	for range n {
		time.Sleep(time.Duration(rand.IntN(400)) * time.Millisecond)
		start := time.Now()
		if err := card.Insert(); err != nil {
			b.Fatal(err)
		}
		seen, err := obs.WaitFor(reader, func(c stack.ObservedChange) bool { return c.Present }, 5*time.Second)
		if err != nil {
			b.Fatal(err)
		}
		got, err := seenBy(start)
		if err != nil {
			b.Fatalf("the face under test: %v", err)
		}
		l.raw = append(l.raw, seen.Time.Sub(start))
		l.sub = append(l.sub, got.Sub(start))
		l.added = append(l.added, got.Sub(seen.Time))
		time.Sleep(time.Duration(rand.IntN(400)) * time.Millisecond)
		card.Remove()
		if _, err := obs.WaitFor(reader, func(c stack.ObservedChange) bool { return !c.Present }, 5*time.Second); err != nil {
			b.Fatal(err)
		}
	}
	return l
}

func quantile(ds []time.Duration, q float64) float64 {
	s := slices.Clone(ds)
	slices.Sort(s)
	return float64(s[int(q*float64(len(s)-1))].Microseconds()) / 1000
}

// ctxSwitches sums the voluntary and involuntary context switches of every
// thread of pid.
func ctxSwitches(b *testing.B, pid int) int {
	b.Helper()
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		b.Fatal(err)
	}
	total := 0
	for _, t := range tasks {
		data, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/status", pid, t.Name()))
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(data), "\n") {
			for _, key := range []string{"voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:"} {
				if v, ok := strings.CutPrefix(line, key); ok {
					n, _ := strconv.Atoi(strings.TrimSpace(v))
					total += n
				}
			}
		}
	}
	return total
}

// callRate runs f n times and returns the calls per second, failing the
// benchmark on an error.
func callRate(b *testing.B, n int, f func() error) float64 {
	start := time.Now()
	for range n {
		if err := f(); err != nil {
			b.Fatal(err)
		}
	}
	return float64(n) / time.Since(start).Seconds()
}

// median is the median of v (the upper one for an even count).
func median(v []float64) float64 {
	v = slices.Clone(v)
	slices.Sort(v)
	return v[len(v)/2]
}
