package config

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/slotwatch/slotwatch/policy"
)

// The keys the config file knows, in the order error messages list them.
var (
	topKeys = []string{
		"removal-action", "removal-scope", "removal-grace", "notify",
		"max-sessions-per-token", "max-concurrent-calls", "max-find-results", "token-wait",
		"idle-release", "idle-release-grace", "resume-login",
	}
	moduleKeys = []string{"path", "isolate", "idle-release", "idle-release-grace"}
)

// The ranges of the limit keys (inclusive; token-wait must also be more
// than 0).
const (
	maxSessionsPerToken = 1024
	maxConcurrentCalls  = 256
	maxFindResults      = 100000
	maxTokenWait        = 60 * time.Second
	maxRemovalGrace     = 60 * time.Second
	maxIdleReleaseGrace = time.Hour
)

// Parse parses a config file read from r; name is the file's name in
// error messages and Config.Source.
//
// Grammar, line by line (leading and trailing white space is ignored):
//
//	# comment             also after a value, when "#" follows white space
//	key = value           top-level keys before the first section
//	[module NAME]         starts a module section; NAME is [A-Za-z0-9_-]+
//	key = value           module keys: path (required, absolute), isolate
//
// Top-level keys and their values:
//
//	removal-action          none | lock-screen | force-logout
//	removal-scope           login-token | any | serial:SERIAL[,SERIAL...]
//	removal-grace           seconds, digits with an optional decimal
//	                        fraction (3, 0.5), from 0 (act at once) to 60
//	                        (Config.RemovalGrace)
//	notify                  true | false
//	max-sessions-per-token  a whole number, 1 to 1024       (Limits.SessionsPerToken)
//	max-concurrent-calls    a whole number, 1 to 256        (Limits.ConcurrentCalls)
//	max-find-results        a whole number, 1 to 100000     (Limits.FindResults)
//	token-wait              seconds, digits with an optional decimal
//	                        fraction (5, 0.5), more than 0 and at most 60
//	                        (Limits.TokenWait)
//	idle-release            true | false (IdleRelease.Enabled)
//	idle-release-grace      seconds, 0 to 3600 (IdleRelease.Grace)
//	resume-login            true | false (ResumeLogin)
//
// Keys not given keep their Default values.
//
// Unknown keys and sections, bad values, a key or section given twice, a
// module section without path, two sections with the same path, and any
// other line are errors, reported as *Error with the line number.
// Parsing stops at the first error.
func Parse(r io.Reader, name string) (*Config, error) {
	if name == "" {
		name = "config"
	}
	p := &parser{
		cfg:      Default(),
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
		return nil, &Error{File: name, Msg: err.Error()}
	}
	if err := p.endSection(); err != nil {
		return nil, err
	}
	return p.cfg, nil
}

type parser struct {
	cfg      *Config
	file     string
	line     int
	topLines map[string]int // top-level key → line it was set on
	sections map[string]int // module name → line of its header
	cur      *moduleSection // nil before the first section
}

// moduleSection is the module section being read.
type moduleSection struct {
	mod  Module
	line int            // line of the [module NAME] header
	keys map[string]int // key → line it was set on
}

func (p *parser) errorf(line int, format string, args ...any) error {
	return &Error{File: p.file, Line: line, Msg: fmt.Sprintf(format, args...)}
}

func (p *parser) parseLine(text string) error {
	text = strings.TrimSpace(stripComment(text))
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

// stripComment cuts a "#" comment off a line: one at the start, or
// one preceded by white space. A "#" inside a word (a path such as
// /opt/a#b.so) is part of the value.
func stripComment(s string) string {
	for i := 0; i < len(s); i++ {
		if s[i] == '#' && (i == 0 || s[i-1] == ' ' || s[i-1] == '\t') {
			return s[:i]
		}
	}
	return s
}

func (p *parser) parseSection(text string) error {
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
		// Top-level keys come before the first section: the default
		// policy is final here.
		mod:  Module{Name: name, From: FromFile, Source: fmt.Sprintf("%s:%d", p.file, p.line), IdleRelease: p.cfg.IdleRelease},
		line: p.line,
		keys: map[string]int{},
	}
	return nil
}

