package config

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

// p11KitProgramName is the program name enable-in and disable-in are
// matched against: p11-kit uses the base name of the executable.
const p11KitProgramName = "slotwatch"

// P11KitDirs returns the directories p11-kit reads module configs
// from, lowest precedence first: the packages' (/usr/share/p11-kit/modules),
// the administrator's (/etc/pkcs11/modules), the user's
// ($XDG_CONFIG_HOME/pkcs11/modules, ~/.config/pkcs11/modules by default).
//
// p11-kit's user-config setting in pkcs11.conf (none / only / override) is
// not consulted: the user directory is always merged, p11-kit's default.
func P11KitDirs() []string {
	dirs := []string{"/usr/share/p11-kit/modules", "/etc/pkcs11/modules"}
	if d := userConfigHome(); d != "" {
		dirs = append(dirs, filepath.Join(d, "pkcs11", "modules"))
	}
	return dirs
}

// P11KitModules reads the *.module files in dirs (lowest precedence first,
// as P11KitDirs returns them) and returns the modules slotwatch
// should load, highest priority first, then by name. Relative "module:"
// values are resolved against moduleDir: p11-kit's module directory,
// p11kitpath.ModuleDir() on this machine (ResolveModules passes it).
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
//   - "#" starts a comment only at the start of a line; after a value it
//     is part of the value. "priority" (default 0) is read as p11-kit
//     reads it, as C's atoi does: the whole number at the start of the
//     value, so "priority: 10 # note" is 10. A value that does not start
//     with a number is 0 and one with something other than a "#" comment
//     after its number ("7 high") is that number, each with a warning
//     naming the file and line. The highest priority comes first.
//   - "critical" (yes/no) sets Module.Critical; "x-init-reserved" sets
//     Module.InitReserved (see there: slotwatch carries it but does not
//     pass it to the module yet). Every other key (managed, log-calls,
//     other x-* keys, ...) is ignored.
//   - The library must not be p11-kit itself: a module whose library is
//     p11-kit-proxy.so, p11-kit-client.so or libp11-kit.so* (by base
//     name, also after resolving symlinks) is refused, as p11-kit refuses
//     to load its proxy as a registered module. The proxy would load the
//     registry's modules a second time, inside slotwatch, and the client
//     talks to whatever P11_KIT_SERVER_ADDRESS names; slotwatch loads
//     each registered module itself.
//
// Where p11-kit would fail or only print a message, P11KitModules leaves
// the module out and says why in warnings (the daemon logs them and goes
// on with the others): a file that cannot be read or parsed (the module of
// that name is left out entirely, since its overrides are unknown), a
// module whose library does not exist (the warning says so when the module
// is marked critical), a "remote:" module (slotwatch loads libraries
// itself), p11-kit's own proxy or client module, a library already listed
// under another name. Bad priority, critical or trust-policy values are
// warnings naming the file and line; the module stays, with the value
// p11-kit would use.
//
// Missing directories are fine, and so are unreadable ones (a warning).
// The error is for any other failure to list a directory.
//
// Names are sanitized to [A-Za-z0-9_-] (every other byte becomes "_") and
// made unique with a "-2", "-3", ... suffix. From is FromP11Kit and
// Source lists the files the module was read from.
func P11KitModules(dirs []string, moduleDir string) (mods []Module, warnings []string, err error) {
	type entry struct {
		name   string            // p11-kit's name: the file name without .module
		keys   map[string]string // merged over all files, later wins
		where  map[string]string // key → "FILE:LINE" of the value in keys
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
				e = &entry{name: name, keys: map[string]string{}, where: map[string]string{}}
				entries[name] = e
			}
			e.files = append(e.files, path)
			if e.broken {
				continue
			}
			mf, err := readP11KitModuleFile(path)
			if errors.Is(err, errIsDir) {
				e.files = e.files[:len(e.files)-1]
				continue
			}
			if err != nil {
				warnf("module %q left out: %v", name, err)
				e.broken = true
				continue
			}
			for k, v := range mf.values {
				e.keys[k] = v
				e.where[k] = fmt.Sprintf("%s:%d", path, mf.lines[k])
			}
		}
	}

	type candidate struct {
		mod      Module
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
		if p11KitBool(e.name, e.keys, e.where, "trust-policy", warnf) {
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
		if self := p11KitSelf(lib); self != "" {
			warnf("module %q (%s) left out: %s is %s; slotwatch loads the registered modules itself and never p11-kit's own modules", e.name, e.where["module"], lib, self)
			continue
		}
		critical := p11KitBool(e.name, e.keys, e.where, "critical", warnf)
		if _, err := os.Stat(lib); errors.Is(err, fs.ErrNotExist) {
			if critical {
				warnf("module %q (%s) left out: library %s does not exist, although the module is marked critical", e.name, src, lib)
			} else {
				warnf("module %q (%s) left out: library %s does not exist", e.name, src, lib)
			}
			continue
		}
		prio := 0
		if v, ok := e.keys["priority"]; ok {
			n, clean, number := parseP11KitPriority(v)
			switch {
			case !number:
				warnf("module %q: %s: bad priority %q (want a whole number), using 0 as p11-kit does", e.name, e.where["priority"], v)
			case !clean:
				warnf("module %q: %s: priority %q is not just a number (and perhaps a \"#\" comment), using %d as p11-kit does", e.name, e.where["priority"], v, n)
			}
			prio = n
		}
		cands = append(cands, candidate{
			mod: Module{
				Path:         lib,
				From:         FromP11Kit,
				Critical:     critical,
				InitReserved: e.keys["x-init-reserved"],
				Source:       src,
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

// p11KitModuleFile is one parsed .module file.
type p11KitModuleFile struct {
	values map[string]string // key → value
	lines  map[string]int    // key → the line its value is on
}

func readP11KitModuleFile(path string) (*p11KitModuleFile, error) {
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
// "#" inside or after a value is part of it: p11-kit has no trailing
// comments); a key given twice keeps the last value. A line without a
// colon (such as "priority = 10"), a [section] header or a PEM block is
// an error naming the line.
func parseP11KitModuleFile(r io.Reader, name string) (*p11KitModuleFile, error) {
	mf := &p11KitModuleFile{values: map[string]string{}, lines: map[string]int{}}
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
			return nil, &Error{File: name, Line: line, Msg: "unexpected PEM block in a module config"}
		case text[0] == '[':
			return nil, &Error{File: name, Line: line, Msg: fmt.Sprintf("unexpected section header %q in a module config", text)}
		}
		key, value, ok := strings.Cut(text, ":")
		if !ok {
			return nil, &Error{File: name, Line: line, Msg: fmt.Sprintf("expected \"key: value\", got %q", text)}
		}
		key = strings.TrimSpace(key)
		if key == "" {
			return nil, &Error{File: name, Line: line, Msg: "missing key before \":\""}
		}
		mf.values[key] = strings.TrimSpace(value)
		mf.lines[key] = line
	}
	if err := sc.Err(); err != nil {
		if errors.Is(err, bufio.ErrTooLong) {
			return nil, &Error{File: name, Line: line + 1, Msg: "line too long"}
		}
		return nil, &Error{File: name, Msg: err.Error()}
	}
	return mf, nil
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

// p11KitBool reads a yes/no key (absent = no). Anything else, also "yes"
// followed by a "#" comment, is no, with a warning naming the file and
// line, as p11-kit reads its booleans.
func p11KitBool(name string, keys, where map[string]string, key string, warnf func(string, ...any)) bool {
	switch v, ok := keys[key]; {
	case !ok || v == "no":
		return false
	case v == "yes":
		return true
	default:
		warnf("module %q: %s: bad value %q for %s (want yes or no), using no as p11-kit does", name, where[key], v, key)
		return false
	}
}

// parseP11KitPriority reads a priority value as p11-kit does, which is
// C's atoi: an optional sign and the decimal digits at the start of the
// value; whatever follows is ignored, and a value without them is 0.
// number reports whether the value starts with a number (that fits a C
// int); clean, whether nothing but white space and a "#" comment follows
// it, as in "10 # note". Anything else deserves a warning.
func parseP11KitPriority(v string) (n int, clean, number bool) {
	end := 0
	if end < len(v) && (v[end] == '+' || v[end] == '-') {
		end++
	}
	digits := end
	for end < len(v) && v[end] >= '0' && v[end] <= '9' {
		end++
	}
	if end == digits {
		return 0, false, false
	}
	i, err := strconv.ParseInt(v[:end], 10, 32)
	if err != nil {
		return 0, false, false
	}
	rest := strings.TrimLeft(v[end:], " \t")
	return int(i), rest == "" || rest[0] == '#', true
}

// p11KitSelf says which of p11-kit's own modules the library at path is,
// by its base name or the base name of the file it links to: "p11-kit's
// proxy module" (p11-kit-proxy.so, libp11-kit.so*), "p11-kit's client
// module" (p11-kit-client.so), or "" for any other library.
func p11KitSelf(path string) string {
	names := []string{filepath.Base(path)}
	if r, err := filepath.EvalSymlinks(path); err == nil {
		names = append(names, filepath.Base(r))
	}
	for _, n := range names {
		switch {
		case n == "p11-kit-proxy.so", n == "libp11-kit.so", strings.HasPrefix(n, "libp11-kit.so."):
			return "p11-kit's proxy module"
		case n == "p11-kit-client.so":
			return "p11-kit's client module"
		}
	}
	return ""
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
