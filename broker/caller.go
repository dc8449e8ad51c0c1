package broker

import (
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// Caller is who is calling, as the face established it at its boundary (a
// D-Bus connection's unique name and credentials, a socket's SO_PEERCRED).
// The broker trusts it: every ownership rule is keyed on ID.
//
// A pid alone is not an identity (pids are recycled), so a caller is its ID
// — unique for the daemon's life: bus unique names are never reused — and
// the pid, uid, command line and process start time are what people are
// shown.
type Caller struct {
	ID        string // ":1.42" on D-Bus; unique for the daemon's life
	UID       uint32
	PID       uint32 // 0 if unknown
	Command   string // the process's program (argv[0], no arguments), "" if unknown
	StartTime uint64 // the process's start time in clock ticks since boot (/proc/PID/stat), 0 if unknown
}

// ProcessCaller returns the Caller with id for the process pid of user uid,
// with its program and start time read from /proc (left empty when the
// process is gone or unreadable).
func ProcessCaller(id string, uid, pid uint32) Caller {
	c := Caller{ID: id, UID: uid, PID: pid}
	if pid == 0 {
		return c
	}
	if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid)); err == nil {
		// The program only, not its arguments: a command line may hold
		// secrets (pkcs11-tool --pin 1234), and Command goes to the log
		// and, naming a holder, to other clients.
		prog, _, _ := bytes.Cut(b, []byte{0})
		c.Command = strings.TrimSpace(string(prog))
	}
	c.StartTime = processStartTime(pid)
	return c
}

// processStartTime reads field 22 of /proc/PID/stat. The command (field 2)
// may hold blanks and parentheses, so fields are counted after its last ')'.
func processStartTime(pid uint32) uint64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0
	}
	fields := strings.Fields(string(b[i+1:]))
	// After ")" come field 3 (state) onwards: field 22 is index 19.
	if len(fields) < 20 {
		return 0
	}
	t, _ := strconv.ParseUint(fields[19], 10, 64)
	return t
}

// String names the caller for people: "ID (pid N, command)".
func (c Caller) String() string {
	if c.PID == 0 {
		return c.ID
	}
	cmd := c.Command
	if cmd == "" {
		cmd = "?"
	}
	return fmt.Sprintf("%s (pid %d, %s)", c.ID, c.PID, cmd)
}
