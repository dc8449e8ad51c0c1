package stack

import (
	"bufio"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
)

// vpcd ports are looked at, never connected to: a connect() to a vpcd
// port is a card insertion (and, with vpcd's backlog of 0, it can also
// delay the next real one by a second). So free ports are chosen and
// readiness is detected by reading the kernel's socket tables in
// /proc/net/tcp and /proc/net/tcp6.

// Ports are picked at random in [portLow, portHigh): high enough to be
// unprivileged and rarely used, and below Linux's default ephemeral range
// (32768-60999), so an outgoing connection of another process cannot hold
// one by chance. Random, because test binaries of several packages run in
// parallel processes that know nothing of each other.
const (
	portLow  = 20000
	portHigh = 32700
)

const tcpListen = 0x0A // st column value of a listening socket

// tcpSocket is the part of a /proc/net/tcp line the harness needs.
type tcpSocket struct {
	port  int    // local port
	state int    // TCP state, tcpListen for a listener
	inode uint64 // socket inode, matches /proc/PID/fd/N -> "socket:[inode]"
}

// readTCPSockets returns every IPv4 and IPv6 TCP socket of the network
// namespace, in any state.
func readTCPSockets() ([]tcpSocket, error) {
	var all []tcpSocket
	for _, name := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		s, err := parseTCPFile(name)
		if errors.Is(err, os.ErrNotExist) && strings.HasSuffix(name, "6") {
			continue // IPv6 disabled
		}
		if err != nil {
			return nil, err
		}
		all = append(all, s...)
	}
	return all, nil
}

// parseTCPFile parses lines like
//
//	sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
//	0: 00000000:A028 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 123456 ...
func parseTCPFile(name string) ([]tcpSocket, error) {
	f, err := os.Open(name)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []tcpSocket
	sc := bufio.NewScanner(f)
	sc.Scan() // header
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 10 {
			continue
		}
		local := fields[1]
		i := strings.LastIndexByte(local, ':')
		if i < 0 {
			continue
		}
		port, err1 := strconv.ParseUint(local[i+1:], 16, 16)
		state, err2 := strconv.ParseUint(fields[3], 16, 8)
		inode, err3 := strconv.ParseUint(fields[9], 10, 64)
		if err1 != nil || err2 != nil || err3 != nil {
			return nil, fmt.Errorf("%s: unexpected line %q", name, sc.Text())
		}
		out = append(out, tcpSocket{port: int(port), state: int(state), inode: inode})
	}
	return out, sc.Err()
}

// pickFreePorts returns a random base such that base .. base+n-1 are used
// by no TCP socket at all (listening, connected or in TIME_WAIT: vpcd binds
// without SO_REUSEADDR, so even a TIME_WAIT leftover would make it fail).
// Another process can still take a port before pcscd binds it; the caller
// detects that and picks again.
func pickFreePorts(n int) (int, error) {
	socks, err := readTCPSockets()
	if err != nil {
		return 0, err
	}
	used := make(map[int]bool, len(socks))
	for _, s := range socks {
		used[s.port] = true
	}
	for range 100 {
		base := portLow + rand.IntN(portHigh-portLow-n)
		free := true
		for p := base; p < base+n; p++ {
			if used[p] {
				free = false
				break
			}
		}
		if free {
			return base, nil
		}
	}
	return 0, fmt.Errorf("no %d consecutive free TCP ports in [%d, %d)", n, portLow, portHigh)
}

// socketInodes returns the inodes of the sockets process pid has open.
func socketInodes(pid int) map[uint64]bool {
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil
	}
	out := make(map[uint64]bool)
	for _, e := range ents {
		link, err := os.Readlink(dir + "/" + e.Name())
		if err != nil || !strings.HasPrefix(link, "socket:[") {
			continue
		}
		if ino, err := strconv.ParseUint(strings.TrimSuffix(link[len("socket:["):], "]"), 10, 64); err == nil {
			out[ino] = true
		}
	}
	return out
}
