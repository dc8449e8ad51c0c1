package broker

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/slotwatch/slotwatch/module"
	"github.com/slotwatch/slotwatch/monitor"
	"github.com/slotwatch/slotwatch/tests/faultmod"
	"github.com/slotwatch/slotwatch/tests/stack"
)

// The broker's tests load the fault-injection module in this process
// (one instance per process: its tokens outlive every test) and run the
// real monitor over it, without PC/SC. Each test puts the tokens it needs
// into slots of its own and removes them at the end.

const (
	fmSlots = 8
	fmPIN   = "1234" // faultmod's user and SO PIN unless set
)

var (
	fmSocket string
	hsmErr   error // why there is no SoftHSM2 store (the SoftHSM2 test says it)
)

// The SoftHSM2 store of this process: SoftHSM reads SOFTHSM2_CONF once,
// at its first C_Initialize.
const (
	hsmLabel = "broker hsm"
	hsmSO    = "55667788"
	hsmPIN   = "135792"
)

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "slotwatch-broker-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmSocket = filepath.Join(dir, "faultmod.sock")
	for _, kv := range faultmod.Env(fmSocket, fmSlots) {
		k, v, _ := strings.Cut(kv, "=")
		os.Setenv(k, v)
	}
	hsm, err := stack.NewSoftHSM(filepath.Join(dir, "softhsm"))
	if err == nil {
		err = hsm.InitToken(hsmLabel, hsmSO, hsmPIN)
	}
	if err == nil {
		err = hsm.GenerateECKey(hsmLabel, hsmPIN, "01", "signing key")
	}
	if err == nil {
		os.Setenv("SOFTHSM2_CONF", hsm.Conf)
	}
	hsmErr = err
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// rig is a broker over a monitor over faultmod, as the daemon wires them,
// with the face's part played by the test: TokenGone on every removal, and
// an observer that records what a face would be told.
type rig struct {
	t    *testing.T
	b    *Broker
	mon  *monitor.Monitor
	ctl  *faultmod.Control
	obs  *recorder
	stop chan struct{}
	done chan struct{}
}

// newRig starts the broker with tokens in the given slots (label and
// serial "tN" for slot N).
func newRig(t *testing.T, limits Limits, slots ...uint) *rig {
	t.Helper()
	return newRigWith(t, limits, nil, slots...)
}

