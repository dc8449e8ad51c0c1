package config

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/slotwatch/slotwatch/monitor"
	"github.com/slotwatch/slotwatch/policy"
)

// DefaultIdleReleaseForTest is every module's policy when the file sets none.
var DefaultIdleReleaseForTest = monitor.DefaultIdleRelease

func TestParseGood(t *testing.T) {
	def := func(edit func(c *Config)) *Config {
		c := Default()
		c.Source = "slotwatch.conf"
		if edit != nil {
			edit(c)
		}
		return c
	}
	tests := []struct {
		name string
		in   string
		want *Config
	}{
		{"empty", "", def(nil)},
		{"only comments and blanks", "# a comment\n\n   # indented\n\t\n", def(nil)},
		{"design example", `
removal-action = none            # none | lock-screen | force-logout
removal-scope = login-token      # login-token | any | serial:SERIAL[,SERIAL...]
notify = false
[module opensc]
path = /usr/lib/x86_64-linux-gnu/pkcs11/opensc-pkcs11.so
isolate = false                  # true: load through p11-kit remote (crash isolation)
`, def(func(c *Config) {
			c.RemovalActionSet = true // "removal-action = none" is a choice, unlike no line
			c.Modules = []Module{{Name: "opensc", Path: "/usr/lib/x86_64-linux-gnu/pkcs11/opensc-pkcs11.so", From: FromFile, Source: "slotwatch.conf:5", IdleRelease: DefaultIdleReleaseForTest}}
		})},
		{"every value set", `removal-action=force-logout
removal-scope = any
removal-grace = 1.5
notify = true
`, def(func(c *Config) {
			c.RemovalAction = policy.ActionForceLogout
			c.RemovalActionSet = true
			c.RemovalScope = policy.Scope{Kind: policy.ScopeAny}
			c.RemovalGrace = 1500 * time.Millisecond
			c.Notify = true
		})},
		{"removal-grace 0 acts at once", "removal-grace = 0\n", def(func(c *Config) { c.RemovalGrace = 0 })},
		{"removal-grace 0.0", "removal-grace = 0.0\n", def(func(c *Config) { c.RemovalGrace = 0 })},
		{"removal-grace at most 60", "removal-grace = 60\n", def(func(c *Config) { c.RemovalGrace = time.Minute })},
		{"removal-grace with a comment", "removal-grace = 10   # a slow hub\n", def(func(c *Config) { c.RemovalGrace = 10 * time.Second })},
		{"lock-screen", "removal-action = lock-screen\n", def(func(c *Config) {
			c.RemovalAction = policy.ActionLockScreen
			c.RemovalActionSet = true
		})},
		{"none given explicitly is set", "removal-action = none\n", def(func(c *Config) { c.RemovalActionSet = true })},
		{"scope alone does not set the action", "removal-scope = any\n", def(func(c *Config) {
			c.RemovalScope = policy.Scope{Kind: policy.ScopeAny}
		})},
		{"serials trimmed and deduplicated", "removal-scope = serial: 0123 ,ABCD,0123\n", def(func(c *Config) {
			c.RemovalScope = policy.Scope{Kind: policy.ScopeSerial, Serials: []string{"0123", "ABCD"}}
		})},
		{"one serial", "removal-scope = serial:42\n", def(func(c *Config) {
			c.RemovalScope = policy.Scope{Kind: policy.ScopeSerial, Serials: []string{"42"}}
		})},
		{"two modules, isolate, cleaned path, CRLF, BOM", "\ufeffnotify = true\r\n[module a]\r\npath = /opt//a/../a/liba.so\r\n[ module  b_2-x ]\r\nisolate = true\r\npath=/opt/b.so\r\n", def(func(c *Config) {
			c.Notify = true
			c.Modules = []Module{
				{Name: "a", Path: "/opt/a/liba.so", From: FromFile, Source: "slotwatch.conf:2", IdleRelease: DefaultIdleReleaseForTest},
				{Name: "b_2-x", Path: "/opt/b.so", Isolate: true, From: FromFile, Source: "slotwatch.conf:4", IdleRelease: DefaultIdleReleaseForTest},
			}
		})},
		{"limits", `max-sessions-per-token = 1024
max-concurrent-calls = 1   # one at a time
max-find-results=100000
token-wait = 0.25
`, def(func(c *Config) {
			c.Limits = Limits{SessionsPerToken: 1024, ConcurrentCalls: 1, FindResults: 100000, TokenWait: 250 * time.Millisecond}
		})},
		{"limits at their other ends", "max-sessions-per-token = 1\nmax-concurrent-calls = 256\nmax-find-results = 1\ntoken-wait = 60\n", def(func(c *Config) {
			c.Limits = Limits{SessionsPerToken: 1, ConcurrentCalls: 256, FindResults: 1, TokenWait: time.Minute}
		})},
		{"one limit keeps the others' defaults", "max-find-results = 0050\n", def(func(c *Config) {
			c.Limits.FindResults = 50
		})},
		{"token-wait: whole seconds, fractions, nanoseconds", "token-wait = 1.000000001\n", def(func(c *Config) {
			c.Limits.TokenWait = time.Second + time.Nanosecond
		})},
		{"token-wait: digits beyond nanoseconds are dropped", "token-wait = 60.0000000009\n", def(func(c *Config) {
			c.Limits.TokenWait = time.Minute
		})},
		{"hash inside a value is not a comment", "[module a]\npath = /opt/a#1/a.so # but this is\n", def(func(c *Config) {
			c.Modules = []Module{{Name: "a", Path: "/opt/a#1/a.so", From: FromFile, Source: "slotwatch.conf:1", IdleRelease: DefaultIdleReleaseForTest}}
		})},
		{"idle release: top level is every section's default, a section overrides one key", "idle-release-grace = 0.5\n[module a]\npath = /a.so\n[module b]\npath = /b.so\nidle-release = false\n[module c]\npath = /c.so\nidle-release-grace = 0\n", def(func(c *Config) {
			c.IdleRelease = IdleRelease{Enabled: true, Grace: 500 * time.Millisecond}
			c.Modules = []Module{
				{Name: "a", Path: "/a.so", From: FromFile, Source: "slotwatch.conf:2", IdleRelease: IdleRelease{Enabled: true, Grace: 500 * time.Millisecond}},
				{Name: "b", Path: "/b.so", From: FromFile, Source: "slotwatch.conf:4", IdleRelease: IdleRelease{Enabled: false, Grace: 500 * time.Millisecond}},
				{Name: "c", Path: "/c.so", From: FromFile, Source: "slotwatch.conf:7", IdleRelease: IdleRelease{Enabled: true}},
			}
		})},
		{"idle release off everywhere, at its longest grace", "idle-release = false\nidle-release-grace = 3600\n", def(func(c *Config) {
			c.IdleRelease = IdleRelease{Grace: time.Hour}
		})},
		{"resume-login off", "resume-login = false\n", def(func(c *Config) { c.ResumeLogin = false })},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Parse(strings.NewReader(tt.in), "slotwatch.conf")
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("Parse =\n%+v\nwant\n%+v", got, tt.want)
			}
		})
	}
}

