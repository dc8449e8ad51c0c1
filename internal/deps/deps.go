//go:build tools

// Package deps pins the dependencies that DESIGN.md names but no package
// imports yet (coreos/go-systemd for sd_notify in `slotwatch serve`), so
// that go mod tidy keeps them. It is never built (the tools tag); delete an
// import here once real code uses it.
package deps

import (
	_ "github.com/coreos/go-systemd/v22/daemon"
	_ "github.com/godbus/dbus/v5"
)
