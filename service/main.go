// Command slotwatch is the slotwatch daemon and its command-line client.
//
// Subcommands:
//
//	slotwatch serve [--address BUS] [--module PATH]... [--config FILE]
//	    the daemon: owns io.github.slotwatch.Slotwatch1 on the session bus
//
//	slotwatch watch [--module PATH]... [--no-pcsc] [--json]
//	    run the monitor in the foreground and print every change, one line
//	    each, with its generation (a front end for trying the monitor out)
package main

import (
	"fmt"
	"os"
)

const usage = `usage: slotwatch COMMAND [OPTIONS]

commands:
  serve       the daemon: serve the view and PKCS#11 sessions on D-Bus
  watch       run a monitor in this process (no daemon) and print every change
  list        show the daemon's readers, slots, tokens and modules
  monitor     print the daemon's events as they happen (a D-Bus client)
  sessions    show who holds which PKCS#11 session
  init-token  initialize a token (C_InitToken) through the daemon
  help        show this text

Run "slotwatch COMMAND -h" for a command's options.
`

func main() {
	if len(os.Args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "serve":
		err = runServe(os.Args[2:])
	case "watch":
		err = runWatch(os.Args[2:])
	case "list":
		err = runList(os.Args[2:])
	case "monitor":
		err = runMonitor(os.Args[2:])
	case "sessions":
		err = runSessions(os.Args[2:])
	case "init-token":
		err = runInitToken(os.Args[2:])
	case "help", "-h", "--help":
		fmt.Print(usage)
		return
	default:
		fmt.Fprintf(os.Stderr, "slotwatch: unknown command %q\n\n%s", os.Args[1], usage)
		os.Exit(2)
	}
	if err != nil {
		os.Exit(reportError(os.Args[1], err))
	}
}
