package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	swversion "github.com/slotwatch/slotwatch/version"
	"log/slog"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	godbus "github.com/godbus/dbus/v5"

	"github.com/slotwatch/slotwatch/broker"
	"github.com/slotwatch/slotwatch/config"
	"github.com/slotwatch/slotwatch/dbusapi"
	"github.com/slotwatch/slotwatch/internal/logind"
	"github.com/slotwatch/slotwatch/monitor"
	"github.com/slotwatch/slotwatch/pkcs11face"
	"github.com/slotwatch/slotwatch/policy"
)

// version is slotwatch's, from version/VERSION (the one place it is kept).
var version = swversion.Version

// shutdownBudget is how long SIGTERM may take, sessions and modules
// included: systemd and the session manager wait for us.
const shutdownBudget = 2 * time.Second

func runServe(args []string) error {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	address := fs.String("address", "", "D-Bus address to serve on (default: the session bus, DBUS_SESSION_BUS_ADDRESS)")
	var modules stringList
	fs.Var(&modules, "module", "watch exactly this PKCS#11 module (repeatable; no config file, no p11-kit registry)")
	configPath := fs.String("config", "", "config file (default $XDG_CONFIG_HOME/slotwatch/slotwatch.conf, then /etc/slotwatch/slotwatch.conf)")
	var gnome gnomeFlag
	fs.Var(&gnome, "gnome-compat", "also serve org.gnome.SettingsDaemon.Smartcard, as gnome-settings-daemon's smartcard service does; =replace takes the name over from its owner where allowed")
	logCalls := fs.Bool("log-calls", false, "log every PKCS#11 call (PINs and secrets redacted)")
	logLevel := fs.String("log-level", "info", "debug, info, warn or error")
	noPCSC := fs.Bool("no-pcsc", false, "do not watch PC/SC readers")
	isolateFlag := fs.Bool("isolate", false, "run the --module modules in helper processes (p11-kit remote), as isolate = true does in the config")
	pkcs11Socket := fs.String("pkcs11-socket", pkcs11face.DefaultSocket(), "serve the PKCS#11 face (p11-kit's RPC protocol, for p11-kit-client.so) on this unix socket; empty: off")
	if err := fs.Parse(args); err != nil {
		return err
	}
	// Before any module is loaded: PINs pass through this process.
	if err := hardenProcess(); err != nil {
		return err
	}
	logger, err := newLogger(*logLevel, *logCalls)
	if err != nil {
		return err
	}
	if stop := startCPUProfile(logger); stop != nil {
		defer stop()
	}

	cfg, mods, warnings, err := config.ResolveModules(modules, *configPath)
	if err != nil {
		return err
	}
	for _, w := range warnings {
		logger.Warn(w)
	}
	if len(mods) == 0 {
		logger.Warn("no PKCS#11 module to watch: none given with --module, none in the config file or the p11-kit registry")
	}
	loaded := newLoadedModules(*isolateFlag, *logCalls, logger)
	watched := loaded.apply(mods)
	if cfg != nil && cfg.Source != "" {
		logger.Info("config", "file", cfg.Source)
	}

	conn, err := connectBus(*address)
	if err != nil {
		return err
	}
	defer conn.Close()

	mon, err := monitor.New(monitor.Config{Modules: watched, PCSC: !*noPCSC, Logger: logger, IdleRelease: loaded.idleRelease})
	if err != nil {
		return err
	}
	reportCritical(logger, mods, mon.Snapshot())
	limits, resumeLogin := broker.DefaultLimits(), config.Default().ResumeLogin
	if cfg != nil {
		limits, resumeLogin = cfg.Limits, cfg.ResumeLogin
	}
	br := broker.New(mon, loaded.set, broker.Options{Limits: limits, Logger: logger, ResumeLogin: resumeLogin})
	var pol atomic.Pointer[policy.Policy] // set once the service is up; Reload reconfigures it
	svc := dbusapi.New(conn, mon, br, dbusapi.Options{
		Logger:         logger,
		Version:        version,
		LoginTokenName: os.Getenv("PKCS11_LOGIN_TOKEN_NAME"),
		Gnome:          gnome.mode,
		Reload: func() (*monitor.Snapshot, error) {
			cfg, mods, warnings, err := config.ResolveModules(modules, *configPath)
			if err != nil {
				logger.Error("reload: keeping the current configuration", "err", err)
				return nil, &dbusapi.ConfigError{Err: err}
			}
			if p := pol.Load(); p != nil {
				p.SetConfig(removalPolicy(cfg, gnome.mode, logger, nil))
			}
			br.SetResumeLogin(cfg == nil || cfg.ResumeLogin)
			for _, w := range warnings {
				logger.Warn(w)
			}
			snap, err := mon.SetModules(loaded.apply(mods))
			if err != nil {
				return nil, err
			}
			reportCritical(logger, mods, snap)
			logger.Info("reloaded", "modules", len(mods))
			return snap, nil
		},
	})
	if err := svc.Start(); err != nil {
		mon.Close()
		return err
	}
	pol.Store(policy.Start(conn, mon, removalPolicy(cfg, gnome.mode, logger, svc.SetPolicyProblem)))
	// Suspend and resume (logind on the system bus, if any): on resume,
	// re-read everything at once; the policy counts removal graces from it.
	sleepWatch := logind.Start(logind.Config{
		Logger: logger,
		OnSleep: func() {
			logger.Info("the system is going to sleep")
			pol.Load().Sleep()
		},
		OnResume: func() {
			logger.Info("the system resumed: re-reading every reader and module")
			pol.Load().Resume()
			mon.Rescan()
		},
	})
	// The PKCS#11 face, before READY=1: a client started after it finds
	// the socket.
	p11 := startPKCS11Face(*pkcs11Socket, flagGiven(fs, "pkcs11-socket"), br, mon, logger)
	daemon.SdNotify(false, daemon.SdNotifyReady)
	logger.Info("serving", "name", dbusapi.BusName, "state", mon.Snapshot().State.String())

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	go watchdog(ctx, mon, logger)
	var exitErr error
	select {
	case <-ctx.Done():
	case <-conn.Context().Done():
		// The bus went away (a session ends, a test's private bus stops):
		// nobody can reach us any more, and systemd restarts us on failure.
		exitErr = errors.New("lost the connection to the bus")
		logger.Error("lost the connection to the bus; stopping")
	}

	daemon.SdNotify(false, daemon.SdNotifyStopping)
	logger.Info("stopping")
	done := make(chan struct{})
	go func() {
		sleepWatch.Close()
		pol.Load().Close()
		p11.stop()
		svc.Close()
		mon.Close()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(shutdownBudget):
		logger.Error("shutdown took longer than its budget; exiting anyway", "budget", shutdownBudget)
	}
	return exitErr
}

