// Command slotwatch is the slotwatch daemon and its command-line client.
//
// Commands (cli.go builds the command line with cobra; each command's
// options are defined next to its run function):
//
//	slotwatch serve [--address BUS] [--module PATH]... [--config FILE] [OPTIONS]
//	    the daemon: owns io.github.slotwatch.Slotwatch1 on the session bus
//	    (serve.go)
//
//	slotwatch watch [--module PATH]... [--no-pcsc] [--json] [-v] [--log-calls]
//	    run the monitor in the foreground and print every change, one line
//	    each, with its generation (a front end for trying the monitor out;
//	    watch.go)
//
//	slotwatch list|sessions|monitor [--address BUS] [--json]
//	slotwatch init-token [--address BUS] --token PATH|--serial S|--label L --label-new NEWLABEL ...
//	    D-Bus clients of a running daemon (client*.go)
//
//	slotwatch completion bash|zsh|fish, slotwatch help [COMMAND]
//	slotwatch --version
//
// Options are GNU style (--address BUS, --address=BUS); the single-dash
// long options of Go's flag package (-address BUS) still work. Exit codes:
// see cli.go.
package main

import "os"

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}
