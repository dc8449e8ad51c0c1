package main

// The command-line client: list, monitor, sessions, init-token. It talks to
// the daemon over D-Bus only; it never loads a PKCS#11 module and never
// talks to pcscd.

import (
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"

	godbus "github.com/godbus/dbus/v5"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/slotwatch/slotwatch/dbusapi"
)

// Exit codes of the client commands.
const (
	exitOK            = 0
	exitFailure       = 1  // a D-Bus error, or another failure
	exitNotRunning    = 2  // the daemon is not running (and cannot be activated), or left the bus
	exitSessionsExist = 3  // init-token: sessions are open on the token (see --force)
	exitUsage         = 64 // bad arguments (EX_USAGE of sysexits.h)
)

// exitError is an error that carries the process's exit code. Its message
// is complete: writeError prints it as it is, without a prefix. An empty
// message means that everything was already said.
type exitError struct {
	code int
	msg  string
	err  error // the cause, if any
}

func (e *exitError) Error() string {
	if e.msg == "" && e.err != nil {
		return e.err.Error()
	}
	return e.msg
}

func (e *exitError) Unwrap() error { return e.err }

// writeError prints err for the user on w and returns the exit code main
// should exit with (run in cli.go). Errors other than exitError are
// printed as "slotwatch COMMAND: error" and exit 1; -h/--help exits 0.
func writeError(w io.Writer, cmd string, err error) int {
	if err == nil {
		return exitOK
	}
	if errors.Is(err, flag.ErrHelp) || errors.Is(err, pflag.ErrHelp) {
		return exitOK
	}
	var ee *exitError
	if errors.As(err, &ee) {
		if ee.msg != "" {
			fmt.Fprintln(w, strings.TrimRight(ee.msg, "\n"))
		}
		return ee.code
	}
	fmt.Fprintf(w, "slotwatch %s: %v\n", cmd, err)
	return exitFailure
}

// usageError is a bad command line: the message and a pointer to -h.
func usageError(cmd, format string, args ...any) error {
	return &exitError{code: exitUsage, msg: fmt.Sprintf("slotwatch %s: %s\nRun \"slotwatch %s -h\" for its options.", cmd, fmt.Sprintf(format, args...), cmd)}
}

// failure is any other error of a command, exit code 1.
func failure(cmd, format string, args ...any) error {
	return &exitError{code: exitFailure, msg: fmt.Sprintf("slotwatch %s: %s", cmd, fmt.Sprintf(format, args...))}
}

// notRunningMessage is what every command says when nobody owns the bus
// name and the bus cannot activate it.
func notRunningMessage(address string) string {
	return fmt.Sprintf("slotwatch: the daemon is not running on %s (start it with `slotwatch serve` or `systemctl --user start slotwatch`)", address)
}

func notRunning(address string) error {
	return &exitError{code: exitNotRunning, msg: notRunningMessage(address)}
}

// clientFlags are the options every client command has.
type clientFlags struct {
	address string
	json    bool
}

// clientDescriptions say what each client command does, in its --help.
var clientDescriptions = map[string]string{
	"list":       "Shows the daemon's readers, slots, tokens, modules and sessions. A D-Bus client of\n`slotwatch serve`: it loads no module itself.",
	"sessions":   "Shows who holds which PKCS#11 session through the daemon. A D-Bus client of\n`slotwatch serve`.",
	"monitor":    "Prints the daemon's events as they happen, the current view first. A D-Bus client\nof `slotwatch serve`: it sees what every other client of the daemon sees, and\nloads no module itself. (`slotwatch watch` runs a monitor in its own process\ninstead; both print the same JSON.)",
	"init-token": "Initializes a token (C_InitToken) through the daemon. A D-Bus client of\n`slotwatch serve`.",
}

// newClientCmd is the cobra.Command of a client command, named by the
// first word of synopsis, with --address (and --json if withJSON) bound
// to cf. A bad option or any positional argument is exit code 64 with a
// pointer to -h; the caller sets RunE and adds its own flags.
func newClientCmd(synopsis, short string, cf *clientFlags, withJSON bool) *cobra.Command {
	name, _, _ := strings.Cut(synopsis, " ")
	codes := "2 the daemon is not running, 64 bad arguments."
	if name == "init-token" {
		codes = "2 the daemon is not running, 3 sessions are open on the token (see --force),\n64 bad arguments."
	}
	cmd := &cobra.Command{
		Use:                   synopsis,
		Short:                 short,
		Long:                  clientDescriptions[name] + "\n\nExit status: 0 success, 1 error (a D-Bus error is printed with its name),\n" + codes,
		GroupID:               groupClients,
		DisableFlagsInUseLine: true,
		Args:                  noArgs(exitUsage),
		ValidArgsFunction:     cobra.NoFileCompletions,
	}
	cmd.SetFlagErrorFunc(flagErrorFunc(exitUsage))
	cmd.Flags().StringVar(&cf.address, "address", "", "connect to the daemon on the bus at `BUS`, a D-Bus address (default: the session bus, DBUS_SESSION_BUS_ADDRESS)")
	if withJSON {
		cmd.Flags().BoolVar(&cf.json, "json", false, "print JSON (lower_snake_case keys) instead of text")
	}
	return cmd
}

