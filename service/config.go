package main

// The config file: DESIGN.md's "key = value" format with [module NAME]
// sections. See packaging/slotwatch.conf for the installed, commented
// default and ParseConfig for the exact grammar.

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/slotwatch/slotwatch/policy"
)

// Values of ModuleConfig.From: where a module came from.
const (
	ModuleFromConfig = "config"  // a [module NAME] section
	ModuleFromP11Kit = "p11-kit" // p11-kit's module registry (*.module files)
	ModuleFromFlag   = "flag"    // slotwatch serve --module PATH
)

// Config is the parsed config file. The zero value is not useful; start
// from DefaultConfig.
type Config struct {
	RemovalAction policy.Action // what happens when a token in RemovalScope is removed
	// RemovalActionSet is true when the file has a removal-action line
	// (also "removal-action = none"): with --gnome-compat and no such
	// line, GNOME's own setting applies.
	RemovalActionSet bool
	RemovalScope     policy.Scope // which tokens' removal triggers RemovalAction
	Notify           bool         // show a desktop notification on insertion and removal
	Modules          []ModuleConfig
	Source           string // the file it came from, "" for the built-in defaults
}

// ModuleConfig is one PKCS#11 module to load.
type ModuleConfig struct {
	// Name is the module's short name in logs and D-Bus object paths;
	// always matches [A-Za-z0-9_-]+ and is unique within one list.
	Name string
	// Path is the library to load. Absolute for config and p11-kit
	// modules; as given for --module (made absolute if it has a "/").
	Path string
	// Isolate: load the module through p11-kit remote in a child process
	// (crash isolation). Only config modules can set it.
	Isolate bool
	// From is one of the ModuleFrom* constants.
	From string
	// Critical is p11-kit's "critical: yes": the module's owner considers
	// it required. Always false for config and flag modules.
	Critical bool
	// Source says where the module was defined, for messages:
	// "FILE:LINE" of its [module] section, the p11-kit .module file(s)
	// it was read from (comma separated), or "--module".
	Source string
}

// DefaultConfig is what slotwatch runs with when there is no config file:
// no removal action, scope login-token, no notifications, no [module]
// sections (so p11-kit's registry supplies the modules).
func DefaultConfig() *Config {
	return &Config{
		RemovalAction: policy.ActionNone,
		RemovalScope:  policy.Scope{Kind: policy.ScopeLoginToken},
	}
}

// ConfigError is a problem in a config or p11-kit .module file. Error()
// reads "FILE:LINE: message" ("FILE: message" when Line is 0).
type ConfigError struct {
	File string
	Line int
	Msg  string
}

func (e *ConfigError) Error() string {
	if e.Line > 0 {
		return fmt.Sprintf("%s:%d: %s", e.File, e.Line, e.Msg)
	}
	return fmt.Sprintf("%s: %s", e.File, e.Msg)
}

// The keys the config file knows, in the order error messages list them.
var (
	configTopKeys    = []string{"removal-action", "removal-scope", "notify"}
	configModuleKeys = []string{"path", "isolate"}
)

// ParseConfig parses a config file read from r; name is the file's name in
// error messages and Config.Source.
//
// Grammar, line by line (leading and trailing white space is ignored):
//
//	# comment             also after a value, when "#" follows white space
//	key = value           top-level keys before the first section
//	[module NAME]         starts a module section; NAME is [A-Za-z0-9_-]+
//	key = value           module keys: path (required, absolute), isolate
//
// Unknown keys and sections, bad values, a key or section given twice, a
// module section without path, two sections with the same path, and any
// other line are errors, reported as *ConfigError with the line number.
// Parsing stops at the first error.
func ParseConfig(r io.Reader, name string) (*Config, error) {
	if name == "" {
		name = "config"
	}
	p := &configParser{
		cfg:      DefaultConfig(),
		file:     name,
		topLines: map[string]int{},
		sections: map[string]int{},
	}
	p.cfg.Source = name
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 4096), 64*1024)
	for sc.Scan() {
		p.line++
		text := sc.Text()
		if p.line == 1 {
			text = strings.TrimPrefix(text, "\ufeff")
		}
		if err := p.parseLine(text); err != nil {
			return nil, err
		}
	}
	if err := sc.Err(); err != nil {
		if errors.Is(err, bufio.ErrTooLong) {
			return nil, p.errorf(p.line+1, "line too long")
		}
		return nil, &ConfigError{File: name, Msg: err.Error()}
	}
	if err := p.endSection(); err != nil {
		return nil, err
	}
	return p.cfg, nil
}

type configParser struct {
	cfg      *Config
	file     string
	line     int
	topLines map[string]int // top-level key → line it was set on
	sections map[string]int // module name → line of its header
	cur      *moduleSection // nil before the first section
}

