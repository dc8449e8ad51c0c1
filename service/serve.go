package main

import (
	"context"
	"errors"
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
	"github.com/spf13/cobra"

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

// serveOptions is serve's command line (newServeCmd).
type serveOptions struct {
	address           string
	modules           []string
	config            string
	gnome             gnomeFlag
	logCalls          bool
	logLevel          string
	noPCSC            bool
	isolate           bool
	pkcs11Socket      string
	pkcs11SocketGiven bool // --pkcs11-socket was on the command line: failing to listen on it is an error
}

// newServeCmd is `slotwatch serve`; run is runServe (a test's own in
// tests). A bad command line is exit code 1, as it was with Go's flag
// package: units and scripts know that code.
func newServeCmd(run func(*serveOptions) error) *cobra.Command {
	o := &serveOptions{}
	cmd := &cobra.Command{
		Use:   "serve [--address BUS] [--module PATH]... [--config FILE] [OPTIONS]",
		Short: "the daemon: serve the view and PKCS#11 sessions on D-Bus",
		Long: `The daemon. It watches the PC/SC readers and the PKCS#11 modules of --module,
or else of the config file and the p11-kit registry; owns
io.github.slotwatch.Slotwatch1 on the session bus (or --address), and serves
there what it sees and PKCS#11 sessions under its rules; PKCS#11 programs
reach the same sessions through p11-kit-client.so on --pkcs11-socket. systemd starts it as slotwatch.service (Type=notify,
with a watchdog); SIGTERM stops it; the D-Bus Manager's Reload method
re-reads the config file.

Exit status: 0 stopped by SIGTERM or SIGINT, 1 an error (a bad command line
too; the message says which).`,
		GroupID:               groupDaemon,
		DisableFlagsInUseLine: true,
		// Positional arguments were ignored with Go's flag package, and
		// so was every option after one; now they are an error.
		Args:              noArgs(exitFailure),
		ValidArgsFunction: cobra.NoFileCompletions,
		RunE: func(cmd *cobra.Command, _ []string) error {
			o.pkcs11SocketGiven = cmd.Flags().Changed("pkcs11-socket")
			return run(o)
		},
	}
	cmd.SetFlagErrorFunc(flagErrorFunc(exitFailure))
	f := cmd.Flags()
	f.StringVar(&o.address, "address", "", "serve on the D-Bus bus at `BUS`, a D-Bus address (default: the session bus, DBUS_SESSION_BUS_ADDRESS)")
	f.StringArrayVar(&o.modules, "module", nil, "watch exactly the PKCS#11 module `PATH` (repeatable; no config file, no p11-kit registry)")
	f.StringVar(&o.config, "config", "", "read the config `FILE` (default $XDG_CONFIG_HOME/slotwatch/slotwatch.conf, then /etc/slotwatch/slotwatch.conf)")
	f.Var(&o.gnome, "gnome-compat", "also serve org.gnome.SettingsDaemon.Smartcard, as gnome-settings-daemon's smartcard service does, waiting in the name's queue while gsd-smartcard owns it; --gnome-compat=replace takes the name over from its owner where allowed")
	// Bare --gnome-compat is on; a value needs "=" (--gnome-compat=replace).
	f.Lookup("gnome-compat").NoOptDefVal = "true"
	f.BoolVar(&o.logCalls, "log-calls", false, "log every PKCS#11 call (PINs and secrets redacted)")
	f.StringVar(&o.logLevel, "log-level", "info", "log at `LEVEL`: debug, info, warn or error")
	f.BoolVar(&o.noPCSC, "no-pcsc", false, "do not watch PC/SC readers")
	f.BoolVar(&o.isolate, "isolate", false, "run the --module modules in helper processes (p11-kit remote), as isolate = true does in the config")
	// The default depends on XDG_RUNTIME_DIR; --pkcs11-socket= (empty)
	// turns the face off.
	f.StringVar(&o.pkcs11Socket, "pkcs11-socket", pkcs11face.DefaultSocket(), "serve the PKCS#11 face (p11-kit's RPC protocol, for p11-kit-client.so) on the unix socket `PATH`; empty: off")
	return cmd
}

func runServe(o *serveOptions) error {
	// The names the daemon's wiring below has always read (they were the
	// flag package's pointers).
	address, modules, configPath, gnome := &o.address, o.modules, &o.config, o.gnome
	logCalls, logLevel, noPCSC, isolateFlag, pkcs11Socket := &o.logCalls, &o.logLevel, &o.noPCSC, &o.isolate, &o.pkcs11Socket
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
	p11 := startPKCS11Face(*pkcs11Socket, o.pkcs11SocketGiven, br, mon, logger)
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

// Type is pflag's: "bool", as IsBoolFlag was the flag package's, so that
// --help shows a switch (--gnome-compat) and no value name; =replace is
// in its usage text.
func (f *gnomeFlag) Type() string { return "bool" }

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
