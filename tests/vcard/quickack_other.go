//go:build !linux

package vcard

import "net"

// quickAck is Linux-only (TCP_QUICKACK); elsewhere delayed ACKs only make
// the card slower.
func quickAck(*net.TCPConn) {}
