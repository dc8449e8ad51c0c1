package config

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"runtime"
	"slices"
	"strings"
	"testing"

	"github.com/slotwatch/slotwatch/internal/p11kitpath"

	"github.com/slotwatch/slotwatch/policy"
)

func TestP11KitParseModuleFile(t *testing.T) {
	good := []struct {
		name string
		in   string
		want map[string]string
	}{
		{"empty", "", map[string]string{}},
		{"debian opensc", "# This file describes how to load the opensc module\n# See: http://p11-glue.freedesktop.org/doc/p11-kit/config.html\nmodule: opensc-pkcs11.so\n",
			map[string]string{"module": "opensc-pkcs11.so"}},
		{"debian trust", `# See pkcs11.conf(5) to understand this file

module: p11-kit-trust.so
priority: 1
trust-policy: yes
x-trust-lookup: pkcs11:library-description=PKCS%2311%20Kit%20Trust%20Module
disable-in: p11-kit-proxy
x-init-reserved:
`, map[string]string{
			"module": "p11-kit-trust.so", "priority": "1", "trust-policy": "yes",
			"x-trust-lookup": "pkcs11:library-description=PKCS%2311%20Kit%20Trust%20Module",
			"disable-in":     "p11-kit-proxy", "x-init-reserved": "",
		}},
		{"white space, later key wins, hash in value", "  module :  /a.so  \n\tcritical:yes\nmodule: /b#c.so\n",
			map[string]string{"module": "/b#c.so", "critical": "yes"}},
		{"colon in value", "remote: |ssh host p11-kit remote /a.so\n", map[string]string{"remote": "|ssh host p11-kit remote /a.so"}},
		{"a trailing comment is part of the value", "priority: 10 # note\ncritical: yes # required\n",
			map[string]string{"priority": "10 # note", "critical": "yes # required"}},
	}
	for _, tt := range good {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseP11KitModuleFile(strings.NewReader(tt.in), "x.module")
			if err != nil {
				t.Fatalf("parse: %v", err)
			}
			if !reflect.DeepEqual(got.values, tt.want) {
				t.Errorf("parse = %q, want %q", got.values, tt.want)
			}
		})
	}

	bad := []struct {
		name string
		in   string
		line int
		msg  string
	}{
		{"no colon", "module: a.so\nmodule = b.so\n", 2, `expected "key: value", got "module = b.so"`},
		{"section", "# c\n[global]\n", 2, `unexpected section header "[global]"`},
		{"pem", "\n\n-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", 3, "unexpected PEM block"},
		{"empty key", "module: a.so\n: x\n", 2, `missing key before ":"`},
		{"trailing comment is not one", "module: a.so\nfoo # bar\n", 2, `expected "key: value"`},
		{"equals sign, as in slotwatch.conf", "module: a.so\npriority = 10 # note\n", 2, `expected "key: value", got "priority = 10 # note"`},
	}
	for _, tt := range bad {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseP11KitModuleFile(strings.NewReader(tt.in), "x.module")
			if err == nil {
				t.Fatalf("parse = %q, want an error", got.values)
			}
			var ce *Error
			if !errors.As(err, &ce) || ce.File != "x.module" || ce.Line != tt.line {
				t.Errorf("error %v is not at x.module:%d", err, tt.line)
			}
			if !strings.Contains(err.Error(), tt.msg) {
				t.Errorf("error %q does not contain %q", err, tt.msg)
			}
		})
	}
}

func TestP11KitProgramLists(t *testing.T) {
	tests := []struct {
		keys map[string]string
		want bool
	}{
		{map[string]string{}, true},
		{map[string]string{"disable-in": "p11-kit-proxy"}, true},
		{map[string]string{"disable-in": "slotwatch"}, false},
		{map[string]string{"disable-in": "firefox, slotwatch"}, false},
		{map[string]string{"disable-in": "firefox,slotwatch,ssh"}, false},
		{map[string]string{"disable-in": "firefox slotwatchd"}, true}, // whole words only
		{map[string]string{"disable-in": ""}, true},
		{map[string]string{"enable-in": "slotwatch"}, true},
		{map[string]string{"enable-in": "seahorse\tslotwatch"}, true},
		{map[string]string{"enable-in": "seahorse, ssh"}, false},
		{map[string]string{"enable-in": ""}, false},
		{map[string]string{"enable-in": "slotwatch", "disable-in": "slotwatch"}, true}, // enable-in wins, as in p11-kit
		{map[string]string{"enable-in": "ssh", "disable-in": "firefox"}, false},
	}
	for _, tt := range tests {
		if got := p11KitEnabled(tt.keys); got != tt.want {
			t.Errorf("p11KitEnabled(%q) = %v, want %v", tt.keys, got, tt.want)
		}
	}
}

// p11Fixture is a p11-kit configuration in a temp dir: three registry
// directories (package, system, user) and a module directory with fake
// libraries (p11-kit only needs them to exist here; nothing loads them).
type p11Fixture struct {
	t                      *testing.T
	pkg, sys, user, libDir string
	dirs                   []string
}

func newP11Fixture(t *testing.T) *p11Fixture {
	d := t.TempDir()
	f := &p11Fixture{
		t:      t,
		pkg:    filepath.Join(d, "usr/share/p11-kit/modules"),
		sys:    filepath.Join(d, "etc/pkcs11/modules"),
		user:   filepath.Join(d, "home/.config/pkcs11/modules"),
		libDir: filepath.Join(d, "usr/lib/pkcs11"),
	}
	f.dirs = []string{f.pkg, f.sys, f.user}
	if err := os.MkdirAll(f.libDir, 0o755); err != nil {
		t.Fatal(err)
	}
	return f
}

