package stack

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Paths of Debian 12's pcscd and vsmartcard-vpcd packages.
const (
	PCSCDPath  = "/usr/sbin/pcscd"
	VPCDDriver = "/usr/lib/pcsc/drivers/serial/libifdvpcd.so"

	// usbDriversDir holds pcscd's USB reader drivers (ifd-ccid.bundle).
	usbDriversDir = "/usr/lib/pcsc/drivers"
)

// SocketEnv is the variable libpcsclite reads (once per process) to find
// pcscd's socket. pcscd itself ignores it.
const SocketEnv = "PCSCLITE_CSOCK_NAME"

const (
	readyTimeout = 5 * time.Second // for vpcd to listen on every port
	stopGrace    = 5 * time.Second // between SIGTERM and SIGKILL
)

// errPortTaken means another process listens on one of the chosen vpcd
// ports; StartPCSCD then tries other ports.
var errPortTaken = errors.New("vpcd port taken by another process")

// PCSCDConfig configures a private pcscd.
type PCSCDConfig struct {
	// Socket is the path of the private pcscd socket. Callers pass the
	// value of the process's PCSCLITE_CSOCK_NAME (clients find pcscd
	// through it); "" means $PCSCLITE_CSOCK_NAME, or Dir/pcscd.comm if
	// that is unset. At most 107 bytes (a unix socket address).
	Socket string
	// Dir holds the reader configuration, driver copies, and the log.
	// "" means a new temporary directory, removed by Stop.
	Dir string
	// Entries is the number of vpcd reader entries (default 1). Each
	// gives two readers on two consecutive TCP ports.
	Entries int
	// Debug runs pcscd with --debug --apdu (a verbose Log).
	Debug bool
}

// PCSCD is a private pcscd with vsmartcard's vpcd reader driver: readers
// into which a vcard.Card is inserted over TCP. It never touches the
// system's pcscd: it listens on its own socket, and, when it can create a
// mount namespace, it sees a private /run (so it does not write
// /run/pcscd/pcscd.pid, or delete it on exit) and no USB reader drivers
// (so it cannot grab a real reader from the system's pcscd).
//
// Its methods are safe for concurrent use.
type PCSCD struct {
	cfg      PCSCDConfig
	ownDir   bool // Dir was created by StartPCSCD; Stop removes it
	basePort int  // reader i listens on basePort+i

	mu       sync.Mutex
	proc     *proc // current pcscd; nil after Stop
	stopped  bool
	finalLog string // the log, kept when Stop removes Dir
}

// StartPCSCD starts pcscd with cfg.Entries vpcd entries on free random
// ports and returns once vpcd listens on all of them. The error of a
// failed start contains pcscd's log.
func StartPCSCD(cfg PCSCDConfig) (*PCSCD, error) {
	if cfg.Entries <= 0 {
		cfg.Entries = 1
	}
	p := &PCSCD{cfg: cfg}
	if p.cfg.Dir == "" {
		dir, err := os.MkdirTemp("", "slotwatch-pcscd-")
		if err != nil {
			return nil, err
		}
		p.cfg.Dir, p.ownDir = dir, true
	}
	if p.cfg.Socket == "" {
		p.cfg.Socket = os.Getenv(SocketEnv)
	}
	if p.cfg.Socket == "" {
		p.cfg.Socket = filepath.Join(p.cfg.Dir, "pcscd.comm")
	}
	if err := p.prepareDir(); err != nil {
		p.cleanup()
		return nil, fmt.Errorf("start pcscd: %w", err)
	}

	var err error
	for range 5 {
		if p.basePort, err = pickFreePorts(2 * p.cfg.Entries); err != nil {
			break
		}
		if err = p.writeReaderConf(); err != nil {
			break
		}
		if err = p.start(); !errors.Is(err, errPortTaken) {
			break
		}
	}
	if err != nil {
		log := p.Log()
		p.cleanup()
		return nil, fmt.Errorf("start pcscd: %w\n--- pcscd log ---\n%s", err, log)
	}
	return p, nil
}

// Readers returns the reader names pcscd gives, in port order: reader i
// listens on Port(i). Entry 0 gives "Virtual PCD 00 00" and
// "Virtual PCD 00 01"; entry k>0 gives "Virtual PCD k 00 00" and
// "Virtual PCD k 00 01". (pcscd numbers equal names only for readers of
// the same driver file, and each entry needs its own copy of the driver,
// so equal FRIENDLYNAMEs would give every entry "Virtual PCD 00 0x".)
func (p *PCSCD) Readers() []string {
	var out []string
	for k := range p.cfg.Entries {
		name := friendlyName(k)
		out = append(out, name+" 00 00", name+" 00 01")
	}
	return out
}

