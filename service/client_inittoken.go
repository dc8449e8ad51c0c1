package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"

	godbus "github.com/godbus/dbus/v5"
	"github.com/spf13/cobra"

	"github.com/slotwatch/slotwatch/dbusapi"
)

// maxSOPIN is the daemon's limit on a PIN (the contract's 256 bytes).
const maxSOPIN = 256

// ckfProtectedAuthPath is CKF_PROTECTED_AUTHENTICATION_PATH: the token
// has a PIN pad, and an empty PIN means "enter it there".
const ckfProtectedAuthPath = 0x100

// initTokenArgs is init-token's command line.
type initTokenArgs struct {
	clientFlags
	token, serial, label string // exactly one selects the token
	labelNew             string
	force                bool
	soPINFile            string
	soPINStdin           bool
}

// newInitTokenCmd is `slotwatch init-token`; run is runInitToken (a
// test's own in tests). The arguments are checked (check) before run is
// called: a bad combination is exit code 64 like a bad option.
func newInitTokenCmd(run func(*initTokenArgs) error) *cobra.Command {
	a := &initTokenArgs{}
	cmd := newClientCmd("init-token [--address BUS] --token PATH|--serial S|--label L --label-new NEWLABEL [--force] [--so-pin-file FILE | --so-pin-stdin]",
		"initialize a token (C_InitToken) through the daemon", &a.clientFlags, false)
	cmd.RunE = func(*cobra.Command, []string) error {
		if err := a.check(); err != nil {
			return err
		}
		return run(a)
	}
	f := cmd.Flags()
	f.StringVar(&a.token, "token", "", "the token to initialize, `PATH`: its object path, or its generation")
	f.StringVar(&a.serial, "serial", "", "the token to initialize: its serial number `S`")
	f.StringVar(&a.label, "label", "", "the token to initialize: its current label `L`")
	f.StringVar(&a.labelNew, "label-new", "", "the token's new label `NEWLABEL` (1 to 32 bytes)")
	f.BoolVar(&a.force, "force", false, "close every session open on the token first, whoever holds it (their owners lose them)")
	f.StringVar(&a.soPINFile, "so-pin-file", "", "read the security officer PIN from the first line of `FILE`")
	f.BoolVar(&a.soPINStdin, "so-pin-stdin", false, "read the security officer PIN from one line of standard input")
	return cmd
}

// check validates the arguments without the bus. The PIN is never an
// argument: it would be visible in ps.
func (a *initTokenArgs) check() error {
	const cmd = "init-token"
	n := 0
	for _, s := range []string{a.token, a.serial, a.label} {
		if s != "" {
			n++
		}
	}
	if n != 1 {
		return usageError(cmd, "name the token with exactly one of --token, --serial and --label")
	}
	if a.token != "" {
		if _, err := tokenPathArg(a.token); err != nil {
			return usageError(cmd, "%v", err)
		}
	}
	if a.labelNew == "" {
		return usageError(cmd, "--label-new is required (the token's new label)")
	}
	if len(a.labelNew) > 32 {
		return usageError(cmd, "--label-new %q is %d bytes; a token label has at most 32", a.labelNew, len(a.labelNew))
	}
	if a.soPINFile != "" && a.soPINStdin {
		return usageError(cmd, "--so-pin-file and --so-pin-stdin exclude each other")
	}
	return nil
}

// tokenPathArg accepts a token's object path or its generation.
func tokenPathArg(s string) (godbus.ObjectPath, error) {
	if gen, err := strconv.ParseUint(s, 10, 64); err == nil {
		return dbusapi.RootPath + godbus.ObjectPath("/tokens/"+strconv.FormatUint(gen, 10)), nil
	}
	p := godbus.ObjectPath(s)
	if !p.IsValid() || !strings.HasPrefix(s, string(dbusapi.RootPath)+"/tokens/") {
		return "", fmt.Errorf("--token %q is neither a generation nor a token path (%s/tokens/GENERATION)", s, dbusapi.RootPath)
	}
	return p, nil
}

// selectToken finds the one token the arguments name.
func selectToken(tokens []tokenInfo, a *initTokenArgs) (tokenInfo, error) {
	var what string
	var match func(t tokenInfo) bool
	switch {
	case a.token != "":
		p, _ := tokenPathArg(a.token)
		what = "at " + string(p)
		match = func(t tokenInfo) bool { return t.Path == string(p) }
	case a.serial != "":
		what = fmt.Sprintf("with serial %q", a.serial)
		match = func(t tokenInfo) bool { return t.Serial == a.serial }
	default:
		what = fmt.Sprintf("labelled %q", a.label)
		match = func(t tokenInfo) bool { return t.Label == a.label }
	}
	var found []tokenInfo
	for _, t := range tokens {
		if match(t) {
			found = append(found, t)
		}
	}
	switch len(found) {
	case 0:
		return tokenInfo{}, failure("init-token", "no token %s is present (\"slotwatch list\" shows the tokens)", what)
	case 1:
		return found[0], nil
	}
	var gens []string
	for _, t := range found {
		gens = append(gens, fmt.Sprintf("generation %d (serial %s)", t.Generation, orDash(t.Serial)))
	}
	return tokenInfo{}, failure("init-token", "%d tokens %s are present: %s; choose one with --token GENERATION", len(found), what, strings.Join(gens, ", "))
}

