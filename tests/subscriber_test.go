package tests

import (
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	godbus "github.com/godbus/dbus/v5"

	"github.com/slotwatch/slotwatch/tests/stack"
	"github.com/slotwatch/slotwatch/tests/vcard"
)

// subscriber is a gnome-settings-daemon-style client: it follows the
// ObjectManager signals, PropertiesChanged and the Manager's signals, in
// order.
type subscriber struct {
	t    *testing.T
	conn *godbus.Conn
	ch   chan *godbus.Signal
}

func subscribe(t *testing.T, bus *stack.DBus) *subscriber {
	t.Helper()
	s := &subscriber{t: t, conn: dial(t, bus), ch: make(chan *godbus.Signal, 1000)}
	if err := s.conn.AddMatchSignal(godbus.WithMatchSender(busName)); err != nil {
		t.Fatal(err)
	}
	s.conn.Signal(s.ch)
	return s
}

// next returns the next signal named name (interface.member), skipping
// others.
func (s *subscriber) next(name string, timeout time.Duration) *godbus.Signal {
	s.t.Helper()
	deadline := time.After(timeout)
	for {
		select {
		case sig := <-s.ch:
			if sig.Name == name {
				return sig
			}
		case <-deadline:
			s.t.Fatalf("no %s within %v", name, timeout)
		}
	}
}

// nextOf returns the next signal whose name is one of names.
func (s *subscriber) nextOf(timeout time.Duration, names ...string) *godbus.Signal {
	s.t.Helper()
	deadline := time.After(timeout)
	for {
		select {
		case sig := <-s.ch:
			for _, n := range names {
				if sig.Name == n {
					return sig
				}
			}
		case <-deadline:
			s.t.Fatalf("none of %v within %v", names, timeout)
		}
	}
}

const (
	sigInserted   = mgrIface + ".TokenInserted"
	sigRemoved    = mgrIface + ".TokenRemoved"
	sigIfAdded    = "org.freedesktop.DBus.ObjectManager.InterfacesAdded"
	sigIfRemoved  = "org.freedesktop.DBus.ObjectManager.InterfacesRemoved"
	sigPropChange = "org.freedesktop.DBus.Properties.PropertiesChanged"
)

