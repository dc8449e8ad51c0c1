package module

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/miekg/pkcs11"
	"github.com/slotwatch/slotwatch/tests/faultmod"
	"github.com/slotwatch/slotwatch/tests/stack"
)

// Test fixtures, not secrets. Distinct digits so that a leak of any of them
// into the call log is unambiguous.
const (
	alphaLabel   = "alpha"
	alphaSOPIN   = "55443322"
	alphaUserPIN = "918273"
	initLabel    = "initme"
	initSOPIN    = "670451"
	initUserPIN  = "246813"
	keyID        = 0x42 // EC P-256 key pair on alpha, made by pkcs11-tool
)

var openSCModule = stack.OpenSCModule

var (
	fmSocket  string // faultmod's control socket (FAULTMOD_CONTROL), set before any load
	hsm       *stack.SoftHSM
	hsmErr    error // why there is no SoftHSM store, reported by every test that needs it
	keyGenErr error // why there is no key pair on alpha (only the Sign test needs it)
)

// TestMain creates a private SoftHSM store with two tokens before anything
// initializes SoftHSM in this process (SoftHSM reads SOFTHSM2_CONF, and sees
// tokens made by another process, only at C_Initialize), points libpcsclite
// at a socket that does not exist, so OpenSC never reaches the machine's
// pcscd (libpcsclite reads the variable once per process), and gives
// faultmod (one instance per process, faultmod_test.go) a private control
// socket.
func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "slotwatch-module-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	if os.Getenv(childEnv) != "" {
		// A child run by a test that started a private pcscd for it: keep
		// the PCSCLITE_CSOCK_NAME it was given, and no SoftHSM.
		hsmErr = fmt.Errorf("child process of a pcscd test")
	} else {
		hsm, hsmErr = setupSoftHSM(dir)
		if hsmErr == nil {
			os.Setenv("SOFTHSM2_CONF", hsm.Conf)
		}
		os.Setenv("PCSCLITE_CSOCK_NAME", filepath.Join(dir, "no-pcscd", "pcscd.comm"))
		// faultmod reads these once, at its first call in this process;
		// only faultmod reads them.
		fmSocket = filepath.Join(dir, "faultmod.sock")
		for _, kv := range faultmod.Env(fmSocket, fmSlots) {
			k, v, _ := strings.Cut(kv, "=")
			os.Setenv(k, v)
		}
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func setupSoftHSM(dir string) (*stack.SoftHSM, error) {
	h, err := stack.NewSoftHSM(filepath.Join(dir, "softhsm"))
	if err != nil {
		return nil, err
	}
	if err := h.InitToken(alphaLabel, alphaSOPIN, alphaUserPIN); err != nil {
		return nil, err
	}
	if err := h.InitToken(initLabel, initSOPIN, initUserPIN); err != nil {
		return nil, err
	}
	cmd := exec.Command("pkcs11-tool", "--module", stack.SoftHSMModule, "--token-label", alphaLabel,
		"--login", "--pin", alphaUserPIN, "--keypairgen", "--key-type", "EC:prime256v1",
		"--id", fmt.Sprintf("%02x", keyID), "--label", "signing key")
	cmd.Env = append(os.Environ(), h.Env()...)
	if out, err := cmd.CombinedOutput(); err != nil {
		keyGenErr = fmt.Errorf("pkcs11-tool --keypairgen: %v\n%s", err, out)
	}
	return h, nil
}

// openSoftHSM returns an initialized SoftHSM module; cleanup gives up every
// hold still left (a failed test may leave some).
func openSoftHSM(t *testing.T, opts Options) *Module {
	t.Helper()
	if hsmErr != nil {
		t.Fatalf("no SoftHSM store: %v", hsmErr)
	}
	if opts.Name == "" {
		opts.Name = "softhsm"
	}
	m := Open(stack.SoftHSMModule, opts)
	if err := m.Initialize(); err != nil {
		t.Fatalf("Initialize: %v", err)
	}
	t.Cleanup(func() { finalizeAll(m) })
	return m
}

func finalizeAll(m *Module) {
	for m.Finalize() == nil {
	}
}

// slotOf finds the slot holding the token labelled label.
func slotOf(t *testing.T, m *Module, label string) uint {
	t.Helper()
	slots, err := m.SlotList(true)
	if err != nil {
		t.Fatalf("SlotList: %v", err)
	}
	for _, s := range slots {
		ti, err := m.TokenInfo(s)
		if err != nil {
			t.Fatalf("TokenInfo(%d): %v", s, err)
		}
		if ti.Label == label {
			return s
		}
	}
	t.Fatalf("no token %q in slots %v", label, slots)
	return 0
}

// rawCtx is a second miekg handle on the same, already initialized SoftHSM
// instance (dlopen returns the loaded library). Tests use it to ask the
// module itself about handles the registry no longer has. Never finalize it.
func rawCtx(t *testing.T) *pkcs11.Ctx {
	t.Helper()
	c := pkcs11.New(stack.SoftHSMModule)
	if c == nil {
		t.Fatal("pkcs11.New(softhsm) = nil")
	}
	t.Cleanup(c.Destroy)
	return c
}
