package stack

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// SystemdPath is the service manager binary that runs as "systemd --user".
const SystemdPath = "/lib/systemd/systemd"

// userManagerReadyTimeout bounds the manager's start-up (READY=1).
const userManagerReadyTimeout = 30 * time.Second

// UserManagerConfig describes a systemd user manager for a test.
type UserManagerConfig struct {
	// Dir holds everything of the manager: the runtime directory (its
	// XDG_RUNTIME_DIR, with the session bus socket), the home directory
	// (XDG_CONFIG_HOME/systemd/user holds the test's units and drop-ins)
	// and the logs. Paths in it must not need quoting in unit files.
	Dir string
	// Root is a tree of installed files (a package extracted with
	// dpkg-deb -x): in the manager's mount namespace Root/usr is laid over
	// /usr and Root/etc over /etc (read-only overlays), so that the
	// manager, the bus and every unit see them where the package puts
	// them, and nothing is written to the real /usr or /etc.
	Root string
	// Units are extra unit files and drop-ins, by path relative to
	// XDG_CONFIG_HOME/systemd/user ("foo.service.d/50-test.conf").
	Units map[string]string
}

// UserManager is "systemd --user" running in a private mount namespace
// made with bubblewrap, in a cgroup of its own, with a session bus of its
// own; nothing of it touches the machine's /run, its buses, its user
// managers or other processes' cgroups:
//
//   - a fresh tmpfs on /run with /run/systemd/system, so that systemd
//     believes the system was booted with it (it refuses to run as a user
//     instance otherwise), and the machine's /run (its system bus, pcscd,
//     journald) is out of sight;
//   - Root's usr and etc overlaid on /usr and /etc;
//   - /dev/kmsg and /dev/console, where systemd and its generators log
//     without a journal (the manager is told to log to kmsg), are a pipe
//     that this harness reads (Log), not the machine's;
//   - a new cgroup, below the test's own, as the manager's whole cgroup
//     tree: the manager runs in a cgroup namespace rooted there and sees
//     only a cgroup2 file system mounted from it. (A user manager moves
//     every process of its root cgroup into its init.scope: run in the
//     test's cgroup, it would move the machine's processes.)
//
// The session bus is what Debian's dbus-user-session runs: dbus.socket on
// $XDG_RUNTIME_DIR/bus and dbus.service running "dbus-daemon --session
// --address=systemd: --systemd-activation" (its log in BusLog instead of
// syslog). The manager connects to that bus once dbus.service runs, that
// is after the first client connected to the socket; activation files are
// those of the session bus's standard directories (the overlaid
// /usr/share/dbus-1/services among them). The manager starts
// slotwatch-test.target, which wants dbus.socket, and nothing else of the
// machine's user units; once a service starts, its default dependencies
// pull in basic.target and, as in a real session, the sockets and timers
// the machine enables for every user (gpg-agent's sockets, say): they
// listen in the runtime directory, and nothing runs behind them unless a
// client connects.
type UserManager struct {
	// PID is the manager's process id ("systemd --user").
	PID int
	// RuntimeDir is its XDG_RUNTIME_DIR; BusAddress the session bus there.
	RuntimeDir, BusAddress string
	// Home is its HOME; UnitDir is XDG_CONFIG_HOME/systemd/user.
	Home, UnitDir string
	// Cgroup is the manager's cgroup (the root of its tree) as the
	// machine sees it.
	Cgroup string

	dir     string
	bwrap   *proc
	logR    *os.File // read end of the console pipe (opened read-write)
	logDone chan struct{}
	log     lockedLog

	mu      sync.Mutex
	stopped bool
}

type lockedLog struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// The test's session: the bus socket, and nothing else.
const testTargetUnit = `[Unit]
Description=slotwatch test session
Wants=dbus.socket
After=dbus.socket
`

// As dbus-user-session's dbus.socket (without its ExecStartPost: the
// manager's environment has DBUS_SESSION_BUS_ADDRESS already).
const busSocketUnit = `[Unit]
Description=D-Bus User Message Bus Socket (slotwatch test)

[Socket]
ListenStream=%t/bus
`

