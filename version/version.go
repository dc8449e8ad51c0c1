// Package version is slotwatch's version, kept in one place: the file
// VERSION next to this one. The binary's --version, the Manager's Version
// property, the PKCS#11 face's library version and the Debian package
// (make deb reads the same file) all come from it.
package version

import (
	_ "embed"
	"strings"
)

//go:embed VERSION
var raw string

// Version is slotwatch's version, as in VERSION: "MAJOR.MINOR.PATCH".
var Version = strings.TrimSpace(raw)
