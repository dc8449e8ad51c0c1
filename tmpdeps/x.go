// Package tmpdeps keeps go.mod's dependencies until code uses them all. Remove it then.
package tmpdeps

import (
	_ "github.com/coreos/go-systemd/v22/daemon"
	_ "github.com/ebfe/scard"
	_ "github.com/godbus/dbus/v5"
	_ "github.com/miekg/pkcs11"
)
