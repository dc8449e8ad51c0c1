package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/slotwatch/slotwatch/config"
	"github.com/slotwatch/slotwatch/internal/p11kitpath"

	"github.com/slotwatch/slotwatch/module"
	"github.com/slotwatch/slotwatch/monitor"
)

// defaultModule is OpenSC's PKCS#11 module, in p11-kit's module directory
// of this machine's architecture.
var defaultModule = filepath.Join(p11kitpath.ModuleDir(), "opensc-pkcs11.so")

// watchOptions is watch's command line (newWatchCmd).
type watchOptions struct {
	modules  []string
	noPCSC   bool
	json     bool
	verbose  bool
	logCalls bool
}

// newWatchCmd is `slotwatch watch`; run is runWatch (a test's own in
// tests). A bad command line is exit code 1, as it was with Go's flag
// package.
func newWatchCmd(run func(*watchOptions) error) *cobra.Command {
	o := &watchOptions{}
	cmd := &cobra.Command{
		Use:   "watch [--module PATH]... [--no-pcsc] [--json] [-v] [--log-calls]",
		Short: "run a monitor in this process (no daemon) and print every change",
		Long: `Runs the monitor in this process, in the foreground, and prints every change with
its generation. It loads the modules itself, as any PKCS#11 program does, and
needs no daemon. "slotwatch monitor" is the D-Bus client of a running daemon
instead; both print the same JSON.

Exit status: 0 stopped by SIGINT or SIGTERM, 1 an error (a bad command line
too).`,
		GroupID:               groupDaemon,
		DisableFlagsInUseLine: true,
		// Positional arguments were ignored with Go's flag package (and
		// every option after one); now they are an error.
		Args:              noArgs(exitFailure),
		ValidArgsFunction: cobra.NoFileCompletions,
		RunE:              func(*cobra.Command, []string) error { return run(o) },
	}
	cmd.SetFlagErrorFunc(flagErrorFunc(exitFailure))
	f := cmd.Flags()
	f.StringArrayVar(&o.modules, "module", nil, "watch the PKCS#11 module `PATH` (repeatable; default "+defaultModule+")")
	f.BoolVar(&o.noPCSC, "no-pcsc", false, "do not watch PC/SC readers")
	f.BoolVar(&o.json, "json", false, "print one JSON object per line")
	// Go's flag package called it -v; -v it stays.
	f.BoolVarP(&o.verbose, "verbose", "v", false, "log the monitor's decisions to stderr")
	f.BoolVar(&o.logCalls, "log-calls", false, "log every PKCS#11 call to stderr (secrets redacted)")
	return cmd
}

func runWatch(o *watchOptions) error {
	modules := o.modules
	if len(modules) == 0 {
		modules = []string{defaultModule}
	}
	level := slog.LevelWarn
	if o.verbose || o.logCalls {
		level = slog.LevelDebug
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))

	var mods []monitor.Module
	for _, path := range modules {
		opts := module.Options{Name: config.FlagModuleName(path)}
		if o.logCalls {
			opts.CallLog = logger
		}
		mods = append(mods, module.Open(path, opts))
	}
	mon, err := monitor.New(monitor.Config{Modules: mods, PCSC: !o.noPCSC, Logger: logger})
	if err != nil {
		return err
	}
	defer mon.Close()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	snap, sub := mon.Subscribe()
	defer sub.Close()
	printSnapshot(os.Stdout, snap, o.json)
	for {
		ev, err := sub.Next(ctx)
		if errors.Is(err, context.Canceled) || errors.Is(err, monitor.ErrClosed) {
			return nil
		}
		if err != nil {
			return err
		}
		printEvent(os.Stdout, ev, o.json)
	}
}

func printSnapshot(w io.Writer, s *monitor.Snapshot, asJSON bool) {
	if asJSON {
		writeEvent(w, monitorEvent{Time: time.Now(), Event: evState, Snapshot: watchListing(s)}, true)
		return
	}
	fmt.Fprintf(w, "%s state=%s %s\n", stamp(), s.State, s.StateReason)
	for _, m := range s.Modules {
		fmt.Fprintf(w, "%s module %s %q wait=%s state=%s\n", stamp(), m.Name, m.Description, m.WaitMode, m.State)
	}
	for _, r := range s.Readers {
		fmt.Fprintf(w, "%s reader %q state=%s events=%d\n", stamp(), r.Name, r.State, r.EventCount)
	}
	for _, sl := range s.Slots {
		if t := sl.Token; t != nil {
			fmt.Fprintf(w, "%s token generation=%d slot=%s label=%q serial=%q\n", stamp(), t.Generation, t.Slot, t.Label, t.Serial)
		}
	}
}

func printEvent(w io.Writer, ev monitor.Event, asJSON bool) {
	if asJSON {
		writeEvent(w, watchEvent(ev, time.Now()), true)
		return
	}
	fmt.Fprintf(w, "%s %s\n", stamp(), ev)
}

func stamp() string { return time.Now().Format("15:04:05.000") }
