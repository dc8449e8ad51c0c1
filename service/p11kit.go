package main

// p11-kit's module registry (pkcs11.conf(5), "Module Configuration"), read
// the way p11-kit reads it, and the rule that turns --module flags, the
// config file and the registry into the list of modules to load.

import (
	"bufio"
	"bytes"
	"cmp"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
)

// P11KitModuleDir is where p11-kit resolves a relative "module:" value:
// Debian's multiarch default for amd64, the value of
// `pkg-config --variable=p11_module_path p11-kit-1` there. Callers on
// other systems pass their own directory to P11KitModules.
const P11KitModuleDir = "/usr/lib/x86_64-linux-gnu/pkcs11"

// p11KitProgramName is the program name enable-in and disable-in are
// matched against: p11-kit uses the base name of the executable.
const p11KitProgramName = "slotwatch"

// DefaultP11KitDirs returns the directories p11-kit reads module configs
// from, lowest precedence first: the packages' (/usr/share/p11-kit/modules),
// the administrator's (/etc/pkcs11/modules), the user's
// ($XDG_CONFIG_HOME/pkcs11/modules, ~/.config/pkcs11/modules by default).
//
// p11-kit's user-config setting in pkcs11.conf (none / only / override) is
// not consulted: the user directory is always merged, p11-kit's default.
func DefaultP11KitDirs() []string {
	dirs := []string{"/usr/share/p11-kit/modules", "/etc/pkcs11/modules"}
	if d := userConfigHome(); d != "" {
		dirs = append(dirs, filepath.Join(d, "pkcs11", "modules"))
	}
	return dirs
}

