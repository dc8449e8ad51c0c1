package tests

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/slotwatch/slotwatch/tests/stack"
)

// pcscSocket is the one pcscd socket path of this test process:
// libpcsclite reads PCSCLITE_CSOCK_NAME once per process, so every pcscd a
// test here starts listens on it, one at a time.
var pcscSocket string

// testDir is this test process's temp dir (the built binary, confs).
var testDir string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "slotwatch-tests-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	testDir = dir
	pcscSocket = filepath.Join(dir, "pcscd.comm")
	os.Setenv(stack.SocketEnv, pcscSocket)
	conf, err := stack.WriteOpenSCConf(dir)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Setenv(stack.OpenSCConfEnv, conf)
	// Never the user's runtime directory: a daemon's default PKCS#11
	// socket goes there (startDaemon gives each daemon one of its own).
	rt := filepath.Join(dir, "rt")
	if err := os.Mkdir(rt, 0o700); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Setenv("XDG_RUNTIME_DIR", rt)
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}
