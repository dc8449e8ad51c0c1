package module

import (
	"context"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestWaitForSlotEventSoftHSM(t *testing.T) {
	m := openSoftHSM(t, Options{})
	if _, err := m.WaitForSlotEvent(false); !errors.Is(err, ErrFunctionNotSupported) {
		t.Errorf("blocking wait = %v, want ErrFunctionNotSupported", err)
	}
	if _, err := m.WaitForSlotEvent(true); !errors.Is(err, ErrNoEvent) {
		t.Errorf("polling wait = %v, want ErrNoEvent", err)
	}
}

// OpenSC with no pcscd reachable (TestMain points PCSCLITE_CSOCK_NAME at a
// socket that does not exist): it initializes and lists no slots, polling
// says CKR_NO_EVENT, and a blocking wait does not block — it fails at once
// with CKR_GENERAL_ERROR (seen with OpenSC 0.23), a module failure.
func TestOpenSCWithoutPCSCD(t *testing.T) {
	m := Open(openSCModule, Options{Name: "opensc"})
	if err := m.Initialize(); err != nil {
		t.Fatalf("Initialize: %v", err)
	}
	defer finalizeAll(m)
	info, err := m.Info()
	if err != nil || info.Manufacturer != "OpenSC Project" {
		t.Fatalf("Info = %+v, %v", info, err)
	}
	for _, present := range []bool{false, true} {
		slots, err := m.SlotList(present)
		if err != nil || len(slots) != 0 {
			t.Errorf("SlotList(%v) = %v, %v; want no slots", present, slots, err)
		}
	}
	if _, err := m.WaitForSlotEvent(true); !errors.Is(err, ErrNoEvent) {
		t.Errorf("polling wait = %v, want ErrNoEvent", err)
	}
	start := time.Now()
	_, err = m.WaitForSlotEvent(false)
	took := time.Since(start)
	t.Logf("blocking wait without pcscd: %v after %v", err, took)
	if !errors.Is(err, ErrGeneralError) || !IsModuleFailure(err) || took > time.Second {
		t.Errorf("blocking wait without pcscd = %v after %v, want CKR_GENERAL_ERROR at once", err, took)
	}
	if err := m.Finalize(); err != nil {
		t.Fatal(err)
	}
	if err := m.Initialize(); err != nil {
		t.Fatalf("Initialize again: %v", err)
	}
	if _, err := m.SlotList(false); err != nil {
		t.Errorf("SlotList after reinit: %v", err)
	}
}

// childEnv marks a re-run of the test binary in a process of its own, for
// tests that need a PC/SC environment different from TestMain's (libpcsclite
// reads PCSCLITE_CSOCK_NAME once per process).
const childEnv = "SLOTWATCH_MODULE_TEST_CHILD"

// A wait blocked in OpenSC (private pcscd with no readers, so nothing ever
// happens) is unblocked by the last Finalize from another goroutine, with
// ErrNotInitialized, and the library is unloaded once the wait has let go of
// it. Twice, to show the module loads and waits again afterwards.
func TestOpenSCFinalizeUnblocksWait(t *testing.T) {
	if os.Getenv(childEnv) == "" {
		sock := startPCSCD(t)
		runChild(t, "TestOpenSCFinalizeUnblocksWait", "PCSCLITE_CSOCK_NAME="+sock)
		return
	}

	m := Open(openSCModule, Options{Name: "opensc"})
	defer finalizeAll(m)
	for round := range 2 {
		if err := m.Initialize(); err != nil {
			t.Fatalf("Initialize: %v", err)
		}
		type result struct {
			err error
			at  time.Time
		}
		done := make(chan result, 1)
		go func() {
			_, err := m.WaitForSlotEvent(false)
			done <- result{err, time.Now()}
		}()
		select {
		case r := <-done:
			t.Fatalf("round %d: wait returned before Finalize: %v", round, r.err)
		case <-time.After(500 * time.Millisecond):
		}
		finalized := time.Now()
		if err := m.Finalize(); err != nil {
			t.Fatalf("Finalize: %v", err)
		}
		select {
		case r := <-done:
			t.Logf("round %d: wait returned %v after Finalize: %v", round, r.at.Sub(finalized), r.err)
			if !errors.Is(r.err, ErrNotInitialized) {
				t.Errorf("wait = %v, want ErrNotInitialized", r.err)
			}
		case <-time.After(2 * time.Second):
			t.Fatal("wait still blocked 2 s after the last Finalize")
		}
		if lib, ok := refLoaded(openSCModule); ok {
			lib.release()
			t.Errorf("round %d: library still loaded after Finalize and the wait's return", round)
		}
	}
}

// startPCSCD runs a private pcscd with no readers on a socket of its own and
// returns the socket's path. pcscd 1.9.9 ignores PCSCLITE_CSOCK_NAME, so the
// socket is handed over the systemd way (fd 3, LISTEN_FDS, LISTEN_PID).
// Cleanup stops it by its pid. (pcscd still writes /run/pcscd/pcscd.pid.)
func startPCSCD(t *testing.T) string {
	t.Helper()
	const pcscd = "/usr/sbin/pcscd"
	if _, err := os.Stat(pcscd); err != nil {
		t.Fatalf("pcscd is not installed (make deps): %v", err)
	}
	dir := t.TempDir()
	readers := filepath.Join(dir, "reader.conf.d") // empty: no readers
	if err := os.Mkdir(readers, 0o755); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "pcscd.comm")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false) // the socket file outlives our copy of the fd
	f, err := l.File()
	l.Close()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	// LISTEN_PID must be pcscd's own pid: the shell's $$, kept by exec.
	cmd := exec.Command("/bin/sh", "-c", `export LISTEN_PID=$$ LISTEN_FDS=1; exec "$0" --foreground -c "$1"`, pcscd, readers)
	cmd.ExtraFiles = []*os.File{f} // fd 3
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "LISTEN_") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	var log strings.Builder
	cmd.Stdout, cmd.Stderr = &log, &log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(5 * time.Second):
			cmd.Process.Kill()
			<-exited
		}
		if t.Failed() {
			t.Logf("pcscd output:\n%s", log.String())
		}
	})
	return sock
}

// runChild runs one test of this binary in a child process with extra
// environment and fails if it fails.
func runChild(t *testing.T, test string, env ...string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^"+test+"$", "-test.v", "-test.count=1")
	cmd.Env = append(append(os.Environ(), childEnv+"=1"), env...)
	out, err := cmd.CombinedOutput()
	t.Logf("child process:\n%s", out)
	if err != nil {
		t.Fatalf("child process: %v", err)
	}
}
