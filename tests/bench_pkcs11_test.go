package tests

import (
	"bufio"
	"context"
	"crypto/sha256"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/miekg/pkcs11"

	"github.com/slotwatch/slotwatch/pkcs11face/rpc"
	"github.com/slotwatch/slotwatch/tests/stack"
)

// BenchmarkPKCS11Face: the PKCS#11 face against p11-kit's own server on
// the same SoftHSM2 token, and against loading SoftHSM2 directly, in one
// run: a new client's first session (C_Initialize, which connects, then
// C_GetSlotList and C_OpenSession, then C_Finalize), round trips
// (C_GetSlotList + C_GetTokenInfo) and signatures (C_SignInit + C_Sign,
// ECDSA P-256, logged in) per second. Ratios are medians over the rounds.
// A first session is also timed against an in-memory server (the floor:
// what the client library and the protocol cost by themselves), so that
// what each server adds to it can be compared.
func BenchmarkPKCS11Face(b *testing.B) {
	hsm := hsmStore(b)
	for _, kv := range hsm.Env() {
		k, v, _ := strings.Cut(kv, "=")
		b.Setenv(k, v) // direct loading, in this process
	}
	bus, err := stack.StartDBus(b.TempDir(), "")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { bus.Stop() })
	dir, err := os.MkdirTemp(testDir, "p11b-")
	if err != nil {
		b.Fatal(err)
	}
	ours := filepath.Join(dir, "slotwatch")
	// SLOTWATCH_BENCH_CPUPROFILE=FILE: the daemon's CPU profile.
	benchDaemon(b, bus, append(hsm.Env(), "SLOTWATCH_CPUPROFILE="+os.Getenv("SLOTWATCH_BENCH_CPUPROFILE")), "--module", stack.SoftHSMModule, "--no-pcsc", "--pkcs11-socket", ours)
	theirs, theirPID := p11KitServer(b, hsm.Env(), filepath.Join(dir, "p11-kit"))
	floor := stubServer(b, filepath.Join(dir, "stub"))

	// Each client: a p11-kit-client.so instance pointed at a socket (the
	// client reads the address when it is loaded), or SoftHSM2 itself.
	load := func(socket string) *pkcs11.Ctx {
		path := stack.SoftHSMModule
		if socket != "" {
			os.Setenv("P11_KIT_SERVER_ADDRESS", "unix:path="+socket)
			path = stack.P11KitClientModule
		}
		p := pkcs11.New(path)
		if p == nil {
			b.Fatalf("cannot load %s", path)
		}
		return p
	}
	b.Cleanup(func() { os.Unsetenv("P11_KIT_SERVER_ADDRESS") })

	// A new client is a new process: each first session runs in a helper
	// process of its own (TestHelperFirstSessionProcess), which times it
	// from C_Initialize on; the process start and the module's loading
	// are the same for both servers and not counted.
	var stepInit, stepFind, stepOpen []float64 // slotwatch's first sessions, by step, in ms
	firstSession := func(socket string) time.Duration {
		cmd := exec.Command(os.Args[0], "-test.run=^TestHelperFirstSessionProcess$")
		cmd.Env = append(os.Environ(), "SLOTWATCH_HELPER_FIRST_SESSION=1", "P11_KIT_SERVER_ADDRESS=unix:path="+socket)
		out, err := cmd.Output()
		if err != nil {
			b.Fatalf("first session helper: %v\n%s", err, out)
		}
		var init, find, open float64
		if _, err := fmt.Sscanf(string(out), "first session %g %g %g", &init, &find, &open); err != nil {
			b.Fatalf("first session helper said %q: %v", out, err)
		}
		if socket == ours {
			stepInit, stepFind, stepOpen = append(stepInit, init), append(stepFind, find), append(stepOpen, open)
		}
		return time.Duration((init + find + open) * float64(time.Millisecond))
	}
	type client struct {
		p    *pkcs11.Ctx
		slot uint
		h    pkcs11.SessionHandle
		key  pkcs11.ObjectHandle
	}
	open := func(socket string) *client {
		p := load(socket)
		if err := p.Initialize(); err != nil {
			b.Fatal(err)
		}
		c := &client{p: p, slot: tokenSlot(b, p)}
		if c.h, err = p.OpenSession(c.slot, pkcs11.CKF_SERIAL_SESSION); err != nil {
			b.Fatal(err)
		}
		if err := p.Login(c.h, pkcs11.CKU_USER, hsmPIN); err != nil {
			b.Fatal(err)
		}
		if err := p.FindObjectsInit(c.h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY)}); err != nil {
			b.Fatal(err)
		}
		keys, _, err := p.FindObjects(c.h, 1)
		p.FindObjectsFinal(c.h)
		if err != nil || len(keys) != 1 {
			b.Fatalf("private key: %v %v", keys, err)
		}
		c.key = keys[0]
		b.Cleanup(func() { p.Logout(c.h); p.CloseSession(c.h); p.Finalize(); p.Destroy() })
		return c
	}
	clients := map[string]*client{"slotwatch": open(ours), "p11-kit": open(theirs), "direct": open("")}
	digest := sha256.Sum256([]byte("bench"))
	const calls = 500
	rate := func(f func() error) float64 { return callRate(b, calls, f) }
	roundTrip := func(c *client) func() error {
		return func() error {
			if _, err := c.p.GetSlotList(true); err != nil {
				return err
			}
			_, err := c.p.GetTokenInfo(c.slot)
			return err
		}
	}
	sign := func(c *client) func() error {
		return func() error {
			if err := c.p.SignInit(c.h, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_ECDSA, nil)}, c.key); err != nil {
				return err
			}
			_, err := c.p.Sign(c.h, digest[:])
			return err
		}
	}

	b.ResetTimer()
	var floorMS, overRatio []float64
	var firstOurs, firstTheirs, firstRatio, rtRatio, rtDirect, signRatio, signDirect, rtOurs, signOurs []float64
	for range b.N {
		// p11-kit server's child for the last client may still be
		// finalizing SoftHSM2: on two cores, that would be timed as
		// part of the next client's first session.
		waitNoChildren(b, theirPID)
		o := firstSession(ours)
		t := firstSession(theirs)
		waitNoChildren(b, theirPID)
		f := firstSession(floor)
		floorMS = append(floorMS, f.Seconds()*1000)
		overRatio = append(overRatio, (o-f).Seconds()/(t-f).Seconds())
		firstOurs, firstTheirs = append(firstOurs, o.Seconds()*1000), append(firstTheirs, t.Seconds()*1000)
		firstRatio = append(firstRatio, o.Seconds()/t.Seconds())
		rtO, rtT, rtD := rate(roundTrip(clients["slotwatch"])), rate(roundTrip(clients["p11-kit"])), rate(roundTrip(clients["direct"]))
		rtOurs, rtRatio, rtDirect = append(rtOurs, rtO), append(rtRatio, rtO/rtT), append(rtDirect, rtO/rtD)
		sO, sT, sD := rate(sign(clients["slotwatch"])), rate(sign(clients["p11-kit"])), rate(sign(clients["direct"]))
		signOurs, signRatio, signDirect = append(signOurs, sO), append(signRatio, sO/sT), append(signDirect, sO/sD)
	}
	b.StopTimer()
	b.ReportMetric(median(firstOurs), "first-session-ms")
	b.ReportMetric(median(firstTheirs), "first-session-p11kit-ms")
	b.ReportMetric(median(firstRatio), "first-session/p11kit")
	// The floor: the same client against a server that answers at once
	// from memory (the client library's own start, the connection, the
	// round trips); what each server adds to it, compared.
	b.ReportMetric(median(floorMS), "first-session-floor-ms")
	b.ReportMetric(median(overRatio), "first-session-over-floor/p11kit")
	b.ReportMetric(median(stepInit), "first-session-initialize-ms")
	b.ReportMetric(median(stepFind), "first-session-slots-tokens-ms")
	b.ReportMetric(median(stepOpen), "first-session-open-ms")
	b.ReportMetric(median(rtOurs), "roundtrips/s")
	b.ReportMetric(median(rtRatio), "roundtrips/p11kit")
	b.ReportMetric(median(rtDirect), "roundtrips/direct")
	b.ReportMetric(median(signOurs), "signs/s")
	b.ReportMetric(median(signRatio), "signs/p11kit")
	b.ReportMetric(median(signDirect), "signs/direct")
}

