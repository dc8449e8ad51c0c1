package main

import (
	"fmt"
	"syscall"
)

// prctl(2) options (linux/prctl.h); the syscall package does not name them.
const (
	prGetDumpable = 3 // PR_GET_DUMPABLE
	prSetDumpable = 4 // PR_SET_DUMPABLE
)

// hardenProcess keeps this process's memory to itself. PINs (Login,
// InitToken, InitPIN, SetPIN) and the session state of every client pass
// through the daemon's memory and the memory of the PKCS#11 modules it
// loads, and no module promises to wipe what it was given. So:
//
//   - The process is made non-dumpable (prctl PR_SET_DUMPABLE 0): another
//     process of the same user can no longer ptrace(2) it, read
//     /proc/PID/mem or /proc/PID/environ, or use process_vm_readv(2) on it
//     (all need ptrace access, which the kernel refuses for a non-dumpable
//     target without CAP_SYS_PTRACE), and the kernel writes no core dump
//     of it.
//   - RLIMIT_CORE is 0, soft and hard: no core file where fs.suid_dumpable
//     = 2 would still dump a non-dumpable process (the kernel honours the
//     limit for core files; systemd-coredump, behind a core_pattern pipe,
//     honours it too and keeps no core), and none of the helper processes
//     it starts (p11-kit remote for isolate = true), which inherit the
//     limit but not the non-dumpable flag (execve resets that). The hard
//     limit cannot be raised again without privilege, so a module cannot
//     undo it.
//
// Call it first thing in serve, before any module is loaded. It uses only
// the standard library's syscall package. systemd's LimitCORE=0 in the
// packaged units does the same for the limit; this covers starts outside
// systemd (a plain `slotwatch serve`, D-Bus activation without systemd).
func hardenProcess() error {
	if _, _, errno := syscall.RawSyscall(syscall.SYS_PRCTL, prSetDumpable, 0, 0); errno != 0 {
		return fmt.Errorf("hardening: prctl(PR_SET_DUMPABLE, 0): %w", errno)
	}
	if err := syscall.Setrlimit(syscall.RLIMIT_CORE, &syscall.Rlimit{Cur: 0, Max: 0}); err != nil {
		return fmt.Errorf("hardening: setrlimit(RLIMIT_CORE, 0): %w", err)
	}
	return nil
}