// connectBus connects to address, or to the session bus. Signals are
// delivered in order (NameOwnerChanged drives session cleanup).
func connectBus(address string) (*godbus.Conn, error) {
	opts := []godbus.ConnOption{godbus.WithSignalHandler(godbus.NewSequentialSignalHandler())}
	var conn *godbus.Conn
	var err error
	if address != "" {
		conn, err = godbus.Connect(address, opts...)
	} else {
		conn, err = godbus.ConnectSessionBus(opts...)
	}
	if err != nil {
		return nil, fmt.Errorf("connecting to the bus: %w", err)
	}
	return conn, nil
}

// watchdog pings systemd's watchdog at half its interval while the
// monitor's loop is alive: a loop stuck in a module call stops the pings,
// and systemd restarts the daemon.
func watchdog(ctx context.Context, mon *monitor.Monitor, logger *slog.Logger) {
	interval, err := daemon.SdWatchdogEnabled(false)
	if err != nil || interval == 0 {
		return
	}
	t := time.NewTicker(interval / 2)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		alive := make(chan struct{})
		go func() {
			mon.Hold()()
			close(alive)
		}()
		select {
		case <-alive:
			daemon.SdNotify(false, daemon.SdNotifyWatchdog)
		case <-time.After(interval / 2):
			logger.Error("monitor loop unresponsive; not pinging the watchdog")
		case <-ctx.Done():
			return
		}
	}
}

// newLogger logs to stderr; under systemd (JOURNAL_STREAM) without
// timestamps, which the journal adds itself.
func newLogger(level string, logCalls bool) (*slog.Logger, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level: %w", err)
	}
	if logCalls && l > slog.LevelDebug {
		l = slog.LevelDebug // call logs are Debug records
	}
	opts := &slog.HandlerOptions{Level: l}
	if os.Getenv("JOURNAL_STREAM") != "" {
		opts.ReplaceAttr = func(groups []string, a slog.Attr) slog.Attr {
			if len(groups) == 0 && a.Key == slog.TimeKey {
				return slog.Attr{}
			}
			return a
		}
	}
	return slog.New(slog.NewTextHandler(os.Stderr, opts)), nil
}

// gnomeFlag is --gnome-compat: alone (or =true) it serves GNOME's
// smartcard name, waiting in its queue while gsd-smartcard owns it;
// =replace takes the name over where the owner allows it.
type gnomeFlag struct{ mode dbusapi.GnomeMode }

func (f *gnomeFlag) IsBoolFlag() bool { return true }

func (f *gnomeFlag) String() string {
	switch f.mode {
	case dbusapi.GnomeQueue:
		return "true"
	case dbusapi.GnomeReplace:
		return "replace"
	}
	return "false"
}

func (f *gnomeFlag) Set(v string) error {
	switch v {
	case "true", "queue":
		f.mode = dbusapi.GnomeQueue
	case "false":
		f.mode = dbusapi.GnomeOff
	case "replace":
		f.mode = dbusapi.GnomeReplace
	default:
		return fmt.Errorf("want --gnome-compat or --gnome-compat=replace, got %q", v)
	}
	return nil
}

// removalPolicy is the policy.Config of the config file. With
// --gnome-compat and no removal-action line, GNOME's own setting decides,
// as it does for gsd-smartcard.
func removalPolicy(cfg *config.Config, gnome dbusapi.GnomeMode, logger *slog.Logger, report func(string)) policy.Config {
	if cfg == nil {
		cfg = config.Default()
	}
	pc := policy.Config{
		Action:         cfg.RemovalAction,
		Scope:          cfg.RemovalScope,
		RemovalGrace:   cfg.RemovalGrace,
		Notify:         cfg.Notify,
		LoginTokenName: os.Getenv("PKCS11_LOGIN_TOKEN_NAME"),
		Logger:         logger,
		Report:         report,
	}
	if gnome != dbusapi.GnomeOff && !cfg.RemovalActionSet {
		pc.Action, pc.GSettings = "", true
	}
	return pc
}