// TestSubscriberSeesInsertRemoveReinsert: a subscriber sees a virtual card
// come, go and come back as two generations, with the right paths, the
// object announced before the signal, and the dead generation's path
// answering TokenRemoved.
func TestSubscriberSeesInsertRemoveReinsert(t *testing.T) {
	pcscd := stack.StartPCSCDForTest(t, stack.PCSCDConfig{Socket: pcscSocket, Dir: t.TempDir()})
	bus := stack.StartDBusForTest(t, "")
	startDaemon(t, bus, nil, "--module", stack.OpenSCModule)
	sub := subscribe(t, bus)
	card := vcard.New(pcscd.Addr(0), vcard.Profile{Label: "Bus Card", Serial: "b0500001"})
	t.Cleanup(func() { card.Close() })

	expectInsert := func() (godbus.ObjectPath, uint64) {
		t.Helper()
		added := sub.nextOf(5*time.Second, sigIfAdded, sigInserted)
		if added.Name != sigIfAdded {
			t.Fatalf("TokenInserted before InterfacesAdded of its token: %v", added.Body)
		}
		for added.Name == sigIfAdded && !isUnder(added.Body[0].(godbus.ObjectPath), "tokens") {
			added = sub.nextOf(5*time.Second, sigIfAdded, sigInserted)
		}
		tokPath := added.Body[0].(godbus.ObjectPath)
		props := added.Body[1].(map[string]map[string]godbus.Variant)[tokIface]
		if props["Label"].Value() != "Bus Card" || props["Serial"].Value() != "b0500001" {
			t.Fatalf("InterfacesAdded token properties: %v", props)
		}
		ins := sub.next(sigInserted, 5*time.Second)
		gen := ins.Body[2].(uint64)
		if ins.Body[0].(godbus.ObjectPath) != tokPath || tokPath != rootPath+godbus.ObjectPath("/tokens/"+strconv.FormatUint(gen, 10)) {
			t.Fatalf("TokenInserted %v for object %s", ins.Body, tokPath)
		}
		if slot := ins.Body[1].(godbus.ObjectPath); !isUnder(slot, "slots") {
			t.Fatalf("TokenInserted slot path %s", slot)
		}
		var label string
		if err := sub.conn.Object(busName, tokPath).StoreProperty(tokIface+".Label", &label); err != nil || label != "Bus Card" {
			t.Fatalf("Label property: %q, %v", label, err)
		}
		return tokPath, gen
	}

	if err := card.Insert(); err != nil {
		t.Fatal(err)
	}
	tok1, gen1 := expectInsert()
	var sess godbus.ObjectPath
	if err := sub.conn.Object(busName, tok1).Call(tokIface+".OpenSession", 0, false).Store(&sess); err != nil {
		t.Fatalf("OpenSession on the virtual card: %v", err)
	}
	var found []map[string]godbus.Variant
	if err := sub.conn.Object(busName, sess).Call(sesIface+".FindObjects", 0, map[string]godbus.Variant{"class": godbus.MakeVariant(uint32(1))}).Store(&found); err != nil {
		t.Fatalf("FindObjects(certificates) on the virtual card: %v", err)
	}
	if len(found) != 1 || len(found[0]["value"].Value().([]byte)) == 0 {
		t.Fatalf("FindObjects(certificates) = %v, want the card's certificate with its value", found)
	}
	var certs []struct {
		ID      []byte
		Label   string
		Subject string
		DER     []byte
	}
	if err := sub.conn.Object(busName, tok1).Call(tokIface+".ListCertificates", 0).Store(&certs); err != nil {
		t.Fatalf("ListCertificates: %v", err)
	}
	if len(certs) != 1 || !strings.Contains(certs[0].Subject, "CN=Bus Card") || len(certs[0].DER) == 0 {
		t.Fatalf("ListCertificates = %+v, want the card's one certificate", certs)
	}

	if err := card.Remove(); err != nil {
		t.Fatal(err)
	}
	rm := sub.nextOf(5*time.Second, sigRemoved, sigIfAdded)
	for rm.Name == sigIfAdded && isUnder(rm.Body[0].(godbus.ObjectPath), "sessions") {
		rm = sub.nextOf(5*time.Second, sigRemoved, sigIfAdded) // our own session
	}
	if rm.Name != sigRemoved || rm.Body[0].(godbus.ObjectPath) != tok1 || rm.Body[2].(uint64) != gen1 {
		t.Fatalf("after removal: %s %v, want TokenRemoved of %s", rm.Name, rm.Body, tok1)
	}
	if _, ok := managedObjects(t, sub.conn)[tok1]; ok {
		t.Fatalf("removed token %s still in GetManagedObjects", tok1)
	}
	var p godbus.ObjectPath
	err := sub.conn.Object(busName, tok1).Call(tokIface+".OpenSession", 0, false).Store(&p)
	if errName(err) != errPfx+"TokenRemoved" {
		t.Fatalf("OpenSession on a removed token: %v, want TokenRemoved", err)
	}
	// Its session went with it, and its path says why.
	if _, ok := managedObjects(t, sub.conn)[sess]; ok {
		t.Fatalf("session %s of the removed token still on the bus", sess)
	}
	err = sub.conn.Object(busName, sess).Call(sesIface+".FindObjects", 0, map[string]godbus.Variant{}).Err
	if errName(err) != errPfx+"TokenRemoved" {
		t.Fatalf("FindObjects on a removed token's session: %v, want TokenRemoved", err)
	}
	_, err = sub.conn.Object(busName, tok1).GetProperty(tokIface + ".Label")
	if errName(err) != errPfx+"TokenRemoved" {
		t.Fatalf("Get Label of a removed token: %v, want TokenRemoved", err)
	}

	if err := card.Insert(); err != nil {
		t.Fatal(err)
	}
	tok2, gen2 := expectInsert()
	if gen2 <= gen1 || tok2 == tok1 {
		t.Fatalf("reinserted as %s (generation %d), first was %s (%d)", tok2, gen2, tok1, gen1)
	}
	var last uint64
	if err := sub.conn.Object(busName, rootPath).StoreProperty(mgrIface+".LastGeneration", &last); err != nil || last != gen2 {
		t.Fatalf("LastGeneration %d, %v; want %d", last, err, gen2)
	}
	t.Log(fmt.Sprintf("generations %d then %d", gen1, gen2))
}