// As dbus-user-session's dbus.service, logging to a file instead of
// syslog (there is none in the namespace).
const busServiceUnit = `[Unit]
Description=D-Bus User Message Bus (slotwatch test)
Requires=dbus.socket

[Service]
Type=notify
NotifyAccess=main
ExecStart=/usr/bin/dbus-daemon --session --address=systemd: --nofork --nopidfile --systemd-activation
StandardOutput=append:%s
StandardError=inherit
`

// BusLog returns what the session bus's dbus-daemon wrote.
func (m *UserManager) BusLog() string {
	b, _ := os.ReadFile(m.busLogPath())
	return string(b)
}

func (m *UserManager) busLogPath() string { return filepath.Join(m.dir, "dbus.log") }

// Log returns what the manager (and the generators it ran) logged.
func (m *UserManager) Log() string { return m.log.String() }

// unitSafe reports whether a path can go into a unit file as it is.
func unitSafe(p string) bool { return !strings.ContainsAny(p, " \t\n\"'\\%$;") }

// overlaySafe reports whether a path can go into overlayfs' lowerdir=.
func overlaySafe(p string) bool { return !strings.ContainsAny(p, ":,\\ \t\n\"'$`") }

// cgroup2Dir returns where the machine's cgroup2 hierarchy is mounted
// and this process's cgroup in it.
func cgroup2Dir() (mount, self string, err error) {
	mi, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return "", "", err
	}
	for _, l := range strings.Split(string(mi), "\n") {
		// ... mountpoint ... - fstype source options
		pre, post, ok := strings.Cut(l, " - ")
		if !ok || !strings.HasPrefix(post, "cgroup2 ") {
			continue
		}
		f := strings.Fields(pre)
		if len(f) >= 5 {
			mount = f[4]
			break
		}
	}
	if mount == "" {
		return "", "", errors.New("no cgroup2 file system is mounted")
	}
	cg, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return "", "", err
	}
	for _, l := range strings.Split(string(cg), "\n") {
		if p, ok := strings.CutPrefix(l, "0::"); ok {
			return mount, p, nil
		}
	}
	return "", "", errors.New("/proc/self/cgroup has no cgroup2 entry")
}

// newCgroup makes an empty cgroup below this process's own.
func newCgroup() (string, error) {
	mount, self, err := cgroup2Dir()
	if err != nil {
		return "", err
	}
	var r [6]byte
	rand.Read(r[:])
	dir := filepath.Join(mount, self, fmt.Sprintf("slotwatch-usermanager-%d-%s", os.Getpid(), hex.EncodeToString(r[:])))
	if err := os.Mkdir(dir, 0o755); err != nil {
		return "", fmt.Errorf("make a cgroup for the manager: %w", err)
	}
	return dir, nil
}

// removeCgroup removes a cgroup tree, deepest first. It fails if a
// process is still in it.
func removeCgroup(dir string) error {
	var dirs []string
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			dirs = append(dirs, p)
		}
		return nil
	})
	var errs []error
	for _, d := range slices.Backward(dirs) {
		if err := os.Remove(d); err != nil && !errors.Is(err, fs.ErrNotExist) {
			procs, _ := os.ReadFile(filepath.Join(d, "cgroup.procs"))
			errs = append(errs, fmt.Errorf("remove cgroup %s (processes: %q): %w", d, strings.Fields(string(procs)), err))
		}
	}
	return errors.Join(errs...)
}

// namespaceScript is what runs inside bubblewrap: join the new cgroup,
// lay the installed files over /usr and /etc, enter a cgroup namespace
// rooted at the new cgroup, mount a cgroup2 file system of it over
// /sys/fs/cgroup (hiding the machine's hierarchies), and become the
// command. Arguments: $1 cgroup.procs of the new cgroup, $2 the root of
// the installed files, then the command.
const namespaceScript = `set -e
echo $$ > "$1"
mount -t overlay slotwatch-usr -o "ro,lowerdir=$2/usr:/usr" /usr
if [ -d "$2/etc" ]; then mount -t overlay slotwatch-etc -o "ro,lowerdir=$2/etc:/etc" /etc; fi
shift 2
exec unshare --cgroup -- /bin/sh -c 'mount -t cgroup2 slotwatch-cgroup /sys/fs/cgroup && exec "$@"' sh "$@"
`

