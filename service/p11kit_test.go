package main

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

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
	}
	for _, tt := range good {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseP11KitModuleFile(strings.NewReader(tt.in), "x.module")
			if err != nil {
				t.Fatalf("parse: %v", err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("parse = %q, want %q", got, tt.want)
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
	}
	for _, tt := range bad {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseP11KitModuleFile(strings.NewReader(tt.in), "x.module")
			if err == nil {
				t.Fatalf("parse = %q, want an error", got)
			}
			var ce *ConfigError
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

func (f *p11Fixture) load() ([]ModuleConfig, []string) {
	f.t.Helper()
	mods, warnings, err := P11KitModules(f.dirs, f.libDir)
	if err != nil {
		f.t.Fatalf("P11KitModules: %v", err)
	}
	return mods, warnings
}

func moduleNames(mods []ModuleConfig) []string {
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
	want := []ModuleConfig{
		{Name: "opensc-pkcs11", Path: opensc, From: ModuleFromP11Kit, Source: openscFile},
		{Name: "softhsm2", Path: softhsm, From: ModuleFromP11Kit, Source: filepath.Join(f.pkg, "softhsm2.module")},
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
		check     func(t *testing.T, f *p11Fixture, mods []ModuleConfig, warnings []string)
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
			check: func(t *testing.T, f *p11Fixture, mods []ModuleConfig, _ []string) {
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
			check: func(t *testing.T, f *p11Fixture, mods []ModuleConfig, _ []string) {
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
			check: func(t *testing.T, f *p11Fixture, _ []ModuleConfig, warnings []string) {
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
			check: func(t *testing.T, f *p11Fixture, _ []ModuleConfig, warnings []string) {
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
			check: func(t *testing.T, f *p11Fixture, _ []ModuleConfig, warnings []string) {
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
			check: func(t *testing.T, f *p11Fixture, _ []ModuleConfig, warnings []string) {
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
			check: func(t *testing.T, f *p11Fixture, mods []ModuleConfig, warnings []string) {
				wantWarning(t, warnings, `bad priority "high"`)
				wantWarning(t, warnings, `bad value "true" for critical`)
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
				if !validModuleName(m.Name) || m.From != ModuleFromP11Kit || !filepath.IsAbs(m.Path) || m.Source == "" {
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
	if got := DefaultP11KitDirs(); !slices.Equal(got, want) {
		t.Errorf("DefaultP11KitDirs = %q, want %q", got, want)
	}
	t.Setenv("XDG_CONFIG_HOME", "")
	t.Setenv("HOME", "/home/u")
	want[2] = "/home/u/.config/pkcs11/modules"
	if got := DefaultP11KitDirs(); !slices.Equal(got, want) {
		t.Errorf("DefaultP11KitDirs without XDG_CONFIG_HOME = %q, want %q", got, want)
	}
}

// On a machine with Debian's opensc-pkcs11 package, the real registry
// yields OpenSC and never p11-kit's trust module.
func TestP11KitModulesThisMachine(t *testing.T) {
	if _, err := os.Stat("/usr/share/p11-kit/modules/opensc-pkcs11.module"); err != nil {
		t.Skipf("no OpenSC in p11-kit's registry here: %v", err)
	}
	mods, warnings, err := P11KitModules([]string{"/usr/share/p11-kit/modules", "/etc/pkcs11/modules"}, P11KitModuleDir)
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
		if got := flagModuleName(in); got != want {
			t.Errorf("flagModuleName(%q) = %q, want %q", in, got, want)
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
		want := []ModuleConfig{
			{Name: "card", Path: filepath.Join(f.libDir, "opensc-link.so"), Isolate: true, From: ModuleFromConfig, Source: conf + ":2"},
			{Name: "softhsm2", Path: filepath.Join(f.libDir, "other-softhsm.so"), From: ModuleFromConfig, Source: conf + ":5"},
			{Name: "other", Path: filepath.Join(f.libDir, "other.so"), From: ModuleFromP11Kit, Source: filepath.Join(f.pkg, "other.module")},
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
		want := []ModuleConfig{
			{Name: "opensc-pkcs11", Path: opensc, From: ModuleFromFlag, Source: "--module"},
			{Name: "softhsm2", Path: softhsm, From: ModuleFromFlag, Source: "--module"},
			{Name: "opensc-pkcs11-2", Path: other, From: ModuleFromFlag, Source: "--module"},
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