// moduleSection is the module section being read.
type moduleSection struct {
	mod  ModuleConfig
	line int            // line of the [module NAME] header
	keys map[string]int // key → line it was set on
}

func (p *configParser) errorf(line int, format string, args ...any) error {
	return &ConfigError{File: p.file, Line: line, Msg: fmt.Sprintf(format, args...)}
}

func (p *configParser) parseLine(text string) error {
	text = strings.TrimSpace(stripConfigComment(text))
	if text == "" {
		return nil
	}
	if text[0] == '[' {
		return p.parseSection(text)
	}
	key, value, ok := strings.Cut(text, "=")
	if !ok {
		return p.errorf(p.line, "expected \"key = value\", \"[module NAME]\" or a comment, got %q", text)
	}
	key, value = strings.TrimSpace(key), strings.TrimSpace(value)
	if key == "" {
		return p.errorf(p.line, "missing key before \"=\"")
	}
	if p.cur == nil {
		return p.setTopKey(key, value)
	}
	return p.setModuleKey(key, value)
}

// stripConfigComment cuts a "#" comment off a line: one at the start, or
// one preceded by white space. A "#" inside a word (a path such as
// /opt/a#b.so) is part of the value.
func stripConfigComment(s string) string {
	for i := 0; i < len(s); i++ {
		if s[i] == '#' && (i == 0 || s[i-1] == ' ' || s[i-1] == '\t') {
			return s[:i]
		}
	}
	return s
}

func (p *configParser) parseSection(text string) error {
	if !strings.HasSuffix(text, "]") {
		return p.errorf(p.line, "malformed section header %q (want \"[module NAME]\")", text)
	}
	fields := strings.Fields(text[1 : len(text)-1])
	switch {
	case len(fields) == 0:
		return p.errorf(p.line, "empty section header (want \"[module NAME]\")")
	case fields[0] != "module":
		return p.errorf(p.line, "unknown section [%s] (known: [module NAME])", strings.Join(fields, " "))
	case len(fields) == 1:
		return p.errorf(p.line, "section [module] needs a name: [module NAME]")
	case len(fields) > 2:
		return p.errorf(p.line, "section [%s] has more than one name (want \"[module NAME]\")", strings.Join(fields, " "))
	}
	name := fields[1]
	if !validModuleName(name) {
		return p.errorf(p.line, "invalid module name %q: use only letters, digits, \"-\" and \"_\" (it appears in logs and D-Bus object paths)", name)
	}
	if first, dup := p.sections[name]; dup {
		return p.errorf(p.line, "duplicate section [module %s] (first on line %d)", name, first)
	}
	if err := p.endSection(); err != nil {
		return err
	}
	p.sections[name] = p.line
	p.cur = &moduleSection{
		mod:  ModuleConfig{Name: name, From: ModuleFromConfig, Source: fmt.Sprintf("%s:%d", p.file, p.line)},
		line: p.line,
		keys: map[string]int{},
	}
	return nil
}

// endSection checks the section being read and appends its module.
func (p *configParser) endSection() error {
	s := p.cur
	if s == nil {
		return nil
	}
	p.cur = nil
	if _, ok := s.keys["path"]; !ok {
		return p.errorf(s.line, "section [module %s] has no \"path\" (the module library's absolute path)", s.mod.Name)
	}
	p.cfg.Modules = append(p.cfg.Modules, s.mod)
	return nil
}

func (p *configParser) setTopKey(key, value string) error {
	if !slices.Contains(configTopKeys, key) {
		return p.errorf(p.line, "unknown key %q (known: %s)", key, strings.Join(configTopKeys, ", "))
	}
	if first, dup := p.topLines[key]; dup {
		return p.errorf(p.line, "duplicate key %q (first set on line %d)", key, first)
	}
	p.topLines[key] = p.line
	switch key {
	case "removal-action":
		switch a := policy.Action(value); a {
		case policy.ActionNone, policy.ActionLockScreen, policy.ActionForceLogout:
			p.cfg.RemovalAction = a
			p.cfg.RemovalActionSet = true
		default:
			return p.errorf(p.line, "bad value %q for removal-action (want none, lock-screen or force-logout)", value)
		}
	case "removal-scope":
		scope, err := parseRemovalScope(value)
		if err != nil {
			return p.errorf(p.line, "%v", err)
		}
		p.cfg.RemovalScope = scope
	case "notify":
		b, err := parseConfigBool(key, value)
		if err != nil {
			return p.errorf(p.line, "%v", err)
		}
		p.cfg.Notify = b
	}
	return nil
}

