package faultmod

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
)

// Library is the built module's path relative to this package's directory.
const Library = "build/libfaultmod.so"

// Path returns the absolute path of the built module. FAULTMOD_LIB, if set,
// overrides where it is looked for. It is an error, telling to run
// `make faultmod`, if the library is missing or older than its sources.
func Path() (string, error) {
	if p := os.Getenv("FAULTMOD_LIB"); p != "" {
		if _, err := os.Stat(p); err != nil {
			return "", fmt.Errorf("faultmod: FAULTMOD_LIB: %w", err)
		}
		return filepath.Abs(p)
	}
	dir, err := packageDir()
	if err != nil {
		return "", err
	}
	lib := filepath.Join(dir, Library)
	st, err := os.Stat(lib)
	if errors.Is(err, fs.ErrNotExist) {
		return "", fmt.Errorf("faultmod: %s is not built: run `make faultmod` in the repository root", lib)
	}
	if err != nil {
		return "", fmt.Errorf("faultmod: %w", err)
	}
	srcs, _ := filepath.Glob(filepath.Join(dir, "csrc", "*"))
	hdrs, _ := filepath.Glob(filepath.Join(dir, "include", "*.h"))
	for _, src := range append(srcs, hdrs...) {
		if s, err := os.Stat(src); err == nil && s.ModTime().After(st.ModTime()) {
			return "", fmt.Errorf("faultmod: %s is older than %s: run `make faultmod` in the repository root",
				lib, filepath.Base(src))
		}
	}
	return lib, nil
}

// packageDir is this package's source directory: from the compiled-in file
// name, or, in a binary built with -trimpath, searched upwards from the
// working directory.
func packageDir() (string, error) {
	if _, file, _, ok := runtime.Caller(0); ok && filepath.IsAbs(file) {
		return filepath.Dir(file), nil
	}
	wd, err := os.Getwd()
	if err != nil {
		return "", fmt.Errorf("faultmod: %w", err)
	}
	for d := wd; ; d = filepath.Dir(d) {
		cand := filepath.Join(d, "tests", "faultmod")
		if _, err := os.Stat(filepath.Join(cand, "csrc", "faultmod.c")); err == nil {
			return cand, nil
		}
		if filepath.Dir(d) == d {
			return "", fmt.Errorf("faultmod: cannot find tests/faultmod above %s; set FAULTMOD_LIB", wd)
		}
	}
}

// Env is the environment a process that loads the module needs: the
// control socket path, and the number of slots (slots <= 0: the default, 4).
func Env(socket string, slots int) []string {
	env := []string{"FAULTMOD_CONTROL=" + socket}
	if slots > 0 {
		env = append(env, "FAULTMOD_SLOTS="+strconv.Itoa(slots))
	}
	return env
}

// Token is a token present from the start (TokensEnv).
type Token struct {
	Slot          uint
	Label, Serial string
}

// TokensEnv is the FAULTMOD_TOKENS environment entry that has the module
// start with tokens in their slots, as if they were inserted before the
// process started: no events, present at the first C_GetSlotList. Without it
// every slot starts empty.
func TokensEnv(tokens ...Token) string {
	parts := make([]string, len(tokens))
	for i, t := range tokens {
		parts[i] = fmt.Sprintf("%d %s %s", t.Slot, encodeWord(t.Label), encodeWord(t.Serial))
	}
	return "FAULTMOD_TOKENS=" + strings.Join(parts, ";")
}
