package stack

import (
	"testing"

	godbus "github.com/godbus/dbus/v5"
)

// StartPCSCDForTest starts a pcscd (StartPCSCD) that t's cleanup stops. A
// cfg.Dir of "" becomes t.TempDir(). It fails t with pcscd's log if the
// start fails, and reports a failing stop the same way.
func StartPCSCDForTest(t testing.TB, cfg PCSCDConfig) *PCSCD {
	t.Helper()
	if cfg.Dir == "" {
		cfg.Dir = t.TempDir()
	}
	p, err := StartPCSCD(cfg)
	if err != nil {
		t.Fatalf("%v", err) // the error carries the log
	}
	t.Cleanup(func() {
		if err := p.Stop(); err != nil {
			t.Errorf("stop pcscd: %v\n--- pcscd log ---\n%s", err, p.Log())
		}
	})
	return p
}

// StartDBusForTest starts a private bus (StartDBus) in t.TempDir() that
// t's cleanup stops.
func StartDBusForTest(t testing.TB, serviceDir string) *DBus {
	t.Helper()
	d, err := StartDBus(t.TempDir(), serviceDir)
	if err != nil {
		t.Fatalf("%v", err)
	}
	t.Cleanup(func() {
		if err := d.Stop(); err != nil {
			t.Errorf("stop dbus-daemon: %v\n--- dbus-daemon log ---\n%s", err, d.Log())
		}
	})
	return d
}

// ConnectForTest connects a client to the bus at address; t's cleanup
// closes the connection.
func ConnectForTest(t testing.TB, address string) *godbus.Conn {
	t.Helper()
	conn, err := godbus.Connect(address)
	if err != nil {
		t.Fatalf("connect to the test bus: %v", err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// NewObserverForTest starts an Observer of p's readers that t's cleanup
// closes; on failure it fails t with pcscd's log.
func NewObserverForTest(t testing.TB, p *PCSCD) *Observer {
	t.Helper()
	o, err := NewObserver(p.Readers())
	if err != nil {
		t.Fatalf("%v\n--- pcscd log ---\n%s", err, p.Log())
	}
	t.Cleanup(func() { o.Close() })
	return o
}
