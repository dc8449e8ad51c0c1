package tests

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/slotwatch/slotwatch/tests/stack"
)

// sshAgent is an ssh-agent of the test's, loading PKCS#11 keys through
// p11-kit-client.so from slotwatch's socket. Cleanup stops it by PID.
type sshAgent struct {
	t       *testing.T
	dir     string
	env     []string
	askpass string
	out     *lockedBuffer
}

// startSSHAgent starts ssh-agent for PKCS#11 socket sock; pin is what
// ssh-add is told when it asks (SSH_ASKPASS).
func startSSHAgent(t *testing.T, sock, pin string) *sshAgent {
	t.Helper()
	dir, err := os.MkdirTemp(testDir, "ssh-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	a := &sshAgent{t: t, dir: dir, out: &lockedBuffer{}, askpass: filepath.Join(dir, "askpass")}
	agentSock := filepath.Join(dir, "agent")
	a.env = append(os.Environ(), stack.P11KitServerEnv(sock), "SSH_AUTH_SOCK="+agentSock)
	agent := exec.Command("ssh-agent", "-D", "-a", agentSock)
	agent.Env = a.env
	agent.Stdout, agent.Stderr = a.out, a.out
	if err := agent.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { agent.Process.Signal(syscall.SIGTERM); agent.Wait() })
	waitFor(t, "ssh-agent's socket", func() bool { _, err := os.Stat(agentSock); return err == nil })
	if err := os.WriteFile(a.askpass, []byte("#!/bin/sh\necho "+pin+"\n"), 0o700); err != nil {
		t.Fatal(err)
	}
	return a
}

// run runs an OpenSSH tool against the agent and returns its output.
func (a *sshAgent) run(stdin string, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = append(a.env, "SSH_ASKPASS="+a.askpass, "SSH_ASKPASS_REQUIRE=force", "DISPLAY=:0")
	if stdin != "" {
		cmd.Stdin = strings.NewReader(stdin)
	}
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func (a *sshAgent) must(name string, args ...string) string {
	a.t.Helper()
	out, err := a.run("", name, args...)
	if err != nil {
		a.t.Fatalf("%s %v: %v\n%s\nssh-agent:\n%s", name, args, err, out, a.out.String())
	}
	return out
}

// addPKCS11 is ssh-add -s of p11-kit-client.so; it returns the agent's
// first public key line (ssh-add -L).
func (a *sshAgent) addPKCS11() string {
	a.t.Helper()
	a.must("ssh-add", "-s", stack.P11KitClientModule)
	return strings.SplitN(a.must("ssh-add", "-L"), "\n", 2)[0]
}

// sign has the agent sign data with public key pub (ssh-keygen -Y sign),
// verifies the signature, and returns an error if either fails.
func (a *sshAgent) sign(pub, data string) error {
	pubFile, dataFile := filepath.Join(a.dir, "key.pub"), filepath.Join(a.dir, "data")
	allowed := filepath.Join(a.dir, "allowed")
	for f, s := range map[string]string{pubFile: pub + "\n", dataFile: data, allowed: "signer " + pub + "\n"} {
		if err := os.WriteFile(f, []byte(s), 0o600); err != nil {
			return err
		}
	}
	os.Remove(dataFile + ".sig")
	if out, err := a.run("", "ssh-keygen", "-Y", "sign", "-f", pubFile, "-n", "file", dataFile); err != nil {
		return &toolError{"ssh-keygen -Y sign", err, out + "\nssh-agent:\n" + a.out.String()}
	}
	if out, err := a.run(data, "ssh-keygen", "-Y", "verify", "-f", allowed, "-I", "signer", "-n", "file", "-s", dataFile+".sig"); err != nil {
		return &toolError{"ssh-keygen -Y verify", err, out}
	}
	return nil
}

type toolError struct {
	what string
	err  error
	out  string
}

func (e *toolError) Error() string { return e.what + ": " + e.err.Error() + "\n" + e.out }
