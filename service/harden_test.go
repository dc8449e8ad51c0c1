package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"
)

// hardenChildEnv makes the test binary, re-executed by TestHardenProcess,
// run hardenProcess in that child instead of the test: the flag and the
// limit it sets last for the process, and must not leak into the other
// tests of this one.
const hardenChildEnv = "SLOTWATCH_TEST_HARDEN_CHILD"

// TestHardenProcess runs hardenProcess in a child process, which then
// reports what it sees of itself: prctl(PR_GET_DUMPABLE) is 0 (it was 1),
// RLIMIT_CORE is 0 soft and hard, and /proc/self/limits says so. From the
// outside, a process of the same user without CAP_SYS_PTRACE can no longer
// read the child's /proc/PID/environ (which needs the same ptrace access
// as /proc/PID/mem); as root, which has that capability, that part is
// skipped.
func TestHardenProcess(t *testing.T) {
	if os.Getenv(hardenChildEnv) != "" {
		hardenChild()
		return
	}

	cmd := exec.Command(os.Args[0], "-test.run=^TestHardenProcess$", "-test.count=1")
	cmd.Env = append(os.Environ(), hardenChildEnv+"=1")
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// One goroutine reads the child's stdout to the end and then reaps it
	// (Wait only after the last read from the pipe).
	lines := make(chan string, 100)
	done := make(chan struct{})
	var waitErr error
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
		waitErr = cmd.Wait()
		close(done)
	}()
	t.Cleanup(func() {
		stdin.Close()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-done
			t.Errorf("the hardened child (pid %d) did not exit within 10 s of its stdin closing", cmd.Process.Pid)
		}
	})

	// The child prints its findings, then "hardened", and waits for its
	// stdin to close: it is still running while this side looks at it.
	var report []string
	for hardened := false; !hardened; {
		select {
		case l, ok := <-lines:
			switch {
			case !ok:
				<-done
				t.Fatalf("the child ended before it was hardened: %v\nstdout:\n%s\nstderr:\n%s",
					waitErr, strings.Join(report, "\n"), stderr.String())
			case l == "hardened":
				hardened = true
			default:
				report = append(report, l)
			}
		case <-time.After(time.Minute):
			t.Fatalf("no report from the child within a minute\nstdout:\n%s", strings.Join(report, "\n"))
		}
	}
	for _, l := range report {
		if strings.HasPrefix(l, "FAIL ") {
			t.Error(strings.TrimPrefix(l, "FAIL "))
		} else {
			t.Log(l)
		}
	}

	pid := cmd.Process.Pid
	if os.Geteuid() == 0 {
		t.Logf("running as root (CAP_SYS_PTRACE): not checking that /proc/%d/environ is closed to the same user", pid)
	} else {
		_, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
		if !errors.Is(err, fs.ErrPermission) {
			t.Errorf("reading the hardened child's /proc/%d/environ as the same user: %v, want a permission error", pid, err)
		}
	}

	stdin.Close()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatalf("the hardened child (pid %d) did not exit within 10 s of its stdin closing", pid)
	}
	for range lines { // the test framework's own lines ("PASS")
	}
	if waitErr != nil {
		t.Errorf("the hardened child: %v\nstderr:\n%s", waitErr, stderr.String())
	}
}

// hardenChild is the child's side of TestHardenProcess. It prints one
// line per finding ("FAIL ..." for a wrong one), then "hardened", and
// waits for its stdin to close.
func hardenChild() {
	dumpable := func() uintptr {
		v, _, errno := syscall.RawSyscall(syscall.SYS_PRCTL, prGetDumpable, 0, 0)
		if errno != 0 {
			fmt.Printf("FAIL prctl(PR_GET_DUMPABLE): %v\n", errno)
		}
		return v
	}
	if before := dumpable(); before != 1 {
		fmt.Printf("FAIL dumpable before hardenProcess = %d, want 1 (the check below would prove nothing)\n", before)
	}
	if err := hardenProcess(); err != nil {
		fmt.Printf("FAIL hardenProcess: %v\n", err)
	}
	if after := dumpable(); after != 0 {
		fmt.Printf("FAIL dumpable after hardenProcess = %d, want 0\n", after)
	} else {
		fmt.Println("prctl(PR_GET_DUMPABLE) = 0")
	}
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_CORE, &rl); err != nil {
		fmt.Printf("FAIL getrlimit(RLIMIT_CORE): %v\n", err)
	} else if rl.Cur != 0 || rl.Max != 0 {
		fmt.Printf("FAIL RLIMIT_CORE = %d soft, %d hard, want 0 and 0\n", rl.Cur, rl.Max)
	} else {
		fmt.Println("RLIMIT_CORE = 0 soft, 0 hard")
	}
	// The kernel's own view: "Max core file size  0  0  bytes".
	if b, err := os.ReadFile("/proc/self/limits"); err != nil {
		fmt.Printf("FAIL /proc/self/limits: %v\n", err)
	} else {
		found := false
		for _, l := range strings.Split(string(b), "\n") {
			if rest, ok := strings.CutPrefix(l, "Max core file size"); ok {
				found = true
				if f := strings.Fields(rest); len(f) < 2 || f[0] != "0" || f[1] != "0" {
					fmt.Printf("FAIL /proc/self/limits: %q, want 0 0\n", l)
				}
			}
		}
		if !found {
			fmt.Println("FAIL /proc/self/limits has no \"Max core file size\" line")
		}
	}
	// Idempotent: serve may be started by something that hardened already.
	if err := hardenProcess(); err != nil {
		fmt.Printf("FAIL hardenProcess a second time: %v\n", err)
	}
	fmt.Println("hardened")
	io.Copy(io.Discard, os.Stdin)
}