// lib creates a fake library in the module dir and returns its path.
func (f *p11Fixture) lib(name string) string {
	p := filepath.Join(f.libDir, name)
	if err := os.WriteFile(p, []byte("not really ELF"), 0o644); err != nil {
		f.t.Fatal(err)
	}
	return p
}

func (f *p11Fixture) file(dir, name, content string) string {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		f.t.Fatal(err)
	}
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		f.t.Fatal(err)
	}
	return p
}

func (f *p11Fixture) load() ([]Module, []string) {
	f.t.Helper()
	mods, warnings, err := P11KitModules(f.dirs, f.libDir)
	if err != nil {
		f.t.Fatalf("P11KitModules: %v", err)
	}
	return mods, warnings
}

func moduleNames(mods []Module) []string {
	var names []string
	for _, m := range mods {
		names = append(names, m.Name)
	}
	return names
}

func wantWarning(t *testing.T, warnings []string, parts ...string) {
	t.Helper()
	for _, w := range warnings {
		ok := true
		for _, p := range parts {
			ok = ok && strings.Contains(w, p)
		}
		if ok {
			return
		}
	}
	t.Errorf("no warning containing all of %q in %q", parts, warnings)
}

func TestP11KitModulesDebianLike(t *testing.T) {
	f := newP11Fixture(t)
	opensc := f.lib("opensc-pkcs11.so")
	f.lib("p11-kit-trust.so")
	softhsm := filepath.Join(filepath.Dir(f.libDir), "softhsm", "libsofthsm2.so")
	if err := os.MkdirAll(filepath.Dir(softhsm), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(softhsm, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	openscFile := f.file(f.pkg, "opensc-pkcs11.module", "# See: http://p11-glue.freedesktop.org/doc/p11-kit/config.html\nmodule: opensc-pkcs11.so\n")
	f.file(f.pkg, "p11-kit-trust.module", "module: p11-kit-trust.so\npriority: 1\ntrust-policy: yes\ndisable-in: p11-kit-proxy\nx-init-reserved:\n")
	f.file(f.pkg, "softhsm2.module", "module: "+softhsm+"\n")
	f.file(f.pkg, "README", "not a module file\n")
	f.file(f.pkg, "opensc-pkcs11.module.dpkg-old", "module: old.so\n")
	f.file(f.pkg, ".hidden.module", "module: hidden.so\n")
	if err := os.MkdirAll(filepath.Join(f.pkg, "sub.module"), 0o755); err != nil {
		t.Fatal(err)
	}

	mods, warnings := f.load()
	want := []Module{
		{Name: "opensc-pkcs11", Path: opensc, From: FromP11Kit, Source: openscFile},
		{Name: "softhsm2", Path: softhsm, From: FromP11Kit, Source: filepath.Join(f.pkg, "softhsm2.module")},
	}
	if !reflect.DeepEqual(mods, want) {
		t.Errorf("modules =\n%+v\nwant\n%+v", mods, want)
	}
	if len(warnings) != 0 {
		t.Errorf("warnings: %q", warnings)
	}
}

func TestP11KitModulesOverrides(t *testing.T) {
	tests := []struct {
		name      string
		setup     func(f *p11Fixture)
		wantNames []string
		check     func(t *testing.T, f *p11Fixture, mods []Module, warnings []string)
	}{
		{
			name: "user disable-in merges with the package file",
			setup: func(f *p11Fixture) {
				f.lib("a.so")
				f.lib("b.so")
				f.file(f.pkg, "a.module", "module: a.so\n")
				f.file(f.pkg, "b.module", "module: b.so\n")
				f.file(f.user, "a.module", "disable-in: firefox slotwatch\n")
			},
			wantNames: []string{"b"},
		},
		{
			name: "user blank module: removes it",
			setup: func(f *p11Fixture) {
				f.lib("a.so")
				f.file(f.pkg, "a.module", "module: a.so\ncritical: yes\n")
				f.file(f.user, "a.module", "module:\n")
			},
			wantNames: nil,
		},
		{
			name: "system file changes the path, keeps other keys",
			setup: func(f *p11Fixture) {
				f.lib("a.so")
				f.lib("a-new.so")
				f.file(f.pkg, "a.module", "module: a.so\ncritical: yes\n")
				f.file(f.sys, "a.module", "module: a-new.so\n")
			},
			wantNames: []string{"a"},
			check: func(t *testing.T, f *p11Fixture, mods []Module, _ []string) {
				m := mods[0]
				if m.Path != filepath.Join(f.libDir, "a-new.so") || !m.Critical {
					t.Errorf("module = %+v, want a-new.so and critical from the package file", m)
				}
				if want := filepath.Join(f.pkg, "a.module") + ", " + filepath.Join(f.sys, "a.module"); m.Source != want {
					t.Errorf("Source = %q, want %q", m.Source, want)
				}
			},
		},
		{
			name: "user enable-in without slotwatch",
			setup: func(f *p11Fixture) {
				f.lib("a.so")
				f.file(f.sys, "a.module", "module: a.so\n")
				f.file(f.user, "a.module", "enable-in: seahorse\n")
			},
			wantNames: nil,
		},
		{
			name: "user enables a module the package disabled for slotwatch",
			setup: func(f *p11Fixture) {
				f.lib("a.so")
				f.file(f.pkg, "a.module", "module: a.so\ndisable-in: slotwatch\n")
				f.file(f.user, "a.module", "enable-in: slotwatch\n")
			},
			wantNames: []string{"a"},
		},
		{
			name: "user-only module with an absolute path",
			setup: func(f *p11Fixture) {
				p := filepath.Join(filepath.Dir(f.user), "mine.so")
				f.file(filepath.Dir(f.user), "mine.so", "")
				f.file(f.user, "mine.module", "module: "+p+"\n")
			},
			wantNames: []string{"mine"},
			check: func(t *testing.T, f *p11Fixture, mods []Module, _ []string) {
				if want := filepath.Join(filepath.Dir(f.user), "mine.so"); mods[0].Path != want {
					t.Errorf("Path = %q, want %q", mods[0].Path, want)
				}
			},
		},
		{
			name: "priority descending, then name",
			setup: func(f *p11Fixture) {
				for _, n := range []string{"a", "b", "c", "d", "e"} {
					f.lib(n + ".so")
				}
				f.file(f.pkg, "a.module", "module: a.so\n")
				f.file(f.pkg, "b.module", "module: b.so\npriority: 10\n")
				f.file(f.pkg, "c.module", "module: c.so\npriority: -1\n")
				f.file(f.pkg, "d.module", "module: d.so\npriority: 10\n")
				f.file(f.pkg, "e.module", "module: e.so\n")
			},
			wantNames: []string{"b", "d", "a", "e", "c"},
		},
		{
			name: "trust policy, remote and module-less files are not token sources",
			setup: func(f *p11Fixture) {
				f.lib("trust.so")
				f.lib("a.so")
				f.file(f.pkg, "trust.module", "module: trust.so\ntrust-policy: yes\n")
				f.file(f.pkg, "far.module", "remote: |ssh host p11-kit remote /x.so\n")
				f.file(f.pkg, "nothing.module", "priority: 3\n")
				f.file(f.pkg, "a.module", "module: a.so\ntrust-policy: no\n")
			},
			wantNames: []string{"a"},
			check: func(t *testing.T, f *p11Fixture, _ []Module, warnings []string) {
				wantWarning(t, warnings, `"far"`, "remote")
				wantWarning(t, warnings, `"nothing"`, `no "module:" line`)
				if len(warnings) != 2 {
					t.Errorf("warnings = %q, want 2", warnings)
				}
			},
		},
		{
			name: "missing library",
			setup: func(f *p11Fixture) {
				f.lib("a.so")
				f.file(f.pkg, "a.module", "module: a.so\n")
				f.file(f.pkg, "gone.module", "module: gone.so\n")
			},
			wantNames: []string{"a"},
			check: func(t *testing.T, f *p11Fixture, _ []Module, warnings []string) {
				wantWarning(t, warnings, `"gone"`, filepath.Join(f.libDir, "gone.so"), "does not exist")
			},
		},
		{
			name: "a malformed user file drops the module, naming file and line",
			setup: func(f *p11Fixture) {
				f.lib("a.so")
				f.lib("b.so")
				f.file(f.pkg, "a.module", "module: a.so\n")
				f.file(f.pkg, "b.module", "module: b.so\n")
				f.file(f.user, "a.module", "# mine\ndisable-in = slotwatch\n")
			},
			wantNames: []string{"b"},
			check: func(t *testing.T, f *p11Fixture, _ []Module, warnings []string) {
				wantWarning(t, warnings, `"a"`, filepath.Join(f.user, "a.module")+":2:")
			},
		},
		{
			name: "names are sanitized and made unique",
			setup: func(f *p11Fixture) {
				f.lib("x.so")
				f.lib("y.so")
				f.lib("z.so")
				f.file(f.pkg, "my.token.module", "module: x.so\n")
				f.file(f.pkg, "my_token.module", "module: y.so\n")
				f.file(f.pkg, "Vendor+HSM.module", "module: z.so\n")
			},
			wantNames: []string{"Vendor_HSM", "my_token", "my_token-2"},
		},
		{
			name: "one library under two names is loaded once",
			setup: func(f *p11Fixture) {
				f.lib("opensc-pkcs11.so")
				if err := os.Symlink(filepath.Join(f.libDir, "opensc-pkcs11.so"), filepath.Join(f.libDir, "alias.so")); err != nil {
					t.Fatal(err)
				}
				f.file(f.pkg, "opensc.module", "module: opensc-pkcs11.so\n")
				f.file(f.sys, "opensc-alias.module", "module: alias.so\n")
			},
			wantNames: []string{"opensc"},
			check: func(t *testing.T, f *p11Fixture, _ []Module, warnings []string) {
				wantWarning(t, warnings, `"opensc-alias"`, `already loaded as module "opensc"`)
			},
		},
		{
			name: "bad values warn",
			setup: func(f *p11Fixture) {
				f.lib("a.so")
				f.file(f.pkg, "a.module", "module: a.so\npriority: high\ncritical: true\n")
			},
			wantNames: []string{"a"},
			check: func(t *testing.T, f *p11Fixture, mods []Module, warnings []string) {
				file := filepath.Join(f.pkg, "a.module")
				wantWarning(t, warnings, `"a"`, file+":2:", `bad priority "high"`, "using 0")
				wantWarning(t, warnings, `"a"`, file+":3:", `bad value "true" for critical`)
				if mods[0].Critical {
					t.Error("critical: true (not yes) made the module critical")
				}
			},
		},
		{
			name:      "no directories at all",
			setup:     func(f *p11Fixture) {},
			wantNames: nil,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newP11Fixture(t)
			tt.setup(f)
			mods, warnings := f.load()
			if got := moduleNames(mods); !slices.Equal(got, tt.wantNames) {
				t.Fatalf("modules %q, want %q (warnings %q)", got, tt.wantNames, warnings)
			}
			for _, m := range mods {
				if !validModuleName(m.Name) || m.From != FromP11Kit || !filepath.IsAbs(m.Path) || m.Source == "" {
					t.Errorf("bad module %+v", m)
				}
			}
			if tt.check != nil {
				tt.check(t, f, mods, warnings)
			}
		})
	}
}

func TestP11KitModulesUnreadableDir(t *testing.T) {
	if os.Geteuid() == 0 {
		t.Skip("root reads every directory")
	}
	f := newP11Fixture(t)
	f.lib("a.so")
	f.file(f.pkg, "a.module", "module: a.so\n")
	f.file(f.user, "b.module", "module: a.so\n")
	if err := os.Chmod(f.user, 0); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Chmod(f.user, 0o755) })
	mods, warnings := f.load()
	if got := moduleNames(mods); !slices.Equal(got, []string{"a"}) {
		t.Errorf("modules %q, want [a]", got)
	}
	wantWarning(t, warnings, f.user)
}

