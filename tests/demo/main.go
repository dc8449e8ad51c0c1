// Command demo is what `make demo` runs: a private pcscd with the vpcd
// driver, the project's virtual card, and `slotwatch watch` printing what it
// sees while the card is inserted, removed, reinserted and swapped inside one
// event gap. Everything runs in a temp dir on loopback ports and is stopped
// by PID at the end (also on ^C); the machine's pcscd is never touched.
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

	say("starting: %s watch   (OpenSC's PKCS#11 module + PC/SC)", bin)
	watch := exec.Command(bin, "watch")
	watch.Env = append(os.Environ(), "PCSCLITE_CSOCK_NAME="+socket, "OPENSC_CONF="+conf)
	watch.Stdout, watch.Stderr = os.Stdout, os.Stderr
	if err := watch.Start(); err != nil {
		return err
	}
	defer func() {
		watch.Process.Signal(syscall.SIGTERM)
		watch.Wait()
	}()

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

	card := vcard.New(pcscd.Addr(0), vcard.Profile{Label: "Demo Card", Serial: "D3300001"})
	defer card.Close()
	steps := []struct {
		what string
		do   func() error
	}{
		{fmt.Sprintf("inserting virtual card \"Demo Card\" into %q", reader), card.Insert},
		{"removing it", card.Remove},
		{"inserting it again: a new generation", card.Insert},
		{"swapping in \"Other Card\" as fast as possible (one event gap)", func() error {
			return card.Swap(vcard.Profile{Label: "Other Card", Serial: "0DD00002"})
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
	say("done; stopping slotwatch and pcscd")
	return nil
}
