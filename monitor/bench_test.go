package monitor_test

import (
	"context"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/slotwatch/slotwatch/monitor"
	"github.com/slotwatch/slotwatch/tests/stack"
)

// BenchmarkInsertLatency measures, over jittered insert cycles, how long after
// the virtual card connects (a) a raw SCardGetStatusChange observer and (b)
// a monitor subscriber see the insertion. The raw observer is the baseline
// measured in the same run; the interesting figures are the monitor's
// median/p90 and what it adds on top of PC/SC. pcscd polls vpcd every
// 400 ms, so both are dominated by that poll; jitter keeps the cycles from
// locking onto its phase.
//
//	go test -run '^$' -bench InsertLatency -benchtime 20x ./monitor
func BenchmarkInsertLatency(b *testing.B) {
	w := newWorld(b)
	reader := w.pcscd.Readers()[0]
	obs, err := stack.NewObserver([]string{reader})
	if err != nil {
		b.Fatal(err)
	}
	defer obs.Close()
	mon, err := monitor.New(monitor.Config{Modules: []monitor.Module{w.mod}, PCSC: true})
	if err != nil {
		b.Fatal(err)
	}
	defer mon.Close()
	_, sub := mon.Subscribe()
	defer sub.Close()
	card := w.cards[0]

	var raw, monitored, added []time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		time.Sleep(time.Duration(rand.IntN(400)) * time.Millisecond)
		start := time.Now()
		if err := card.Insert(); err != nil {
			b.Fatal(err)
		}
		seen, err := obs.WaitFor(reader, func(c stack.ObservedChange) bool { return c.Present }, eventTimeout)
		if err != nil {
			b.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), eventTimeout)
		for {
			ev, err := sub.Next(ctx)
			if err != nil {
				cancel()
				b.Fatal(err)
			}
			if ev.Kind == monitor.TokenInserted {
				got := time.Now()
				raw = append(raw, seen.Time.Sub(start))
				monitored = append(monitored, got.Sub(start))
				added = append(added, got.Sub(seen.Time))
				break
			}
		}
		cancel()
		time.Sleep(time.Duration(rand.IntN(400)) * time.Millisecond)
		if err := card.Remove(); err != nil {
			b.Fatal(err)
		}
		if _, err := obs.WaitFor(reader, func(c stack.ObservedChange) bool { return !c.Present }, eventTimeout); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	q := func(ds []time.Duration, p float64) float64 {
		s := slices.Clone(ds)
		slices.Sort(s)
		return float64(s[int(p*float64(len(s)-1))].Microseconds()) / 1000
	}
	b.ReportMetric(q(raw, 0.5), "pcsc-median-ms")
	b.ReportMetric(q(raw, 0.9), "pcsc-p90-ms")
	b.ReportMetric(q(monitored, 0.5), "monitor-median-ms")
	b.ReportMetric(q(monitored, 0.9), "monitor-p90-ms")
	b.ReportMetric(q(added, 0.5), "added-median-ms")
	b.ReportMetric(q(added, 0.9), "added-p90-ms")
	b.ReportMetric(q(monitored, 0.5)/q(raw, 0.5), "monitor/pcsc-median")
}