func friendlyName(entry int) string {
	if entry == 0 {
		return "Virtual PCD"
	}
	return fmt.Sprintf("Virtual PCD %d", entry)
}

// Port returns the vpcd TCP port of reader i (an index into Readers).
func (p *PCSCD) Port(reader int) int {
	if reader < 0 || reader >= 2*p.cfg.Entries {
		panic(fmt.Sprintf("stack: reader %d out of range (pcscd has %d readers)", reader, 2*p.cfg.Entries))
	}
	return p.basePort + reader
}

// Addr returns the address a vcard.Card connects to for reader i.
func (p *PCSCD) Addr(reader int) string { return fmt.Sprintf("127.0.0.1:%d", p.Port(reader)) }

// Socket returns the path of pcscd's socket.
func (p *PCSCD) Socket() string { return p.cfg.Socket }

// Env returns the environment entry a child process needs to use this
// pcscd (PCSCLITE_CSOCK_NAME=...).
func (p *PCSCD) Env() []string { return []string{SocketEnv + "=" + p.cfg.Socket} }

// PID returns the pid of the running pcscd, or 0.
func (p *PCSCD) PID() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.proc == nil || p.proc.exited() {
		return 0
	}
	return p.proc.pid()
}

// Log returns what pcscd wrote so far (all runs, Restart adds a marker).
func (p *PCSCD) Log() string {
	p.mu.Lock()
	final := p.finalLog
	p.mu.Unlock()
	if final != "" {
		return final
	}
	b, _ := os.ReadFile(p.logPath())
	return string(b)
}

// Kill sends SIGKILL to pcscd and waits for it, for crash tests: readers
// vanish, clients get SCARD_E_NO_SERVICE until Restart. Inserted cards
// see their connection closed.
func (p *PCSCD) Kill() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.proc == nil || p.proc.exited() {
		return errors.New("pcscd is not running")
	}
	return p.proc.kill()
}

// Stop ends pcscd (SIGTERM, after 5 s SIGKILL), removes its socket and,
// if StartPCSCD created it, its directory. It is idempotent; afterwards
// only Log and the static accessors work.
func (p *PCSCD) Stop() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.stopped {
		return nil
	}
	p.stopped = true
	var err error
	if p.proc != nil && !p.proc.exited() {
		err = p.proc.stop(stopGrace)
	}
	p.proc = nil
	p.finalLog = p.readLog()
	p.cleanup()
	return err
}

// Restart stops pcscd if it runs and starts it again with the same
// socket, configuration and ports (cards have to be inserted again).
func (p *PCSCD) Restart() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.stopped {
		return errors.New("pcscd was stopped")
	}
	if p.proc != nil && !p.proc.exited() {
		if err := p.proc.stop(stopGrace); err != nil {
			return err
		}
	}
	p.proc = nil
	appendFile(p.logPath(), "--- stack: pcscd restart ---\n")
	if err := p.start(); err != nil {
		return fmt.Errorf("restart pcscd: %w\n--- pcscd log ---\n%s", err, p.readLog())
	}
	return nil
}

func (p *PCSCD) logPath() string  { return filepath.Join(p.cfg.Dir, "pcscd.log") }
func (p *PCSCD) confDir() string  { return filepath.Join(p.cfg.Dir, "reader.conf.d") }
func (p *PCSCD) runDir() string   { return filepath.Join(p.cfg.Dir, "run") }
func (p *PCSCD) noUSBDir() string { return filepath.Join(p.cfg.Dir, "no-usb-drivers") }
func (p *PCSCD) driver(k int) string {
	return filepath.Join(p.cfg.Dir, fmt.Sprintf("libifdvpcd-%d.so", k))
}

func (p *PCSCD) readLog() string {
	b, _ := os.ReadFile(p.logPath())
	return string(b)
}