// bwrapArgs are bubblewrap's arguments for a namespace as described at
// UserManager, running cmd; infoFD is bwrap's --info-fd (0 for none).
func bwrapArgs(runtimeDir, logPipe string, infoFD int, cgroupProcs, root string, cmd ...string) []string {
	args := []string{
		"--dev-bind", "/", "/",
		"--tmpfs", "/run",
		"--dir", "/run/systemd/system",
		"--bind", runtimeDir, runtimeDir,
		"--cap-add", "CAP_SYS_ADMIN",
		"--die-with-parent",
	}
	if logPipe != "" {
		args = append(args, "--bind", logPipe, "/dev/console", "--bind", logPipe, "/dev/kmsg")
	}
	if infoFD > 0 {
		args = append(args, "--info-fd", strconv.Itoa(infoFD))
	}
	args = append(args, "--", "/bin/sh", "-c", namespaceScript, "sh", cgroupProcs, root)
	return append(args, cmd...)
}

// CheckUserManagerNamespace checks, with a probe, that this machine lets
// a test build the namespace of a UserManager around root: bubblewrap
// with CAP_SYS_ADMIN (a mount namespace, overlayfs, a cgroup namespace
// and a cgroup2 mount) and a writable cgroup2 hierarchy. The error says
// what failed.
func CheckUserManagerNamespace(root string) error {
	if _, err := exec.LookPath("bwrap"); err != nil {
		return fmt.Errorf("bubblewrap is not installed: %w", err)
	}
	for _, tool := range []string{"unshare", "mount", "nsenter"} {
		if _, err := exec.LookPath(tool); err != nil {
			return err
		}
	}
	cg, err := newCgroup()
	if err != nil {
		return err
	}
	defer removeCgroup(cg)
	rt, err := os.MkdirTemp("", "slotwatch-probe-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(rt)
	probe := `test -d /run/systemd/system && grep -q "^0::/$" /proc/self/cgroup && ` +
		`test "$(stat -f -c %T /sys/fs/cgroup)" = cgroup2fs && test -e /usr/bin/slotwatch`
	cmd := exec.Command("bwrap", bwrapArgs(rt, "", 0, filepath.Join(cg, "cgroup.procs"), root, "/bin/sh", "-c", probe)...)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("bwrap %s: %v: %s", strings.Join(cmd.Args[1:], " "), err, bytes.TrimSpace(out))
	}
	return nil
}

