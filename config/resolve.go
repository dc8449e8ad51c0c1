package config

import (
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"

	"github.com/slotwatch/slotwatch/internal/p11kitpath"
)

// FlagModuleName derives a module name from a --module path (serve's and
// watch's): the file name up to ".so", without a "lib"
// prefix (".../opensc-pkcs11.so" → "opensc-pkcs11", ".../libsofthsm2.so"
// → "softhsm2"), sanitized to [A-Za-z0-9_-].
func FlagModuleName(path string) string {
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
// loads, with p11-kit's registry read from P11KitDirs and relative
// module paths resolved against p11-kit's module directory for this
// machine's architecture (p11kitpath.ModuleDir).
//
// With one or more flagModules (serve --module PATH), exactly those modules
// are loaded (From "flag", names from FlagModuleName, made unique), in the
// order given; a path given twice is an error. Neither the config file's
// [module] sections nor p11-kit's registry are used. The config file is
// read only if configPath is given explicitly (for removal-action and the
// other settings; a warning says its [module] sections are ignored): the
// default search path is skipped so that a test's --module run never
// picks up the user's or the system's config.
//
// Without flagModules, the config file (configPath, or Load's search
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
func ResolveModules(flagModules []string, configPath string) (*Config, []Module, []string, error) {
	return resolveModules(flagModules, configPath, P11KitDirs(), p11kitpath.ModuleDir())
}

func resolveModules(flagModules []string, configPath string, p11Dirs []string, moduleDir string) (*Config, []Module, []string, error) {
	var warnings []string
	if len(flagModules) > 0 {
		cfg := Default()
		if configPath != "" {
			var err error
			if cfg, err = Load(configPath); err != nil {
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
		for i := range mods {
			mods[i].IdleRelease = cfg.IdleRelease
		}
		return cfg, mods, warnings, nil
	}

	cfg, err := Load(configPath)
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
		m.IdleRelease = cfg.IdleRelease
		mods = append(mods, m)
	}
	return cfg, mods, warnings, nil
}

func flagModuleConfigs(paths []string) ([]Module, error) {
	var mods []Module
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
		mods = append(mods, Module{
			Name:   uniqueModuleName(FlagModuleName(p), names),
			Path:   p,
			From:   FromFlag,
			Source: "--module",
		})
	}
	return mods, nil
}