// prepareDir creates Dir's layout and one copy of the vpcd driver per
// entry: the driver keeps per-slot state in globals, so a second entry
// loading the same file shares it and hangs clients; a copy under another
// path is loaded as a separate library. (Entry 0 uses a copy too, because
// in the mount namespace the system's driver directory is hidden.)
func (p *PCSCD) prepareDir() error {
	if len(p.cfg.Socket) > 107 {
		return fmt.Errorf("socket path %q is longer than a unix socket address (107 bytes)", p.cfg.Socket)
	}
	for _, d := range []string{p.cfg.Dir, p.confDir(), p.runDir(), p.noUSBDir(), filepath.Dir(p.cfg.Socket)} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	so, err := os.ReadFile(VPCDDriver)
	if err != nil {
		return fmt.Errorf("vpcd driver (Debian package vsmartcard-vpcd): %w", err)
	}
	for k := range p.cfg.Entries {
		if err := os.WriteFile(p.driver(k), so, 0o644); err != nil {
			return err
		}
	}
	return nil
}

// writeReaderConf writes the reader.conf.d entries. vpcd takes its TCP
// port from DEVICENAME ("/dev/null" = listen on all addresses) and listens
// on PORT for slot 0 and PORT+1 for slot 1. All entries go in one file:
// pcscd reads a directory in readdir order, and the order of entries
// decides nothing here but keeps the log readable.
func (p *PCSCD) writeReaderConf() error {
	var b strings.Builder
	for k := range p.cfg.Entries {
		port := p.basePort + 2*k
		fmt.Fprintf(&b, "FRIENDLYNAME \"%s\"\nDEVICENAME   /dev/null:%d\nLIBPATH      %s\nCHANNELID    %d\n\n",
			friendlyName(k), port, p.driver(k), port)
	}
	return os.WriteFile(filepath.Join(p.confDir(), "vpcd"), []byte(b.String()), 0o644)
}

// start launches pcscd and waits until vpcd listens on every port.
//
// pcscd 1.9.9 ignores PCSCLITE_CSOCK_NAME and always creates
// /run/pcscd/pcscd.comm, except when started the systemd way (socket
// activation): then it uses the listening socket it inherits as fd 3
// (LISTEN_FDS=1) if LISTEN_PID is its own pid. A Go parent cannot know the
// child's pid before exec, so a shell sets LISTEN_PID=$$ and execs pcscd,
// which keeps the shell's pid.
//
// The shell first bind-mounts, in a mount namespace of its own, private
// directories over /run (pcscd writes /run/pcscd/pcscd.pid even when
// socket-activated, and deletes it on exit) and over the USB driver
// directory. Without the privilege for a mount namespace pcscd runs
// without these two shields.
func (p *PCSCD) start() error {
	lf, err := listenUnix(p.cfg.Socket)
	if err != nil {
		return err
	}
	// pcscd gets its own descriptor; closing ours means that once pcscd
	// is gone, clients are refused at once (SCARD_E_NO_SERVICE) instead of
	// queueing on a socket nobody serves.
	defer lf.Close()

	logf, err := os.OpenFile(p.logPath(), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer logf.Close()

	pr, err := p.launch(lf, logf, true)
	if errors.Is(err, errNoNamespace) {
		// No right to create a mount namespace or to mount (e.g.
		// unprivileged user namespaces disabled): run pcscd unshielded.
		fmt.Fprintf(logf, "--- stack: %v; pcscd uses the real /run ---\n", err)
		pr, err = p.launch(lf, logf, false)
	}
	if err != nil {
		return err
	}
	p.proc = pr
	return nil
}

// errNoNamespace: the mount namespace could not be set up.
var errNoNamespace = errors.New("no private mount namespace")

// exitNoNamespace is the launch script's exit status when a mount fails.
const exitNoNamespace = 125

// launch runs the launch script (see start) and waits until pcscd is ready.
// The script, with $1 = Dir/run and $2 = Dir/no-usb-drivers:
//
//	mount --bind "$1" /run || exit 125                      # namespaced only
//	mount --bind "$2" /usr/lib/pcsc/drivers || exit 125     # namespaced only
//	shift 2; LISTEN_PID=$$ exec /usr/sbin/pcscd "$@"        # "$@" = pcscd's arguments
func (p *PCSCD) launch(lf, logf *os.File, namespaced bool) (*proc, error) {
	args := []string{"--foreground", "-c", p.confDir()}
	if p.cfg.Debug {
		args = append(args, "--debug", "--apdu")
	}
	script := `shift 2; LISTEN_PID=$$ exec ` + PCSCDPath + ` "$@"`
	if namespaced {
		mounts := fmt.Sprintf(`mount --bind "$1" /run || exit %d; `, exitNoNamespace)
		if _, err := os.Stat(usbDriversDir); err == nil {
			mounts += fmt.Sprintf(`mount --bind "$2" %s || exit %d; `, usbDriversDir, exitNoNamespace)
		}
		script = mounts + script
	}
	cmd := exec.Command("/bin/sh", append([]string{"-c", script, "pcscd-launch", p.runDir(), p.noUSBDir()}, args...)...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.ExtraFiles = []*os.File{lf} // becomes fd 3
	cmd.Env = append(withoutEnv(os.Environ(), "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET"), "LISTEN_FDS=1")
	if namespaced {
		cmd.SysProcAttr = mountNamespace()
	}

	pr, err := startProc(cmd)
	if err != nil {
		if namespaced {
			return nil, fmt.Errorf("%w: %v", errNoNamespace, err)
		}
		return nil, err
	}
	if err := p.waitReady(pr); err != nil {
		pr.kill()
		var exit *exec.ExitError
		if namespaced && errors.As(pr.err, &exit) && exit.ExitCode() == exitNoNamespace {
			return nil, fmt.Errorf("%w: mount failed", errNoNamespace)
		}
		return nil, err
	}
	return pr, nil
}

// mountNamespace returns the process attributes for a private mount
// namespace: root unshares one directly (Go makes "/" a private mount in
// the child, so the bind mounts never show outside); other users need a
// user namespace in which they are root.
func mountNamespace() *syscall.SysProcAttr {
	if os.Geteuid() == 0 {
		return &syscall.SysProcAttr{Unshareflags: syscall.CLONE_NEWNS}
	}
	return &syscall.SysProcAttr{
		Cloneflags:  syscall.CLONE_NEWUSER | syscall.CLONE_NEWNS,
		UidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: os.Geteuid(), Size: 1}},
		GidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: os.Getegid(), Size: 1}},
	}
}