// P11KitModules reads the *.module files in dirs (lowest precedence first,
// as DefaultP11KitDirs returns them) and returns the modules slotwatch
// should load, highest priority first, then by name. Relative "module:"
// values are resolved against moduleDir.
//
// It follows p11-kit:
//
//   - The module's name is the file name without ".module"; files whose
//     names do not end in ".module" or do not start with a letter or digit
//     are ignored. Files with the same name in several directories are
//     merged key by key, the later directory winning, so a user file
//     holding only "disable-in: slotwatch" disables a system module, and
//     one with an empty "module:" removes it.
//   - A module is skipped when enable-in is present and does not list
//     "slotwatch", or (without enable-in) when disable-in lists it. Both
//     are comma and/or white-space separated lists.
//   - Modules with "trust-policy: yes" are skipped: p11-kit's trust store
//     is not a token source. So are modules without a "module:" value.
//   - "priority" (an integer, default 0) orders the list; "critical"
//     (yes/no) sets ModuleConfig.Critical; every other key (managed,
//     log-calls, x-*, ...) is ignored.
//
// Where p11-kit would fail or only print a message, P11KitModules leaves
// the module out and says why in warnings (the daemon logs them and goes
// on with the others): a file that cannot be read or parsed (the module of
// that name is left out entirely, since its overrides are unknown), a
// module whose library does not exist, a "remote:" module (slotwatch loads
// libraries itself), a library already listed under another name, a bad
// priority, critical or trust-policy value.
//
// Missing directories are fine, and so are unreadable ones (a warning).
// The error is for any other failure to list a directory.
//
// Names are sanitized to [A-Za-z0-9_-] (every other byte becomes "_") and
// made unique with a "-2", "-3", ... suffix. From is ModuleFromP11Kit and
// Source lists the files the module was read from.
func P11KitModules(dirs []string, moduleDir string) (mods []ModuleConfig, warnings []string, err error) {
	type entry struct {
		name   string            // p11-kit's name: the file name without .module
		keys   map[string]string // merged over all files, later wins
		files  []string
		broken bool
	}
	entries := map[string]*entry{}
	warnf := func(format string, args ...any) {
		warnings = append(warnings, fmt.Sprintf("p11-kit registry: "+format, args...))
	}

	for _, dir := range dirs {
		des, err := os.ReadDir(dir)
		if err != nil {
			switch {
			case errors.Is(err, fs.ErrNotExist), errors.Is(err, syscall.ENOTDIR):
				continue
			case errors.Is(err, fs.ErrPermission):
				warnf("%v; its modules are ignored", err)
				continue
			}
			return nil, warnings, fmt.Errorf("p11-kit registry: %w", err)
		}
		for _, de := range des { // sorted by file name
			fname := de.Name()
			name, ok := strings.CutSuffix(fname, ".module")
			if !ok || name == "" || !isASCIIAlnum(name[0]) {
				continue
			}
			path := filepath.Join(dir, fname)
			e := entries[name]
			if e == nil {
				e = &entry{name: name, keys: map[string]string{}}
				entries[name] = e
			}
			e.files = append(e.files, path)
			if e.broken {
				continue
			}
			keys, err := readP11KitModuleFile(path)
			if errors.Is(err, errIsDir) {
				e.files = e.files[:len(e.files)-1]
				continue
			}
			if err != nil {
				warnf("module %q left out: %v", name, err)
				e.broken = true
				continue
			}
			for k, v := range keys {
				e.keys[k] = v
			}
		}
	}

	type candidate struct {
		mod      ModuleConfig
		name     string // p11-kit's name, for sorting
		priority int
	}
	var cands []candidate
	for _, e := range entries {
		if e.broken || len(e.files) == 0 {
			continue
		}
		src := strings.Join(e.files, ", ")
		if !p11KitEnabled(e.keys) {
			continue
		}
		if p11KitBool(e.keys, "trust-policy", src, warnf) {
			continue
		}
		if _, ok := e.keys["remote"]; ok {
			warnf("module %q (%s) left out: it is a p11-kit \"remote:\" module; slotwatch loads module libraries itself", e.name, src)
			continue
		}
		lib, ok := e.keys["module"]
		if !ok {
			warnf("module %q (%s) left out: no \"module:\" line", e.name, src)
			continue
		}
		if lib == "" { // pkcs11.conf(5): a blank value disables the module
			continue
		}
		if !filepath.IsAbs(lib) {
			lib = filepath.Join(moduleDir, lib)
		}
		lib = filepath.Clean(lib)
		if _, err := os.Stat(lib); errors.Is(err, fs.ErrNotExist) {
			warnf("module %q (%s) left out: library %s does not exist", e.name, src, lib)
			continue
		}
		prio := 0
		if v, ok := e.keys["priority"]; ok {
			if n, err := strconv.Atoi(v); err == nil {
				prio = n
			} else {
				warnf("module %q (%s): bad priority %q, using 0", e.name, src, v)
			}
		}
		cands = append(cands, candidate{
			mod: ModuleConfig{
				Path:     lib,
				From:     ModuleFromP11Kit,
				Critical: p11KitBool(e.keys, "critical", src, warnf),
				Source:   src,
			},
			name:     e.name,
			priority: prio,
		})
	}
	slices.SortFunc(cands, func(a, b candidate) int {
		if c := cmp.Compare(b.priority, a.priority); c != 0 {
			return c
		}
		return strings.Compare(a.name, b.name)
	})

	names := map[string]bool{}
	var libs []libraryID
	for _, c := range cands {
		id := newLibraryID(c.mod.Path)
		if i := slices.IndexFunc(libs, id.same); i >= 0 {
			warnf("module %q (%s) left out: library %s is already loaded as module %q", c.name, c.mod.Source, c.mod.Path, mods[i].Name)
			continue
		}
		c.mod.Name = uniqueModuleName(sanitizeModuleName(c.name), names)
		libs = append(libs, id)
		mods = append(mods, c.mod)
	}
	return mods, warnings, nil
}

var errIsDir = errors.New("is a directory")

func readP11KitModuleFile(path string) (map[string]string, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, syscall.EISDIR) {
		return nil, errIsDir
	}
	if err != nil {
		return nil, err
	}
	return parseP11KitModuleFile(bytes.NewReader(data), path)
}

