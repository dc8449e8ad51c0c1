// Package p11kitpath finds p11-kit's PKCS#11 module directory on this machine.
package p11kitpath

import (
	"os"
	"path/filepath"
	"runtime"
)

// Where p11-kit's PKCS#11 modules live on this machine: p11-kit's module
// directory (its p11_module_path, LIBDIR/pkcs11) is where it resolves a
// relative "module:" value and where p11-kit-client.so is installed. It
// differs between distributions and, on Debian and its derivatives,
// between architectures (multiarch: /usr/lib/x86_64-linux-gnu/pkcs11 on
// amd64, /usr/lib/aarch64-linux-gnu/pkcs11 on arm64, ...). slotwatch
// finds it at run time from its own architecture, without pkg-config.

// multiarch maps a GOARCH to Debian's multiarch tuples for it on Linux,
// most likely first, and says whether it is a 64-bit architecture (where
// Fedora-style systems use /usr/lib64).
var multiarch = map[string]struct {
	triplets []string
	lib64    bool
}{
	"amd64":    {[]string{"x86_64-linux-gnu"}, true},
	"arm64":    {[]string{"aarch64-linux-gnu"}, true},
	"386":      {[]string{"i386-linux-gnu"}, false},
	"arm":      {[]string{"arm-linux-gnueabihf", "arm-linux-gnueabi"}, false},
	"ppc64le":  {[]string{"powerpc64le-linux-gnu"}, true},
	"ppc64":    {[]string{"powerpc64-linux-gnu"}, true},
	"s390x":    {[]string{"s390x-linux-gnu"}, true},
	"riscv64":  {[]string{"riscv64-linux-gnu"}, true},
	"mips64le": {[]string{"mips64el-linux-gnuabi64"}, true},
	"mips64":   {[]string{"mips64-linux-gnuabi64"}, true},
	"mipsle":   {[]string{"mipsel-linux-gnu"}, false},
	"mips":     {[]string{"mips-linux-gnu"}, false},
	"loong64":  {[]string{"loongarch64-linux-gnu"}, true},
}

// MultiarchTriplet returns Debian's multiarch tuple for goarch (a
// runtime.GOARCH value) on Linux, such as "x86_64-linux-gnu" for "amd64"
// or "arm-linux-gnueabihf" for "arm"; "" for an architecture it does not
// know.
func MultiarchTriplet(goarch string) string {
	if a, ok := multiarch[goarch]; ok {
		return a.triplets[0]
	}
	return ""
}

// ModuleDirs returns the directories that may be p11-kit's module
// directory for a process of architecture goarch, most specific first:
// /usr/lib/TRIPLET/pkcs11 for each Debian multiarch tuple of goarch, then
// /usr/lib64/pkcs11 (Fedora, openSUSE; only for 64-bit architectures, or
// when goarch is unknown), then /usr/lib/pkcs11 (Arch, Alpine, p11-kit's
// own default).
func ModuleDirs(goarch string) []string {
	a, known := multiarch[goarch]
	var dirs []string
	for _, t := range a.triplets {
		dirs = append(dirs, filepath.Join("/usr/lib", t, "pkcs11"))
	}
	if a.lib64 || !known {
		dirs = append(dirs, "/usr/lib64/pkcs11")
	}
	return append(dirs, "/usr/lib/pkcs11")
}

// FindModuleDir returns the first of ModuleDirs(goarch) for
// which isDir reports true; when none does, the first of them (where the
// modules would be on Debian, or /usr/lib64/pkcs11 for an unknown
// architecture), so that messages about missing modules name a path.
func FindModuleDir(goarch string, isDir func(path string) bool) string {
	dirs := ModuleDirs(goarch)
	for _, d := range dirs {
		if isDir(d) {
			return d
		}
	}
	return dirs[0]
}

// ModuleDir is p11-kit's module directory on this machine:
// FindModuleDir for runtime.GOARCH and the real file system.
func ModuleDir() string {
	return FindModuleDir(runtime.GOARCH, multiarchIsDir)
}

func multiarchIsDir(path string) bool {
	fi, err := os.Stat(path)
	return err == nil && fi.IsDir()
}
