package policy

import (
	"slices"
	"strings"
)

// Action is what happens when a token in the removal scope is removed.
// The values are the config file's, and GNOME's (the removal-action key of
// org.gnome.settings-daemon.peripherals.smartcard).
type Action string

const (
	ActionNone        Action = "none"         // nothing (clients still see the removal)
	ActionLockScreen  Action = "lock-screen"  // lock the session's screen
	ActionForceLogout Action = "force-logout" // end the session, without confirmation
)

// valid reports whether a is one of the three actions.
func (a Action) valid() bool {
	switch a {
	case ActionNone, ActionLockScreen, ActionForceLogout:
		return true
	}
	return false
}

// Values of Scope.Kind: which tokens' removal triggers the action.
const (
	ScopeLoginToken = "login-token" // the token used to log in (PKCS11_LOGIN_TOKEN_NAME)
	ScopeAny        = "any"         // any token
	ScopeSerial     = "serial"      // tokens whose serial is in Serials
)

// Scope says which tokens' removal triggers the removal action. The zero
// value means ScopeLoginToken.
type Scope struct {
	Kind    string   // one of the Scope* constants; "" means ScopeLoginToken
	Serials []string // only for ScopeSerial; never empty then
}

func (s Scope) kind() string {
	if s.Kind == "" {
		return ScopeLoginToken
	}
	return s.Kind
}

// String renders the scope the way the config file spells it.
func (s Scope) String() string {
	if s.kind() == ScopeSerial {
		return ScopeSerial + ":" + strings.Join(s.Serials, ",")
	}
	return s.kind()
}

// Covers reports whether removing a token with this serial triggers the
// removal action. usedForLogin is true for the token the session was
// logged in with. The serial is compared after trimming PKCS#11's blank
// padding.
func (s Scope) Covers(serial string, usedForLogin bool) bool {
	switch s.kind() {
	case ScopeAny:
		return true
	case ScopeLoginToken:
		return usedForLogin
	case ScopeSerial:
		return slices.Contains(s.Serials, strings.TrimSpace(serial))
	}
	return false
}
