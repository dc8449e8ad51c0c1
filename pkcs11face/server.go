package pkcs11face

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"

	"github.com/miekg/pkcs11"

	"github.com/slotwatch/slotwatch/broker"
	"github.com/slotwatch/slotwatch/monitor"
)

// Options configures a Server.
type Options struct {
	Logger  *slog.Logger
	Version string // slotwatch's version, for C_GetInfo
	// MaxConnections bounds the clients served at once (each costs a
	// subscription to the monitor and a few goroutines); one more is
	// closed at once, and said so in the log. Default 256.
	MaxConnections int
}

// Server serves the PKCS#11 face on a listener: each connection is a
// broker caller, like a D-Bus connection.
type Server struct {
	b        *broker.Broker
	mon      *monitor.Monitor
	log      *slog.Logger
	ver      string
	slots    *slotTable
	tokens   tokenInfos
	maxConns int

	mu     sync.Mutex // guards conns, active, nextID
	conns  map[*conn]struct{}
	active int    // connections being served (MaxConnections)
	nextID uint64 // connections so far

	wg sync.WaitGroup
}

// New returns a server over the broker and the monitor's view.
func New(b *broker.Broker, mon *monitor.Monitor, opts Options) *Server {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.MaxConnections <= 0 {
		opts.MaxConnections = 256
	}
	return &Server{b: b, mon: mon, log: opts.Logger, ver: opts.Version, slots: newSlotTable(), maxConns: opts.MaxConnections}
}

// Serve accepts connections until ctx ends or l fails, then closes l and
// every connection (their callers leave the broker: their sessions close)
// and returns once they are gone.
func (s *Server) Serve(ctx context.Context, l *net.UnixListener) error {
	ctx, cancel := context.WithCancel(ctx)
	defer func() {
		cancel()
		s.wg.Wait()
	}()
	go func() {
		<-ctx.Done()
		l.Close()
	}()
	for {
		c, err := l.AcceptUnix()
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return nil
			}
			return fmt.Errorf("pkcs11 socket: %w", err)
		}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			s.serveConn(ctx, c)
		}()
	}
}

// serveConn checks who connected, makes it a caller, and serves it.
func (s *Server) serveConn(ctx context.Context, uc *net.UnixConn) {
	defer uc.Close()
	uid, pid, err := peerCred(uc)
	if err != nil {
		s.log.Warn("pkcs11 socket: cannot tell who connected; closing", "err", err)
		return
	}
	if int(uid) != os.Getuid() {
		// The socket is 0600 in a 0700 directory; a connection from
		// another user means those were changed (or root): refuse.
		s.log.Warn("pkcs11 socket: connection from another user refused", "uid", uid, "pid", pid)
		return
	}
	s.mu.Lock()
	full := s.active >= s.maxConns
	if !full {
		s.active++
	}
	s.mu.Unlock()
	if full {
		s.log.Warn("pkcs11 socket: too many clients; connection closed", "pid", pid, "max", s.maxConns)
		return
	}
	defer func() {
		s.mu.Lock()
		s.active--
		s.mu.Unlock()
	}()
	caller := broker.ProcessCaller(s.callerID(pid), uid, pid)
	s.b.Join(caller)
	defer s.b.Leave(caller.ID)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	c := &conn{srv: s, caller: caller, events: watchSlots(ctx, s.mon, s.slots), finds: map[pkcs11.SessionHandle]*findState{}}
	s.log.Info("pkcs11 client connected", "caller", caller.String())
	err = c.serve(ctx, uc)
	s.log.Info("pkcs11 client left", "caller", caller.ID, "err", err)
}

// released tells whether the view shows module name released (idle).
func (s *Server) released(name string) bool {
	for _, m := range s.mon.Snapshot().Modules {
		if m.Name == name {
			return m.Released
		}
	}
	return false
}

// tokenInfos keeps the last C_GetTokenInfo answer of each live token
// generation, for answering while its module is released.
type tokenInfos struct {
	mu    sync.Mutex
	byGen map[uint64]pkcs11.TokenInfo
}

func (t *tokenInfos) get(gen uint64) (pkcs11.TokenInfo, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	info, ok := t.byGen[gen]
	return info, ok
}

// put keeps gen's answer and forgets those of generations snap no longer
// shows.
func (t *tokenInfos) put(gen uint64, info pkcs11.TokenInfo, snap *monitor.Snapshot) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.byGen == nil {
		t.byGen = map[uint64]pkcs11.TokenInfo{}
	}
	t.byGen[gen] = info
	for g := range t.byGen {
		if _, ok := snap.Token(g); !ok && g != gen {
			delete(t.byGen, g)
		}
	}
}

// callerID names a connection for people and for the broker:
// "pkcs11:pid 1234 (ssh-agent) #7", #7 being the connection's number,
// which keeps the name unique for the daemon's life (pids are recycled).
func (s *Server) callerID(pid uint32) string {
	comm := "?"
	if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid)); err == nil {
		comm = strings.TrimSpace(string(b))
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.nextID++
	return fmt.Sprintf("pkcs11:pid %d (%s) #%d", pid, comm, s.nextID)
}
