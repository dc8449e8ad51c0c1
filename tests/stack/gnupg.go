package stack

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// GnuPG programs (Debian packages gnupg, gpg-agent and scdaemon).
const (
	GPGPath             = "gpg"
	GPGAgentPath        = "gpg-agent"
	GPGConfPath         = "gpgconf"
	GPGConnectAgentPath = "gpg-connect-agent"
	ScdaemonPath        = "/usr/lib/gnupg/scdaemon"
)

const (
	gnupgReadyTimeout = 10 * time.Second // for gpg-agent to answer
	// The longest socket name in GnuPG's socket directory (a supervised
	// gpg-agent creates only S.gpg-agent; scdaemon adds S.scdaemon).
	longestAgentSocket = "S.gpg-agent.browser"
)

// GnuPG is a private gpg-agent, with the scdaemon it starts on demand, on
// a private GNUPGHOME, whose scdaemon uses a private pcscd. It exists to
// run an unmodified GnuPG against the test stack: scdaemon connects to
// the card the default way, SCARD_SHARE_EXCLUSIVE, so while another
// process holds any connection to the card (even a shared one, as OpenSC
// does) `gpg --card-status` fails with "sharing violation", and while
// scdaemon holds the card nobody else can connect.
//
// gpg-agent runs in the foreground as a child of the test process; its
// scdaemon is gpg-agent's child. Stop ends both by pid. Nothing touches
// ~/.gnupg or the user's agent: every command gets --homedir and
// GNUPGHOME, and gpg never autostarts an agent.
//
// Its methods are safe for concurrent use.
type GnuPG struct {
	home      string
	reader    string
	env       []string
	socket    string // gpg-agent's main socket
	socketDir string // where gpg-agent puts its sockets; not home on a desktop (/run/user/UID/gnupg/d.*)

	mu      sync.Mutex
	agent   *proc // nil after Stop
	stopped bool
}

