package vcard

import (
	"net"
	"syscall"
)

// quickAck asks Linux to ACK received data at once instead of delaying the
// ACK (up to 40 ms). The kernel leaves quick-ACK mode by itself, so it is
// re-armed before every read. Errors only cost speed and are ignored.
func quickAck(conn *net.TCPConn) {
	rc, err := conn.SyscallConn()
	if err != nil {
		return
	}
	_ = rc.Control(func(fd uintptr) {
		_ = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_TCP, syscall.TCP_QUICKACK, 1)
	})
}