// StartUserManager starts "systemd --user" as described at UserManager
// and returns once it said READY=1.
func StartUserManager(cfg UserManagerConfig) (*UserManager, error) {
	for _, p := range []string{cfg.Dir, cfg.Root} {
		if !filepath.IsAbs(p) || !unitSafe(p) || !overlaySafe(p) {
			return nil, fmt.Errorf("path %q cannot be used as it is (absolute, no spaces, quotes, %%, :, ,)", p)
		}
	}
	m := &UserManager{
		dir:        cfg.Dir,
		RuntimeDir: filepath.Join(cfg.Dir, "rt"),
		Home:       filepath.Join(cfg.Dir, "home"),
		logDone:    make(chan struct{}),
	}
	m.BusAddress = "unix:path=" + filepath.Join(m.RuntimeDir, "bus")
	m.UnitDir = filepath.Join(m.Home, ".config", "systemd", "user")
	if n := len(filepath.Join(m.RuntimeDir, "systemd", "private")); n > 107 {
		return nil, fmt.Errorf("runtime directory %q is too long for unix sockets in it", m.RuntimeDir)
	}
	if err := os.MkdirAll(m.RuntimeDir, 0o700); err != nil {
		return nil, err
	}
	if err := os.Chmod(m.RuntimeDir, 0o700); err != nil {
		return nil, err
	}
	units := map[string]string{
		"slotwatch-test.target": testTargetUnit,
		"dbus.socket":           busSocketUnit,
		"dbus.service":          fmt.Sprintf(busServiceUnit, m.busLogPath()),
	}
	for k, v := range cfg.Units {
		units[k] = v
	}
	for name, text := range units {
		p := filepath.Join(m.UnitDir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return nil, err
		}
		if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
			return nil, err
		}
	}

	// The log pipe: opened read-write here, so that systemd's opens never
	// block and this end never sees EOF until Stop closes it.
	pipe := filepath.Join(cfg.Dir, "console")
	if err := syscall.Mkfifo(pipe, 0o600); err != nil {
		return nil, fmt.Errorf("mkfifo %s: %w", pipe, err)
	}
	r, err := os.OpenFile(pipe, os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	m.logR = r
	go func() {
		defer close(m.logDone)
		io.Copy(&m.log, r)
	}()

	fail := func(err error) (*UserManager, error) {
		m.Stop()
		return nil, fmt.Errorf("%w\n--- systemd --user log ---\n%s\n--- bus log ---\n%s", err, m.Log(), m.BusLog())
	}

	// READY=1 from the manager, as user@.service (Type=notify) gets it.
	notifyPath := filepath.Join(cfg.Dir, "notify")
	notify, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: notifyPath, Net: "unixgram"})
	if err != nil {
		return fail(err)
	}
	defer notify.Close()
	ready := make(chan struct{})
	go func() {
		buf := make([]byte, 4096)
		for {
			n, _, err := notify.ReadFromUnix(buf)
			if err != nil {
				return
			}
			if slices.Contains(strings.Split(string(buf[:n]), "\n"), "READY=1") {
				close(ready)
				return
			}
		}
	}()

	m.Cgroup, err = newCgroup()
	if err != nil {
		return fail(err)
	}
	info, infoW, err := os.Pipe()
	if err != nil {
		return fail(err)
	}
	defer info.Close()
	manager := []string{SystemdPath, "--user", "--unit=slotwatch-test.target", "--log-target=kmsg", "--log-level=info"}
	cmd := exec.Command("bwrap", bwrapArgs(m.RuntimeDir, pipe, 3, filepath.Join(m.Cgroup, "cgroup.procs"), cfg.Root, manager...)...)
	cmd.Env = []string{
		"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		"HOME=" + m.Home,
		"XDG_CONFIG_HOME=" + filepath.Join(m.Home, ".config"),
		"XDG_RUNTIME_DIR=" + m.RuntimeDir,
		"DBUS_SESSION_BUS_ADDRESS=" + m.BusAddress,
		"NOTIFY_SOCKET=" + notifyPath,
		"LANG=C.UTF-8",
		"USER=root", "LOGNAME=root", "SHELL=/bin/sh",
	}
	cmd.Stdout, cmd.Stderr = &m.log, &m.log
	cmd.ExtraFiles = []*os.File{infoW}
	p, err := startProc(cmd)
	infoW.Close()
	if err != nil {
		return fail(err)
	}
	m.bwrap = p

	// bwrap writes {"child-pid": N, ...} once the namespace is made; N
	// runs the script, then systemd (exec keeps the pid).
	var childInfo struct {
		ChildPID int `json:"child-pid"`
	}
	if err := json.NewDecoder(bufio.NewReader(info)).Decode(&childInfo); err != nil || childInfo.ChildPID <= 0 {
		return fail(fmt.Errorf("bwrap gave no child pid (%v); exit: %v", err, p.err))
	}
	m.PID = childInfo.ChildPID

	timer := time.NewTimer(userManagerReadyTimeout)
	defer timer.Stop()
	select {
	case <-ready:
	case <-p.done:
		return fail(fmt.Errorf("systemd --user exited before READY=1: %v", p.err))
	case <-timer.C:
		return fail(fmt.Errorf("systemd --user did not say READY=1 within %v", userManagerReadyTimeout))
	}
	return m, nil
}

// Systemctl runs "systemctl --user ARGS" in the manager's mount
// namespace (as a user's systemctl would see it) and returns its output.
func (m *UserManager) Systemctl(args ...string) (string, error) {
	full := append([]string{"--mount=/proc/" + strconv.Itoa(m.PID) + "/ns/mnt", "--", "systemctl", "--user", "--no-pager", "--no-ask-password"}, args...)
	cmd := exec.Command("nsenter", full...)
	cmd.Env = []string{
		"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		"XDG_RUNTIME_DIR=" + m.RuntimeDir,
		"HOME=" + m.Home,
		"LANG=C.UTF-8",
		"SYSTEMD_COLORS=0",
		"SYSTEMD_PAGER=",
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("systemctl --user %s: %w", strings.Join(args, " "), err)
	}
	return string(out), nil
}