// StartGnuPG writes a GnuPG configuration into home (created if needed,
// mode 0700; keep the path short: gpg-agent's sockets live there and a
// unix socket path has at most 107 bytes) and starts gpg-agent, whose
// scdaemon will talk to pcscd p and watch only the reader named reader.
// It returns once gpg-agent answers on its socket.
//
// scdaemon.conf: disable-ccid (PC/SC only, never a USB reader directly),
// reader-port (scdaemon 2.2 watches one reader), a log file in home
// (ScdaemonLog) with the debug flags "ipc" (the Assuan commands),
// "cardio" (every APDU) and "reader" (reader and connection handling;
// pcsc_connect failures are logged as errors in any case). No
// debug-level: it would replace those flags. pcsc-shared is
// deliberately not set: scdaemon connects exclusively, as it does for
// everyone.
func StartGnuPG(home string, p *PCSCD, reader string) (*GnuPG, error) {
	for _, prog := range []string{GPGPath, GPGAgentPath, GPGConfPath, GPGConnectAgentPath, ScdaemonPath} {
		if _, err := exec.LookPath(prog); err != nil {
			return nil, fmt.Errorf("start gnupg: %w (Debian packages gnupg and scdaemon; make deps)", err)
		}
	}
	home, err := filepath.Abs(home)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(home, 0o700); err != nil {
		return nil, fmt.Errorf("start gnupg: %w", err)
	}
	if err := os.Chmod(home, 0o700); err != nil { // gpg warns about anything else
		return nil, fmt.Errorf("start gnupg: %w", err)
	}
	env := withoutEnv(os.Environ(), "GNUPGHOME", "GPG_AGENT_INFO", SocketEnv, "LC_ALL", "LANGUAGE",
		"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
	env = append(env, "GNUPGHOME="+home, "LC_ALL=C", "LANGUAGE=")
	env = append(env, p.Env()...)
	g := &GnuPG{home: home, reader: reader, env: env}

	scdConf := fmt.Sprintf("log-file %s\nverbose\ndebug ipc,cardio,reader\ndisable-ccid\nreader-port %s\n",
		g.ScdaemonLogPath(), reader)
	agentConf := "verbose\n" // gpg-agent logs to its stderr (AgentLog)
	for name, text := range map[string]string{"scdaemon.conf": scdConf, "gpg-agent.conf": agentConf} {
		if err := os.WriteFile(filepath.Join(home, name), []byte(text), 0o600); err != nil {
			return nil, fmt.Errorf("start gnupg: %w", err)
		}
	}

	// Where gpg-agent will listen: home itself, unless /run/user/UID
	// exists (then a directory below it named after a hash of home).
	out, err := g.command(context.Background(), GPGConfPath, "--homedir", home, "--list-dirs", "agent-socket").Output()
	if err != nil {
		return nil, fmt.Errorf("start gnupg: gpgconf --list-dirs: %w", err)
	}
	g.socket = strings.TrimSpace(string(out))
	g.socketDir = filepath.Dir(g.socket)
	if n := len(filepath.Join(g.socketDir, longestAgentSocket)); n > 107 {
		return nil, fmt.Errorf("start gnupg: socket directory %q too long for unix sockets (%d > 107 bytes)", g.socketDir, n)
	}

	if err := g.startAgent(); err != nil {
		g.removeSocket()
		return nil, fmt.Errorf("start gnupg: %w\n--- gpg-agent log ---\n%s", err, g.AgentLog())
	}
	return g, nil
}

// startAgent starts gpg-agent the way systemd does (--supervised, its
// socket inherited as fd 3): gpg-agent 2.2 in --daemon mode always forks,
// even with --no-detach, and the agent would not be our child. As for
// pcscd (see PCSCD.start), a shell sets LISTEN_PID=$$ and execs gpg-agent,
// which keeps the shell's pid. A supervised gpg-agent creates no sockets
// (so no extra, browser or ssh socket) and removes none on exit.
//
// The shell also ignores SIGPIPE, as systemd does for its services
// (IgnoreSIGPIPE=yes): a supervised gpg-agent 2.2 does not ignore it
// itself and dies of it when a client closes its connection before the
// agent's last reply (measured: a client that sent BYE and closed at
// once killed it).
func (g *GnuPG) startAgent() error {
	if g.socketDir != g.home {
		if err := g.command(context.Background(), GPGConfPath, "--homedir", g.home, "--create-socketdir").Run(); err != nil {
			return fmt.Errorf("gpgconf --create-socketdir: %w", err)
		}
	}
	lf, err := listenUnix(g.socket)
	if err != nil {
		return err
	}
	defer lf.Close() // gpg-agent has its own copy
	logf, err := os.OpenFile(g.agentLogPath(), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd := exec.Command("/bin/sh", "-c", `trap '' PIPE; LISTEN_PID=$$ exec "$0" "$@"`, GPGAgentPath, "--homedir", g.home, "--supervised")
	cmd.Env = append(g.Env(), "LISTEN_FDS=1", "LISTEN_FDNAMES=std")
	cmd.Dir = g.home
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.ExtraFiles = []*os.File{lf} // fd 3
	if g.agent, err = startProc(cmd); err != nil {
		return err
	}
	if err := g.waitAgent(); err != nil {
		g.agent.kill()
		return err
	}
	return nil
}

// StartGnuPGForTest starts GnuPG (StartGnuPG) for reader 0 of p, in a
// short private home, and stops it in t's cleanup, failing t with the
// logs if a start or stop fails. Start it after p (and stop it before:
// cleanups run in reverse order).
func StartGnuPGForTest(t testing.TB, p *PCSCD) *GnuPG {
	t.Helper()
	home := filepath.Join(t.TempDir(), "g")
	if len(filepath.Join(home, longestAgentSocket)) > 100 { // long test name
		dir, err := os.MkdirTemp("", "gpg")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(dir) })
		home = dir
	}
	g, err := StartGnuPG(home, p, p.Readers()[0])
	if err != nil {
		t.Fatalf("%v", err)
	}
	t.Cleanup(func() {
		if err := g.Stop(); err != nil {
			t.Errorf("stop gnupg: %v\n--- gpg-agent log ---\n%s\n--- scdaemon log ---\n%s", err, g.AgentLog(), g.ScdaemonLog())
		}
	})
	return g
}

// Home returns the GNUPGHOME.
func (g *GnuPG) Home() string { return g.home }

// Reader returns the PC/SC reader scdaemon uses.
func (g *GnuPG) Reader() string { return g.reader }

// Env returns the environment every GnuPG command of g runs with (the
// test process's, with GNUPGHOME, LC_ALL=C and the pcscd socket).
func (g *GnuPG) Env() []string { return append([]string(nil), g.env...) }

// AgentPID returns the pid of the running gpg-agent, or 0.
func (g *GnuPG) AgentPID() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.agent == nil || g.agent.exited() {
		return 0
	}
	return g.agent.pid()
}

// ScdaemonPIDs returns the pids of gpg-agent's scdaemon children (none
// before the first card command, or after ReleaseCard).
func (g *GnuPG) ScdaemonPIDs() []int {
	pid := g.AgentPID()
	if pid == 0 {
		return nil
	}
	kids, _ := childProcs(pid)
	var out []int
	for _, k := range kids {
		if k.comm == "scdaemon" {
			out = append(out, k.pid)
		}
	}
	return out
}

