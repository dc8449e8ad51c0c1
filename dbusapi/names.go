package dbusapi

import (
	"fmt"
	"strconv"

	"github.com/coreos/go-systemd/v22/dbus"
	godbus "github.com/godbus/dbus/v5"

	"github.com/slotwatch/slotwatch/monitor"
)

// The names of DESIGN.md's contract. They are fixed: clients depend on them.
const (
	BusName  = "io.github.slotwatch.Slotwatch1"
	RootPath = godbus.ObjectPath("/io/github/slotwatch/Slotwatch1")

	ManagerInterface = BusName + ".Manager"
	ModuleInterface  = BusName + ".Module"
	ReaderInterface  = BusName + ".Reader"
	SlotInterface    = BusName + ".Slot"
	TokenInterface   = BusName + ".Token"
	SessionInterface = BusName + ".Session"

	objectManagerInterface = "org.freedesktop.DBus.ObjectManager"
	propertiesInterface    = "org.freedesktop.DBus.Properties"
	introspectInterface    = "org.freedesktop.DBus.Introspectable"
	peerInterface          = "org.freedesktop.DBus.Peer"
)

// The collections under the root path.
const (
	modulesPath  = RootPath + "/modules"
	readersPath  = RootPath + "/readers"
	slotsPath    = RootPath + "/slots"
	tokensPath   = RootPath + "/tokens"
	sessionsPath = RootPath + "/sessions"
)

// noObject is what an object-path property holds when there is nothing to
// point at (Slot.Reader without a reader, Slot.Token of an empty slot).
const noObject = godbus.ObjectPath("/")

// Path elements are escaped the way systemd escapes unit names in paths
// (every byte outside [A-Za-z0-9] becomes _xx), so any module or reader
// name makes a valid, reversible path element.

func modulePath(name string) godbus.ObjectPath {
	return modulesPath + "/" + godbus.ObjectPath(dbus.PathBusEscape(name))
}

func readerPath(name string) godbus.ObjectPath {
	if name == "" {
		return noObject
	}
	return readersPath + "/" + godbus.ObjectPath(dbus.PathBusEscape(name))
}

// slotPath is .../slots/<module>_<slot id>. The escaped module name cannot
// contain "_" unescaped, so the last "_" separates the two.
func slotPath(k monitor.SlotKey) godbus.ObjectPath {
	return slotsPath + "/" + godbus.ObjectPath(fmt.Sprintf("%s_%d", dbus.PathBusEscape(k.Module), k.ID))
}

func tokenPath(gen uint64) godbus.ObjectPath {
	return tokensPath + "/" + godbus.ObjectPath(strconv.FormatUint(gen, 10))
}

func sessionPath(id uint64) godbus.ObjectPath {
	return sessionsPath + "/" + godbus.ObjectPath(strconv.FormatUint(id, 10))
}

// lastElement returns the part of p after its last "/".
func lastElement(p godbus.ObjectPath) string {
	s := string(p)
	for i := len(s) - 1; i >= 0; i-- {
		if s[i] == '/' {
			return s[i+1:]
		}
	}
	return s
}

// generationOf parses the generation from a token path.
func generationOf(p godbus.ObjectPath) (uint64, bool) {
	g, err := strconv.ParseUint(lastElement(p), 10, 64)
	return g, err == nil
}

// The paths of the contract, for clients in this repository that speak of
// the monitor's objects as the daemon names them (slotwatch watch --json).

// ModulePath is the object path of module name.
func ModulePath(name string) godbus.ObjectPath { return modulePath(name) }

// ReaderPath is the object path of reader name ("/" for "").
func ReaderPath(name string) godbus.ObjectPath { return readerPath(name) }

// SlotPath is the object path of slot k.
func SlotPath(k monitor.SlotKey) godbus.ObjectPath { return slotPath(k) }

// TokenPath is the object path of token generation gen.
func TokenPath(gen uint64) godbus.ObjectPath { return tokenPath(gen) }
