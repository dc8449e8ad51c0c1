// Package dbusapi will own slotwatch's D-Bus objects: the Manager, Module,
// Reader, Slot, Token and Session interfaces of DESIGN.md's contract, the
// ObjectManager at the root, properties with PropertiesChanged, the
// TokenInserted/TokenRemoved signals, caller tracking, and the one table
// that maps every internal error to a D-Bus error name.
//
// It reads monitor snapshots and events only; it holds a token's generation
// (monitor.Acquire) for the duration of each call into module/. It is built
// with the D-Bus service milestone.
package dbusapi