// CardStatus runs `gpg --card-status` (batch mode, no tty, no agent
// autostart) and returns what it printed. err is non-nil if gpg failed
// (an *exec.ExitError with no card, or with the card in use elsewhere)
// or ctx ended.
func (g *GnuPG) CardStatus(ctx context.Context) (stdout, stderr string, err error) {
	cmd := g.command(ctx, GPGPath, "--homedir", g.home, "--batch", "--no-tty", "--no-autostart", "--card-status")
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err = cmd.Run()
	return o.String(), e.String(), err
}

// ReleaseCard makes scdaemon let go of the card: it sends "SCD KILLSCD"
// through gpg-agent (what `gpgconf --reload scdaemon` does) and waits
// until gpg-agent has reaped the exited scdaemon, which is also when it
// forgets its connection to it; the next card command starts a new
// scdaemon. gpg-agent 2.2 reaps it only on its 4-second housekeeping
// tick, so this takes up to about 4 s; a card command sent before that
// would fail with "Broken pipe", because the agent reuses its connection
// to the dead scdaemon. ("SCD RESTART" is not enough: scdaemon 2.2 keeps
// the card's application, and so its exclusive connection, for the next
// client.) Without a running scdaemon it does nothing.
func (g *GnuPG) ReleaseCard(ctx context.Context) error {
	pid := g.AgentPID()
	if pid == 0 {
		return errors.New("gpg-agent is not running")
	}
	kids, err := childProcs(pid)
	if err != nil {
		return err
	}
	var scd []procInfo
	for _, k := range kids {
		if k.comm == "scdaemon" {
			scd = append(scd, k)
		}
	}
	if len(scd) == 0 {
		return nil
	}
	out, err := g.command(ctx, GPGConnectAgentPath, "--homedir", g.home, "--no-autostart", "SCD KILLSCD", "/bye").CombinedOutput()
	if err != nil {
		return fmt.Errorf("gpg-connect-agent SCD KILLSCD: %w: %s", err, out)
	}
	for _, p := range scd {
		for p.exists() {
			select {
			case <-ctx.Done():
				return fmt.Errorf("scdaemon (pid %d) not yet reaped by gpg-agent after SCD KILLSCD: %w", p.pid, ctx.Err())
			case <-time.After(10 * time.Millisecond):
			}
		}
	}
	return nil
}

// ScdaemonLogPath returns the path of scdaemon's log file.
func (g *GnuPG) ScdaemonLogPath() string { return filepath.Join(g.home, "scdaemon.log") }

// ScdaemonLog returns what scdaemon logged so far (all its runs).
func (g *GnuPG) ScdaemonLog() string {
	b, _ := os.ReadFile(g.ScdaemonLogPath())
	return string(b)
}

// AgentLog returns what gpg-agent wrote to its stdout and stderr.
func (g *GnuPG) AgentLog() string {
	b, _ := os.ReadFile(g.agentLogPath())
	return string(b)
}

func (g *GnuPG) agentLogPath() string { return filepath.Join(g.home, "gpg-agent.log") }

// Stop ends gpg-agent and its scdaemon: it notes the agent's children,
// sends the agent SIGTERM (after 5 s SIGKILL) and waits for it, then
// waits up to 5 s for each child to exit (scdaemon ends when its agent
// connection closes) and SIGKILLs, by pid, any that did not; that is
// reported as an error. It is idempotent; the logs stay readable.
func (g *GnuPG) Stop() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.stopped {
		return nil
	}
	g.stopped = true
	defer g.removeSocket()
	if g.agent == nil {
		return nil
	}
	agent := g.agent
	g.agent = nil
	if agent.exited() {
		return fmt.Errorf("gpg-agent had exited: %v", agent.err)
	}
	kids, kidsErr := childProcs(agent.pid())
	errs := []error{kidsErr}
	if err := agent.stop(stopGrace); err != nil {
		errs = append(errs, fmt.Errorf("gpg-agent: %w", err))
	}
	for _, k := range kids {
		if waitGone(k, stopGrace) {
			continue
		}
		if err := k.kill(); err != nil {
			errs = append(errs, err)
		}
		if !waitGone(k, stopGrace) {
			errs = append(errs, fmt.Errorf("%s (pid %d) survives SIGKILL", k.comm, k.pid))
		} else {
			errs = append(errs, fmt.Errorf("%s (pid %d) outlived gpg-agent by %v and was killed", k.comm, k.pid, stopGrace))
		}
	}
	return errors.Join(errs...)
}

