package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/slotwatch/slotwatch/config"
	"github.com/slotwatch/slotwatch/internal/p11kitpath"

	"github.com/slotwatch/slotwatch/module"
	"github.com/slotwatch/slotwatch/monitor"
)

// defaultModule is OpenSC's PKCS#11 module, in p11-kit's module directory
// of this machine's architecture.
var defaultModule = filepath.Join(p11kitpath.ModuleDir(), "opensc-pkcs11.so")

// stringList is a repeatable flag.
type stringList []string

func (s *stringList) String() string     { return strings.Join(*s, ",") }
func (s *stringList) Set(v string) error { *s = append(*s, v); return nil }

func runWatch(args []string) error {
	fs := flag.NewFlagSet("watch", flag.ContinueOnError)
	var modules stringList
	fs.Var(&modules, "module", "PKCS#11 module to watch (repeatable; default "+defaultModule+")")
	noPCSC := fs.Bool("no-pcsc", false, "do not watch PC/SC readers")
	asJSON := fs.Bool("json", false, "print one JSON object per line")
	verbose := fs.Bool("v", false, "log the monitor's decisions to stderr")
	logCalls := fs.Bool("log-calls", false, "log every PKCS#11 call to stderr (secrets redacted)")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: slotwatch watch [--module PATH]... [--no-pcsc] [--json] [-v] [--log-calls]\n\n"+
			"Runs the monitor in this process, in the foreground, and prints every change with\n"+
			"its generation. It loads the modules itself, as any PKCS#11 program does, and\n"+
			"needs no daemon. `slotwatch monitor` is the D-Bus client of a running daemon\n"+
			"instead; both print the same JSON.\n\noptions:\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if len(modules) == 0 {
		modules = stringList{defaultModule}
	}
	level := slog.LevelWarn
	if *verbose || *logCalls {
		level = slog.LevelDebug
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))

	var mods []monitor.Module
	for _, path := range modules {
		opts := module.Options{Name: config.FlagModuleName(path)}
		if *logCalls {
			opts.CallLog = logger
		}
		mods = append(mods, module.Open(path, opts))
	}
	mon, err := monitor.New(monitor.Config{Modules: mods, PCSC: !*noPCSC, Logger: logger})
	if err != nil {
		return err
	}
	defer mon.Close()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	snap, sub := mon.Subscribe()
	defer sub.Close()
	printSnapshot(os.Stdout, snap, *asJSON)
	for {
		ev, err := sub.Next(ctx)
		if errors.Is(err, context.Canceled) || errors.Is(err, monitor.ErrClosed) {
			return nil
		}
		if err != nil {
			return err
		}
		printEvent(os.Stdout, ev, *asJSON)
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