// stubServer serves p11-kit's protocol on socket from memory — two slots,
// the benchmark's token in the first — with slotwatch's rpc package and
// nothing behind it: the floor of a first session.
func stubServer(b *testing.B, socket string) string {
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: socket, Net: "unix"})
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	b.Cleanup(func() { cancel(); l.Close(); <-done })
	go func() {
		defer close(done)
		var conns sync.WaitGroup
		defer conns.Wait()
		for {
			c, err := l.AcceptUnix()
			if err != nil {
				return
			}
			conns.Add(1)
			go func() {
				defer conns.Done()
				rpc.Serve(ctx, c, stubToken{}, rpc.Options{Logger: slog.New(slog.DiscardHandler)})
			}()
		}
	}()
	return socket
}

// stubToken answers the calls of a first session from memory.
type stubToken struct{ rpc.Unsupported }

func (stubToken) GetSlotList(context.Context, bool) ([]uint, error) { return []uint{0, 1}, nil }
func (stubToken) GetTokenInfo(_ context.Context, slot uint) (pkcs11.TokenInfo, error) {
	if slot == 0 {
		return pkcs11.TokenInfo{Label: hsmLabel}, nil
	}
	return pkcs11.TokenInfo{Label: "other"}, nil
}
func (stubToken) OpenSession(context.Context, uint, uint) (pkcs11.SessionHandle, error) {
	return 1, nil
}
func (stubToken) CloseSession(context.Context, pkcs11.SessionHandle) error { return nil }