// endSection checks the section being read and appends its module.
func (p *parser) endSection() error {
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

func (p *parser) setTopKey(key, value string) error {
	if !slices.Contains(topKeys, key) {
		return p.errorf(p.line, "unknown key %q (known: %s)", key, strings.Join(topKeys, ", "))
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
	case "removal-grace":
		d, err := parseSeconds(key, value, 0, maxRemovalGrace)
		if err != nil {
			return p.errorf(p.line, "%v", err)
		}
		p.cfg.RemovalGrace = d
	case "notify":
		b, err := parseBool(key, value)
		if err != nil {
			return p.errorf(p.line, "%v", err)
		}
		p.cfg.Notify = b
	case "max-sessions-per-token":
		return p.setInt(&p.cfg.Limits.SessionsPerToken, key, value, maxSessionsPerToken)
	case "max-concurrent-calls":
		return p.setInt(&p.cfg.Limits.ConcurrentCalls, key, value, maxConcurrentCalls)
	case "max-find-results":
		return p.setInt(&p.cfg.Limits.FindResults, key, value, maxFindResults)
	case "token-wait":
		d, err := parseSeconds(key, value, time.Nanosecond, maxTokenWait)
		if err != nil {
			return p.errorf(p.line, "%v", err)
		}
		p.cfg.Limits.TokenWait = d
	case "idle-release", "idle-release-grace":
		return p.setIdleRelease(&p.cfg.IdleRelease, key, value)
	case "resume-login":
		b, err := parseBool(key, value)
		if err != nil {
			return p.errorf(p.line, "%v", err)
		}
		p.cfg.ResumeLogin = b
	}
	return nil
}

// setIdleRelease reads idle-release (true or false) or idle-release-grace
// (seconds, 0 to an hour) into r.
func (p *parser) setIdleRelease(r *IdleRelease, key, value string) error {
	if key == "idle-release" {
		b, err := parseBool(key, value)
		if err != nil {
			return p.errorf(p.line, "%v", err)
		}
		r.Enabled = b
		return nil
	}
	d, err := parseSeconds(key, value, 0, maxIdleReleaseGrace)
	if err != nil {
		return p.errorf(p.line, "%v", err)
	}
	r.Grace = d
	return nil
}

// setInt sets *dst to value, a whole number from 1 to hi written in
// decimal digits (no sign, no blanks inside).
func (p *parser) setInt(dst *int, key, value string, hi int) error {
	if value == "" || strings.Trim(value, "0123456789") != "" {
		return p.errorf(p.line, "bad value %q for %s (want a whole number from 1 to %d)", value, key, hi)
	}
	n, err := strconv.ParseUint(value, 10, 64)
	if err != nil || n < 1 || n > uint64(hi) {
		return p.errorf(p.line, "%s = %s is out of range (want a whole number from 1 to %d)", key, value, hi)
	}
	*dst = int(n)
	return nil
}

// parseSeconds reads a number of seconds written as decimal digits with
// an optional fraction ("5", "0.5", "2.25"; no sign, exponent or unit),
// from lo to hi. Digits beyond nanoseconds are dropped. key names the
// setting in the messages.
func parseSeconds(key, value string, lo, hi time.Duration) (time.Duration, error) {
	want := fmt.Sprintf("more than 0 and at most %v", hi.Seconds())
	if lo <= 0 {
		want = fmt.Sprintf("from 0 to %v", hi.Seconds())
	}
	whole, frac, hasDot := strings.Cut(value, ".")
	if whole == "" || strings.Trim(whole, "0123456789") != "" ||
		hasDot && (frac == "" || strings.Trim(frac, "0123456789") != "") {
		return 0, fmt.Errorf("bad value %q for %s (want seconds such as 5 or 0.5, %s)", value, key, want)
	}
	d, err := time.ParseDuration(value + "s")
	if err != nil || d < lo || d > hi {
		return 0, fmt.Errorf("%s = %s is out of range (want seconds, %s)", key, value, want)
	}
	return d, nil
}

func (p *parser) setModuleKey(key, value string) error {
	s := p.cur
	if !slices.Contains(moduleKeys, key) {
		if slices.Contains(topKeys, key) {
			return p.errorf(p.line, "key %q is not a module key; top-level keys go before the first [module] section", key)
		}
		return p.errorf(p.line, "unknown key %q in [module %s] (known: %s)", key, s.mod.Name, strings.Join(moduleKeys, ", "))
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
		b, err := parseBool(key, value)
		if err != nil {
			return p.errorf(p.line, "%v", err)
		}
		s.mod.Isolate = b
	case "idle-release", "idle-release-grace":
		return p.setIdleRelease(&s.mod.IdleRelease, key, value)
	}
	return nil
}

func parseBool(key, value string) (bool, error) {
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