// command returns cmd with g's environment.
func (g *GnuPG) command(ctx context.Context, name string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env, cmd.Dir = g.env, g.home
	return cmd
}

// waitAgent waits until gpg-agent serves its socket: the socket exists
// (and queues connections) from the start, so it waits for the Assuan
// greeting ("OK ..."), which gpg-agent sends once it accepted.
func (g *GnuPG) waitAgent() error {
	deadline := time.Now().Add(gnupgReadyTimeout)
	var last error
	for {
		if g.agent.exited() {
			return fmt.Errorf("gpg-agent exited during startup: %v", g.agent.err)
		}
		if last = greeting(g.socket, deadline); last == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("gpg-agent does not answer on %s after %v: %v", g.socket, gnupgReadyTimeout, last)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// greeting connects to an Assuan server at path and reads its greeting
// line, waiting at most until deadline.
func greeting(path string, deadline time.Time) error {
	c, err := net.DialTimeout("unix", path, time.Until(deadline))
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(deadline)
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err
	}
	if !strings.HasPrefix(line, "OK") {
		return fmt.Errorf("greeting %q", line)
	}
	return nil // closing is saying goodbye
}

// removeSocket removes gpg-agent's socket (a supervised agent leaves it)
// and a socket directory outside home (/run/user/UID/gnupg/d.*); the
// test's cleanup removes home.
func (g *GnuPG) removeSocket() {
	if fi, err := os.Lstat(g.socket); err == nil && fi.Mode()&os.ModeSocket != 0 {
		os.Remove(g.socket)
	}
	if g.socketDir != "" && g.socketDir != g.home {
		g.command(context.Background(), GPGConfPath, "--homedir", g.home, "--remove-socketdir").Run()
	}
}

// procInfo identifies a process: its pid and start time (clock ticks
// after boot), so that a reused pid is never taken for it.
type procInfo struct {
	pid   int
	comm  string
	start uint64
}

// procStat reads /proc/PID/stat: comm, state, parent pid and start time.
func procStat(pid int) (comm string, state byte, ppid int, start uint64, err error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return "", 0, 0, 0, err
	}
	// "pid (comm) state ppid ..."; comm may contain spaces and ")".
	open, end := bytes.IndexByte(b, '('), bytes.LastIndexByte(b, ')')
	if open < 0 || end < open {
		return "", 0, 0, 0, fmt.Errorf("/proc/%d/stat: malformed", pid)
	}
	f := strings.Fields(string(b[end+1:]))
	if len(f) < 20 {
		return "", 0, 0, 0, fmt.Errorf("/proc/%d/stat: malformed", pid)
	}
	// f[0] is field 3 (state), f[1] field 4 (ppid), f[19] field 22 (starttime).
	ppid, err1 := strconv.Atoi(f[1])
	start, err2 := strconv.ParseUint(f[19], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return "", 0, 0, 0, fmt.Errorf("/proc/%d/stat: %w", pid, err)
	}
	return string(b[open+1 : end]), f[0][0], ppid, start, nil
}

// childProcs returns the processes whose parent is ppid.
func childProcs(ppid int) ([]procInfo, error) {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil, err
	}
	var out []procInfo
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		comm, state, pp, start, err := procStat(pid)
		if err != nil || pp != ppid || state == 'Z' || state == 'X' {
			continue // gone meanwhile, someone else's, or dead
		}
		out = append(out, procInfo{pid: pid, comm: comm, start: start})
	}
	return out, nil
}

// exists reports whether the process is still there, even as a zombie
// that its parent has not reaped yet.
func (p procInfo) exists() bool {
	_, _, _, start, err := procStat(p.pid)
	return err == nil && start == p.start
}

// alive reports whether the process still runs (a zombie does not).
func (p procInfo) alive() bool {
	_, state, _, start, err := procStat(p.pid)
	return err == nil && start == p.start && state != 'Z' && state != 'X'
}

// waitGone waits up to d for p to exit and reports whether it did.
func waitGone(p procInfo, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for p.alive() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(10 * time.Millisecond)
	}
	return true
}

// kill sends SIGKILL to p, through a pidfd (os.FindProcess opens one) so
// that, once its start time has been checked again, a reused pid cannot
// be hit.
func (p procInfo) kill() error {
	pr, err := os.FindProcess(p.pid)
	if err != nil {
		return nil // gone
	}
	defer pr.Release()
	if !p.alive() {
		return nil
	}
	if err := pr.Signal(syscall.SIGKILL); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("kill %s (pid %d): %w", p.comm, p.pid, err)
	}
	return nil
}