func TestParseBad(t *testing.T) {
	tests := []struct {
		name string
		in   string
		line int
		msg  string // a substring of the message
	}{
		{"unknown key", "notify = true\n\n# x\nfoo = bar\n", 4, `unknown key "foo" (known: removal-action, removal-scope, removal-grace, notify, max-sessions-per-token, max-concurrent-calls, max-find-results, token-wait, idle-release, idle-release-grace, resume-login)`},
		{"unknown module key", "[module a]\npath = /a.so\nlibrary = /b.so\n", 3, `unknown key "library" in [module a] (known: path, isolate, idle-release, idle-release-grace)`},
		{"top-level key in a section", "[module a]\npath = /a.so\nnotify = true\n", 3, `key "notify" is not a module key; top-level keys go before the first [module] section`},
		{"no equals sign", "notify true\n", 1, `expected "key = value", "[module NAME]" or a comment, got "notify true"`},
		{"p11-kit syntax", "[module a]\npath: /a.so\n", 2, `expected "key = value"`},
		{"missing key", "= true\n", 1, `missing key before "="`},
		{"bad removal-action", "removal-action = lock\n", 1, `bad value "lock" for removal-action (want none, lock-screen or force-logout)`},
		{"empty removal-action", "removal-action =\n", 1, `bad value "" for removal-action`},
		{"values are case sensitive", "removal-action = None\n", 1, `bad value "None" for removal-action`},
		{"bad removal-scope", "removal-scope = serials:1\n", 1, `bad value "serials:1" for removal-scope (want login-token, any or serial:SERIAL[,SERIAL...])`},
		{"serial without serials", "removal-scope = serial:\n", 1, `empty serial in removal-scope "serial:"`},
		{"empty serial in list", "removal-scope = serial:1,,2\n", 1, `empty serial in removal-scope`},
		{"bare serial", "removal-scope = serial\n", 1, `bad value "serial" for removal-scope`},
		{"bad bool", "notify = yes\n", 1, `bad value "yes" for notify (want true or false)`},
		{"bad isolate", "[module a]\nisolate = 1\n", 2, `bad value "1" for isolate (want true or false)`},
		{"duplicate key", "notify = true\nremoval-action = none\nnotify = false\n", 3, `duplicate key "notify" (first set on line 1)`},
		{"duplicate module key", "[module a]\npath = /a.so\n\npath = /b.so\n", 4, `duplicate key "path" in [module a] (first set on line 2)`},
		{"duplicate section", "[module a]\npath = /a.so\n[module b]\npath = /b.so\n[module a]\npath = /c.so\n", 5, `duplicate section [module a] (first on line 1)`},
		{"same library twice", "[module a]\npath = /x/a.so\n[module b]\npath = /x/./a.so\n", 4, `[module b] loads the same library as [module a] (slotwatch.conf:1)`},
		{"missing path", "[module a]\nisolate = true\n[module b]\npath = /b.so\n", 1, `section [module a] has no "path"`},
		{"missing path in last section", "[module a]\npath = /a.so\n\n[module b]\n", 4, `section [module b] has no "path"`},
		{"relative path", "[module a]\npath = pkcs11/a.so\n", 2, `path "pkcs11/a.so" in [module a] is not absolute`},
		{"empty path", "[module a]\npath =\n", 2, `empty path in [module a]`},
		{"unknown section", "[modules a]\n", 1, `unknown section [modules a] (known: [module NAME])`},
		{"section without name", "[module]\n", 1, `section [module] needs a name`},
		{"section with two names", "[module a b]\n", 1, `section [module a b] has more than one name`},
		{"empty section", "[]\n", 1, `empty section header`},
		{"unclosed section", "notify = true\n[module a\n", 2, `malformed section header "[module a"`},
		{"bad module name", "[module open.sc]\n", 1, `invalid module name "open.sc": use only letters, digits, "-" and "_"`},
		{"module name with slash", "[module a/b]\n", 1, `invalid module name "a/b"`},
		{"line too long", "notify = true\n" + strings.Repeat("x", 70000) + "\n", 2, "line too long"},
		{"sessions per token 0", "max-sessions-per-token = 0\n", 1, `max-sessions-per-token = 0 is out of range (want a whole number from 1 to 1024)`},
		{"sessions per token 1025", "notify = true\nmax-sessions-per-token = 1025\n", 2, `max-sessions-per-token = 1025 is out of range (want a whole number from 1 to 1024)`},
		{"sessions per token garbage", "max-sessions-per-token = lots\n", 1, `bad value "lots" for max-sessions-per-token (want a whole number from 1 to 1024)`},
		{"sessions per token negative", "max-sessions-per-token = -1\n", 1, `bad value "-1" for max-sessions-per-token`},
		{"sessions per token with a sign", "max-sessions-per-token = +4\n", 1, `bad value "+4" for max-sessions-per-token`},
		{"sessions per token empty", "max-sessions-per-token =\n", 1, `bad value "" for max-sessions-per-token`},
		{"sessions per token huge", "max-sessions-per-token = 99999999999999999999999\n", 1, `max-sessions-per-token = 99999999999999999999999 is out of range`},
		{"concurrent calls 0", "max-concurrent-calls = 0\n", 1, `max-concurrent-calls = 0 is out of range (want a whole number from 1 to 256)`},
		{"concurrent calls 257", "max-concurrent-calls = 257\n", 1, `max-concurrent-calls = 257 is out of range (want a whole number from 1 to 256)`},
		{"concurrent calls decimal", "max-concurrent-calls = 2.5\n", 1, `bad value "2.5" for max-concurrent-calls (want a whole number from 1 to 256)`},
		{"concurrent calls two numbers", "max-concurrent-calls = 2 3\n", 1, `bad value "2 3" for max-concurrent-calls`},
		{"find results 0", "max-find-results = 0\n", 1, `max-find-results = 0 is out of range (want a whole number from 1 to 100000)`},
		{"find results 100001", "max-find-results = 100001\n", 1, `max-find-results = 100001 is out of range (want a whole number from 1 to 100000)`},
		{"find results hex", "max-find-results = 0x10\n", 1, `bad value "0x10" for max-find-results`},
		{"find results with a thousands separator", "max-find-results = 1_000\n", 1, `bad value "1_000" for max-find-results`},
		{"idle-release yes", "idle-release = yes\n", 1, `bad value "yes" for idle-release (want true or false)`},
		{"resume-login 1", "resume-login = 1\n", 1, `bad value "1" for resume-login (want true or false)`},
		{"idle-release-grace over an hour", "[module a]\npath = /a.so\nidle-release-grace = 3601\n", 3, `idle-release-grace = 3601 is out of range (want seconds, from 0 to 3600)`},
		{"idle-release-grace negative", "idle-release-grace = -1\n", 1, `bad value "-1" for idle-release-grace`},
		{"token-wait 0", "token-wait = 0\n", 1, `token-wait = 0 is out of range (want seconds, more than 0 and at most 60)`},
		{"token-wait 0.0", "token-wait = 0.0\n", 1, `token-wait = 0.0 is out of range`},
		{"token-wait below a nanosecond", "token-wait = 0.0000000001\n", 1, `token-wait = 0.0000000001 is out of range`},
		{"token-wait 60.5", "token-wait = 60.5\n", 1, `token-wait = 60.5 is out of range`},
		{"token-wait 61", "token-wait = 61\n", 1, `token-wait = 61 is out of range`},
		{"token-wait huge", "token-wait = 100000000000000000000\n", 1, `token-wait = 100000000000000000000 is out of range`},
		{"token-wait with a unit", "token-wait = 5s\n", 1, `bad value "5s" for token-wait (want seconds such as 5 or 0.5, more than 0 and at most 60)`},
		{"token-wait negative", "token-wait = -1\n", 1, `bad value "-1" for token-wait`},
		{"token-wait leading dot", "token-wait = .5\n", 1, `bad value ".5" for token-wait`},
		{"token-wait trailing dot", "token-wait = 5.\n", 1, `bad value "5." for token-wait`},
		{"token-wait exponent", "token-wait = 1e1\n", 1, `bad value "1e1" for token-wait`},
		{"token-wait NaN", "token-wait = NaN\n", 1, `bad value "NaN" for token-wait`},
		{"token-wait Inf", "token-wait = Inf\n", 1, `bad value "Inf" for token-wait`},
		{"token-wait comma", "token-wait = 0,5\n", 1, `bad value "0,5" for token-wait`},
		{"token-wait empty", "token-wait =\n", 1, `bad value "" for token-wait`},
		{"duplicate limit", "token-wait = 1\ntoken-wait = 2\n", 2, `duplicate key "token-wait" (first set on line 1)`},
		{"removal-grace 60.5", "notify = true\nremoval-grace = 60.5\n", 2, `removal-grace = 60.5 is out of range (want seconds, from 0 to 60)`},
		{"removal-grace huge", "removal-grace = 100000000000000000000\n", 1, `removal-grace = 100000000000000000000 is out of range`},
		{"removal-grace negative", "removal-grace = -1\n", 1, `bad value "-1" for removal-grace (want seconds such as 5 or 0.5, from 0 to 60)`},
		{"removal-grace with a unit", "removal-grace = 3s\n", 1, `bad value "3s" for removal-grace`},
		{"removal-grace leading dot", "removal-grace = .5\n", 1, `bad value ".5" for removal-grace`},
		{"removal-grace trailing dot", "removal-grace = 5.\n", 1, `bad value "5." for removal-grace`},
		{"removal-grace exponent", "removal-grace = 1e1\n", 1, `bad value "1e1" for removal-grace`},
		{"removal-grace empty", "removal-grace =\n", 1, `bad value "" for removal-grace`},
		{"removal-grace none", "removal-grace = none\n", 1, `bad value "none" for removal-grace`},
		{"duplicate removal-grace", "removal-grace = 1\n\nremoval-grace = 2\n", 3, `duplicate key "removal-grace" (first set on line 1)`},
		{"removal-grace in a module section", "[module a]\npath = /a.so\nremoval-grace = 5\n", 3, `key "removal-grace" is not a module key`},
		{"limit in a module section", "[module a]\npath = /a.so\nmax-find-results = 5\n", 3, `key "max-find-results" is not a module key`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := Parse(strings.NewReader(tt.in), "slotwatch.conf")
			if err == nil {
				t.Fatalf("Parse = %+v, want an error", cfg)
			}
			var ce *Error
			if !errors.As(err, &ce) {
				t.Fatalf("error %v (%T) is not a *Error", err, err)
			}
			if ce.File != "slotwatch.conf" || ce.Line != tt.line {
				t.Errorf("error at %s:%d, want slotwatch.conf:%d: %v", ce.File, ce.Line, tt.line, err)
			}
			prefix := fmt.Sprintf("slotwatch.conf:%d: ", tt.line)
			if !strings.HasPrefix(err.Error(), prefix) {
				t.Errorf("error %q does not start with %q", err, prefix)
			}
			if !strings.Contains(err.Error(), tt.msg) {
				t.Errorf("error %q does not contain %q", err, tt.msg)
			}
		})
	}
}

