package policy

import "testing"

func TestScopeCovers(t *testing.T) {
	tests := []struct {
		scope     Scope
		serial    string
		login     bool
		want      bool
		wantSpell string
	}{
		{Scope{Kind: ScopeLoginToken}, "1", true, true, "login-token"},
		{Scope{Kind: ScopeLoginToken}, "1", false, false, "login-token"},
		{Scope{}, "1", true, true, "login-token"}, // the zero value is login-token
		{Scope{}, "1", false, false, "login-token"},
		{Scope{Kind: ScopeAny}, "1", false, true, "any"},
		{Scope{Kind: ScopeSerial, Serials: []string{"1", "2"}}, "2", false, true, "serial:1,2"},
		{Scope{Kind: ScopeSerial, Serials: []string{"1", "2"}}, "2   ", false, true, "serial:1,2"}, // PKCS#11 pads serials with blanks
		{Scope{Kind: ScopeSerial, Serials: []string{"1", "2"}}, "3", true, false, "serial:1,2"},
		{Scope{Kind: "bogus"}, "1", true, false, "bogus"},
	}
	for _, tt := range tests {
		if got := tt.scope.Covers(tt.serial, tt.login); got != tt.want {
			t.Errorf("%+v.Covers(%q, %v) = %v, want %v", tt.scope, tt.serial, tt.login, got, tt.want)
		}
		if got := tt.scope.String(); got != tt.wantSpell {
			t.Errorf("%+v.String() = %q, want %q", tt.scope, got, tt.wantSpell)
		}
	}
}

func TestActionValid(t *testing.T) {
	for _, a := range []Action{ActionNone, ActionLockScreen, ActionForceLogout} {
		if !a.valid() {
			t.Errorf("%q is not valid", a)
		}
	}
	for _, a := range []Action{"", "lock", "None"} {
		if a.valid() {
			t.Errorf("%q is valid", a)
		}
	}
}