// parseP11KitModuleFile parses one module config file the way p11-kit's
// lexer does: white space around lines, keys and values is trimmed; blank
// lines and lines starting with "#" are skipped; every other line is
// "key: value" split at the first colon (the value may be empty, and
// "#" inside a value is part of it); a key given twice keeps the last
// value. A line without a colon, a [section] header or a PEM block is an
// error naming the line.
func parseP11KitModuleFile(r io.Reader, name string) (map[string]string, error) {
	keys := map[string]string{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 4096), 64*1024)
	line := 0
	for sc.Scan() {
		line++
		text := strings.TrimSpace(sc.Text())
		if line == 1 {
			text = strings.TrimSpace(strings.TrimPrefix(text, "\ufeff"))
		}
		if text == "" || text[0] == '#' {
			continue
		}
		switch {
		case strings.HasPrefix(text, "-----BEGIN "):
			return nil, &ConfigError{File: name, Line: line, Msg: "unexpected PEM block in a module config"}
		case text[0] == '[':
			return nil, &ConfigError{File: name, Line: line, Msg: fmt.Sprintf("unexpected section header %q in a module config", text)}
		}
		key, value, ok := strings.Cut(text, ":")
		if !ok {
			return nil, &ConfigError{File: name, Line: line, Msg: fmt.Sprintf("expected \"key: value\", got %q", text)}
		}
		key = strings.TrimSpace(key)
		if key == "" {
			return nil, &ConfigError{File: name, Line: line, Msg: "missing key before \":\""}
		}
		keys[key] = strings.TrimSpace(value)
	}
	if err := sc.Err(); err != nil {
		if errors.Is(err, bufio.ErrTooLong) {
			return nil, &ConfigError{File: name, Line: line + 1, Msg: "line too long"}
		}
		return nil, &ConfigError{File: name, Msg: err.Error()}
	}
	return keys, nil
}

// p11KitEnabled applies enable-in and disable-in for slotwatch, as
// p11-kit's is_module_enabled_unlocked does (enable-in wins when both are
// present).
func p11KitEnabled(keys map[string]string) bool {
	if list, ok := keys["enable-in"]; ok {
		return p11KitListHas(list, p11KitProgramName)
	}
	if list, ok := keys["disable-in"]; ok {
		return !p11KitListHas(list, p11KitProgramName)
	}
	return true
}

// p11KitListHas reports whether a comma and/or white-space separated list
// holds name.
func p11KitListHas(list, name string) bool {
	return slices.Contains(strings.FieldsFunc(list, func(r rune) bool {
		return r == ',' || r == ' ' || r == '\t' || r == '\n' || r == '\r' || r == '\v' || r == '\f'
	}), name)
}

// p11KitBool reads a yes/no key (absent = no). Anything else is no, with a
// warning, as p11-kit's _p11_conf_parse_boolean does.
func p11KitBool(keys map[string]string, key, src string, warnf func(string, ...any)) bool {
	switch v, ok := keys[key]; {
	case !ok || v == "no":
		return false
	case v == "yes":
		return true
	default:
		warnf("%s: bad value %q for %s (want yes or no), using no", src, v, key)
		return false
	}
}

func isASCIIAlnum(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9'
}

// uniqueModuleName returns name, or name-2, name-3, ... whichever is not
// in taken yet, and adds it to taken.
func uniqueModuleName(name string, taken map[string]bool) string {
	n := name
	for i := 2; taken[n]; i++ {
		n = name + "-" + strconv.Itoa(i)
	}
	taken[n] = true
	return n
}

// libraryID identifies a module library by its cleaned path and, when it
// exists, its symlink-free path and inode, so that two spellings of one
// library (Debian's pkcs11/opensc-pkcs11.so is a symlink to
// ../opensc-pkcs11.so) count as the same.
type libraryID struct {
	path     string
	resolved string
	dev, ino uint64
}

func newLibraryID(path string) libraryID {
	id := libraryID{path: filepath.Clean(path)}
	if r, err := filepath.EvalSymlinks(id.path); err == nil {
		id.resolved = r
	}
	if fi, err := os.Stat(id.path); err == nil {
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			id.dev, id.ino = uint64(st.Dev), st.Ino
		}
	}
	return id
}

func (a libraryID) same(b libraryID) bool {
	switch {
	case a.path == b.path:
		return true
	case a.resolved != "" && a.resolved == b.resolved:
		return true
	case a.ino != 0 && a.dev == b.dev && a.ino == b.ino:
		return true
	}
	return false
}