func (p *configParser) setModuleKey(key, value string) error {
	s := p.cur
	if !slices.Contains(configModuleKeys, key) {
		if slices.Contains(configTopKeys, key) {
			return p.errorf(p.line, "key %q is not a module key; top-level keys go before the first [module] section", key)
		}
		return p.errorf(p.line, "unknown key %q in [module %s] (known: %s)", key, s.mod.Name, strings.Join(configModuleKeys, ", "))
	}
	if first, dup := s.keys[key]; dup {
		return p.errorf(p.line, "duplicate key %q in [module %s] (first set on line %d)", key, s.mod.Name, first)
	}
	s.keys[key] = p.line
	switch key {
	case "path":
		if value == "" {
			return p.errorf(p.line, "empty path in [module %s]", s.mod.Name)
		}
		if !filepath.IsAbs(value) {
			return p.errorf(p.line, "path %q in [module %s] is not absolute", value, s.mod.Name)
		}
		path := filepath.Clean(value)
		for _, m := range p.cfg.Modules {
			if m.Path == path {
				return p.errorf(p.line, "[module %s] loads the same library as [module %s] (%s): a library is loaded once", s.mod.Name, m.Name, m.Source)
			}
		}
		s.mod.Path = path
	case "isolate":
		b, err := parseConfigBool(key, value)
		if err != nil {
			return p.errorf(p.line, "%v", err)
		}
		s.mod.Isolate = b
	}
	return nil
}

func parseConfigBool(key, value string) (bool, error) {
	switch value {
	case "true":
		return true, nil
	case "false":
		return false, nil
	}
	return false, fmt.Errorf("bad value %q for %s (want true or false)", value, key)
}

func parseRemovalScope(value string) (policy.Scope, error) {
	switch value {
	case policy.ScopeLoginToken, policy.ScopeAny:
		return policy.Scope{Kind: value}, nil
	}
	list, ok := strings.CutPrefix(value, policy.ScopeSerial+":")
	if !ok {
		return policy.Scope{}, fmt.Errorf("bad value %q for removal-scope (want login-token, any or serial:SERIAL[,SERIAL...])", value)
	}
	var serials []string
	for s := range strings.SplitSeq(list, ",") {
		s = strings.TrimSpace(s)
		if s == "" {
			return policy.Scope{}, fmt.Errorf("empty serial in removal-scope %q (want serial:SERIAL[,SERIAL...])", value)
		}
		if !slices.Contains(serials, s) {
			serials = append(serials, s)
		}
	}
	return policy.Scope{Kind: policy.ScopeSerial, Serials: serials}, nil
}

// validModuleName reports whether name matches [A-Za-z0-9_-]+.
func validModuleName(name string) bool {
	if name == "" {
		return false
	}
	for i := 0; i < len(name); i++ {
		if !isModuleNameByte(name[i]) {
			return false
		}
	}
	return true
}

func isModuleNameByte(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-'
}

// sanitizeModuleName maps every byte outside [A-Za-z0-9_-] to "_"
// ("module" for an empty name).
func sanitizeModuleName(name string) string {
	if name == "" {
		return "module"
	}
	b := []byte(name)
	for i, c := range b {
		if !isModuleNameByte(c) {
			b[i] = '_'
		}
	}
	return string(b)
}

// systemConfigFile is the system-wide config, read when the user has none.
// A variable so that tests need not depend on the machine's /etc.
var systemConfigFile = "/etc/slotwatch/slotwatch.conf"

// userConfigHome is $XDG_CONFIG_HOME, or ~/.config when that is unset or
// not absolute (the XDG base directory rules); "" without a home directory.
func userConfigHome() string {
	if d := os.Getenv("XDG_CONFIG_HOME"); filepath.IsAbs(d) {
		return d
	}
	home, err := os.UserHomeDir()
	if err != nil || home == "" {
		return ""
	}
	return filepath.Join(home, ".config")
}

// ConfigSearchPath lists the files LoadConfig("") tries, in order.
func ConfigSearchPath() []string {
	var paths []string
	if d := userConfigHome(); d != "" {
		paths = append(paths, filepath.Join(d, "slotwatch", "slotwatch.conf"))
	}
	return append(paths, systemConfigFile)
}

// LoadConfig reads the config file at path. With path "", it reads the
// first file of ConfigSearchPath that exists ($XDG_CONFIG_HOME/slotwatch/
// slotwatch.conf, then /etc/slotwatch/slotwatch.conf) — the first one found
// is the whole config, files are not merged — and returns DefaultConfig if
// neither exists. A file that exists but cannot be read is an error either
// way, and so is an explicitly given path that does not exist.
func LoadConfig(path string) (*Config, error) {
	if path != "" {
		return loadConfigFile(path)
	}
	for _, p := range ConfigSearchPath() {
		cfg, err := loadConfigFile(p)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		return cfg, err
	}
	return DefaultConfig(), nil
}

func loadConfigFile(path string) (*Config, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	defer f.Close()
	if st, err := f.Stat(); err == nil && st.IsDir() {
		return nil, &ConfigError{File: path, Msg: "is a directory, not a config file"}
	}
	return ParseConfig(f, path)
}