// client is a connection to the bus the daemon is on.
type client struct {
	cmd     string
	conn    *godbus.Conn
	address string // for messages
}

// dialDaemon connects to address (or the session bus) and checks that the
// daemon is running or can be activated.
func dialDaemon(cmd, address string) (*client, error) {
	c, err := dialBus(cmd, address)
	if err != nil {
		return nil, err
	}
	if err := c.checkRunning(); err != nil {
		c.conn.Close()
		return nil, err
	}
	return c, nil
}

// dialBus connects to address, or with an empty address to the session
// bus. Signals are delivered in order.
func dialBus(cmd, address string) (*client, error) {
	opts := []godbus.ConnOption{godbus.WithSignalHandler(godbus.NewSequentialSignalHandler())}
	var conn *godbus.Conn
	var err error
	shown := address
	if address != "" {
		conn, err = godbus.Connect(address, opts...)
	} else {
		conn, err = godbus.ConnectSessionBus(opts...)
		// ConnectSessionBus sets the variable when it found the bus
		// another way (XDG_RUNTIME_DIR/bus).
		shown = os.Getenv("DBUS_SESSION_BUS_ADDRESS")
		if shown == "" {
			shown = "the session bus"
		}
	}
	if err != nil {
		where := "the bus at " + shown
		if address == "" && os.Getenv("DBUS_SESSION_BUS_ADDRESS") == "" {
			where = "the session bus (DBUS_SESSION_BUS_ADDRESS is not set)"
		}
		return nil, &exitError{code: exitNotRunning, err: err,
			msg: fmt.Sprintf("slotwatch: cannot connect to %s: %v\n%s", where, err, notRunningMessage(shown))}
	}
	return &client{cmd: cmd, conn: conn, address: shown}, nil
}

func (c *client) close() { c.conn.Close() }

// checkRunning fails with exit code 2 when the bus name has no owner and
// the bus cannot start it (so activation works when slotwatch is
// installed).
func (c *client) checkRunning() error {
	var has bool
	if err := c.conn.BusObject().Call("org.freedesktop.DBus.NameHasOwner", 0, dbusapi.BusName).Store(&has); err != nil {
		return c.dbusError(err)
	}
	if has {
		return nil
	}
	var names []string
	if err := c.conn.BusObject().Call("org.freedesktop.DBus.ListActivatableNames", 0).Store(&names); err != nil {
		return c.dbusError(err)
	}
	if slices.Contains(names, dbusapi.BusName) {
		return nil
	}
	return notRunning(c.address)
}

// dbusError turns a failed call into an exitError: the D-Bus error's name
// and message, exit code 1; the daemon gone (or not startable) is exit 2.
func (c *client) dbusError(err error) error {
	return dbusErrorFor(c.cmd, c.address, err)
}

func dbusErrorFor(cmd, address string, err error) error {
	if err == nil {
		return nil
	}
	name, msg, ok := dbusErrorParts(err)
	if !ok {
		return &exitError{code: exitFailure, err: err, msg: fmt.Sprintf("slotwatch %s: %v", cmd, err)}
	}
	switch {
	case name == "org.freedesktop.DBus.Error.ServiceUnknown" || name == "org.freedesktop.DBus.Error.NameHasNoOwner":
		return &exitError{code: exitNotRunning, err: err, msg: notRunningMessage(address)}
	case strings.HasPrefix(name, "org.freedesktop.DBus.Error.Spawn."):
		return &exitError{code: exitNotRunning, err: err,
			msg: fmt.Sprintf("slotwatch: the daemon is not running on %s and the bus could not start it: %s: %s", address, name, msg)}
	}
	return &exitError{code: exitFailure, err: err, msg: fmt.Sprintf("slotwatch %s: %s: %s", cmd, name, msg)}
}

// dbusErrorParts returns the name and message of a D-Bus error reply.
func dbusErrorParts(err error) (name, msg string, ok bool) {
	var e godbus.Error
	var pe *godbus.Error
	switch {
	case errors.As(err, &e):
	case errors.As(err, &pe) && pe != nil:
		e = *pe
	default:
		return "", "", false
	}
	if len(e.Body) > 0 {
		if s, isString := e.Body[0].(string); isString {
			msg = s
		}
	}
	if msg == "" {
		msg = "(no message)"
	}
	return e.Name, msg, true
}

