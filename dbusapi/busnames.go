package dbusapi

import (
	"fmt"

	godbus "github.com/godbus/dbus/v5"
)

// The bus names slotwatch owns beyond its own: GNOME's smartcard name,
// which another daemon (gsd-smartcard) may hold.

// requestGnomeName asks for org.gnome.SettingsDaemon.Smartcard. If
// gsd-smartcard (or anyone) owns it, slotwatch says so and keeps serving
// its own name; it stays in the name's queue, so it takes the name over
// when the owner leaves. With GnomeReplace it asks the owner to hand the
// name over, which works where the owner allowed replacement.
func (s *Service) requestGnomeName() {
	var flags godbus.RequestNameFlags
	if s.opts.Gnome == GnomeReplace {
		flags = godbus.NameFlagReplaceExisting
	}
	owner := s.nameOwner(GnomeBusName)
	reply, err := s.conn.RequestName(GnomeBusName, flags)
	if err == nil && reply == godbus.RequestNameReplyPrimaryOwner {
		s.gnomeOwned.Store(true)
	}
	switch {
	case err != nil:
		s.log.Error("could not request the GNOME smartcard name; serving "+BusName+" only",
			"name", GnomeBusName, "err", err)
	case reply == godbus.RequestNameReplyPrimaryOwner && owner != "":
		s.log.Info("took over the GNOME smartcard name", "name", GnomeBusName, "from", owner)
	case reply == godbus.RequestNameReplyPrimaryOwner:
		s.log.Info("serving the GNOME smartcard name", "name", GnomeBusName)
	case s.opts.Gnome == GnomeReplace:
		s.log.Warn(fmt.Sprintf("%s is owned by %s, which does not allow replacement; serving %s only, "+
			"and waiting in the name's queue: slotwatch takes the name when its owner exits "+
			"(for gsd-smartcard: systemctl --user stop org.gnome.SettingsDaemon.Smartcard.service)",
			GnomeBusName, owner, BusName))
	default:
		s.log.Warn(fmt.Sprintf("%s is owned by %s (is gsd-smartcard running?); serving %s only, "+
			"and waiting in the name's queue: slotwatch takes the name when its owner exits; "+
			"--gnome-compat=replace takes it over now where the owner allows it",
			GnomeBusName, owner, BusName))
	}
}

// nameOwner describes the owner of a bus name (unique name, pid and
// command line), "" if it has none.
func (s *Service) nameOwner(name string) string {
	var o string
	if s.conn.BusObject().Call("org.freedesktop.DBus.GetNameOwner", 0, name).Store(&o) != nil {
		return ""
	}
	return s.callers.describeName(o)
}

// nameChanged logs when slotwatch gains or loses the GNOME name after
// start-up (its owner left, or replaced slotwatch).
func (s *Service) nameChanged(name string, acquired bool) {
	if s.gnome == nil || name != GnomeBusName {
		return
	}
	switch {
	case acquired && !s.gnomeOwned.Swap(true):
		s.log.Info("now serving the GNOME smartcard name", "name", name)
	case !acquired:
		s.gnomeOwned.Store(false)
		s.log.Warn("lost the GNOME smartcard name to another owner; serving "+BusName+" only", "name", name)
	}
}
