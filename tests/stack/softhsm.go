package stack

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
)

// SoftHSMModule is where Debian 12's softhsm2 package installs the module.
const SoftHSMModule = "/usr/lib/softhsm/libsofthsm2.so"

// SoftHSM is a private SoftHSM2 token store: its own config file and token
// directory, so tests never see the machine's /var/lib/softhsm tokens.
//
// SoftHSM reads SOFTHSM2_CONF when the module is initialized, so a process
// that loads the module itself must set it (Setenv) before C_Initialize; a
// child process gets it through Env.
type SoftHSM struct {
	Dir      string // holds softhsm2.conf and tokens/
	Conf     string // value for SOFTHSM2_CONF
	TokenDir string
}

// NewSoftHSM creates an empty token store under dir.
func NewSoftHSM(dir string) (*SoftHSM, error) {
	if _, err := os.Stat(SoftHSMModule); err != nil {
		return nil, fmt.Errorf("softhsm2 is not installed (run make deps): %w", err)
	}
	s := &SoftHSM{Dir: dir, Conf: filepath.Join(dir, "softhsm2.conf"), TokenDir: filepath.Join(dir, "tokens")}
	if err := os.MkdirAll(s.TokenDir, 0o700); err != nil {
		return nil, err
	}
	conf := fmt.Sprintf("directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n", s.TokenDir)
	if err := os.WriteFile(s.Conf, []byte(conf), 0o600); err != nil {
		return nil, err
	}
	return s, nil
}

// Env is the environment a child process needs to use this store.
func (s *SoftHSM) Env() []string { return []string{"SOFTHSM2_CONF=" + s.Conf} }

// InitToken initializes a token in the first free slot with softhsm2-util.
// PINs here are test fixtures, not secrets.
func (s *SoftHSM) InitToken(label, soPIN, userPIN string) error {
	cmd := exec.Command("softhsm2-util", "--init-token", "--free", "--label", label, "--so-pin", soPIN, "--pin", userPIN)
	cmd.Env = append(os.Environ(), s.Env()...)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("softhsm2-util --init-token %q: %v\n%s", label, err, out)
	}
	return nil
}

// GenerateECKey makes a P-256 key pair with CKA_ID id (hex) in the token
// labelled token, with pkcs11-tool. PINs here are test fixtures.
func (s *SoftHSM) GenerateECKey(token, userPIN, idHex, label string) error {
	cmd := exec.Command("pkcs11-tool", "--module", SoftHSMModule, "--token-label", token,
		"--login", "--pin", userPIN, "--keypairgen", "--key-type", "EC:prime256v1", "--id", idHex, "--label", label)
	cmd.Env = append(os.Environ(), s.Env()...)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("pkcs11-tool --keypairgen: %v\n%s", err, out)
	}
	return nil
}