// managedObjects is GetManagedObjects' answer.
type managedObjects = map[godbus.ObjectPath]map[string]map[string]godbus.Variant

// fetch reads every object (one GetManagedObjects) and the root's Manager
// properties (one GetAll; the ObjectManager does not list its own object).
func (c *client) fetch() (managedObjects, map[string]godbus.Variant, error) {
	root := c.conn.Object(dbusapi.BusName, dbusapi.RootPath)
	var objs managedObjects
	if err := root.Call("org.freedesktop.DBus.ObjectManager.GetManagedObjects", 0).Store(&objs); err != nil {
		return nil, nil, c.dbusError(err)
	}
	var mgr map[string]godbus.Variant
	if err := root.Call("org.freedesktop.DBus.Properties.GetAll", 0, dbusapi.ManagerInterface).Store(&mgr); err != nil {
		return nil, nil, c.dbusError(err)
	}
	return objs, mgr, nil
}

// Property helpers: tolerant of missing properties and wrong types (a
// newer daemon may add or change some); they return the zero value.

func propString(p map[string]godbus.Variant, name string) string {
	s, _ := p[name].Value().(string)
	return s
}

func propUint32(p map[string]godbus.Variant, name string) uint32 {
	u, _ := p[name].Value().(uint32)
	return u
}

func propUint64(p map[string]godbus.Variant, name string) uint64 {
	u, _ := p[name].Value().(uint64)
	return u
}

func propBool(p map[string]godbus.Variant, name string) bool {
	b, _ := p[name].Value().(bool)
	return b
}

func propPath(p map[string]godbus.Variant, name string) godbus.ObjectPath {
	o, _ := p[name].Value().(godbus.ObjectPath)
	return o
}

func propBytes(p map[string]godbus.Variant, name string) []byte {
	b, _ := p[name].Value().([]byte)
	return b
}

// pathOrEmpty is a path for output: "/" (nothing) becomes "".
func pathOrEmpty(p godbus.ObjectPath) string {
	if p == "/" {
		return ""
	}
	return string(p)
}

// Enumerations of the contract, named for people.

func enumName(names []string, v uint32) string {
	if int(v) < len(names) {
		return names[v]
	}
	return fmt.Sprintf("unknown(%d)", v)
}

func managerStateName(v uint32) string {
	return enumName([]string{"unknown", "running", "degraded", "recovering"}, v)
}

func readerStateName(v uint32) string {
	return enumName([]string{"unknown", "empty", "present", "mute", "unavailable", "exclusive"}, v)
}

func moduleStateName(v uint32) string {
	return enumName([]string{"unknown", "running", "failed"}, v)
}

func waitModeName(v uint32) string {
	return enumName([]string{"unknown", "blocking", "polling", "pcsc"}, v)
}

// sessionStateName names CKS_* values (0 is a real value here).
func sessionStateName(v uint32) string {
	names := []string{"ro-public", "ro-user", "rw-public", "rw-user", "rw-so"}
	if int(v) < len(names) {
		return names[v]
	}
	return fmt.Sprintf("unknown(%d)", v)
}

// lastElement is the part of a path after its last "/".
func lastElement(p godbus.ObjectPath) string {
	s := string(p)
	return s[strings.LastIndexByte(s, '/')+1:]
}

// unescapePathElement reverses the daemon's escaping of names in path
// elements (every byte outside [A-Za-z0-9] is _xx; "_" alone is "").
func unescapePathElement(s string) string {
	if s == "_" {
		return ""
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '_' && i+2 < len(s) {
			if v, err := hex.DecodeString(s[i+1 : i+3]); err == nil {
				b.Write(v)
				i += 2
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// commandLine returns the command line of a process from /proc, arguments
// separated by blanks; "" if it cannot be read (gone, other namespace).
func commandLine(pid uint32) string {
	if pid == 0 {
		return ""
	}
	b, err := os.ReadFile(filepath.Join("/proc", fmt.Sprint(pid), "cmdline"))
	if err != nil {
		return ""
	}
	return formatCmdline(b)
}

// formatCmdline turns /proc/PID/cmdline (NUL-separated) into one line.
func formatCmdline(b []byte) string {
	parts := strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
	for i, p := range parts {
		parts[i] = strings.Map(func(r rune) rune {
			if r < 0x20 || r == 0x7f {
				return '?'
			}
			return r
		}, p)
	}
	return strings.TrimSpace(strings.Join(parts, " "))
}
