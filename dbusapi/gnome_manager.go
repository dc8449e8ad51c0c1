package dbusapi

import (
	"fmt"
	"slices"

	godbus "github.com/godbus/dbus/v5"
)

// gnomeManager is org.gnome.SettingsDaemon.Smartcard.Manager.
type gnomeManager struct{ g *gnome }

// GetLoginToken returns the inserted token the session logged in with,
// else the login_token alias; without PKCS11_LOGIN_TOKEN_NAME it fails
// with FindingSmartcard, as GNOME does.
func (m gnomeManager) GetLoginToken(msg godbus.Message) (godbus.ObjectPath, *godbus.Error) {
	if _, err := checkCall(msg, GnomeManagerPath, GnomeManagerInterface, "GetLoginToken"); err != nil {
		return noObject, m.g.errorFor(msg, err)
	}
	g := m.g
	if g.loginName == "" {
		return noObject, godbus.NewError(ErrGnomeFindingSmartcard,
			[]any{"the session was not logged in with a smart card (PKCS11_LOGIN_TOKEN_NAME is not set)"})
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.aliasFor != "" {
		return g.aliasFor, nil
	}
	return GnomeLoginTokenPath, nil
}

// GetInsertedTokens returns the Token objects whose IsInserted is true.
func (m gnomeManager) GetInsertedTokens(msg godbus.Message) ([]godbus.ObjectPath, *godbus.Error) {
	if _, err := checkCall(msg, GnomeManagerPath, GnomeManagerInterface, "GetInsertedTokens"); err != nil {
		return nil, m.g.errorFor(msg, err)
	}
	g := m.g
	g.mu.Lock()
	defer g.mu.Unlock()
	out := []godbus.ObjectPath{}
	for p, t := range g.tokens {
		if t.inserted {
			out = append(out, p)
		}
	}
	slices.Sort(out)
	return out, nil
}

// errorFor answers a failed argument or path check: an object without the
// interface is UnknownInterface, no object UnknownObject, and bad
// arguments InvalidArgs.
func (g *gnome) errorFor(msg godbus.Message, err error) *godbus.Error {
	if p := msgPath(msg); p != GnomeManagerPath && g.objs.has(p) {
		return godbus.NewError("org.freedesktop.DBus.Error.UnknownInterface",
			[]any{fmt.Sprintf("%s does not implement %s", p, GnomeManagerInterface)})
	}
	return toDBus(g.s.log, err)
}
