module github.com/slotwatch/slotwatch

go 1.26

require (
	github.com/coreos/go-systemd/v22 v22.7.0
	github.com/ebfe/scard v0.0.0-20241214075232-7af069cabc25
	github.com/godbus/dbus/v5 v5.2.4
	github.com/miekg/pkcs11 v1.1.2
	github.com/spf13/cobra v1.10.2
	github.com/spf13/pflag v1.0.9
)

require (
	github.com/cpuguy83/go-md2man/v2 v2.0.6 // indirect
	github.com/inconshreveable/mousetrap v1.1.0 // indirect
	github.com/russross/blackfriday/v2 v2.1.0 // indirect
	golang.org/x/sys v0.27.0 // indirect
)

tool github.com/cpuguy83/go-md2man/v2