// newRigWith is newRig with more modules watched next to faultmod.
func newRigWith(t *testing.T, limits Limits, extra []*module.Module, slots ...uint) *rig {
	t.Helper()
	path, err := faultmod.Path()
	if err != nil {
		t.Fatalf("the fault module is not built (make faultmod): %v", err)
	}
	mod := module.Open(path, module.Options{Name: "faultmod"})
	// The control socket exists once the module was loaded in this process.
	if err := mod.Initialize(); err != nil {
		t.Fatal(err)
	}
	ctl, err := faultmod.DialTimeout(fmSocket, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if err := ctl.Reset(); err != nil {
		t.Fatal(err)
	}
	if err := ctl.ClearCalls(); err != nil {
		t.Fatal(err)
	}
	for _, s := range slots {
		ctl.Remove(s) // left over from a failed test, or not there
		if err := ctl.Insert(s, fmt.Sprintf("t%d", s), fmt.Sprintf("t%d", s)); err != nil {
			t.Fatal(err)
		}
		if err := ctl.SetPIN(s, fmPIN); err != nil {
			t.Fatal(err)
		}
	}
	watched := []monitor.Module{mod}
	for _, m := range extra {
		watched = append(watched, m)
	}
	mon, err := monitor.New(monitor.Config{Modules: watched})
	if err != nil {
		t.Fatal(err)
	}
	mod.Finalize() // the monitor holds its own reference
	r := &rig{t: t, mon: mon, ctl: ctl, obs: &recorder{}, stop: make(chan struct{}), done: make(chan struct{})}
	r.b = New(mon, module.NewSet(append([]*module.Module{mod}, extra...)...), Options{Limits: limits, Observer: r.obs, ResumeLogin: true})
	snap, sub := mon.Subscribe()
	go func() {
		defer close(r.done)
		for {
			ev, err := sub.Next(context.Background())
			if err != nil {
				return
			}
			// What dbusapi does with the token events.
			switch {
			case ev.Kind == monitor.TokenRemoved && ev.Outage:
				r.b.TokenAway(ev.Token.Generation)
			case ev.Kind == monitor.TokenRemoved:
				r.b.TokenGone(ev.Token.Generation)
			case ev.Kind == monitor.TokenInserted:
				r.b.TokenBack(ev.Token)
			case ev.Kind == monitor.TokenLost:
				r.b.TokenLost(ev.Token.Generation)
			}
		}
	}()
	t.Cleanup(func() {
		r.b.Close()
		ctl.Reset()
		for _, s := range slots {
			ctl.Remove(s)
		}
		sub.Close()
		mon.Close()
		<-r.done
		ctl.Close()
	})
	_ = snap
	for _, s := range slots {
		r.gen(s) // every token is in the view before the test starts
	}
	return r
}

// gen waits for a token in slot and returns its generation.
func (r *rig) gen(slot uint) uint64 {
	r.t.Helper()
	var gen uint64
	r.waitFor(fmt.Sprintf("a token in slot %d", slot), func() bool {
		s, ok := r.mon.Snapshot().Slot(monitor.SlotKey{Module: "faultmod", ID: slot})
		if ok && s.Token != nil {
			gen = s.Token.Generation
			return true
		}
		return false
	})
	return gen
}

// genOf waits for the token labelled label and returns its generation.
func (r *rig) genOf(label string) uint64 {
	r.t.Helper()
	var gen uint64
	r.waitFor("token "+label, func() bool {
		for _, t := range r.mon.Snapshot().Tokens() {
			if t.Label == label {
				gen = t.Generation
				return true
			}
		}
		return false
	})
	return gen
}

// waitFor polls cond until it holds, for at most 10 s.
func (r *rig) waitFor(what string, cond func() bool) {
	r.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			r.t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// lockState reports the token lock of gen: readers, writer, waiting writers.
func (r *rig) lockState(gen uint64) (readers int, writer bool, waiting int) {
	r.b.mu.Lock()
	ts, ok := r.b.tokens[gen]
	r.b.mu.Unlock()
	if !ok {
		return 0, false, 0
	}
	ts.lock.mu.Lock()
	defer ts.lock.mu.Unlock()
	return ts.lock.readers, ts.lock.writer, ts.lock.waitingWriters
}

// caller joins a caller named name.
func (r *rig) caller(name string) Caller {
	c := Caller{ID: ":" + name, PID: uint32(os.Getpid()), Command: name}
	r.b.Join(c)
	return c
}

func (r *rig) open(c Caller, gen uint64, rw bool) SessionInfo {
	r.t.Helper()
	s, err := r.b.OpenSession(c, gen, rw)
	if err != nil {
		r.t.Fatalf("%s OpenSession: %v", c.ID, err)
	}
	return s
}

// calls returns faultmod's call record of function fn (all if "").
func (r *rig) calls(fn string) []faultmod.Call {
	r.t.Helper()
	all, err := r.ctl.Calls()
	if err != nil {
		r.t.Fatal(err)
	}
	var out []faultmod.Call
	for _, c := range all {
		if fn == "" || c.Func == fn {
			out = append(out, c)
		}
	}
	return out
}

// recorder is an Observer that keeps what it was told, in order.
type recorder struct {
	mu     sync.Mutex
	events []string
}

func (o *recorder) add(format string, args ...any) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.events = append(o.events, fmt.Sprintf(format, args...))
}

func (o *recorder) SessionOpened(s SessionInfo) { o.add("opened %d state %d", s.ID, s.State) }
func (o *recorder) SessionChanged(s SessionInfo) {
	o.add("changed %d state %d", s.ID, s.State)
}
func (o *recorder) SessionClosed(s SessionInfo, why string) { o.add("closed %d (%s)", s.ID, why) }

func (o *recorder) of(id uint64) []string {
	o.mu.Lock()
	defer o.mu.Unlock()
	var out []string
	for _, e := range o.events {
		f := strings.Fields(e)
		if len(f) > 1 && f[1] == fmt.Sprint(id) {
			out = append(out, e)
		}
	}
	return out
}