// firstLine returns a copy of the first line of b without its line end
// ("\n" or "\r\n"). Anything but blank space after it is an error: a file
// with several lines is probably not a PIN file.
func firstLine(b []byte) ([]byte, error) {
	line, rest, _ := bytes.Cut(b, []byte{'\n'})
	line = bytes.TrimSuffix(line, []byte{'\r'})
	if len(bytes.TrimSpace(rest)) > 0 {
		return nil, errors.New("has more than one line; the PIN must be the only line")
	}
	if len(line) > maxSOPIN {
		return nil, fmt.Errorf("has a first line of %d bytes; a PIN has at most %d", len(line), maxSOPIN)
	}
	return bytes.Clone(line), nil
}

// readPINFile reads the PIN from the first line of a file.
func readPINFile(path string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	defer clear(b)
	pin, err := firstLine(b)
	if err != nil {
		return nil, fmt.Errorf("%s %v", path, err)
	}
	return pin, nil
}

// readPINLine reads one line (up to "\n" or the end) from r, a byte at a
// time, so that nothing after it is consumed and no copy of the PIN stays
// in a buffer.
func readPINLine(r io.Reader) ([]byte, error) {
	buf := make([]byte, 0, maxSOPIN+2)
	var c [1]byte
	for {
		n, err := r.Read(c[:])
		if n == 1 {
			if c[0] == '\n' {
				break
			}
			if len(buf) == maxSOPIN+1 {
				clear(buf[:cap(buf)])
				return nil, fmt.Errorf("the PIN is longer than %d bytes", maxSOPIN)
			}
			buf = append(buf, c[0])
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			clear(buf[:cap(buf)])
			return nil, err
		}
	}
	c[0] = 0
	pin := bytes.TrimSuffix(buf, []byte{'\r'})
	if len(pin) > maxSOPIN {
		clear(buf[:cap(buf)])
		return nil, fmt.Errorf("the PIN is longer than %d bytes", maxSOPIN)
	}
	return pin, nil
}

// readPINStdin reads the PIN from standard input; on a terminal it asks
// for it on stderr and does not echo it.
func readPINStdin(prompt string) ([]byte, error) {
	restore, tty := echoOff(os.Stdin.Fd())
	if !tty {
		return readPINLine(os.Stdin)
	}
	// Ctrl-C while asking must not leave the terminal without echo.
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	done := make(chan struct{})
	go func() {
		select {
		case <-sigs:
			restore()
			fmt.Fprintln(os.Stderr)
			os.Exit(130)
		case <-done:
		}
	}()
	defer func() {
		close(done)
		signal.Stop(sigs)
		restore()
		fmt.Fprintln(os.Stderr)
	}()
	fmt.Fprint(os.Stderr, prompt)
	return readPINLine(os.Stdin)
}

// runInitToken runs init-token with arguments that passed check.
func runInitToken(a *initTokenArgs) error {
	const cmd = "init-token"
	// The SO PIN passes through this process too.
	if err := hardenProcess(); err != nil {
		return err
	}
	c, err := dialDaemon(cmd, a.address)
	if err != nil {
		return err
	}
	defer c.close()
	objs, mgr, err := c.fetch()
	if err != nil {
		return err
	}
	tok, err := selectToken(buildListing(objs, mgr, nil).Tokens, a)
	if err != nil {
		return err
	}

	var pin []byte
	switch {
	case a.soPINFile != "":
		pin, err = readPINFile(a.soPINFile)
	case a.soPINStdin:
		pin, err = readPINStdin(fmt.Sprintf("Security officer PIN of token %s (generation %d): ", quoted(tok.Label), tok.Generation))
	case tok.Flags&ckfProtectedAuthPath != 0:
		fmt.Fprintf(os.Stderr, "Enter the security officer PIN of token %s on the reader's PIN pad.\n", quoted(tok.Label))
		pin = []byte{}
	default:
		return usageError(cmd, "token %s has no PIN pad: give the security officer PIN with --so-pin-file FILE or --so-pin-stdin", quoted(tok.Label))
	}
	if err != nil {
		return failure(cmd, "reading the security officer PIN: %v", err)
	}
	call := c.conn.Object(dbusapi.BusName, godbus.ObjectPath(tok.Path)).Call(dbusapi.TokenInterface+".InitToken", 0, pin, a.labelNew, a.force)
	clear(pin)
	if call.Err != nil {
		return initTokenError(c.address, tok, call.Err)
	}
	fmt.Printf("initialized token %s (generation %d, serial %s) with label %s\n", quoted(tok.Label), tok.Generation, orDash(tok.Serial), quoted(a.labelNew))
	if a.labelNew != tok.Label {
		fmt.Println("with its new label it is a new token: it gets a new generation when the daemon reads the slot again")
	}
	return nil
}

// initTokenError is SessionsExist (exit 3, with the daemon's message, which
// names the holders, and a hint) or any other failure.
func initTokenError(address string, tok tokenInfo, err error) error {
	name, msg, ok := dbusErrorParts(err)
	if ok && name == dbusapi.ErrSessionsExist {
		return &exitError{code: exitSessionsExist, err: err, msg: fmt.Sprintf(
			"slotwatch init-token: %s: %s\n"+
				"hint: token %s (generation %d) is in use; ask the holders to close their sessions, or run again with --force to close them all (their owners lose them) and initialize anyway",
			name, msg, quoted(tok.Label), tok.Generation)}
	}
	return dbusErrorFor("init-token", address, err)
}