func TestP11KitDefaultDirs(t *testing.T) {
	t.Setenv("XDG_CONFIG_HOME", "/xdg")
	want := []string{"/usr/share/p11-kit/modules", "/etc/pkcs11/modules", "/xdg/pkcs11/modules"}
	if got := P11KitDirs(); !slices.Equal(got, want) {
		t.Errorf("P11KitDirs = %q, want %q", got, want)
	}
	t.Setenv("XDG_CONFIG_HOME", "")
	t.Setenv("HOME", "/home/u")
	want[2] = "/home/u/.config/pkcs11/modules"
	if got := P11KitDirs(); !slices.Equal(got, want) {
		t.Errorf("P11KitDirs without XDG_CONFIG_HOME = %q, want %q", got, want)
	}
}

// On a machine with Debian's opensc-pkcs11 package, the real registry
// yields OpenSC and never p11-kit's trust module.
func TestP11KitModulesThisMachine(t *testing.T) {
	if _, err := os.Stat("/usr/share/p11-kit/modules/opensc-pkcs11.module"); err != nil {
		t.Skipf("no OpenSC in p11-kit's registry here: %v", err)
	}
	mods, warnings, err := P11KitModules([]string{"/usr/share/p11-kit/modules", "/etc/pkcs11/modules"}, p11kitpath.ModuleDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("modules %+v, warnings %q", mods, warnings)
	names := moduleNames(mods)
	if !slices.Contains(names, "opensc-pkcs11") {
		t.Errorf("no opensc-pkcs11 in %q", names)
	}
	if slices.Contains(names, "p11-kit-trust") {
		t.Errorf("the trust-policy module is in %q", names)
	}
}

func TestP11KitFlagModuleName(t *testing.T) {
	tests := map[string]string{
		"/usr/lib/x86_64-linux-gnu/pkcs11/opensc-pkcs11.so": "opensc-pkcs11",
		"/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so":  "softhsm2",
		"/opt/vendor/libvendor-pkcs11.so.3.1":               "vendor-pkcs11",
		"tests/fault.so":                                    "fault",
		"/opt/my.module/libweird+name.so":                   "weird_name",
		"/opt/lib.so":                                       "lib",
		"/opt/pkcs11.dylib":                                 "pkcs11_dylib",
	}
	for in, want := range tests {
		if got := FlagModuleName(in); got != want {
			t.Errorf("FlagModuleName(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestP11KitResolveModules(t *testing.T) {
	f := newP11Fixture(t)
	opensc := f.lib("opensc-pkcs11.so")
	softhsm := f.lib("libsofthsm2.so")
	f.lib("other.so")
	if err := os.Symlink(opensc, filepath.Join(f.libDir, "opensc-link.so")); err != nil {
		t.Fatal(err)
	}
	f.file(f.pkg, "opensc-pkcs11.module", "module: opensc-pkcs11.so\n")
	f.file(f.pkg, "softhsm2.module", "module: libsofthsm2.so\n")
	f.file(f.pkg, "other.module", "module: other.so\n")
	f.file(f.pkg, "gone.module", "module: gone.so\n")

	// Keep the search path away from the machine's and the user's files.
	d := t.TempDir()
	t.Setenv("XDG_CONFIG_HOME", filepath.Join(d, "xdg"))
	old := systemConfigFile
	systemConfigFile = filepath.Join(d, "etc", "slotwatch.conf")
	t.Cleanup(func() { systemConfigFile = old })

	t.Run("no config: the registry", func(t *testing.T) {
		cfg, mods, warnings, err := resolveModules(nil, "", f.dirs, f.libDir)
		if err != nil {
			t.Fatal(err)
		}
		if cfg.Source != "" {
			t.Errorf("config from %q, want the defaults", cfg.Source)
		}
		if got, want := moduleNames(mods), []string{"opensc-pkcs11", "other", "softhsm2"}; !slices.Equal(got, want) {
			t.Errorf("modules %q, want %q", got, want)
		}
		wantWarning(t, warnings, `"gone"`)
	})

	t.Run("config modules first; same library or same name replaces the registry's", func(t *testing.T) {
		conf := filepath.Join(d, "a.conf")
		writeConfigFile(t, conf, "notify = true\n"+
			"[module card]\npath = "+filepath.Join(f.libDir, "opensc-link.so")+"\nisolate = true\n"+
			"[module softhsm2]\npath = "+filepath.Join(f.libDir, "other-softhsm.so")+"\n")
		cfg, mods, _, err := resolveModules(nil, conf, f.dirs, f.libDir)
		if err != nil {
			t.Fatal(err)
		}
		if !cfg.Notify || cfg.Source != conf {
			t.Errorf("config = %+v, want notify from %s", cfg, conf)
		}
		want := []Module{
			{Name: "card", Path: filepath.Join(f.libDir, "opensc-link.so"), Isolate: true, From: FromFile, Source: conf + ":2", IdleRelease: DefaultIdleReleaseForTest},
			{Name: "softhsm2", Path: filepath.Join(f.libDir, "other-softhsm.so"), From: FromFile, Source: conf + ":5", IdleRelease: DefaultIdleReleaseForTest},
			{Name: "other", Path: filepath.Join(f.libDir, "other.so"), From: FromP11Kit, Source: filepath.Join(f.pkg, "other.module"), IdleRelease: DefaultIdleReleaseForTest},
		}
		if !reflect.DeepEqual(mods, want) {
			t.Errorf("modules =\n%+v\nwant\n%+v", mods, want)
		}
	})

	t.Run("the default config is found", func(t *testing.T) {
		writeConfigFile(t, filepath.Join(d, "xdg", "slotwatch", "slotwatch.conf"), "removal-action = lock-screen\n")
		t.Cleanup(func() { os.RemoveAll(filepath.Join(d, "xdg")) })
		cfg, _, _, err := resolveModules(nil, "", f.dirs, f.libDir)
		if err != nil || cfg.RemovalAction != policy.ActionLockScreen {
			t.Errorf("config %+v, %v; want the user's lock-screen", cfg, err)
		}
	})

	t.Run("flags: exactly those, no config search", func(t *testing.T) {
		writeConfigFile(t, filepath.Join(d, "xdg", "slotwatch", "slotwatch.conf"), "removal-action = lock-screen\n")
		t.Cleanup(func() { os.RemoveAll(filepath.Join(d, "xdg")) })
		other := filepath.Join(d, "x", "opensc-pkcs11.so")
		cfg, mods, warnings, err := resolveModules([]string{opensc, softhsm, other}, "", f.dirs, f.libDir)
		if err != nil {
			t.Fatal(err)
		}
		if cfg.RemovalAction != policy.ActionNone || cfg.Source != "" {
			t.Errorf("config %+v, want the defaults (no search with --module)", cfg)
		}
		want := []Module{
			{Name: "opensc-pkcs11", Path: opensc, From: FromFlag, Source: "--module", IdleRelease: DefaultIdleReleaseForTest},
			{Name: "softhsm2", Path: softhsm, From: FromFlag, Source: "--module", IdleRelease: DefaultIdleReleaseForTest},
			{Name: "opensc-pkcs11-2", Path: other, From: FromFlag, Source: "--module", IdleRelease: DefaultIdleReleaseForTest},
		}
		if !reflect.DeepEqual(mods, want) {
			t.Errorf("modules =\n%+v\nwant\n%+v", mods, want)
		}
		if len(warnings) != 0 {
			t.Errorf("warnings %q", warnings)
		}
	})

	t.Run("flags with an explicit config: its settings, not its modules", func(t *testing.T) {
		conf := filepath.Join(d, "b.conf")
		writeConfigFile(t, conf, "removal-scope = any\n[module card]\npath = /card.so\n")
		cfg, mods, warnings, err := resolveModules([]string{opensc}, conf, f.dirs, f.libDir)
		if err != nil {
			t.Fatal(err)
		}
		if cfg.RemovalScope.Kind != policy.ScopeAny {
			t.Errorf("config %+v, want removal-scope any", cfg)
		}
		if got := moduleNames(mods); !slices.Equal(got, []string{"opensc-pkcs11"}) {
			t.Errorf("modules %q", got)
		}
		wantWarning(t, warnings, conf, "ignored", "--module")
	})

	t.Run("flag path relative to the working directory", func(t *testing.T) {
		_, mods, _, err := resolveModules([]string{"./rel/libfoo.so", "bare.so"}, "", f.dirs, f.libDir)
		if err != nil {
			t.Fatal(err)
		}
		wd, _ := os.Getwd()
		if mods[0].Path != filepath.Join(wd, "rel", "libfoo.so") || mods[0].Name != "foo" {
			t.Errorf("module %+v, want an absolute path named foo", mods[0])
		}
		if mods[1].Path != "bare.so" { // left to dlopen's search
			t.Errorf("module %+v, want bare.so as given", mods[1])
		}
	})

	errorCases := []struct {
		name   string
		flags  []string
		config string
		want   string
	}{
		{"flag given twice", []string{opensc, filepath.Join(f.libDir, ".", "opensc-pkcs11.so")}, "", "given twice"},
		{"empty flag", []string{""}, "", "empty path"},
		{"missing explicit config", nil, filepath.Join(d, "nope.conf"), "nope.conf"},
		{"missing explicit config with flags", []string{opensc}, filepath.Join(d, "nope.conf"), "nope.conf"},
	}
	for _, tt := range errorCases {
		t.Run(tt.name, func(t *testing.T) {
			_, _, _, err := resolveModules(tt.flags, tt.config, f.dirs, f.libDir)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %v, want one containing %q", err, tt.want)
			}
		})
	}

	t.Run("a bad config is an error naming its line", func(t *testing.T) {
		conf := filepath.Join(d, "bad.conf")
		writeConfigFile(t, conf, "notify = true\nnotify = false\n")
		_, _, _, err := resolveModules(nil, conf, f.dirs, f.libDir)
		if err == nil || !strings.HasPrefix(err.Error(), conf+":2: ") {
			t.Errorf("error %v, want one at %s:2", err, conf)
		}
	})
}

// The p11-kit keys slotwatch acts on beyond module/enable-in/disable-in:
// critical, x-init-reserved, priority with a trailing comment, and the
// refusal of p11-kit's own proxy and client modules.
func TestP11KitModuleRules(t *testing.T) {
	tests := []struct {
		name      string
		setup     func(f *p11Fixture)
		wantNames []string
		// want, when set, is checked against the modules with Path,
		// Critical, InitReserved (Name, From and Source are checked
		// elsewhere).
		want  []Module
		check func(t *testing.T, f *p11Fixture, mods []Module, warnings []string)
		// warnings is the number of warnings expected.
		warnings int
	}{
		{
			name: "critical yes, no and absent",
			setup: func(f *p11Fixture) {
				f.lib("a.so")
				f.lib("b.so")
				f.lib("c.so")
				f.file(f.pkg, "a.module", "module: a.so\ncritical: yes\n")
				f.file(f.pkg, "b.module", "module: b.so\ncritical: no\n")
				f.file(f.pkg, "c.module", "module: c.so\n")
			},
			wantNames: []string{"a", "b", "c"},
			want:      []Module{{Path: "a.so", Critical: true}, {Path: "b.so"}, {Path: "c.so"}},
		},
		{
			name: "critical set by the user's file",
			setup: func(f *p11Fixture) {
				f.lib("a.so")
				f.file(f.pkg, "a.module", "module: a.so\n")
				f.file(f.user, "a.module", "critical: yes\n")
			},
			wantNames: []string{"a"},
			want:      []Module{{Path: "a.so", Critical: true}},
		},
		{
			name: "critical with a trailing comment is not yes, as in p11-kit",
			setup: func(f *p11Fixture) {
				f.lib("a.so")
				f.file(f.pkg, "a.module", "# c\nmodule: a.so\ncritical: yes # required\n")
			},
			wantNames: []string{"a"},
			want:      []Module{{Path: "a.so"}},
			check: func(t *testing.T, f *p11Fixture, _ []Module, warnings []string) {
				wantWarning(t, warnings, filepath.Join(f.pkg, "a.module")+":3:", `bad value "yes # required" for critical`)
			},
			warnings: 1,
		},
		{
			name: "a critical module whose library is missing says so",
			setup: func(f *p11Fixture) {
				f.file(f.pkg, "a.module", "module: a.so\ncritical: yes\n")
			},
			wantNames: nil,
			check: func(t *testing.T, f *p11Fixture, _ []Module, warnings []string) {
				wantWarning(t, warnings, `"a"`, "does not exist", "marked critical")
			},
			warnings: 1,
		},
		{
			name: "x-init-reserved is carried",
			setup: func(f *p11Fixture) {
				f.lib("a.so")
				f.lib("b.so")
				f.lib("c.so")
				f.file(f.pkg, "a.module", "module: a.so\nx-init-reserved: slots=2 debug=yes\n")
				f.file(f.pkg, "b.module", "module: b.so\nx-init-reserved:\n")
				f.file(f.pkg, "c.module", "module: c.so\n")
			},
			wantNames: []string{"a", "b", "c"},
			want:      []Module{{Path: "a.so", InitReserved: "slots=2 debug=yes"}, {Path: "b.so"}, {Path: "c.so"}},
		},
		{
			name: "x-init-reserved overridden by a later directory",
			setup: func(f *p11Fixture) {
				f.lib("a.so")
				f.file(f.pkg, "a.module", "module: a.so\nx-init-reserved: one\n")
				f.file(f.sys, "a.module", "x-init-reserved: two\n")
			},
			wantNames: []string{"a"},
			want:      []Module{{Path: "a.so", InitReserved: "two"}},
		},
		{
			name: "p11-kit's proxy and client are refused",
			setup: func(f *p11Fixture) {
				f.lib("a.so")
				f.lib("p11-kit-proxy.so")
				f.lib("p11-kit-client.so")
				f.file(f.pkg, "a.module", "module: a.so\n")
				f.file(f.pkg, "proxy.module", "module: p11-kit-proxy.so\n")
				f.file(f.pkg, "client.module", "# c\nmodule: "+filepath.Join(f.libDir, "p11-kit-client.so")+"\n")
				f.file(f.pkg, "elsewhere.module", "module: /opt/x/p11-kit-proxy.so\n") // refused although missing
			},
			wantNames: []string{"a"},
			check: func(t *testing.T, f *p11Fixture, _ []Module, warnings []string) {
				wantWarning(t, warnings, `"proxy"`, filepath.Join(f.pkg, "proxy.module")+":1", filepath.Join(f.libDir, "p11-kit-proxy.so"), "p11-kit's proxy module")
				wantWarning(t, warnings, `"client"`, filepath.Join(f.pkg, "client.module")+":2", "p11-kit's client module")
				wantWarning(t, warnings, `"elsewhere"`, "/opt/x/p11-kit-proxy.so", "p11-kit's proxy module")
			},
			warnings: 3,
		},
		{
			name: "libp11-kit and links to it are the proxy",
			setup: func(f *p11Fixture) {
				real := f.lib("libp11-kit.so.0.3.1")
				if err := os.Symlink(real, filepath.Join(f.libDir, "innocent.so")); err != nil {
					f.t.Fatal(err)
				}
				f.file(f.pkg, "direct.module", "module: libp11-kit.so.0.3.1\n")
				f.file(f.pkg, "link.module", "module: innocent.so\n")
			},
			wantNames: nil,
			check: func(t *testing.T, f *p11Fixture, _ []Module, warnings []string) {
				wantWarning(t, warnings, `"direct"`, "p11-kit's proxy module")
				wantWarning(t, warnings, `"link"`, filepath.Join(f.libDir, "innocent.so"), "p11-kit's proxy module")
			},
			warnings: 2,
		},
		{
			name: "a user file can point a refused module elsewhere",
			setup: func(f *p11Fixture) {
				f.lib("p11-kit-proxy.so")
				f.lib("real.so")
				f.file(f.pkg, "a.module", "module: p11-kit-proxy.so\n")
				f.file(f.user, "a.module", "module: real.so\n")
			},
			wantNames: []string{"a"},
			want:      []Module{{Path: "real.so"}},
		},
		{
			name: "priority with a trailing comment",
			setup: func(f *p11Fixture) {
				for _, n := range []string{"a", "b", "c", "d"} {
					f.lib(n + ".so")
				}
				f.file(f.pkg, "a.module", "module: a.so\n")
				f.file(f.pkg, "b.module", "module: b.so\npriority: 10 # note\n")
				f.file(f.pkg, "c.module", "module: c.so\npriority: 5#tight\n")
				f.file(f.pkg, "d.module", "module: d.so\npriority: -3\t# last\n")
			},
			wantNames: []string{"b", "c", "a", "d"},
		},
		{
			name: "priority that is not a number warns with file and line and is 0",
			setup: func(f *p11Fixture) {
				for _, n := range []string{"a", "b", "c"} {
					f.lib(n + ".so")
				}
				f.file(f.pkg, "a.module", "module: a.so\npriority: -1\n")
				f.file(f.pkg, "b.module", "module: b.so\n\npriority: ten # note\n")
				f.file(f.pkg, "c.module", "module: c.so\npriority: 1\n")
			},
			wantNames: []string{"c", "b", "a"},
			check: func(t *testing.T, f *p11Fixture, _ []Module, warnings []string) {
				wantWarning(t, warnings, `"b"`, filepath.Join(f.pkg, "b.module")+":3:", `bad priority "ten # note"`, "using 0")
			},
			warnings: 1,
		},
		{
			name: "priority with more than a number warns and uses the number, as p11-kit does",
			setup: func(f *p11Fixture) {
				f.lib("a.so")
				f.lib("b.so")
				f.file(f.pkg, "a.module", "module: a.so\n")
				f.file(f.user, "b.module", "module: "+filepath.Join(f.libDir, "b.so")+"\npriority: 7 high\n")
			},
			wantNames: []string{"b", "a"},
			check: func(t *testing.T, f *p11Fixture, _ []Module, warnings []string) {
				wantWarning(t, warnings, `"b"`, filepath.Join(f.user, "b.module")+":2:", `priority "7 high" is not just a number`, "using 7")
			},
			warnings: 1,
		},
		{
			name: "priority = 10 (slotwatch.conf syntax) is a broken file, as in p11-kit",
			setup: func(f *p11Fixture) {
				f.lib("a.so")
				f.file(f.pkg, "a.module", "module: a.so\npriority = 10 # note\n")
			},
			wantNames: nil,
			check: func(t *testing.T, f *p11Fixture, _ []Module, warnings []string) {
				wantWarning(t, warnings, `"a"`, filepath.Join(f.pkg, "a.module")+":2:", `expected "key: value"`)
			},
			warnings: 1,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newP11Fixture(t)
			tt.setup(f)
			mods, warnings := f.load()
			if got := moduleNames(mods); !slices.Equal(got, tt.wantNames) {
				t.Fatalf("modules %q, want %q (warnings %q)", got, tt.wantNames, warnings)
			}
			if tt.want != nil {
				for i, w := range tt.want {
					m := mods[i]
					if w.Path = filepath.Join(f.libDir, w.Path); m.Path != w.Path || m.Critical != w.Critical || m.InitReserved != w.InitReserved {
						t.Errorf("module %d = %+v, want Path %s, Critical %v, InitReserved %q", i, m, w.Path, w.Critical, w.InitReserved)
					}
				}
			}
			if tt.check != nil {
				tt.check(t, f, mods, warnings)
			}
			if len(warnings) != tt.warnings {
				t.Errorf("%d warnings %q, want %d", len(warnings), warnings, tt.warnings)
			}
		})
	}
}

func TestP11KitPriority(t *testing.T) {
	tests := []struct {
		in            string
		n             int
		clean, number bool
	}{
		{"0", 0, true, true},
		{"10", 10, true, true},
		{"+10", 10, true, true},
		{"-10", -10, true, true},
		{"10 # note", 10, true, true},
		{"10\t#note", 10, true, true},
		{"10#note", 10, true, true},
		{"10 ", 10, true, true},
		{"10 high", 10, false, true},
		{"10abc", 10, false, true},
		{"1.5", 1, false, true},
		{"", 0, false, false},
		{"high", 0, false, false},
		{"# 10", 0, false, false},
		{"-", 0, false, false},
		{"+ 1", 0, false, false},
		{"2147483647", 2147483647, true, true},
		{"2147483648", 0, false, false}, // more than a C int holds
		{"-2147483648", -2147483648, true, true},
	}
	for _, tt := range tests {
		n, clean, number := parseP11KitPriority(tt.in)
		if n != tt.n || clean != tt.clean || number != tt.number {
			t.Errorf("parseP11KitPriority(%q) = %d, %v, %v; want %d, %v, %v", tt.in, n, clean, number, tt.n, tt.clean, tt.number)
		}
	}
}

// p11-kit's module directory is found from the architecture and what
// exists; relative "module:" values are resolved against it.
func TestP11KitModuleDir(t *testing.T) {
	const (
		lib64 = "/usr/lib64/pkcs11"
		lib   = "/usr/lib/pkcs11"
	)
	tests := []struct {
		goarch string
		exists []string
		want   string
	}{
		{"amd64", []string{"/usr/lib/x86_64-linux-gnu/pkcs11", lib}, "/usr/lib/x86_64-linux-gnu/pkcs11"},
		{"arm64", []string{"/usr/lib/aarch64-linux-gnu/pkcs11"}, "/usr/lib/aarch64-linux-gnu/pkcs11"},
		{"386", []string{"/usr/lib/i386-linux-gnu/pkcs11", "/usr/lib/x86_64-linux-gnu/pkcs11"}, "/usr/lib/i386-linux-gnu/pkcs11"},
		{"arm", []string{"/usr/lib/arm-linux-gnueabihf/pkcs11"}, "/usr/lib/arm-linux-gnueabihf/pkcs11"},
		{"arm", []string{"/usr/lib/arm-linux-gnueabi/pkcs11"}, "/usr/lib/arm-linux-gnueabi/pkcs11"}, // armel
		{"ppc64le", []string{"/usr/lib/powerpc64le-linux-gnu/pkcs11"}, "/usr/lib/powerpc64le-linux-gnu/pkcs11"},
		{"s390x", []string{"/usr/lib/s390x-linux-gnu/pkcs11"}, "/usr/lib/s390x-linux-gnu/pkcs11"},
		{"riscv64", []string{"/usr/lib/riscv64-linux-gnu/pkcs11"}, "/usr/lib/riscv64-linux-gnu/pkcs11"},
		{"mips64le", []string{"/usr/lib/mips64el-linux-gnuabi64/pkcs11"}, "/usr/lib/mips64el-linux-gnuabi64/pkcs11"},
		// Fedora, openSUSE: no multiarch directory.
		{"amd64", []string{lib64, lib}, lib64},
		{"arm64", []string{lib64}, lib64},
		// A 32-bit process on a 64-bit Fedora uses /usr/lib, not lib64.
		{"386", []string{lib64, lib}, lib},
		// Arch, Alpine.
		{"amd64", []string{lib}, lib},
		// Nothing exists: where Debian would have it.
		{"amd64", nil, "/usr/lib/x86_64-linux-gnu/pkcs11"},
		{"riscv64", nil, "/usr/lib/riscv64-linux-gnu/pkcs11"},
		// An architecture without a known triplet.
		{"wasm", []string{lib64, lib}, lib64},
		{"wasm", []string{lib}, lib},
		{"wasm", nil, lib64},
	}
	for _, tt := range tests {
		isDir := func(p string) bool { return slices.Contains(tt.exists, p) }
		if got := p11kitpath.FindModuleDir(tt.goarch, isDir); got != tt.want {
			t.Errorf("FindP11KitModuleDir(%s) with %q = %q, want %q", tt.goarch, tt.exists, got, tt.want)
		}
	}

	triplets := map[string]string{
		"amd64": "x86_64-linux-gnu", "arm64": "aarch64-linux-gnu", "386": "i386-linux-gnu",
		"arm": "arm-linux-gnueabihf", "ppc64le": "powerpc64le-linux-gnu", "s390x": "s390x-linux-gnu",
		"riscv64": "riscv64-linux-gnu", "mips64le": "mips64el-linux-gnuabi64", "wasm": "",
	}
	for goarch, want := range triplets {
		if got := p11kitpath.MultiarchTriplet(goarch); got != want {
			t.Errorf("MultiarchTriplet(%s) = %q, want %q", goarch, got, want)
		}
	}

	// The registry's relative paths land in the directory found, here a
	// fake arm64 machine whose root is a temp dir.
	f := newP11Fixture(t)
	root := t.TempDir()
	isDir := func(p string) bool {
		fi, err := os.Stat(filepath.Join(root, p))
		return err == nil && fi.IsDir()
	}
	want := "/usr/lib/aarch64-linux-gnu/pkcs11"
	if err := os.MkdirAll(filepath.Join(root, want), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, want, "opensc-pkcs11.so"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	dir := p11kitpath.FindModuleDir("arm64", isDir)
	if dir != want {
		t.Fatalf("FindP11KitModuleDir(arm64) = %q, want %q", dir, want)
	}
	f.file(f.pkg, "opensc-pkcs11.module", "module: opensc-pkcs11.so\n")
	mods, warnings, err := P11KitModules(f.dirs, filepath.Join(root, dir))
	if err != nil || len(mods) != 1 || mods[0].Path != filepath.Join(root, want, "opensc-pkcs11.so") {
		t.Errorf("P11KitModules = %+v, %q, %v; want opensc-pkcs11.so in %s", mods, warnings, err, want)
	}

	// This machine: one of the candidates for its own architecture.
	if got := p11kitpath.ModuleDir(); !slices.Contains(p11kitpath.ModuleDirs(runtime.GOARCH), got) {
		t.Errorf("P11KitModuleDir() = %q, not one of %q", got, p11kitpath.ModuleDirs(runtime.GOARCH))
	}
}
