// Package config owns what slotwatch reads to know what to do: the
// slotwatch.conf file (its grammar, its settings and their defaults, where
// it is looked for), p11-kit's module registry (the *.module files of
// pkcs11.conf(5) and the machine's p11-kit module directory), and the rule
// that turns --module flags, the config file and the registry into the
// list of PKCS#11 modules the daemon watches (ResolveModules).
//
// It only reads and validates; loading modules, applying the removal
// policy and enforcing limits belong to the packages that do those things.
//
// The files: config.go (the settings, where the file is looked for),
// parse.go (its grammar), p11kit.go (the registry), resolve.go (the
// list of modules).
package config

// The config file: DESIGN.md's "key = value" format with [module NAME]
// sections. See packaging/slotwatch.conf for the installed, commented
// default and Parse for the exact grammar.

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/slotwatch/slotwatch/broker"
	"github.com/slotwatch/slotwatch/monitor"
	"github.com/slotwatch/slotwatch/policy"
)

// Values of Module.From: where a module came from.
const (
	FromFile   = "config"  // a [module NAME] section of the config file
	FromP11Kit = "p11-kit" // p11-kit's module registry (*.module files)
	FromFlag   = "flag"    // slotwatch serve --module PATH
)

// Config is the parsed config file. The zero value is not useful; start
// from Default.
type Config struct {
	RemovalAction policy.Action // what happens when a token in RemovalScope is removed
	// RemovalActionSet is true when the file has a removal-action line
	// (also "removal-action = none"): with --gnome-compat and no such
	// line, GNOME's own setting applies.
	RemovalActionSet bool
	RemovalScope     policy.Scope // which tokens' removal triggers RemovalAction
	// RemovalGrace is how long RemovalAction waits for the removed token
	// (the same serial and label) to come back, as after a USB reset or a
	// resume from suspend; 0 acts at once. See policy.Config.RemovalGrace.
	RemovalGrace time.Duration
	Notify       bool   // show a desktop notification on insertion and removal
	Limits       Limits // per-caller limits; DefaultLimits unless the file sets them
	// IdleRelease is the top-level idle-release and idle-release-grace:
	// the policy of every module whose [module] section does not set its
	// own (monitor.IdleRelease says what it does).
	IdleRelease IdleRelease
	// ResumeLogin (resume-login, default true) keeps a login's PIN in
	// locked memory so that the login is made again when its sessions
	// resume after an outage (broker.Options.ResumeLogin).
	ResumeLogin bool
	Modules     []Module
	Source      string // the file it came from, "" for the built-in defaults
}

// Limits are the broker's per-caller limits (broker.Limits documents
// each); this package reads them from the file, within the ranges Parse
// checks (see the keys below).
type Limits = broker.Limits

// IdleRelease is a module's idle release policy (monitor.IdleRelease): on
// by default, with a grace of one second (monitor.DefaultIdleRelease).
type IdleRelease = monitor.IdleRelease

// DefaultLimits are the limits without a config file or without the keys
// (broker.DefaultLimits).
func DefaultLimits() Limits { return broker.DefaultLimits() }

// Module is one PKCS#11 module to load.
type Module struct {
	// Name is the module's short name in logs and D-Bus object paths;
	// always matches [A-Za-z0-9_-]+ and is unique within one list.
	Name string
	// Path is the library to load. Absolute for config and p11-kit
	// modules; as given for --module (made absolute if it has a "/").
	Path string
	// Isolate: load the module through p11-kit remote in a child process
	// (crash isolation). Only config modules can set it.
	Isolate bool
	// From is one of the From* constants.
	From string
	// IdleRelease is the module's idle release policy: its [module]
	// section's idle-release and idle-release-grace where set, the
	// top-level ones otherwise (ResolveModules fills it for every module).
	IdleRelease IdleRelease
	// Critical is p11-kit's "critical: yes": the registry says the module
	// is required, and p11-kit itself gives up when such a module fails.
	// slotwatch logs its failure to load or initialize as an error
	// rather than a warning, and goes on with the other modules. Always
	// false for config and flag modules.
	Critical bool
	// InitReserved is p11-kit's "x-init-reserved" value, which p11-kit
	// passes to the module's C_Initialize as CK_C_INITIALIZE_ARGS
	// pReserved (a non-standard use some modules read options from).
	// It is carried for the module loader and for messages only:
	// slotwatch does not pass it to C_Initialize today, so a module that
	// needs it behaves as if it were not set. "" when unset and when set
	// to an empty value (p11-kit passes an empty string for the latter).
	// Always "" for config and flag modules.
	InitReserved string
	// Source says where the module was defined, for messages:
	// "FILE:LINE" of its [module] section, the p11-kit .module file(s)
	// it was read from (comma separated), or "--module".
	Source string
}

// DefaultRemovalGrace is removal-grace without the key: long enough for a
// USB token to re-enumerate after a bus reset or a resume (typically 1 to
// 2 s), short enough that an unattended session is locked soon after its
// token was pulled.
const DefaultRemovalGrace = 3 * time.Second

// Default is what slotwatch runs with when there is no config file:
// no removal action, scope login-token, DefaultRemovalGrace, no
// notifications, DefaultLimits, no [module] sections (so p11-kit's
// registry supplies the modules).
func Default() *Config {
	return &Config{
		RemovalAction: policy.ActionNone,
		RemovalScope:  policy.Scope{Kind: policy.ScopeLoginToken},
		RemovalGrace:  DefaultRemovalGrace,
		Limits:        DefaultLimits(),
		IdleRelease:   monitor.DefaultIdleRelease,
		ResumeLogin:   true,
	}
}

// Error is a problem in a config or p11-kit .module file. Error()
// reads "FILE:LINE: message" ("FILE: message" when Line is 0).
type Error struct {
	File string
	Line int
	Msg  string
}

func (e *Error) Error() string {
	if e.Line > 0 {
		return fmt.Sprintf("%s:%d: %s", e.File, e.Line, e.Msg)
	}
	return fmt.Sprintf("%s: %s", e.File, e.Msg)
}

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

// SearchPath lists the files Load("") tries, in order.
func SearchPath() []string {
	var paths []string
	if d := userConfigHome(); d != "" {
		paths = append(paths, filepath.Join(d, "slotwatch", "slotwatch.conf"))
	}
	return append(paths, systemConfigFile)
}

// Load reads the config file at path. With path "", it reads the
// first file of SearchPath that exists ($XDG_CONFIG_HOME/slotwatch/
// slotwatch.conf, then /etc/slotwatch/slotwatch.conf) — the first one found
// is the whole config, files are not merged — and returns Default if
// neither exists. A file that exists but cannot be read is an error either
// way, and so is an explicitly given path that does not exist.
func Load(path string) (*Config, error) {
	if path != "" {
		return loadFile(path)
	}
	for _, p := range SearchPath() {
		cfg, err := loadFile(p)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		return cfg, err
	}
	return Default(), nil
}

func loadFile(path string) (*Config, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	defer f.Close()
	if st, err := f.Stat(); err == nil && st.IsDir() {
		return nil, &Error{File: path, Msg: "is a directory, not a config file"}
	}
	return Parse(f, path)
}