// parseRemovalScope and policy.Scope.String are inverses (Covers is
// tested in package policy).
func TestRemovalScope(t *testing.T) {
	tests := []struct {
		in   string
		want policy.Scope
	}{
		{"login-token", policy.Scope{Kind: policy.ScopeLoginToken}},
		{"any", policy.Scope{Kind: policy.ScopeAny}},
		{"serial:1,2", policy.Scope{Kind: policy.ScopeSerial, Serials: []string{"1", "2"}}},
	}
	for _, tt := range tests {
		s, err := parseRemovalScope(tt.in)
		if err != nil {
			t.Fatalf("parseRemovalScope(%q): %v", tt.in, err)
		}
		if !reflect.DeepEqual(s, tt.want) {
			t.Errorf("parseRemovalScope(%q) = %+v, want %+v", tt.in, s, tt.want)
		}
		if got := s.String(); got != tt.in {
			t.Errorf("parseRemovalScope(%q).String() = %q", tt.in, got)
		}
	}
}

func writeConfigFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestLoad(t *testing.T) {
	dir := t.TempDir()
	xdg := filepath.Join(dir, "xdg")
	home := filepath.Join(dir, "home")
	system := filepath.Join(dir, "etc", "slotwatch", "slotwatch.conf")
	old := systemConfigFile
	systemConfigFile = system
	t.Cleanup(func() { systemConfigFile = old })
	t.Setenv("HOME", home)
	t.Setenv("XDG_CONFIG_HOME", xdg)

	userFile := filepath.Join(xdg, "slotwatch", "slotwatch.conf")
	if got, want := SearchPath(), []string{userFile, system}; !reflect.DeepEqual(got, want) {
		t.Fatalf("SearchPath = %q, want %q", got, want)
	}

	// Neither file: the defaults.
	cfg, err := Load("")
	if err != nil {
		t.Fatalf("Load with no files: %v", err)
	}
	if want := Default(); !reflect.DeepEqual(cfg, want) || cfg.Source != "" {
		t.Errorf("Load with no files = %+v, want the defaults %+v", cfg, want)
	}

	// Only the system file.
	writeConfigFile(t, system, "removal-action = lock-screen\n")
	cfg, err = Load("")
	if err != nil || cfg.RemovalAction != policy.ActionLockScreen || !cfg.RemovalActionSet || cfg.Source != system {
		t.Errorf("Load with a system file = %+v, %v; want lock-screen from %s", cfg, err, system)
	}

	// The user's file wins, whole (no merging with the system file).
	writeConfigFile(t, userFile, "notify = true\n")
	cfg, err = Load("")
	if err != nil || !cfg.Notify || cfg.RemovalAction != policy.ActionNone || cfg.RemovalActionSet || cfg.Source != userFile {
		t.Errorf("Load with a user file = %+v, %v; want notify and no removal action from %s", cfg, err, userFile)
	}

	// A relative XDG_CONFIG_HOME is ignored: ~/.config.
	t.Setenv("XDG_CONFIG_HOME", "relative/dir")
	homeFile := filepath.Join(home, ".config", "slotwatch", "slotwatch.conf")
	if got := SearchPath()[0]; got != homeFile {
		t.Errorf("with a relative XDG_CONFIG_HOME, SearchPath()[0] = %q, want %q", got, homeFile)
	}
	writeConfigFile(t, homeFile, "removal-scope = any\n")
	cfg, err = Load("")
	if err != nil || cfg.RemovalScope.Kind != policy.ScopeAny || cfg.Source != homeFile {
		t.Errorf("Load from ~/.config = %+v, %v", cfg, err)
	}

	// A broken file found by the search is an error naming it and the line,
	// not a silent fall-through to the next one.
	writeConfigFile(t, homeFile, "notify = true\nbogus = 1\n")
	_, err = Load("")
	if err == nil || !strings.HasPrefix(err.Error(), homeFile+":2: ") {
		t.Errorf("Load with a broken user file: %v, want an error at %s:2", err, homeFile)
	}

	// An explicit path.
	explicit := filepath.Join(dir, "explicit.conf")
	writeConfigFile(t, explicit, "[module x]\npath = /x.so\n")
	cfg, err = Load(explicit)
	if err != nil || len(cfg.Modules) != 1 || cfg.Source != explicit {
		t.Errorf("Load(%s) = %+v, %v", explicit, cfg, err)
	}

	// An explicit path that is missing is an error, even though the
	// search path has files.
	missing := filepath.Join(dir, "missing.conf")
	_, err = Load(missing)
	if err == nil || !errors.Is(err, os.ErrNotExist) || !strings.Contains(err.Error(), missing) {
		t.Errorf("Load(missing) = %v, want a not-exist error naming %s", err, missing)
	}

	// A directory is not a config file.
	_, err = Load(dir)
	if err == nil || !strings.Contains(err.Error(), "is a directory") {
		t.Errorf("Load(dir) = %v, want an error", err)
	}
}

func TestDefaultRemovalGrace(t *testing.T) {
	if got := Default().RemovalGrace; got != 3*time.Second {
		t.Errorf("Default().RemovalGrace = %v, want 3s", got)
	}
}

func TestDefaultLimits(t *testing.T) {
	want := Limits{SessionsPerToken: 16, ConcurrentCalls: 8, FindResults: 1000, TokenWait: 5 * time.Second}
	if got := DefaultLimits(); got != want {
		t.Errorf("DefaultLimits() = %+v, want %+v", got, want)
	}
	if got := Default().Limits; got != want {
		t.Errorf("Default().Limits = %+v, want %+v", got, want)
	}
}

// The installed default config must parse to exactly the built-in defaults.
func TestPackagedDefault(t *testing.T) {
	path := filepath.Join("..", "packaging", "slotwatch.conf")
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	cfg, err := Parse(f, path)
	if err != nil {
		t.Fatalf("the packaged config does not parse: %v", err)
	}
	want := Default()
	want.Source = path
	if !reflect.DeepEqual(cfg, want) {
		t.Errorf("packaged config = %+v, want the defaults %+v", cfg, want)
	}
}
