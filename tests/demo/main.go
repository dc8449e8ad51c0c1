// Command demo is what `make demo` runs: a private D-Bus bus, a private
// pcscd with the vpcd driver, the project's virtual card, `slotwatch serve`
// on that bus, and `slotwatch monitor` printing what a client sees while the
// card is inserted, removed, reinserted, and swapped while the daemon is
// frozen (so that it wakes to a single change); then `busctl tree` and
// `slotwatch list` of the service. Everything runs in a temp dir on
// loopback ports and private sockets and is stopped by PID at the end (also
// on ^C); the machine's pcscd and session bus are never touched.
package main

import (
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/slotwatch/slotwatch/tests/stack"
	"github.com/slotwatch/slotwatch/tests/vcard"
)

func main() {
	bin := flag.String("slotwatch", "bin/slotwatch", "the slotwatch binary")
	flag.Parse()
	if err := run(*bin); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

func say(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "\n==> "+format+"\n", args...)
}

func run(bin string) error {
	dir, err := os.MkdirTemp("", "slotwatch-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	socket := filepath.Join(dir, "pcscd.comm")
	conf, err := stack.WriteOpenSCConf(dir)
	if err != nil {
		return err
	}

	say("starting a private pcscd with the vpcd virtual reader driver (socket %s)", socket)
	pcscd, err := stack.StartPCSCD(stack.PCSCDConfig{Socket: socket, Dir: dir})
	if err != nil {
		return err
	}
	defer pcscd.Stop()
	reader := pcscd.Readers()[0]

	bus, err := stack.StartDBus(dir, "")
	if err != nil {
		return err
	}
	defer bus.Stop()
	say("started a private D-Bus bus: %s", bus.Address)

	say("starting: %s serve --address BUS --module %s --gnome-compat", bin, stack.OpenSCModule)
	serve := exec.Command(bin, "serve", "--address", bus.Address, "--module", stack.OpenSCModule, "--gnome-compat", "--log-level", "warn")
	serve.Env = append(os.Environ(), "PCSCLITE_CSOCK_NAME="+socket, "OPENSC_CONF="+conf)
	serve.Stdout, serve.Stderr = os.Stdout, os.Stderr
	if err := serve.Start(); err != nil {
		return err
	}
	defer func() {
		serve.Process.Signal(syscall.SIGTERM)
		serve.Wait()
	}()
	time.Sleep(500 * time.Millisecond) // the name is owned within a few ms; leave room on a slow machine

	say("starting: %s monitor --address BUS   (a D-Bus client, like pcsc_scan)", bin)
	monitor := exec.Command(bin, "monitor", "--address", bus.Address)
	monitor.Stdout, monitor.Stderr = os.Stdout, os.Stderr
	if err := monitor.Start(); err != nil {
		return err
	}
	defer func() {
		monitor.Process.Signal(syscall.SIGTERM)
		monitor.Wait()
	}()
	watch := serve // the process the swap step freezes

	interrupted := make(chan os.Signal, 1)
	signal.Notify(interrupted, os.Interrupt, syscall.SIGTERM)
	pause := func(d time.Duration) bool {
		select {
		case <-time.After(d):
			return true
		case <-interrupted:
			return false
		}
	}

	// The demo watches pcscd itself too, to know when pcscd has seen a
	// change (libpcsclite reads the socket variable once per process).
	os.Setenv("PCSCLITE_CSOCK_NAME", socket)
	obs, err := stack.NewObserver([]string{reader})
	if err != nil {
		return err
	}
	defer obs.Close()
	seen := func(present bool) error {
		_, err := obs.WaitFor(reader, func(c stack.ObservedChange) bool { return c.Present == present }, 5*time.Second)
		return err
	}

	card := vcard.New(pcscd.Addr(0), vcard.Profile{Label: "Demo Card", Serial: "d3300001"})
	defer card.Close()
	steps := []struct {
		what string
		do   func() error
	}{
		{fmt.Sprintf("inserting virtual card \"Demo Card\" into %q", reader), card.Insert},
		{"removing it", card.Remove},
		{"inserting it again: a new generation", card.Insert},
		{"freezing the daemon (SIGSTOP), swapping in \"Other Card\" while pcscd watches, thawing it (SIGCONT):\n    slotwatch wakes to one change, yet reports the removal and the new generation", func() error {
			if err := watch.Process.Signal(syscall.SIGSTOP); err != nil {
				return err
			}
			defer watch.Process.Signal(syscall.SIGCONT)
			if err := card.Remove(); err != nil {
				return err
			}
			if err := seen(false); err != nil {
				return err
			}
			card.SetProfile(vcard.Profile{Label: "Other Card", Serial: "0dd00002"})
			if err := card.Insert(); err != nil {
				return err
			}
			return seen(true)
		}},
		{"removing it", card.Remove},
	}
	if !pause(time.Second) {
		return nil
	}
	for _, s := range steps {
		say("%s", s.what)
		if err := s.do(); err != nil {
			return err
		}
		if !pause(2 * time.Second) {
			return nil
		}
	}
	if err := card.Insert(); err != nil {
		return err
	}
	pause(2 * time.Second)
	say("busctl --address BUS tree io.github.slotwatch.Slotwatch1")
	show(exec.Command("busctl", "--address="+bus.Address, "tree", "io.github.slotwatch.Slotwatch1"))
	say("the same card as GNOME's login screen sees it (--gnome-compat): gdbus introspect --address BUS -d org.gnome.SettingsDaemon.Smartcard -o /org/gnome/SettingsDaemon/Smartcard -r -p")
	show(exec.Command("gdbus", "introspect", "--address", bus.Address, "-d", "org.gnome.SettingsDaemon.Smartcard", "-o", "/org/gnome/SettingsDaemon/Smartcard", "-r", "-p"))
	say("%s list --address BUS", bin)
	show(exec.Command(bin, "list", "--address", bus.Address))
	say("done; stopping slotwatch, pcscd and the bus")
	return nil
}

// show runs a command with its output on ours; a failure is reported, not
// fatal (busctl may be missing on a minimal system).
func show(cmd *exec.Cmd) {
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	if err := cmd.Run(); err != nil {
		fmt.Fprintf(os.Stderr, "demo: %s: %v\n", cmd.Path, err)
	}
}