// flagModuleName derives a module name from a --module path the way
// `slotwatch watch` does: the file name up to ".so", without a "lib"
// prefix (".../opensc-pkcs11.so" → "opensc-pkcs11", ".../libsofthsm2.so"
// → "softhsm2"), sanitized to [A-Za-z0-9_-].
func flagModuleName(path string) string {
	base := filepath.Base(path)
	if i := strings.Index(base, ".so"); i > 0 {
		base = base[:i]
	}
	if b := strings.TrimPrefix(base, "lib"); b != "" {
		base = b
	}
	return sanitizeModuleName(base)
}

// ResolveModules applies DESIGN.md's rule for which modules the daemon
// loads, with p11-kit's registry read from DefaultP11KitDirs and relative
// module paths resolved against P11KitModuleDir.
//
// With one or more flagModules (serve --module PATH), exactly those modules
// are loaded (From "flag", names from flagModuleName, made unique), in the
// order given; a path given twice is an error. Neither the config file's
// [module] sections nor p11-kit's registry are used. The config file is
// read only if configPath is given explicitly (for removal-action and the
// other settings; a warning says its [module] sections are ignored): the
// default search path is skipped so that a test's --module run never
// picks up the user's or the system's config.
//
// Without flagModules, the config file (configPath, or LoadConfig's search
// when "") is read; its [module] sections come first, in file order,
// followed by the p11-kit registry's modules except those whose library is
// already configured (same path, or the same file through a symlink) and
// those whose name a [module] section already uses (the config wins). A
// registry that cannot be read at all is a warning, not an error: the
// configured modules still run.
//
// The returned modules have unique names. Warnings are for the log; the
// error is for a config file that is missing (when given) or wrong, and
// for bad flags.
func ResolveModules(flagModules []string, configPath string) (*Config, []ModuleConfig, []string, error) {
	return resolveModules(flagModules, configPath, DefaultP11KitDirs(), P11KitModuleDir)
}

func resolveModules(flagModules []string, configPath string, p11Dirs []string, moduleDir string) (*Config, []ModuleConfig, []string, error) {
	var warnings []string
	if len(flagModules) > 0 {
		cfg := DefaultConfig()
		if configPath != "" {
			var err error
			if cfg, err = LoadConfig(configPath); err != nil {
				return nil, nil, nil, err
			}
			if n := len(cfg.Modules); n > 0 {
				warnings = append(warnings, fmt.Sprintf("%s: its %d [module] section(s) are ignored: --module was given", cfg.Source, n))
			}
		}
		mods, err := flagModuleConfigs(flagModules)
		if err != nil {
			return nil, nil, nil, err
		}
		return cfg, mods, warnings, nil
	}

	cfg, err := LoadConfig(configPath)
	if err != nil {
		return nil, nil, nil, err
	}
	mods := slices.Clone(cfg.Modules)
	names := map[string]bool{}
	var libs []libraryID
	for _, m := range mods {
		names[m.Name] = true
		libs = append(libs, newLibraryID(m.Path))
	}
	p11, w, err := P11KitModules(p11Dirs, moduleDir)
	warnings = append(warnings, w...)
	if err != nil {
		warnings = append(warnings, fmt.Sprintf("%v; only the config file's modules are loaded", err))
	}
	for _, m := range p11 {
		if names[m.Name] {
			continue // the config's [module NAME] replaces it
		}
		if slices.ContainsFunc(libs, newLibraryID(m.Path).same) {
			continue // already configured under the config's name
		}
		names[m.Name] = true
		mods = append(mods, m)
	}
	return cfg, mods, warnings, nil
}

func flagModuleConfigs(paths []string) ([]ModuleConfig, error) {
	var mods []ModuleConfig
	names := map[string]bool{}
	seen := map[string]bool{}
	for _, p := range paths {
		if p == "" {
			return nil, errors.New("--module: empty path")
		}
		if strings.Contains(p, "/") && !filepath.IsAbs(p) {
			abs, err := filepath.Abs(p)
			if err != nil {
				return nil, fmt.Errorf("--module %s: %w", p, err)
			}
			p = abs
		}
		if strings.Contains(p, "/") {
			p = filepath.Clean(p)
		}
		if seen[p] {
			return nil, fmt.Errorf("--module %s given twice", p)
		}
		seen[p] = true
		mods = append(mods, ModuleConfig{
			Name:   uniqueModuleName(flagModuleName(p), names),
			Path:   p,
			From:   ModuleFromFlag,
			Source: "--module",
		})
	}
	return mods, nil
}
