package stack

import (
	"bufio"
	"errors"
	"fmt"
	"html"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"
)

// dbusConf is a session bus that any local client may use for anything:
// tests own the whole bus. Without a <servicedir> nothing is ever
// auto-started; <standard_session_servicedirs/> is deliberately absent.
const dbusConf = `<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path=%s</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
%s</busconfig>
`

// DBus is a private dbus-daemon. Its methods are safe for concurrent use.
type DBus struct {
	// Address is the bus address, for DBUS_SESSION_BUS_ADDRESS or
	// dbus.Connect.
	Address string

	dir    string
	ownDir bool

	mu       sync.Mutex
	proc     *proc
	finalLog string
}

// StartDBus starts a private session bus listening on a socket in dir
// ("" = a new temporary directory, removed by Stop) and returns once it
// printed its address. serviceDir, if not "", is the bus's only service
// directory (activatable services); "" means none. The error of a failed
// start contains the daemon's log.
func StartDBus(dir, serviceDir string) (*DBus, error) {
	d := &DBus{dir: dir}
	if d.dir == "" {
		tmp, err := os.MkdirTemp("", "slotwatch-dbus-")
		if err != nil {
			return nil, err
		}
		d.dir, d.ownDir = tmp, true
	}
	if err := d.start(serviceDir); err != nil {
		log := d.readLog()
		if d.ownDir {
			os.RemoveAll(d.dir)
		}
		return nil, fmt.Errorf("start dbus-daemon: %w\n--- dbus-daemon log ---\n%s", err, log)
	}
	return d, nil
}

func (d *DBus) logPath() string { return filepath.Join(d.dir, "dbus.log") }

func (d *DBus) readLog() string {
	b, _ := os.ReadFile(d.logPath())
	return string(b)
}

func (d *DBus) start(serviceDir string) error {
	sock := filepath.Join(d.dir, "bus")
	if len(sock) > 107 {
		return fmt.Errorf("socket path %q is longer than a unix socket address (107 bytes)", sock)
	}
	os.Remove(sock) // a leftover of a killed run
	var sd string
	if serviceDir != "" {
		sd = "  <servicedir>" + html.EscapeString(serviceDir) + "</servicedir>\n"
	}
	conf := filepath.Join(d.dir, "bus.conf")
	if err := os.WriteFile(conf, []byte(fmt.Sprintf(dbusConf, html.EscapeString(sock), sd)), 0o644); err != nil {
		return err
	}
	logf, err := os.OpenFile(d.logPath(), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer logf.Close()

	// dbus-daemon prints its address on fd 3 once it listens: reading it
	// is the readiness signal.
	pr, pw, err := os.Pipe()
	if err != nil {
		return err
	}
	defer pr.Close()
	cmd := exec.Command("dbus-daemon", "--config-file="+conf, "--nofork", "--nopidfile", "--print-address=3")
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.ExtraFiles = []*os.File{pw}
	p, err := startProc(cmd)
	pw.Close() // the daemon has its copy; EOF on pr if it dies
	if err != nil {
		return err
	}
	pr.SetReadDeadline(time.Now().Add(readyTimeout))
	line, err := bufio.NewReader(pr).ReadString('\n')
	addr := strings.TrimSpace(line)
	if err != nil || addr == "" {
		p.kill()
		if err == nil {
			err = errors.New("empty address")
		}
		return fmt.Errorf("reading the bus address: %w (exit: %v)", err, p.err)
	}
	d.Address, d.proc = addr, p
	return nil
}

// PID returns the pid of the running dbus-daemon, or 0.
func (d *DBus) PID() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.proc == nil || d.proc.exited() {
		return 0
	}
	return d.proc.pid()
}

// Log returns what dbus-daemon wrote to stdout and stderr.
func (d *DBus) Log() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.proc == nil {
		return d.finalLog
	}
	return d.readLog()
}

// Stop ends dbus-daemon (SIGTERM, after 5 s SIGKILL) and removes the
// directory if StartDBus created it. It is idempotent.
func (d *DBus) Stop() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.proc == nil {
		return nil
	}
	err := d.proc.stop(stopGrace)
	d.proc = nil
	d.finalLog = d.readLog()
	if d.ownDir {
		os.RemoveAll(d.dir)
	} else {
		os.Remove(filepath.Join(d.dir, "bus"))
	}
	return err
}