// Show returns properties of unit ("systemctl --user show -p ...").
func (m *UserManager) Show(unit string, props ...string) (map[string]string, error) {
	args := []string{"show", unit}
	for _, p := range props {
		args = append(args, "-p", p)
	}
	out, err := m.Systemctl(args...)
	if err != nil {
		return nil, fmt.Errorf("%w: %s", err, out)
	}
	kv := map[string]string{}
	for _, l := range strings.Split(out, "\n") {
		if k, v, ok := strings.Cut(l, "="); ok {
			kv[k] = v
		}
	}
	return kv, nil
}

// Descendants returns the processes below the manager, by pid.
func (m *UserManager) Descendants() ([]int, error) {
	var out []int
	queue := []int{m.PID}
	for len(queue) > 0 {
		kids, err := childProcs(queue[0])
		if err != nil {
			return nil, err
		}
		queue = queue[1:]
		for _, k := range kids {
			out = append(out, k.pid)
			queue = append(queue, k.pid)
		}
	}
	return out, nil
}

// Stop stops the manager by its pid: SIGTERM, which makes a user manager
// start exit.target (stopping every unit) and exit; SIGKILL after 15 s.
// Then it makes sure that every process the manager had is gone (killing
// any left, by pid, which is an error) and removes the manager's cgroup
// tree. It is idempotent.
func (m *UserManager) Stop() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.stopped {
		return nil
	}
	m.stopped = true
	var errs []error
	if m.bwrap != nil {
		var kids []procInfo
		if m.PID > 0 {
			queue := []int{m.PID}
			for len(queue) > 0 {
				ks, _ := childProcs(queue[0])
				queue = queue[1:]
				for _, k := range ks {
					kids = append(kids, k)
					queue = append(queue, k.pid)
				}
			}
			if _, _, _, start, err := procStat(m.PID); err == nil {
				mgr := procInfo{pid: m.PID, comm: "systemd", start: start}
				if pr, err := os.FindProcess(m.PID); err == nil {
					if mgr.alive() {
						pr.Signal(syscall.SIGTERM)
					}
					pr.Release()
				}
			}
		}
		if !m.bwrap.wait(15 * time.Second) {
			errs = append(errs, errors.New("systemd --user did not exit within 15 s of SIGTERM; killed"))
			if pr, err := os.FindProcess(m.PID); err == nil {
				pr.Signal(syscall.SIGKILL)
				pr.Release()
			}
			if !m.bwrap.wait(5 * time.Second) {
				m.bwrap.kill()
			}
		}
		for _, k := range kids {
			if waitGone(k, stopGrace) {
				continue
			}
			errs = append(errs, fmt.Errorf("%s (pid %d) outlived systemd --user and was killed", k.comm, k.pid))
			if err := k.kill(); err != nil {
				errs = append(errs, err)
			}
			waitGone(k, stopGrace)
		}
	}
	if m.Cgroup != "" {
		// Processes the manager lost track of would still be here.
		procs, _ := os.ReadFile(filepath.Join(m.Cgroup, "cgroup.procs"))
		if err := removeCgroup(m.Cgroup); err != nil {
			errs = append(errs, err)
			for _, f := range strings.Fields(string(procs)) {
				if pid, err := strconv.Atoi(f); err == nil {
					if _, _, _, start, err := procStat(pid); err == nil {
						procInfo{pid: pid, comm: "left in the manager's cgroup", start: start}.kill()
					}
				}
			}
		}
	}
	if m.logR != nil {
		m.logR.Close()
		<-m.logDone
	}
	return errors.Join(errs...)
}

// StartUserManagerForTest starts a UserManager (cfg.Dir "" becomes
// t.TempDir()) that t's cleanup stops; on failure it fails t with the
// manager's and the bus's logs.
func StartUserManagerForTest(t testing.TB, cfg UserManagerConfig) *UserManager {
	t.Helper()
	if cfg.Dir == "" {
		cfg.Dir = t.TempDir()
	}
	m, err := StartUserManager(cfg)
	if err != nil {
		t.Fatalf("%v", err)
	}
	t.Cleanup(func() {
		if err := m.Stop(); err != nil {
			t.Errorf("stop systemd --user: %v\n--- its log ---\n%s", err, m.Log())
		}
		if t.Failed() {
			t.Logf("systemd --user log:\n%s\n--- session bus log ---\n%s", m.Log(), m.BusLog())
		}
	})
	return m
}
