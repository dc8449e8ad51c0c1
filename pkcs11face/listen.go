package pkcs11face

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"time"
)

// DefaultSocket is where the socket is by default:
// $XDG_RUNTIME_DIR/slotwatch/pkcs11 (a private, per-user tmpfs), "" if
// XDG_RUNTIME_DIR is not set.
func DefaultSocket() string {
	dir := os.Getenv("XDG_RUNTIME_DIR")
	if dir == "" {
		return ""
	}
	return filepath.Join(dir, "slotwatch", "pkcs11")
}

// Listen creates the socket at path for this user only: its directory is
// created 0700 if missing (an existing one must be this user's and not
// writable by others), the socket is made 0600. A socket file left by a
// daemon that died is replaced; one a live server answers on is not (two
// daemons must not split the clients), nor is a file that is not a socket.
func Listen(path string) (*net.UnixListener, error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("pkcs11 socket: %w", err)
	}
	st, err := os.Lstat(dir)
	if err != nil {
		return nil, fmt.Errorf("pkcs11 socket: %w", err)
	}
	sys, _ := st.Sys().(*syscall.Stat_t)
	switch {
	case !st.IsDir():
		return nil, fmt.Errorf("pkcs11 socket: %s is not a directory", dir)
	case sys != nil && int(sys.Uid) != os.Getuid():
		return nil, fmt.Errorf("pkcs11 socket: %s belongs to uid %d, not to this user (%d)", dir, sys.Uid, os.Getuid())
	case st.Mode().Perm()&0o022 != 0:
		return nil, fmt.Errorf("pkcs11 socket: %s is writable by others (mode %o): refusing to put a socket there", dir, st.Mode().Perm())
	}
	if err := removeStale(path); err != nil {
		return nil, err
	}
	// The socket is created with the umask's mode; create it 0600 from
	// the start rather than chmod it after: no window where another user
	// could connect (the directory is 0700 anyway).
	old := syscall.Umask(0o177)
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	syscall.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("pkcs11 socket: %w", err)
	}
	return l, nil
}

// removeStale removes a socket file nobody listens on.
func removeStale(path string) error {
	st, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("pkcs11 socket: %w", err)
	}
	if st.Mode().Type() != os.ModeSocket {
		return fmt.Errorf("pkcs11 socket: %s exists and is not a socket: not replacing it", path)
	}
	c, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		c.Close()
		return fmt.Errorf("pkcs11 socket: %s: another server answers there (another slotwatch?)", path)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("pkcs11 socket: %s: cannot tell whether a server still uses it: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("pkcs11 socket: removing the stale %s: %w", path, err)
	}
	return nil
}

// peerCred returns the uid and pid of the process at the other end of c
// (SO_PEERCRED: what the kernel recorded at connect, not what the client
// says).
func peerCred(c *net.UnixConn) (uid, pid uint32, err error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return 0, 0, err
	}
	var cred *syscall.Ucred
	var credErr error
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = syscall.GetsockoptUcred(int(fd), syscall.SOL_SOCKET, syscall.SO_PEERCRED)
	}); err != nil {
		return 0, 0, err
	}
	if credErr != nil {
		return 0, 0, credErr
	}
	return cred.Uid, uint32(cred.Pid), nil
}