// waitReady polls the kernel's TCP tables until pcscd's own sockets listen
// on every vpcd port (bounded by readyTimeout). vpcd opens its listeners
// while pcscd initializes the readers, before pcscd serves clients, so a
// client that connects afterwards finds all readers.
func (p *PCSCD) waitReady(pr *proc) error {
	n := 2 * p.cfg.Entries
	deadline := time.Now().Add(readyTimeout)
	for {
		if pr.exited() {
			return fmt.Errorf("pcscd exited during startup: %v", pr.err)
		}
		socks, err := readTCPSockets()
		if err != nil {
			return err
		}
		mine := socketInodes(pr.pid())
		ready := 0
		for _, s := range socks {
			if s.state != tcpListen || s.port < p.basePort || s.port >= p.basePort+n {
				continue
			}
			if !mine[s.inode] {
				return fmt.Errorf("port %d: %w", s.port, errPortTaken)
			}
			ready++
		}
		if ready >= n {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("vpcd listens on %d of ports %d-%d after %v", ready, p.basePort, p.basePort+n-1, readyTimeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// cleanup removes the socket and, if owned, the directory.
func (p *PCSCD) cleanup() {
	if fi, err := os.Lstat(p.cfg.Socket); err == nil && fi.Mode()&os.ModeSocket != 0 {
		os.Remove(p.cfg.Socket)
	}
	if p.ownDir {
		os.RemoveAll(p.cfg.Dir)
	}
}

// listenUnix returns a listening unix socket at path as an *os.File to
// hand to pcscd. It is made with plain syscalls: a net.UnixListener would
// unlink the path when closed, and its descriptor is non-blocking.
// A stale socket at path (from a killed run) is replaced; any other file
// is an error.
func listenUnix(path string) (*os.File, error) {
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("%s exists and is not a socket", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, err
		}
	}
	fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	if err := syscall.Bind(fd, &syscall.SockaddrUnix{Name: path}); err != nil {
		syscall.Close(fd)
		return nil, fmt.Errorf("bind %s: %w", path, err)
	}
	// Like /run/pcscd/pcscd.comm: any local user may talk to pcscd.
	err = os.Chmod(path, 0o666)
	if err == nil {
		err = syscall.Listen(fd, syscall.SOMAXCONN)
	}
	if err != nil {
		syscall.Close(fd)
		os.Remove(path)
		return nil, fmt.Errorf("listen %s: %w", path, err)
	}
	return os.NewFile(uintptr(fd), path), nil
}

// withoutEnv returns env without the given variables.
func withoutEnv(env []string, names ...string) []string {
	var out []string
next:
	for _, kv := range env {
		for _, n := range names {
			if strings.HasPrefix(kv, n+"=") {
				continue next
			}
		}
		out = append(out, kv)
	}
	return out
}

func appendFile(path, s string) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return
	}
	f.WriteString(s)
	f.Close()
}
