package main

import (
	"context"
	"log/slog"
	"net"

	"github.com/coreos/go-systemd/v22/activation"

	"github.com/slotwatch/slotwatch/broker"
	"github.com/slotwatch/slotwatch/monitor"
	"github.com/slotwatch/slotwatch/pkcs11face"
)

// pkcs11Face is the running PKCS#11 face, or nothing (stop is then a
// no-op).
type pkcs11Face struct {
	cancel context.CancelFunc
	done   chan struct{}
}

// startPKCS11Face serves the PKCS#11 face on path ("" : off). A socket that
// cannot be made at the default path is a warning (the D-Bus face still
// serves); at a path given with --pkcs11-socket, it is an error in the log
// too, and the face is off.
func startPKCS11Face(path string, given bool, br *broker.Broker, mon *monitor.Monitor, logger *slog.Logger) *pkcs11Face {
	f := &pkcs11Face{}
	l := activatedSocket(logger)
	if l != nil {
		path = l.Addr().String()
	}
	if path == "" {
		logger.Info("PKCS#11 face off (no --pkcs11-socket, no XDG_RUNTIME_DIR)")
		return f
	}
	var err error
	if l == nil {
		l, err = pkcs11face.Listen(path)
	}
	if err != nil {
		level := slog.LevelWarn
		if given {
			level = slog.LevelError
		}
		logger.Log(context.Background(), level, "PKCS#11 face off", "err", err)
		return f
	}
	srv := pkcs11face.New(br, mon, pkcs11face.Options{Logger: logger, Version: version})
	ctx, cancel := context.WithCancel(context.Background())
	f.cancel, f.done = cancel, make(chan struct{})
	go func() {
		defer close(f.done)
		if err := srv.Serve(ctx, l); err != nil {
			logger.Error("PKCS#11 face stopped", "err", err)
		}
	}()
	logger.Info("PKCS#11 face", "socket", path)
	return f
}

// stop closes the socket and every client connection (their sessions
// close) and waits until they are gone.
func (f *pkcs11Face) stop() {
	if f.cancel == nil {
		return
	}
	f.cancel()
	<-f.done
}

// activatedSocket returns the PKCS#11 socket systemd passed (socket
// activation, packaging/slotwatch-pkcs11.socket: FileDescriptorName=pkcs11),
// nil if there is none. systemd made it with the unit's modes; slotwatch
// serves it as its own.
func activatedSocket(logger *slog.Logger) *net.UnixListener {
	named, err := activation.ListenersWithNames()
	if err != nil {
		logger.Warn("socket activation: cannot use the sockets systemd passed", "err", err)
		return nil
	}
	for _, l := range named["pkcs11"] {
		if ul, ok := l.(*net.UnixListener); ok {
			// The file belongs to the socket unit: leave it when we stop.
			ul.SetUnlinkOnClose(false)
			return ul
		}
		l.Close()
	}
	return nil
}