// TestHelperFirstSessionProcess is one new client of BenchmarkPKCS11Face:
// it loads p11-kit-client.so (P11_KIT_SERVER_ADDRESS names the server),
// times C_Initialize, finding the token (C_GetSlotList, C_GetTokenInfo)
// and C_OpenSession, and prints "first session INIT FIND OPEN" in ms.
func TestHelperFirstSessionProcess(t *testing.T) {
	if os.Getenv("SLOTWATCH_HELPER_FIRST_SESSION") == "" {
		t.Skip("only runs as a helper process of BenchmarkPKCS11Face")
	}
	p := pkcs11.New(stack.P11KitClientModule)
	if p == nil {
		fmt.Println("error cannot load", stack.P11KitClientModule)
		os.Exit(1)
	}
	start := time.Now()
	err := p.Initialize()
	t1 := time.Now()
	var slot uint
	if err == nil {
		slot, err = slotOfToken(p, hsmLabel)
	}
	t2 := time.Now()
	var h pkcs11.SessionHandle
	if err == nil {
		h, err = p.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION)
	}
	t3 := time.Now()
	if err != nil {
		fmt.Println("error", err)
		os.Exit(1)
	}
	ms := func(d time.Duration) float64 { return d.Seconds() * 1000 }
	fmt.Printf("first session %.4f %.4f %.4f\n", ms(t1.Sub(start)), ms(t2.Sub(t1)), ms(t3.Sub(t2)))
	p.CloseSession(h)
	p.Finalize()
	os.Exit(0)
}

// tokenSlot is the slot of the benchmark's token.
func tokenSlot(b *testing.B, p *pkcs11.Ctx) uint {
	slot, err := slotOfToken(p, hsmLabel)
	if err != nil {
		b.Fatal(err)
	}
	return slot
}

// waitNoChildren waits until `p11-kit server` (pid) has no client
// processes: p11-kit runs its server program as a child, which forks one
// process per client.
func waitNoChildren(b *testing.B, pid int) {
	children := func(pid string) []string {
		kids, err := os.ReadFile(fmt.Sprintf("/proc/%s/task/%s/children", pid, pid))
		if err != nil {
			return nil // gone
		}
		return strings.Fields(string(kids))
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(200 * time.Microsecond) {
		var clients []string
		for _, server := range children(fmt.Sprint(pid)) {
			clients = append(clients, children(server)...)
		}
		if len(clients) == 0 {
			return
		}
		if time.Now().After(deadline) {
			b.Fatalf("p11-kit server's client processes did not exit: %v", clients)
		}
	}
}

// p11KitServer runs `p11-kit server` (foreground) on the token, on socket,
// and returns the socket once it is there, and the server's PID; cleanup
// stops it by PID.
func p11KitServer(b *testing.B, env []string, socket string) (string, int) {
	cmd := exec.Command("p11-kit", "server", "-f", "--provider", stack.SoftHSMModule, "-n", socket,
		"pkcs11:token="+strings.ReplaceAll(hsmLabel, " ", "%20"))
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { cmd.Process.Signal(syscall.SIGTERM); cmd.Wait() })
	go func() {
		r := bufio.NewScanner(out)
		for r.Scan() {
		}
	}()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if st, err := os.Stat(socket); err == nil && st.Mode().Type() == os.ModeSocket {
			return socket, cmd.Process.Pid
		}
		if time.Now().After(deadline) {
			b.Fatal("p11-kit server did not make its socket")
		}
		time.Sleep(10 * time.Millisecond)
	}
}
