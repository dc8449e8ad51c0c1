package tests

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/slotwatch/slotwatch/tests/stack"
)

// TestPKCS11FromASandbox: a program in a Flatpak-style sandbox — bubblewrap,
// which Flatpak runs apps in: its own mount, PID, IPC and network
// namespaces, a fresh /run with only slotwatch's socket directory bound in
// read-only (what `--filesystem=xdg-run/slotwatch:ro` gives a Flatpak app)
// — lists the token, logs in and finds its objects through slotwatch,
// and slotwatch names it by its real process (SO_PEERCRED across the PID
// namespace).
func TestPKCS11FromASandbox(t *testing.T) {
	if _, err := exec.LookPath("bwrap"); err != nil {
		t.Fatalf("bubblewrap is not installed (make deps installs it): %v", err)
	}
	// Namespaces may be refused (a container without CAP_SYS_ADMIN and
	// without unprivileged user namespaces): then no sandbox can be made
	// here at all, which says nothing about slotwatch.
	if out, err := exec.Command("bwrap", "--unshare-all", "--ro-bind", "/", "/", "true").CombinedOutput(); err != nil {
		t.Skipf("SKIP: bubblewrap cannot make a sandbox on this machine (%v: %s); the sandboxed client is untested here", err, strings.TrimSpace(string(out)))
	}
	_, sock, d := p11DaemonWith(t)
	runDir := fmt.Sprintf("/run/user/%d", os.Getuid())
	inside := runDir + "/slotwatch/pkcs11"
	args := []string{
		"--unshare-all", "--die-with-parent", "--new-session",
		"--ro-bind", "/usr", "/usr", "--ro-bind", "/etc", "/etc",
		"--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64", "--symlink", "usr/bin", "/bin",
		"--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--tmpfs", "/run",
		"--ro-bind", filepath.Dir(sock), runDir + "/slotwatch",
		"--clearenv", "--setenv", "PATH", "/usr/bin", "--setenv", "XDG_RUNTIME_DIR", runDir,
		"--setenv", "P11_KIT_SERVER_ADDRESS", "unix:path=" + inside,
		"pkcs11-tool", "--module", stack.P11KitClientModule, "--token-label", hsmLabel,
		"--login", "--pin", hsmPIN, "--list-objects",
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "bwrap", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("pkcs11-tool in the sandbox: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "Private Key Object") {
		t.Fatalf("pkcs11-tool in the sandbox found no private key after its login:\n%s", out)
	}
	// The sandboxed program's pid is its pid outside (the kernel
	// translates SO_PEERCRED into slotwatch's PID namespace), so
	// slotwatch reads its name from /proc like any other client's.
	waitFor(t, "the daemon's log of the sandboxed client", func() bool {
		return strings.Contains(d.stderr.String(), "(pkcs11-tool) #")
	})
	for _, line := range strings.Split(d.stderr.String(), "\n") {
		if strings.Contains(line, "pkcs11 client connected") && strings.Contains(line, "(pkcs11-tool)") && strings.Contains(line, "pid 1 ") {
			t.Fatalf("slotwatch saw the sandbox's pid 1, not the client's own: %s", line)
		}
	}
}
