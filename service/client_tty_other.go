//go:build !linux

package main

// echoOff is not available here: a PIN typed on a terminal is echoed.
func echoOff(fd uintptr) (restore func(), ok bool) { return nil, false }
